"""Run once per test session under `torchrun --nproc-per-node 2` by the `torchrun_scenarios` fixture (tests/conftest.py;
not collected by pytest):

    torchrun_scenarios.py OUT_ROOT TESTS_DIR

Every two-process scenario of test_trainer.py and test_janus.py, one after another in one launch, each writing into
OUT_ROOT/<scenario>/ what its test then checks. One launch instead of eight: a launch costs ~5 CPU-s (torchrun and two
workers importing torch, the trainer and torch.distributed.checkpoint) before its first step, which was most of what
these tests cost. The scenarios share the process group; each builds its own trainers from fixed seeds and restores
whatever it patched. A scenario that raises ends the launch (torchrun stops the other rank), and every test that reads
the launch fails with its traceback. (The hung-rank test keeps a launch of its own: that job must fail.)
"""
import contextlib
import errno
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import mmr1.grpo as grpo_module
import mmr1.sharded_checkpoint as sc
from mmr1.distributed import finish_distributed, init_distributed
from mmr1.grpo import GRPOTrainer
from mmr1.preemption import Preempted

sys.path.insert(0, sys.argv[2])
from test_trainer import (FMT, PROMPTS, VOCAB, distributed_cfg, grpo_cfg, half_constant_rewards,  # noqa: E402
                          reward_set, tiny_model)


def full(t):
    """An FSDP2 shard's whole tensor (a plain tensor as it is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def equals_single_process(out: Path, rank: int, parallel: str) -> None:
    """2 GRPO steps with PARALLEL, checkpoint; a fresh trainer (other init weights) resumes for 2 more and saves
    out/final. Rank 0 writes the 4 steps' metrics (history.json) and whether the frozen reference is sharded."""
    tr = GRPOTrainer(tiny_model(11), VOCAB, FMT, reward_set(), PROMPTS, distributed_cfg(), parallel=parallel)
    history = tr.train(2, progress=False)
    tr.save(out / "ckpt")
    dist.barrier()  # rank 0 has written before anyone reads
    resumed = GRPOTrainer(tiny_model(123), VOCAB, FMT, reward_set(), PROMPTS, distributed_cfg(), parallel=parallel,
                          ref_model=tiny_model(11).requires_grad_(False))
    resumed.load(out / "ckpt")
    history += resumed.train(2, progress=False)
    resumed.save(out / "final")
    if rank == 0:
        (out / "history.json").write_text(json.dumps(history))
        # under FSDP2 the frozen reference model is sharded too: each rank holds half of every block's weights
        ref_weight = next(resumed.ref.model.layers[0].parameters())
        (out / "ref_sharded.json").write_text(json.dumps(hasattr(ref_weight, "to_local")
                                                         and ref_weight.to_local().numel() * 2 == ref_weight.numel()))


