"""The embedded default: MM-R1 end to end on the synthetic world, on a CPU, in minutes.

    python -m mmr1.demo            (or: make demo)

1. the world: procedural subjects, single- and two-subject (PSR-style) scenes, a patch VQ tokenizer and a
   tokenizer (mmr1.world)
2. cold-start SFT of a tiny Chameleon-architecture model on X-CoT examples (and on the understanding
   direction, image -> prompt, which the dual self-reward reads) -- loaded from --cold-start if given
3. evaluation on held-out subjects: format / subject similarity / text alignment (mean +- 95% CI), for
   one-subject and two-subject prompts
4. GRPO with the procedural rewards + the generation-direction self-reward (mmr1.grpo, fused kernels),
   then evaluation again
5. rollout and training throughput of the fused kernels vs the reference path (the same GRPO steps with
   GRPOConfig(backend="reference"): full-vocab logits and the PyTorch specs)
6. a PNG grid (reference | subject image | final image, before and after) and a reward curve
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .generate import SamplingConfig
from .grpo import GRPOConfig, GRPOTrainer
from .model import ModelConfig, Transformer, init_weights, load_transformer, save_transformer
from .rewards import RewardSet, format_reward
from .rewards.self_reward import generation_self_reward
from .rollout import XCoTFormat, xcot_rollout
from .sft import SFTConfig, SFTTrainer
from .world import (GRID, WORLD_VERSION, PairScene, PatchVQ, WorldTokens, all_subjects, load_world, pick,
                    random_pair_scene, random_scene, render, save_world, subject_similarity, text_alignment)


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    codes: int = 128
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    sft_steps: int = 1500
    sft_batch: int = 16
    sft_lr: float = 2e-3
    grpo_steps: int = 300
    group_size: int = 4
    prompts_per_step: int = 2
    grpo_lr: float = 3e-5
    pair_frac: float = 0.25  # two-subject (PSR-style) prompts among SFT examples and GRPO prompts
    describe_frac: float = 0.15  # understanding examples (image -> prompt) in the cold start
    self_reward_weight: float = 0.2  # the generation-direction dual self-reward in GRPO (0 = off)
    eval_prompts: int = 48  # one-subject held-out prompts
    eval_pair_prompts: int = 24  # two-subject held-out prompts
    compare_steps: int = 2  # GRPO steps timed per backend for the fused-vs-reference throughput table
    held_out_frac: float = 0.1
    use_shipped: bool = True  # load the shipped world + cold-start weights when they match this config


# The shipped cold start: the world (codebook + tokenizer) and the SFT weights that `make cold-start`
# (= `mmr1 sft --out-dir runs/cold_start` + copy) writes; the demo uses them when their manifest matches.
SHIPPED = Path(__file__).resolve().parent / "assets" / "demo"
COLD_START_FIELDS = ("seed", "codes", "hidden", "layers", "heads", "sft_steps", "sft_batch", "sft_lr", "pair_frac",
                     "describe_frac", "held_out_frac")


def cold_start_key(cfg: "DemoConfig") -> Dict:
    """What determines the cold-start model: the world version and the SFT settings."""
    return {"world_version": WORLD_VERSION, **{k: getattr(cfg, k) for k in COLD_START_FIELDS}}


def shipped_cold_start(cfg: "DemoConfig", root: Path = SHIPPED):
    """The shipped asset directory if its manifest was made with this config, else None."""
    manifest = root / "manifest.json"
    if not cfg.use_shipped or not manifest.exists():
        return None
    made_with = json.loads(manifest.read_text())["config"]
    return root if made_with == json.loads(json.dumps(cold_start_key(cfg))) else None


def split_subjects(seed: int, held_out_frac: float):
    subjects = all_subjects()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(subjects), generator=g).tolist()
    k = int(len(subjects) * held_out_frac)
    return [subjects[i] for i in perm[k:]], [subjects[i] for i in perm[:k]]


def xcot_format(world: WorldTokens) -> XCoTFormat:
    t = world.text
    return XCoTFormat(think_open=t.token_id("<think>"), think_close=t.token_id("</think>"),
                      end_of_turn=world.end_of_turn, subject_hw=(GRID, GRID), final_hw=(GRID, GRID),
                      text_range=(t.token_id("<reserved08706>") + 1, t.vocab_size), max_text_tokens=32)


def random_task(subjects: Sequence, g: torch.Generator, pair: bool):
    """(scene, reference scenes): one subject, or two different subjects (one reference scene each)."""
    first = pick(subjects, g)
    if not pair:
        return random_scene(first, g), [random_scene(first, g)]
    second = pick(subjects, g)
    while second == first:
        second = pick(subjects, g)
    return random_pair_scene(first, second, g), [random_scene(first, g), random_scene(second, g)]


def make_prompts(world: WorldTokens, subjects: Sequence, n: int, seed: int, pair_frac: float = 0.0) -> List[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        scene, refs = random_task(subjects, g, pair=float(torch.rand((), generator=g)) < pair_frac)
        images = [render(r) for r in refs]
        out.append({"prompt_ids": world.prompt_ids(images, scene), "scene": scene, "references": images})
    return out


def sft_batch(world: WorldTokens, subjects: Sequence, g: torch.Generator, cfg: "DemoConfig"):
    """A cold-start batch: X-CoT examples (one- and two-subject) and understanding (describe) examples."""
    seqs, plens = [], []
    for _ in range(cfg.sft_batch):
        u = float(torch.rand((), generator=g))
        scene, refs = random_task(subjects, g, pair=float(torch.rand((), generator=g)) < cfg.pair_frac)
        s, p = world.describe_example(scene) if u < cfg.describe_frac else world.example(scene, refs)
        seqs.append(s)
        plens.append(p)
    return seqs, plens


def world_rewards(world: WorldTokens, fmt: XCoTFormat, policy: Transformer = None,
                  self_weight: float = 0.0) -> RewardSet:
    """format, subject (one subject: pixel similarity; pairs: PSR pairwise consistency), text (layout as asked),
    and with a policy and self_weight > 0 the dual self-reward: the policy's own mean log p(prompt | image)."""
    def decode(codes):
        return world.vq.decode(codes.cpu())

    def subject(ro, batch):
        imgs = decode(ro.final_codes)
        return torch.tensor([subject_similarity(imgs[i], b["scene"]) for i, b in enumerate(batch)]), {}

    def text(ro, batch):
        imgs = decode(ro.final_codes)
        return torch.tensor([text_alignment(imgs[i], b["scene"]) for i, b in enumerate(batch)]), {}

    def self_reward(ro, batch):
        blocks = [world.image.encode_block(c).tolist() for c in ro.final_codes]
        prompts = [world.text.encode(b["scene"].prompt()) for b in batch]
        return generation_self_reward(policy, blocks, prompts, prefix=[world.describe], sep=world.end_of_turn,
                                      bos=world.bos)

    rewards = {"format": lambda ro, b: format_reward(ro, world.image, fmt), "subject": subject, "text": text}
    weights = {"format": 0.5, "subject": 1.0, "text": 1.0}
    if policy is not None and self_weight > 0:
        rewards["self"], weights["self"] = self_reward, self_weight
    return RewardSet(rewards, weights)


