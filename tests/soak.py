"""Soak: a 2-process GRPO job (``torchrun --nproc-per-node 2 -m mmr1.cli grpo``, FSDP2, tiny local checkpoints) run to
the end through random interruptions, compared with the same job run without any.

    python tests/soak.py [--kills 20] [--steps 40] [--seed 0] [--parallel fsdp] [--out DIR]

Each launch of the job is interrupted at a random moment (after a random number of logged steps, plus a random
fraction of a step: during a rollout, an update, a checkpoint write or the start-up) by one of

- ``sigkill-rank``: SIGKILL to one worker (a lost process; torchrun stops the other);
- ``sigkill-all``: SIGKILL to the launcher and both workers (a lost node);
- ``sigkill-launcher``: SIGKILL to torchrun alone (``kill -9``, an OOM kill; torchrun's workers live in sessions of
  their own and would train on, orphaned, beside the rerun: mmr1.distributed makes them stop at the next step);
- ``sigterm-rank``: SIGTERM to one worker (a preemption notice that reached one process);
- ``sigterm-all``: SIGTERM to the launcher and both workers at once (what SLURM does to a job step; torchrun also
  forwards its own copy to the workers);

and between launches, with probability ``--corrupt``, one byte of a random file of the newest checkpoint is flipped
(never the only checkpoint: with nothing to fall back to, the run stops with an error naming the file, as it
should). The same command is then run again, until the job finishes. At the end the final weights and AdamW state
must equal the uninterrupted run's, bit for bit, and every corruption must have been detected (a "did not verify"
warning naming the file). Steps lost per kill = steps the killed launch had logged minus the step its rerun resumed
from (SIGTERM must lose none; SIGKILL loses at most the steps since the last checkpoint, --checkpoint-every 2).

tests/test_soak.py runs a short fixed schedule of this in ``make test``; run this file for the long one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ACTIONS = ("sigkill-rank", "sigkill-all", "sigkill-launcher", "sigterm-rank", "sigterm-all")
CHECKPOINT_EVERY = 2


def build_job(root: Path, steps: int, parallel: str = "fsdp") -> List[str]:
    """Tiny local checkpoints (a transformers Chameleon, a VQGAN, a CLIP) and DreamBench prompts under ``root``;
    returns the ``mmr1.cli`` arguments of the GRPO job, without --out-dir."""
    from test_recipe import DREAMBENCH, make_chameleon, make_tokenizer, make_vq
    from test_trainer import _tiny_clip

    from mmr1.cli import main as cli

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(root / "tok")
    model = make_chameleon(root / "chameleon", len(json.loads(tok.read_text())["model"]["vocab"]))
    vq = make_vq(root / "vq")
    clip = _tiny_clip(root)
    prompts = root / "prompts.jsonl"
    cli(["convert-dreambench", str(DREAMBENCH), str(prompts), "--prompts-per-subject", "1"])
    return ["grpo", "--model", str(model), "--vqgan", str(vq), "--vq-config", str(vq.parent / "vq_config.json"),
            "--tokenizer", str(tok), "--resize", "--cache-dir", str(root / "cache"), "--prompts", str(prompts),
            "--clip", str(clip), "--rewards", "format=0.5,clip_t=1", "--group-size", "2", "--prompts-per-step", "2",
            "--max-reasoning-tokens", "4", "--lr", "1e-3", "--beta", "0.04", "--mu", "2", "--cfg-scale", "2.0",
            "--sample-every", "0", "--steps", str(steps), "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--keep-last", "3", "--parallel", parallel]


def torchrun_command(*args: str) -> List[str]:
    """``torchrun --nproc-per-node 2 ... ARGS`` on a free local port (back-to-back and concurrent launches of the
    suite must not collide at the rendezvous) -- every two-process launch of the tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), *args]