def gather_count(out: Path, rank: int) -> None:
    """FSDP2's all-gathers during one GRPO step, with the policy kept whole for the rollout (the trainer's default)
    and without (every block re-gathered at every decode step); rank 0 writes {"whole": n, "per_step": m,
    "same_step": bool} (both steps log the same loss, gradient norm and reward)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as PG

    calls = {"n": 0}
    original = PG.foreach_all_gather

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    PG.foreach_all_gather = counting
    try:
        cfg = grpo_cfg(prompts_per_step=2, beta=0.0)
        res, history = {}, {}
        for mode in ("whole", "per_step"):
            tr = GRPOTrainer(tiny_model(11), VOCAB, FMT, reward_set(), PROMPTS, cfg, parallel="fsdp")
            if mode == "per_step":  # the policy re-sharded after every forward, as FSDP2 does by default
                tr._whole_policy_for_rollouts = contextlib.nullcontext
            calls["n"] = 0
            history[mode] = tr.step().metrics
            res[mode] = calls["n"]
    finally:
        PG.foreach_all_gather = original
    res["same_step"] = all(history["whole"][k] == history["per_step"][k] for k in ("loss", "grad_norm", "reward/codes"))
    if rank == 0:
        (out / "count.json").write_text(json.dumps(res))


def dynamic_sampling(out: Path, rank: int) -> None:
    """Two DDP steps with dynamic sampling over prompts of which half never have reward spread; every rank writes
    the metrics it logged to rank<r>.json."""
    tr = GRPOTrainer(tiny_model(7), VOCAB, FMT, half_constant_rewards(), PROMPTS,
                     grpo_cfg(dynamic_sampling=True, dynamic_sampling_rounds=8, prompts_per_step=4), parallel="ddp")
    (out / f"rank{rank}.json").write_text(json.dumps(tr.train(2, progress=False)))


def nonfinite(out: Path, rank: int) -> None:
    """Three DDP steps, rank 1's loss at step 1 made NaN; then a disk-full error on rank 1 while writing a
    checkpoint. Every rank writes its metrics, a sum of its weights after each step, the write error it saw, the
    latest checkpoint and any partial directory to rank<r>.json."""
    tr = GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(prompts_per_step=2), parallel="ddp")
    real = tr.loss

    def loss(*a, **k):
        value, m = real(*a, **k)
        return (value * float("nan"), m) if rank == 1 and tr.step_idx == 1 else (value, m)

    tr.loss = loss
    res = {"metrics": [], "weights": []}
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["metrics"].append(tr.step().metrics)
        res["weights"].append(sum(float(p.detach().double().sum()) for p in tr.policy.parameters()))
    root = out / "ckpt"
    tr.save(root)
    real_rng = sc._rng_state
    if rank == 1:
        def full_disk():
            raise OSError(errno.ENOSPC, "No space left on device")
        sc._rng_state = full_disk
    tr.step_idx += 1  # another step's checkpoint
    try:
        tr.save(root)
        res["write_error"] = None
    except sc.CheckpointWriteError as err:
        res["write_error"] = str(err)
    finally:
        sc._rng_state = real_rng
    res["latest"] = sc.latest_checkpoint(root).name
    res["partial_dirs"] = sorted(p.name for p in root.glob(".step-*"))
    (out / f"rank{rank}.json").write_text(json.dumps(res))


def preempt(out: Path, rank: int, parallel: str) -> None:
    """A reference run of 4 GRPO steps; then, for each phase (the rollout or the update of the second step, the
    checkpoint save after the first), a run in which rank 0 alone receives a real SIGTERM there -- both ranks must
    stop at the next step boundary with that step's checkpoint written -- and a fresh trainer that resumes from it
    to step 4. Rank 0 writes what it saw to result.json (the final weights and AdamW state compared with the
    reference run's on every rank)."""
    def trainer():
        return GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(steps=4), parallel=parallel)

    def state(tr):
        params = {n: full(p.detach()).clone() for n, p in tr.policy.named_parameters()}
        adam = {n: full(tr.optimizer.state[p]["exp_avg"]).clone() for n, p in tr.policy.named_parameters()}
        return params, adam

    ref = trainer()
    ref.train(progress=False)
    want = state(ref)
    result = {}
    for phase in ("rollout", "update", "save"):
        ckpt = out / f"ckpt-{phase}"
        tr = trainer()
        fired = []

        def kill_once(tr=tr, fired=fired):
            if rank == 0 and tr.step_idx == 1 and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGTERM)

        if phase == "rollout":
            def rollout(*a, real=tr.rollout_fn):
                kill_once()
                return real(*a)
            tr.rollout_fn = rollout
        elif phase == "update":
            def loss(*a, real=tr.loss, **k):
                kill_once()
                return real(*a, **k)
            tr.loss = loss
        real_save = grpo_module.save_sharded
        if phase == "save":  # during the checkpoint written after step 1 (checkpoint_every=1): tr.step_idx is 1 then
            def save(*a, **k):
                kill_once()
                return real_save(*a, **k)
            grpo_module.save_sharded = save
        try:
            tr.train(progress=False, checkpoint_dir=str(ckpt), checkpoint_every=1 if phase == "save" else 0,
                     handle_signals=True)
            stopped = None
        except Preempted as p:
            stopped = (p.step, p.signum, p.checkpoint)
        finally:
            grpo_module.save_sharded = real_save
        resumed = trainer()
        resumed.load(ckpt)
        at = resumed.step_idx
        resumed.train(progress=False)
        got = state(resumed)
        same = all(torch.equal(got[0][n], want[0][n]) and torch.equal(got[1][n], want[1][n]) for n in want[0])
        result[phase] = {"stopped": stopped, "resumed_at": at, "same_as_uninterrupted": same}
        dist.barrier()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


def janus(out: Path, rank: int) -> None:
    """Janus under DDP and then FSDP2: 2 GRPO steps each (mu 2, micro-batches of one group, activation
    checkpointing, the guided CFG loss) from the same initial weights; rank 0 writes each mode's logged metrics and
    full final weights to <mode>.pt."""
    from test_janus import janus_distributed_trainer

    for parallel in ("ddp", "fsdp"):
        tr = janus_distributed_trainer(parallel)
        history = tr.train(2, progress=False)
        weights = {n: full(p).detach().clone() for n, p in tr.policy.named_parameters()}
        if rank == 0:
            torch.save({"history": history, "weights": weights}, out / f"{parallel}.pt")


def janus_sft(out: Path, rank: int) -> None:
    """SFT on Janus under DDP: each rank takes its half of the 4 sequences of test_janus.janus_sft_batch (text and
    codes, of different lengths), 2 steps; rank 0 writes the logged metrics and final weights to sft.pt."""
    from test_janus import janus_sft_batch, tiny_janus

    from mmr1.sft import SFTConfig, SFTTrainer

    seqs, plens = janus_sft_batch()
    tr = SFTTrainer(tiny_janus(4), SFTConfig(lr=1e-2), parallel="ddp")
    history = [tr.step(seqs[rank::2], plens[rank::2]) for _ in range(2)]
    if rank == 0:
        torch.save({"history": history, "weights": {n: p.detach().clone() for n, p in tr.model.named_parameters()}},
                   out / "sft.pt")


SCENARIOS = {
    "ddp": lambda out, rank: equals_single_process(out, rank, "ddp"),
    "fsdp": lambda out, rank: equals_single_process(out, rank, "fsdp"),
    "gather_count": gather_count,
    "dynamic_sampling": dynamic_sampling,
    "nonfinite": nonfinite,
    "preempt_ddp": lambda out, rank: preempt(out, rank, "ddp"),
    "preempt_fsdp": lambda out, rank: preempt(out, rank, "fsdp"),
    "janus": janus,
    "janus_sft": janus_sft,
}


def main() -> None:
    torch.set_num_threads(1)
    rank, _ = init_distributed()
    root = Path(sys.argv[1])
    for name, run in SCENARIOS.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"[rank {rank}] scenario {name}", file=sys.stderr, flush=True)
        run(out, rank)
        dist.barrier()
        if rank == 0:
            (out / "done").write_text("ok")
    finish_distributed()


if __name__ == "__main__":
    main()