def mean_ci(x: torch.Tensor) -> Tuple[float, float]:
    x = x.double()
    n = x.numel()
    half = 1.96 * float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(x.mean()), half


@torch.no_grad()
def evaluate(model: Transformer, world: WorldTokens, fmt: XCoTFormat, prompts: List[dict], seed: int):
    model.eval()
    rewards = world_rewards(world, fmt)
    ro = xcot_rollout(model, [p["prompt_ids"] for p in prompts], world.image, fmt,
                      SamplingConfig(cfg_scale=2.0, top_k=0, text_top_k=0, seed=seed), num_samples=1)
    r, _, _ = rewards(ro, prompts)
    pair = torch.tensor([isinstance(p["scene"], PairScene) for p in prompts])
    table = {}
    for split, rows in (("one subject", ~pair), ("two subjects", pair)):
        if bool(rows.any()):
            table[split] = {name: mean_ci(r[rows, i]) for i, name in enumerate(rewards.names)}
    return table, ro


def train_cold_start(world: WorldTokens, train_subjects, cfg: DemoConfig, log) -> Transformer:
    mcfg = ModelConfig(vocab_size=world.text.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 8 // 3,
                       num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.heads, max_seq_len=512,
                       bos_id=world.bos, eos_id=world.end_of_turn)
    model = init_weights(Transformer(mcfg), seed=cfg.seed)
    tr = SFTTrainer(model, SFTConfig(lr=cfg.sft_lr, steps=cfg.sft_steps, batch_size=cfg.sft_batch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        tr.optimizer, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.sft_steps, 1.0))))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    from tqdm import tqdm

    bar = tqdm(range(cfg.sft_steps), desc="cold-start SFT")
    for step in bar:
        m = tr.step(*sft_batch(world, train_subjects, g, cfg))
        sched.step()
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        if step % 50 == 0:
            log({"phase": "sft", "step": step, **m})
    return model.eval()