def launch(job: List[str], out_dir: Path, log) -> subprocess.Popen:
    """torchrun with 2 workers in a new session (its own process group, so a whole-job signal reaches only it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(torchrun_command("-m", "mmr1.cli", *job, "--out-dir", str(out_dir)),
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _workers(launcher: subprocess.Popen) -> Dict[int, int]:
    """{rank: pid} of the launcher's worker processes (RANK from each child's environment)."""
    found = {}
    try:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    except OSError:
        return found
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                found[int(kv[5:])] = pid
    return found


def logged_steps(out_dir: Path) -> List[int]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def checkpoint_step(out_dir: Path) -> int:
    """The step of the newest checkpoint that verifies -- what a rerun resumes from (0 when there is none)."""
    import warnings

    from mmr1.sharded_checkpoint import CorruptCheckpoint, verify_checkpoint

    root = out_dir / "checkpoints"
    for path in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.exists() else []:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verify_checkpoint(path)
        except CorruptCheckpoint:
            continue
        return json.loads((path / "meta.json").read_text())["step"]
    return 0


def corrupt_newest(out_dir: Path, rng: random.Random) -> Optional[str]:
    """Flip one byte of a random file of the newest checkpoint, when an older one exists to fall back to."""
    root = out_dir / "checkpoints"
    steps = sorted(p for p in root.glob("step-*") if p.is_dir()) if root.exists() else []
    if len(steps) < 2:
        return None
    files = sorted(p for p in (root / (root / "latest").read_text().strip()).iterdir()
                   if p.is_file() and p.name != "manifest.json")
    victim = rng.choice(files)
    data = bytearray(victim.read_bytes())
    if not data:
        return None
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    victim.write_bytes(bytes(data))
    return f"{victim.parent.name}/{victim.name}@{at}"


@dataclass
class Interruption:
    action: str
    after_steps: int  # the launch's logged steps (counted from where it resumed) before the signal
    delay_s: float
    sent: bool = False  # False: the launch finished before the moment came
    exit_code: Optional[int] = None
    last_logged: Optional[int] = None  # steps done when the launch ended (its last logged step + 1)
    resumed_from: Optional[int] = None  # the published checkpoint's step after it ended
    steps_lost: Optional[int] = None  # finished steps not in that checkpoint
    preempted: bool = False  # the workers reported a preemption stop (a step boundary, a checkpoint)
    corrupted: Optional[str] = None
    corruption_detected: Optional[bool] = None


@dataclass
class SoakReport:
    steps: int
    launches: int = 0
    interruptions: List[Interruption] = field(default_factory=list)
    same_as_uninterrupted: Optional[bool] = None
    seconds: float = 0.0

    def summary(self) -> Dict:
        sent = [i for i in self.interruptions if i.sent]
        lost = {a: [i.steps_lost for i in sent if i.action == a] for a in ACTIONS}
        corrupted = [i for i in self.interruptions if i.corrupted]
        return {"launches": self.launches, "kills survived": len(sent),
                "by action": {a: len(v) for a, v in lost.items()},
                "steps lost per kill (max)": {a: max(v) if v else None for a, v in lost.items()},
                "corruptions": len(corrupted),
                "corruptions detected": sum(bool(i.corruption_detected) for i in corrupted),
                "final weights == uninterrupted": self.same_as_uninterrupted, "seconds": round(self.seconds)}


def _wait(proc: subprocess.Popen, workers: Dict[int, int], timeout: float) -> int:
    """The launcher's exit status, once it and every worker have exited (a hang past ``timeout`` is an error)."""
    deadline = time.monotonic() + timeout
    try:
        rc = proc.wait(timeout=timeout)
        while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers.values()):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            time.sleep(0.05)
        return rc
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *workers.values()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        raise RuntimeError(f"a launch did not end within {timeout:.0f} s of its interruption (a hang)")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def interrupted_launch(job: List[str], out_dir: Path, plan: Interruption, log_path: Path,
                       step_seconds: float, startup_seconds: float = 3.0) -> Interruption:
    """One launch of the job, interrupted as ``plan`` says (unless it ends first)."""
    start, resumed = len(logged_steps(out_dir)), checkpoint_step(out_dir)
    mark = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as log:
        log.write(f"\n=== launch: {plan.action} after {plan.after_steps} steps + {plan.delay_s:.2f} of a step\n")
        log.flush()
        proc = launch(job, out_dir, log)
        deadline = time.monotonic() + 600
        # after_steps == 0: during the start-up (the workers exist; loading models and the checkpoint)
        while proc.poll() is None and (len(logged_steps(out_dir)) - start < plan.after_steps
                                       or len(_workers(proc)) < 2):
            if time.monotonic() > deadline:
                raise RuntimeError("a launch logged no step for 600 s")
            time.sleep(0.05)
        time.sleep(plan.delay_s * (step_seconds if plan.after_steps else startup_seconds))
        workers = _workers(proc)
        if proc.poll() is None and len(workers) == 2:
            plan.sent = True
            victim = random.Random(plan.after_steps).choice(sorted(workers))
            sig = signal.SIGKILL if plan.action.startswith("sigkill") else signal.SIGTERM
            targets = {"rank": [workers[victim]], "launcher": [proc.pid],
                       "all": [proc.pid, *workers.values()]}[plan.action.split("-")[1]]
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        plan.exit_code = _wait(proc, workers, 180)
    mine = logged_steps(out_dir)[start:]
    plan.last_logged = mine[-1] + 1 if mine else resumed
    plan.resumed_from = checkpoint_step(out_dir)  # what the next launch resumes from (before any corruption)
    plan.steps_lost = plan.last_logged - plan.resumed_from
    with open(log_path) as f:
        f.seek(mark)
        plan.preempted = "preempted by SIG" in f.read()
    return plan


