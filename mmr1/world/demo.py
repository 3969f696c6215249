"""The embedded default: MM-R1 end to end on the synthetic world, on a CPU, in minutes.

    python -m mmr1.world.demo            (or: make demo)

1. the world: 1056 procedural subjects, one- and two-subject (PSR-style) scenes, an exact tile VQ tokenizer and a
   tokenizer with Chameleon's id layout (mmr1.world)
2. the cold start: SFT of a tiny Chameleon-architecture model on X-CoT examples (and on the understanding direction,
   image -> prompt, which the dual self-reward reads) -- shipped in mmr1/assets/demo, or trained here
3. evaluation on held-out subjects: does the reasoning name the subject, does the subject image show it, does the
   final image show it (and where it was asked), per attribute and whole, mean +- 95% CI, one and two subjects
4. GRPO with the identity reward (classification-based; PSR's pairwise consistency for pairs), the layout reward,
   format and the dual self-reward (mmr1.grpo, fused kernels), then evaluation again
5. rollout and training throughput of the fused kernels vs the reference path (the same GRPO steps with
   backend="reference": full-vocab logits and the PyTorch specs)
6. a PNG grid (references | subject image | final image, before and after, each row's reasoning and identity
   marks) and a reward / identity curve
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..generate import SamplingConfig
from ..grpo import GRPOConfig, GRPOTrainer
from ..metrics_log import MetricsLog
from ..model import ModelConfig, Transformer, init_weights, load_transformer, save_transformer
from ..sft import SFTConfig, SFTTrainer
from .identity import IdentityJudge
from .pipeline import DataFlaws
from .scene import WORLD_VERSION, subject_view
from .tasks import (TaskMix, evaluate, make_prompts, sft_batch, split_subjects, world_rewards, xcot_format)
from .tokens import WorldTokens, load_world, save_world
from .vq import PatchVQ


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    sft_steps: int = 5000
    sft_batch: int = 16
    sft_lr: float = 2e-3
    grpo_steps: int = 32
    group_size: int = 4
    prompts_per_step: int = 8
    grpo_lr: float = 5e-5
    pair_frac: float = 0.25  # two-subject (PSR-style) prompts among SFT examples and GRPO prompts
    describe_frac: float = 0.15  # understanding examples (image -> prompt) in the cold start
    reasoning_weight: float = 5.0  # SFT loss weight of the reasoning text tokens (image codes: 1)
    self_reward_weight: float = 0.2  # the generation-direction dual self-reward in GRPO (0 = off)
    consistency_weight: float = 0.0  # reasoning-image consistency reward in GRPO (X-CoT only; 0 = off)
    grpo_pair_frac: float = 0.5  # two-subject prompts among GRPO prompts (the one-subject split is at ceiling)
    # DAPO's dynamic sampling in GRPO: drop groups without reward spread, draw more prompts (mmr1.grpo); on the
    # flawed cold start 40 steps with it lifted held-out pairs 0.44 -> 0.77 where 80 plain steps reached 0.68
    # (README); 32 steps keep `make demo` within 8 minutes
    dynamic_sampling: bool = True
    dynamic_sampling_rounds: int = 3
    grpo_beta: float = 0.04
    # held-out identity during GRPO: every grpo_eval_every steps (and before the first), on a fixed small set of
    # held-out prompts (grpo_eval_prompts one- and as many two-subject prompts, other seeds than the final table's)
    grpo_eval_every: int = 8
    grpo_eval_prompts: int = 32
    eval_prompts: int = 200  # one-subject held-out prompts
    eval_pair_prompts: int = 100  # two-subject held-out prompts
    compare_steps: int = 2  # GRPO steps timed per backend for the fused-vs-reference throughput table
    # every rollout of the demo (GRPO, held-out evaluation, `mmr1 generate`): CFG 2 from the policy's own
    # distribution, image blocks by Jacobi windows -- the sequential tokens in fewer forwards (on this model W=8:
    # ~4x fewer, 1.3x less rollout time at the GRPO batch; python -m bench.jacobi)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0, decode="jacobi"))
    held_out_frac: float = 0.1
    # the cold-start data pipeline's errors (mmr1.world.pipeline): identity mixing, wrong sides and dropped patterns
    # in two-subject targets, wrong attribute words in reasoning captions; DataFlaws.clean() = perfect data
    flaws: DataFlaws = field(default_factory=DataFlaws)
    direct: bool = False  # the ablation's direct policy (no reasoning text, no subject image)
    use_shipped: bool = True  # load the shipped world + cold-start weights when they match this config


# The shipped cold start: the world (codebook + tokenizer) and the SFT weights that `make cold-start`
# (= `mmr1 sft --out-dir runs/cold_start` + copy) writes; the demo uses them when their manifest matches.
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "demo"
COLD_START_FIELDS = ("seed", "hidden", "layers", "heads", "sft_steps", "sft_batch", "sft_lr", "pair_frac",
                     "describe_frac", "reasoning_weight", "held_out_frac", "flaws", "direct")


def cold_start_key(cfg: DemoConfig) -> Dict:
    """What determines the cold-start model: the world version and the SFT settings (the data flaws included)."""
    return {"world_version": WORLD_VERSION,
            **{k: asdict(getattr(cfg, k)) if k == "flaws" else getattr(cfg, k) for k in COLD_START_FIELDS}}


def shipped_cold_start(cfg: DemoConfig, root: Path = SHIPPED) -> Optional[Path]:
    """The shipped asset directory if its manifest was made with this config, else None."""
    manifest = root / "manifest.json"
    if not cfg.use_shipped or not manifest.exists():
        return None
    made_with = json.loads(manifest.read_text())["config"]
    return root if made_with == json.loads(json.dumps(cold_start_key(cfg))) else None


def new_model(world: WorldTokens, cfg: DemoConfig) -> Transformer:
    mcfg = ModelConfig(vocab_size=world.text.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 8 // 3,
                       num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.heads, max_seq_len=512,
                       bos_id=world.bos, eos_id=world.end_of_turn)
    return init_weights(Transformer(mcfg), seed=cfg.seed)


def train_cold_start(world: WorldTokens, train_subjects, cfg: DemoConfig, log=lambda rec: None,
                     progress: bool = True, eval_every: int = 0, held_out=None) -> Transformer:
    """SFT from random init: warmup 50 steps, cosine decay, AdamW, batches from mmr1.world.tasks.sft_batch.
    With ``eval_every`` > 0, the identity metrics on (a small set of) held-out prompts are logged along the way."""
    model = new_model(world, cfg)
    tr = SFTTrainer(model, SFTConfig(lr=cfg.sft_lr, steps=cfg.sft_steps, batch_size=cfg.sft_batch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        tr.optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.sft_steps, 1.0))))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    flaw_g = torch.Generator().manual_seed(cfg.seed + 2)  # its own stream: the same tasks whatever the flaw rates
    mix = TaskMix(cfg.sft_batch, cfg.pair_frac, cfg.describe_frac, cfg.direct, cfg.reasoning_weight, cfg.flaws)
    from tqdm import tqdm

    bar = tqdm(range(cfg.sft_steps), desc=f"cold-start SFT ({'direct' if cfg.direct else 'X-CoT'})",
               disable=not progress)
    for step in bar:
        m = tr.step(*sft_batch(world, train_subjects, g, mix, flaw_g))
        sched.step()
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        if step % 50 == 0 or step == cfg.sft_steps - 1:
            log({"phase": "sft", "step": step, **m})
        if eval_every and held_out and ((step + 1) % eval_every == 0 or step + 1 == cfg.sft_steps):
            small = replace(cfg, eval_prompts=64, eval_pair_prompts=32)
            table, _, _ = evaluate(model, world, IdentityJudge(world.vq), xcot_format(world, cfg.direct),
                                   eval_prompts(world, held_out, small), seed=cfg.seed + 11, sampling=cfg.sampling)
            rec = {f"{split}/{k}": round(v[0], 3) for split, t in table.items() for k, v in t.items()
                   if k.endswith("/whole") or k == "layout"}
            log({"phase": "sft_eval", "step": step + 1, **rec})
            bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rec.items()))
            model.train()
    return model.eval()


def grpo_trainer(model: Transformer, world: WorldTokens, judge: IdentityJudge, cfg: DemoConfig, train_subjects,
                 log_path: Optional[str]) -> GRPOTrainer:
    fmt = xcot_format(world, cfg.direct)
    prompts = make_prompts(world, train_subjects, 512, seed=cfg.seed + 3, pair_frac=cfg.grpo_pair_frac)
    gcfg = GRPOConfig(group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step, steps=cfg.grpo_steps,
                      lr=cfg.grpo_lr, beta=cfg.grpo_beta, sampling=cfg.sampling, seed=cfg.seed,
                      log_path=log_path, skip_zero_signal_steps=True,
                      dynamic_sampling=cfg.dynamic_sampling, dynamic_sampling_rounds=cfg.dynamic_sampling_rounds)
    rewards = world_rewards(world, fmt, judge, model, cfg.self_reward_weight, cfg.consistency_weight)
    return GRPOTrainer(model, world.image, fmt, rewards, prompts, gcfg)


def held_out_monitor(world: WorldTokens, judge: IdentityJudge, fmt, held_out, cfg: DemoConfig):
    """eval_fn for GRPOTrainer.train: final-image identity on a fixed small set of held-out prompts (subjects never
    trained on; other prompts than the final table's), one and two subjects, one sample each as the evaluation."""
    prompts = (make_prompts(world, held_out, cfg.grpo_eval_prompts, seed=cfg.seed + 21)
               + make_prompts(world, held_out, cfg.grpo_eval_prompts, seed=cfg.seed + 22, pair_frac=1.0))

    def fn(trainer) -> Dict[str, float]:
        table, _, _ = evaluate(trainer.policy, world, judge, fmt, prompts, seed=cfg.seed + 23, sampling=cfg.sampling)
        return {f"held_out/{split.replace(' ', '_')}/final_whole": t["final/whole"][0] for split, t in table.items()}

    return fn


def eval_prompts(world: WorldTokens, held_out, cfg: DemoConfig) -> List[dict]:
    return (make_prompts(world, held_out, cfg.eval_prompts, seed=cfg.seed + 7)
            + make_prompts(world, held_out, cfg.eval_pair_prompts, seed=cfg.seed + 8, pair_frac=1.0))


# --------------------------------------------------------------------------- figures

def _mark(ok: bool) -> str:
    return "right" if ok else "WRONG"


def save_grid(path: Path, before, after, prompts: List[dict], world: WorldTokens, judge: IdentityJudge,
              rows: Sequence[int]) -> None:
    """references | subject image and final image after the cold start | the same after GRPO; under the subject
    images what the reasoning named, over each image whether it shows the right subject(s)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .vq import render

    has_subject = before.subject_codes is not None
    per = ["subject", "final"] if has_subject else ["final"]
    titles = ["reference(s)"] + [f"{w} ({when})" for when in ("SFT", "GRPO") for w in per]
    n = len(rows)
    fig, axes = plt.subplots(n, len(titles), figsize=(1.75 * len(titles), 2.35 * n), squeeze=False)
    for i, r in enumerate(rows):
        p = prompts[r]
        scene = p["scene"]
        refs = torch.cat([render(s) for s in p["reference_scenes"]], dim=1)  # two subjects: side by side
        images = [(refs, None, "")]
        for when, ro in (("SFT", before), ("GRPO", after)):
            said = ""
            if ro.reasoning and ro.reasoning[r]:  # what the reasoning says the subject is, under the first image
                said = world.text.decode(ro.reasoning[r][:-1]).split(";")[0].replace("subjects are ", "").replace(
                    "subject is ", "").strip()
            if has_subject:
                images.append((world.vq.decode(ro.subject_codes[r:r + 1])[0],
                               judge.judge_image(ro.subject_codes[r], subject_view(scene))["whole"] == 1.0, said))
                said = ""
            images.append((world.vq.decode(ro.final_codes[r:r + 1])[0],
                           judge.judge_image(ro.final_codes[r], scene)["whole"] == 1.0, said))
        for j, (img, ok, said) in enumerate(images):
            ax = axes[i, j]
            ax.imshow(img.numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            label = titles[j] if i == 0 else ""
            if ok is not None:
                label = (label + "\n" if label else "") + _mark(ok)
                for sp in ax.spines.values():
                    sp.set_edgecolor("tab:green" if ok else "tab:red")
                    sp.set_linewidth(2.5)
            ax.set_title(label, fontsize=7, color="black" if ok is None or ok else "tab:red")
            if said:
                ax.set_xlabel("\n".join(textwrap.wrap(f'"{said}"', 28)[:3]), fontsize=5.5)
        axes[i, 0].set_ylabel(scene.prompt().replace("my subject ", "").replace(" subject", "").replace(" and ", "\n"),
                              fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_choice(before, after, prompts: List[dict], judge: IdentityJudge, cfg: DemoConfig) -> List[int]:
    """The grid's rows: 2 one-subject prompts, then two-subject prompts -- up to 3 the cold start got wrong and GRPO
    fixed, 1 GRPO broke (right before, wrong after) if any, the rest wrong both times (what is still not done)."""
    one = list(range(min(cfg.eval_prompts, 2)))
    pairs = range(cfg.eval_prompts, cfg.eval_prompts + cfg.eval_pair_prompts)
    ok = lambda ro, r: judge.judge_image(ro.final_codes[r], prompts[r]["scene"])["whole"] == 1.0  # noqa: E731
    fixed = [r for r in pairs if not ok(before, r) and ok(after, r)][:3]
    broken = [r for r in pairs if ok(before, r) and not ok(after, r)][:1]
    still = [r for r in pairs if not ok(before, r) and not ok(after, r)][:6 - len(fixed) - len(broken)]
    return one + sorted(fixed + broken + still)


def save_curve(path: Path, history: List[Dict[str, float]], evals: Sequence[Dict[str, float]] = ()) -> None:
    """Training rollouts' rewards and final-image identity (moving averages) and, as markers, the held-out identity
    measured during GRPO (subjects never trained on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    k = 10
    for key, label in (("reward/identity", "identity reward (training rollouts)"),
                       ("identity/whole_frac", "final identity (training rollouts)"),
                       ("reward/layout", "layout reward"), ("reward/format", "format")):
        if key not in history[0]:
            continue
        ys = [h[key] for h in history]
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax.plot(range(1, len(ys) + 1), smooth, label=label, alpha=0.8)
    for key, label, marker in (("held_out/one_subject/final_whole", "held-out one subject", "o"),
                               ("held_out/two_subjects/final_whole", "held-out two subjects", "s")):
        pts = [(e["step"], e[key]) for e in evals if key in e]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="--", color="black",
                    markerfacecolor="white" if marker == "o" else "black", label=f"{label} (final identity)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"training: {k}-step moving average; held-out: markers")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- report

ROWS = (("text/whole", "reasoning names the subject(s)"), ("subject_image/whole", "subject image shows them"),
        ("final/whole", "final image shows them (right sides)"), ("final/shape", "  final: shape"),
        ("final/color", "  final: color"), ("final/pattern", "  final: pattern"),
        ("final/pattern_color", "  final: pattern color"), ("layout", "layout as asked"), ("format", "valid format"),
        ("flaw/mixing", "  failure: attributes mixed between subjects"), ("flaw/swapped", "  failure: subjects swapped"),
        ("flaw/dropped_pattern", "  failure: a pattern dropped"))


def identity_table(before: Dict, after: Optional[Dict], counts: Dict[str, int]) -> str:
    """The before/after identity table (text)."""
    lines = []
    for split in before:
        lines += [f"held-out subjects, {split} ({counts[split]} prompts; mean +- 95% CI)",
                  f"  {'':40s} {'cold start':>16s}" + (f" {'after GRPO':>16s}  {'':8s}" if after else "")]
        for key, label in ROWS:
            if key not in before[split]:
                continue
            b = before[split][key]
            line = f"  {label:40s} {b[0]:>8.3f} +- {b[1]:.3f}"
            if after:
                a = after[split][key]
                verdict = ("higher" if a[0] - a[1] > b[0] + b[1] else "lower" if a[0] + a[1] < b[0] - b[1]
                           else "within CIs")
                line += f" {a[0]:>8.3f} +- {a[1]:.3f}  {verdict}"
            lines.append(line)
    return "\n".join(lines)


def compare_backends(trainer: GRPOTrainer, steps: int) -> Dict[str, Dict[str, float]]:
    """The same ``steps`` GRPO steps from the same weights with the fused kernels and with the reference path
    (SamplingConfig(backend="reference")); each on its own copy of the policy, so the run itself is untouched.
    Returns per backend: median rollout tok/s, train tok/s, and whether the rollouts' tokens matched."""
    out: Dict[str, Dict[str, float]] = {}
    tokens: Dict[str, List[torch.Tensor]] = {}
    for backend in ("kernels", "reference"):
        policy = copy.deepcopy(trainer.policy)
        # plain steps (one rollout round each): the comparison is of the kernels, not of dynamic sampling
        cfg = replace(trainer.cfg, sampling=replace(trainer.cfg.sampling, backend=backend), log_path=None,
                      dynamic_sampling=False)
        tr = GRPOTrainer(policy, trainer.vocab, trainer.fmt, trainer.rewards, trainer.prompts, cfg,
                         ref_model=trainer.ref)
        tr.step_idx = trainer.step_idx
        results = [tr.step() for _ in range(steps)]
        tokens[backend] = [r.rollout.tokens for r in results]
        hist = [r.metrics for r in results]
        out[backend] = {name: statistics.median(h[key] for h in hist) for name, key in (
            ("rollout_tok_s", "throughput/rollout_tok_s"), ("train_tok_s", "throughput/train_tok_s"),
            ("rollout_s", "time/rollout_s"), ("train_s", "time/train_s"))}
    same = all(torch.equal(a, b) for a, b in zip(tokens["kernels"], tokens["reference"]))
    out["kernels"]["same_tokens_as_reference"] = float(same)
    return out


# --------------------------------------------------------------------------- runs

def run_sft_only(cfg: DemoConfig, eval_every: int = 0) -> Path:
    """`mmr1 sft` / `make cold-start`: the world and the cold-start model only; returns the model directory.
    ``eval_every``: print (and record in the manifest) held-out identity every that many steps (64 + 32 prompts;
    about 10 s each)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = save_world(out / "world", PatchVQ.build())
    train_subjects, held_out = split_subjects(cfg.seed, cfg.held_out_frac)
    logged: List[Dict] = []
    model = train_cold_start(world, train_subjects, cfg, logged.append, eval_every=eval_every, held_out=held_out)
    save_transformer(model, out / "cold_start")
    seconds = round(time.perf_counter() - t0)
    last = [r for r in logged if r["phase"] == "sft"][-1]
    manifest = {"config": cold_start_key(cfg), "last_logged_sft_step": last,
                "held_out_identity_along_the_way": [r for r in logged if r["phase"] == "sft_eval"],
                "seconds": seconds,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "made_by": f"mmr1 sft --out-dir {out} (= make cold-start)"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    print(f"wrote {out / 'cold_start'}, {out / 'world'} and {out / 'manifest.json'} ({seconds} s)")
    return out / "cold_start"


def load_or_train(cfg: DemoConfig, out: Path, cold_start: Optional[str], log):
    """(world, model, where it came from): the given or shipped cold start when it matches, else SFT here."""
    shipped = None if cold_start else shipped_cold_start(cfg)
    if shipped is not None:
        cold_start = str(shipped / "cold_start")
    world = save_world(out / "world", PatchVQ.build())
    train_subjects, _ = split_subjects(cfg.seed, cfg.held_out_frac)
    if cold_start:
        if not (Path(cold_start) / "config.json").exists():
            raise SystemExit(f"error: no model at {cold_start} (expected config.json + model.safetensors)")
        beside = Path(cold_start).parent / "world"
        if beside.exists():
            load_world(beside)  # refuses a world of another version
        model = load_transformer(cold_start)
        if model.config.vocab_size != world.text.vocab_size:
            raise SystemExit(f"error: the cold-start model at {cold_start} has vocab_size {model.config.vocab_size}, "
                             f"this world's tokenizer has {world.text.vocab_size} (another world version)")
        return world, model, "shipped" if shipped else cold_start
    model = train_cold_start(world, train_subjects, cfg, log)
    save_transformer(model, out / "cold_start")
    return world, model, "trained here"


def run(cfg: DemoConfig, cold_start: Optional[str] = None) -> Dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "log.jsonl"
    log_file.write_text("")
    log = MetricsLog(log_file).write

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    world, model, source = load_or_train(cfg, out, cold_start, log)
    judge = IdentityJudge(world.vq)
    fmt = xcot_format(world, cfg.direct)
    train_subjects, held_out = split_subjects(cfg.seed, cfg.held_out_frac)
    print(f"world v{WORLD_VERSION}: {len(train_subjects)} training / {len(held_out)} held-out subjects, "
          f"{world.text.vocab_size} tokens, {world.vq.num_codes} image codes; cold start: "
          + ("shipped weights (made by `make cold-start`; --train-cold-start trains them here instead)"
             if source == "shipped" else source))
    prompts = eval_prompts(world, held_out, cfg)
    counts = {"one subject": cfg.eval_prompts, "two subjects": cfg.eval_pair_prompts}
    t_eval = time.perf_counter()
    before, _, ro_before = evaluate(model, world, judge, fmt, prompts, seed=cfg.seed + 11, sampling=cfg.sampling)
    t_eval = time.perf_counter() - t_eval
    print(identity_table(before, None, counts))
    trainer = grpo_trainer(model, world, judge, cfg, train_subjects, str(out / "grpo.jsonl"))
    (out / "grpo.jsonl").write_text("")
    t_grpo = time.perf_counter()
    monitor = held_out_monitor(world, judge, fmt, held_out, cfg) if cfg.grpo_eval_every > 0 else None
    history = trainer.train(eval_fn=monitor, eval_every=cfg.grpo_eval_every)
    t_grpo = time.perf_counter() - t_grpo
    after, _, ro_after = evaluate(model, world, judge, fmt, prompts, seed=cfg.seed + 11, sampling=cfg.sampling)
    save_transformer(model, out / "grpo")
    speed = compare_backends(trainer, cfg.compare_steps) if cfg.compare_steps > 0 else {}
    ro_b, ro_a = _joined(ro_before), _joined(ro_after)
    grid_rows = grid_choice(ro_b, ro_a, prompts, judge, cfg)
    save_grid(out / "grid.png", ro_b, ro_a, prompts, world, judge, grid_rows)
    if history:
        save_curve(out / "reward_curve.png", history, trainer.evals)
    seconds = time.perf_counter() - t0
    print("\n" + identity_table(before, after, counts))
    print(f"GRPO: {len(history)} steps of {cfg.prompts_per_step} prompts x {cfg.group_size} samples in {t_grpo:.0f} s;"
          f" one evaluation {t_eval:.0f} s")
    if speed:
        k, r = speed["kernels"], speed["reference"]
        print(f"throughput, {cfg.compare_steps} identical GRPO steps per path (medians; tokens "
              f"{'identical' if k['same_tokens_as_reference'] else 'DIFFERENT'}):")
        print(f"  {'':14s} {'fused kernels':>14s} {'reference path':>15s} {'speedup':>8s}")
        for name, key in (("rollout tok/s", "rollout_tok_s"), ("train tok/s", "train_tok_s")):
            print(f"  {name:14s} {k[key]:>14.0f} {r[key]:>15.0f} {k[key] / r[key]:>7.2f}x")
    print(f"wrote {out / 'grid.png'}, {out / 'reward_curve.png'}, {out / 'log.jsonl'}, {out / 'grpo.jsonl'}, "
          f"{out / 'summary.json'}\ntotal {seconds:.0f} s")
    roll = sum(h["throughput/rollout_tok_s"] for h in history) / max(len(history), 1)
    train = sum(h["throughput/train_tok_s"] for h in history) / max(len(history), 1)
    summary = {"config": asdict(cfg), "cold_start": source, "before": before, "after": after, "counts": counts,
               "rollout_tok_s": roll, "train_tok_s": train, "fused_vs_reference": speed, "grpo_s": t_grpo,
               "seconds": seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _joined(ros):
    """One Rollout-like view over evaluation chunks (codes and reasoning in prompt order)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        subject_codes=None if ros[0].subject_codes is None else torch.cat([r.subject_codes for r in ros]),
        final_codes=torch.cat([r.final_codes for r in ros]), reasoning=[t for r in ros for t in r.reasoning])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="MM-R1 demo on the synthetic world (CPU, minutes)")
    ap.add_argument("--out-dir", default=DemoConfig.out_dir)
    ap.add_argument("--cold-start", default=None, help="a saved cold-start model directory (skips SFT)")
    ap.add_argument("--train-cold-start", action="store_true",
                    help="train the cold start here instead of loading the shipped weights (see make cold-start)")
    ap.add_argument("--sft-steps", type=int, default=DemoConfig.sft_steps)
    ap.add_argument("--grpo-steps", type=int, default=DemoConfig.grpo_steps)
    ap.add_argument("--grpo-lr", type=float, default=DemoConfig.grpo_lr)
    ap.add_argument("--eval-prompts", type=int, default=DemoConfig.eval_prompts, help="one-subject eval prompts")
    ap.add_argument("--eval-pair-prompts", type=int, default=DemoConfig.eval_pair_prompts,
                    help="two-subject eval prompts")
    ap.add_argument("--self-reward-weight", type=float, default=DemoConfig.self_reward_weight,
                    help="weight of the dual self-reward in GRPO (0 = off)")
    ap.add_argument("--compare-steps", type=int, default=DemoConfig.compare_steps,
                    help="GRPO steps timed per path for the fused-vs-reference table (0 = skip)")
    ap.add_argument("--no-dynamic-sampling", dest="dynamic_sampling", action="store_false",
                    help="plain GRPO: keep groups with no reward spread (default: resample them, up to "
                         f"{DemoConfig.dynamic_sampling_rounds} rounds)")
    ap.add_argument("--beta", type=float, default=DemoConfig.grpo_beta, help="KL coefficient of GRPO")
    ap.add_argument("--eval-every", type=int, default=DemoConfig.grpo_eval_every,
                    help="held-out identity every that many GRPO steps (0 = off)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run(DemoConfig(out_dir=args.out_dir, sft_steps=args.sft_steps, grpo_steps=args.grpo_steps, grpo_lr=args.grpo_lr,
                   eval_prompts=args.eval_prompts, eval_pair_prompts=args.eval_pair_prompts,
                   self_reward_weight=args.self_reward_weight, compare_steps=args.compare_steps, seed=args.seed,
                   dynamic_sampling=args.dynamic_sampling, grpo_beta=args.beta, grpo_eval_every=args.eval_every,
                   use_shipped=not args.train_cold_start),
        args.cold_start)


if __name__ == "__main__":
    main()