def save_grid(path: Path, before, after, prompts: List[dict], world: WorldTokens, rows: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(n, 5, figsize=(8.5, 1.6 * n), squeeze=False)
    titles = ["reference(s)", "subject (SFT)", "final (SFT)", "subject (GRPO)", "final (GRPO)"]
    sub_b, fin_b = world.vq.decode(before.subject_codes), world.vq.decode(before.final_codes)
    sub_a, fin_a = world.vq.decode(after.subject_codes), world.vq.decode(after.final_codes)
    for i, r in enumerate(rows):
        refs = torch.cat(prompts[r]["references"], dim=1)  # two subjects: side by side
        for j, img in enumerate([refs, sub_b[r], fin_b[r], sub_a[r], fin_a[r]]):
            ax = axes[i, j]
            ax.imshow(img.numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
        words = prompts[r]["scene"].prompt().replace("my subject ", "").replace(" subject", "")
        axes[i, 0].set_ylabel(words.replace(" and ", "\n"), fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_curve(path: Path, history: List[Dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("reward/subject", "reward/text", "reward/format", "reward/self"):
        if key not in history[0]:
            continue
        ys = [h[key] for h in history]
        k = 10
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax.plot(smooth, label=key.split("/")[1])
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (10-step moving average)\nself: mean log p(prompt | image)", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sft_only(cfg: DemoConfig) -> Path:
    """`mmr1 sft`: the world and the cold-start model only; returns the model directory."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = save_world(out / "world", PatchVQ.fit(num_codes=cfg.codes, seed=cfg.seed))
    train_subjects, _ = split_subjects(cfg.seed, cfg.held_out_frac)
    last: Dict = {}
    model = train_cold_start(world, train_subjects, cfg, last.update)
    save_transformer(model, out / "cold_start")
    manifest = {"config": cold_start_key(cfg), "last_logged_sft_step": last,
                "seconds": round(time.perf_counter() - t0), "torch": torch.__version__,
                "made_by": f"mmr1 sft --out-dir {out} --steps {cfg.sft_steps} --seed {cfg.seed}"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    print(f"wrote {out / 'cold_start'}, {out / 'world'} and {out / 'manifest.json'}")
    return out / "cold_start"


def _recording(rollout_fn, sink: List[torch.Tensor]):
    def fn(*args):
        ro = rollout_fn(*args)
        sink.append(ro.tokens)
        return ro

    return fn


def compare_backends(trainer: GRPOTrainer, steps: int) -> Dict[str, Dict[str, float]]:
    """The same ``steps`` GRPO steps from the same weights with the fused kernels and with the reference path
    (GRPOConfig(backend="reference")); each on its own copy of the policy, so the run itself is untouched.
    Returns per backend: median rollout tok/s, train tok/s, and whether the rollouts' tokens matched."""
    out: Dict[str, Dict[str, float]] = {}
    tokens: Dict[str, List[torch.Tensor]] = {}
    for backend in ("kernels", "reference"):
        policy = copy.deepcopy(trainer.policy)
        cfg = replace(trainer.cfg, backend=backend, log_path=None)
        tr = GRPOTrainer(policy, trainer.vocab, trainer.fmt, trainer.rewards, trainer.prompts, cfg,
                         ref_model=trainer.ref)
        tr.step_idx = trainer.step_idx
        tokens[backend] = []
        tr.rollout_fn = _recording(tr.rollout_fn, tokens[backend])
        hist = [tr.step() for _ in range(steps)]
        out[backend] = {name: statistics.median(h[key] for h in hist) for name, key in (
            ("rollout_tok_s", "throughput/rollout_tok_s"), ("train_tok_s", "throughput/train_tok_s"),
            ("rollout_s", "time/rollout_s"), ("train_s", "time/train_s"))}
    same = all(torch.equal(a, b) for a, b in zip(tokens["kernels"], tokens["reference"]))
    out["kernels"]["same_tokens_as_reference"] = float(same)
    return out


def _report(cfg: DemoConfig, before: Dict, after: Dict, history: List[Dict], speed: Dict, out: Path,
            seconds: float) -> str:
    lines = [""]
    for split in before:
        n = cfg.eval_prompts if split == "one subject" else cfg.eval_pair_prompts
        lines += [f"held-out subjects, {split}: {n} prompts (mean +- 95% CI)",
                  f"  {'reward':10s} {'cold start (SFT)':>20s} {'after GRPO':>20s}"]
        for k in before[split]:
            b, a = before[split][k], after[split][k]
            lines.append(f"  {k:10s} {b[0]:>12.3f} +- {b[1]:.3f} {a[0]:>12.3f} +- {a[1]:.3f}")
    lines.append(f"GRPO: {len(history)} steps of {cfg.prompts_per_step} prompts x {cfg.group_size} samples")
    if speed:
        k, r = speed["kernels"], speed["reference"]
        lines += [f"throughput, {cfg.compare_steps} identical GRPO steps per path (medians; tokens "
                  f"{'identical' if k['same_tokens_as_reference'] else 'DIFFERENT'}):",
                  f"  {'':14s} {'fused kernels':>14s} {'reference path':>15s} {'speedup':>8s}"]
        for name, key in (("rollout tok/s", "rollout_tok_s"), ("train tok/s", "train_tok_s")):
            lines.append(f"  {name:14s} {k[key]:>14.0f} {r[key]:>15.0f} {k[key] / r[key]:>7.2f}x")
    lines += [f"wrote {out / 'grid.png'}, {out / 'reward_curve.png'}, {out / 'log.jsonl'}, {out / 'grpo.jsonl'}",
              f"total {seconds:.0f}s"]
    return "\n".join(lines)


def run(cfg: DemoConfig, cold_start: str = None) -> Dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "log.jsonl"
    log_file.write_text("")

    def log(rec):
        with open(log_file, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    shipped = None if cold_start else shipped_cold_start(cfg)
    if shipped is not None:
        cold_start = str(shipped / "cold_start")
    # a cold start written by `mmr1 sft` has its world beside it; else the world is fitted (deterministic)
    world_dir = Path(cold_start).parent / "world" if cold_start else None
    if world_dir is not None and (world_dir / "vq.safetensors").exists():
        world = save_world(out / "world", load_world(world_dir).vq)
    else:
        world = save_world(out / "world", PatchVQ.fit(num_codes=cfg.codes, seed=cfg.seed))
    fmt = xcot_format(world)
    train_subjects, held_out = split_subjects(cfg.seed, cfg.held_out_frac)
    print(f"world: {len(train_subjects)} training / {len(held_out)} held-out subjects, "
          f"{world.text.vocab_size} tokens, {world.vq.num_codes} image codes ({time.perf_counter() - t0:.0f}s)")
    if cold_start:
        model = load_transformer(cold_start)
        if model.config.vocab_size != world.text.vocab_size:
            raise SystemExit(f"error: the cold-start model at {cold_start} has vocab_size {model.config.vocab_size}, "
                             f"this world's tokenizer has {world.text.vocab_size} (another world version or --codes)")
        print(f"cold start: {'shipped weights ' if shipped else ''}{cold_start}"
              + (" (made by `make cold-start`; --train-cold-start trains them here instead)" if shipped else ""))
    else:
        model = train_cold_start(world, train_subjects, cfg, log)
        save_transformer(model, out / "cold_start")
    eval_prompts = (make_prompts(world, held_out, cfg.eval_prompts, seed=cfg.seed + 7)
                    + make_prompts(world, held_out, cfg.eval_pair_prompts, seed=cfg.seed + 8, pair_frac=1.0))
    before, ro_before = evaluate(model, world, fmt, eval_prompts, seed=cfg.seed + 11)
    train_prompts = make_prompts(world, train_subjects, 512, seed=cfg.seed + 3, pair_frac=cfg.pair_frac)
    gcfg = GRPOConfig(group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step, steps=cfg.grpo_steps,
                      lr=cfg.grpo_lr, beta=0.04, cfg_scale=2.0, top_k=0, text_top_k=0, seed=cfg.seed,
                      log_path=str(out / "grpo.jsonl"))
    rewards = world_rewards(world, fmt, model, cfg.self_reward_weight)
    trainer = GRPOTrainer(model, world.image, fmt, rewards, train_prompts, gcfg)
    history = trainer.train()
    after, ro_after = evaluate(model, world, fmt, eval_prompts, seed=cfg.seed + 11)
    save_transformer(model, out / "grpo")
    speed = compare_backends(trainer, cfg.compare_steps) if cfg.compare_steps > 0 else {}
    n_one = min(cfg.eval_prompts, 6)
    grid_rows = list(range(n_one)) + list(range(cfg.eval_prompts, cfg.eval_prompts + min(cfg.eval_pair_prompts, 3)))
    save_grid(out / "grid.png", ro_before, ro_after, eval_prompts, world, grid_rows)
    if history:
        save_curve(out / "reward_curve.png", history)
    roll = sum(h["throughput/rollout_tok_s"] for h in history) / max(len(history), 1)
    train = sum(h["throughput/train_tok_s"] for h in history) / max(len(history), 1)
    print(_report(cfg, before, after, history, speed, out, time.perf_counter() - t0))
    summary = {"before": before, "after": after, "rollout_tok_s": roll, "train_tok_s": train,
               "fused_vs_reference": speed, "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="MM-R1 demo on the synthetic world (CPU, minutes)")
    ap.add_argument("--out-dir", default=DemoConfig.out_dir)
    ap.add_argument("--cold-start", default=None, help="a saved cold-start model directory (skips SFT)")
    ap.add_argument("--train-cold-start", action="store_true",
                    help="train the cold start here (about 15 min on 2 cores) instead of loading the shipped weights")
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
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run(DemoConfig(out_dir=args.out_dir, sft_steps=args.sft_steps, grpo_steps=args.grpo_steps, grpo_lr=args.grpo_lr,
                   eval_prompts=args.eval_prompts, eval_pair_prompts=args.eval_pair_prompts,
                   self_reward_weight=args.self_reward_weight, compare_steps=args.compare_steps, seed=args.seed,
                   use_shipped=not args.train_cold_start),
        args.cold_start)


if __name__ == "__main__":
    main()