def run_soak(job: List[str], work: Path, steps: int, schedule: List[Tuple[str, int, float, bool]],
             seed: int = 0, say=print) -> SoakReport:
    """Run the job once uninterrupted (``work/reference``), then through ``schedule`` -- (action, logged steps
    before the signal, then a delay as a fraction of a step, corrupt before the rerun) per launch -- and plain
    reruns to the end (``work/soak``). Returns the report; raises AssertionError when a rule is broken (a SIGTERM
    that lost a step, a launch that failed without being interrupted)."""
    rng = random.Random(seed)
    report = SoakReport(steps=steps)
    t0 = time.perf_counter()
    ref, soak, log = work / "reference", work / "soak", work / "soak.log"
    with open(work / "reference.log", "w") as f:
        t_ref = time.perf_counter()
        rc = launch(job, ref, f).wait()
    assert rc == 0, (work / "reference.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    step_seconds = sorted(r["time/rollout_s"] + r["time/train_s"] for r in rows)[len(rows) // 2]
    startup_seconds = max(1.0, time.perf_counter() - t_ref - steps * step_seconds)
    say(f"reference: {steps} steps uninterrupted in {time.perf_counter() - t_ref:.0f} s "
        f"(start-up ~{startup_seconds:.0f} s, steps {step_seconds:.2f} s each)")
    corrupted: Optional[Interruption] = None
    for action, after, delay, corrupt in schedule:
        if checkpoint_step(soak) >= steps:
            break
        mark = log.stat().st_size if log.exists() else 0
        plan = interrupted_launch(job, soak, Interruption(action, after, delay), log, step_seconds, startup_seconds)
        report.launches += 1
        _detected(corrupted, log, mark)
        corrupted = None
        assert plan.sent or plan.exit_code == 0, f"a launch failed without being interrupted: {plan}"
        if plan.sent and plan.action.startswith("sigterm"):
            assert plan.steps_lost == 0, f"a SIGTERM lost {plan.steps_lost} finished step(s): {plan}"
        if corrupt and checkpoint_step(soak) < steps:  # (a finished job's final checkpoint is left alone)
            plan.corrupted = corrupt_newest(soak, rng)
            corrupted = plan if plan.corrupted else None
        report.interruptions.append(plan)
        say(f"launch {report.launches}: {plan.action} after {plan.after_steps} steps -> exit {plan.exit_code}, "
            f"{plan.last_logged} steps done, checkpoint at {plan.resumed_from}"
            + (f", corrupted {plan.corrupted}" if plan.corrupted else ""))
    while checkpoint_step(soak) < steps:
        mark = log.stat().st_size if log.exists() else 0
        with open(log, "a") as f:
            f.write("\n=== launch: to the end\n")
            f.flush()
            rc = launch(job, soak, f).wait()
        report.launches += 1
        _detected(corrupted, log, mark)
        corrupted = None
        assert rc == 0, log.read_text()[-3000:]
    report.same_as_uninterrupted = same_state(ref / "checkpoints", soak / "checkpoints", job)
    report.seconds = time.perf_counter() - t0
    return report


def _detected(plan: Optional[Interruption], log: Path, mark: int) -> None:
    """Whether the launch that followed a corruption (its output: the log from ``mark`` on) reported the corrupt
    checkpoint by name before falling back."""
    if plan is None:
        return
    with open(log) as f:
        f.seek(mark)
        text = f.read()
    step_dir = plan.corrupted.split("/")[0]
    plan.corruption_detected = "did not verify" in text and step_dir in text


def same_state(a: Path, b: Path, job: List[str]) -> bool:
    """Weights and AdamW state of the two checkpoints, read into one process, bit for bit."""
    from mmr1.model import load_model
    from mmr1.sharded_checkpoint import load_sharded

    model_dir = job[job.index("--model") + 1]
    states = []
    for root in (a, b):
        model = load_model(model_dir)
        opt = torch.optim.AdamW(model.parameters())
        info = load_sharded(root, model, opt, restore_rng=False)
        states.append((info["step"], model.state_dict(),
                       {n: {k: v for k, v in opt.state[p].items()} for n, p in model.named_parameters()}))
    (sa, wa, oa), (sb, wb, ob) = states
    return sa == sb and all(torch.equal(wa[k], wb[k]) for k in wa) and \
        all(torch.equal(oa[n][k], ob[n][k]) for n in oa for k in oa[n])


def random_schedule(kills: int, steps: int, rng: random.Random, corrupt: float) -> List[Tuple[str, int, float, bool]]:
    """Each launch: a random action after 0-2 logged steps and a random fraction of the next one (0 steps: a
    random moment of the start-up)."""
    return [(rng.choice(ACTIONS), rng.randrange(0, 3), rng.random(), rng.random() < corrupt) for _ in range(kills)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="interrupted launches (default 20)")
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps of the job (default 40)")
    ap.add_argument("--corrupt", type=float, default=0.3, help="probability of a flipped byte after a kill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default="fsdp")
    ap.add_argument("--out", default="runs/soak", help="work directory (emptied first)")
    args = ap.parse_args(argv)
    import shutil

    work = Path(args.out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    job = build_job(work / "parts", args.steps, args.parallel)
    report = run_soak(job, work, args.steps, random_schedule(args.kills, args.steps, rng, args.corrupt), args.seed)
    (work / "report.json").write_text(json.dumps({"summary": report.summary(),
                                                   "interruptions": [asdict(i) for i in report.interruptions]},
                                                  indent=1))
    print(json.dumps(report.summary(), indent=1))
    ok = report.same_as_uninterrupted and all(i.corruption_detected for i in report.interruptions if i.corrupted)
    print("soak: " + ("PASSED" if ok else "FAILED") + f" (details in {work / 'report.json'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
