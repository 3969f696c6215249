"""The embedded default: MM-R1 end to end on the synthetic world, on a CPU, in minutes.

    python -m mmr1.demo            (or: make demo)

1. the world: procedural subjects, a patch VQ tokenizer and a tokenizer (mmr1.world)
2. cold-start SFT of a tiny Chameleon-architecture model on X-CoT examples
   (loaded from --cold-start if given, else trained here)
3. evaluation on held-out subjects: format / subject similarity / text alignment (mean +- 95% CI)
4. GRPO with the procedural rewards (mmr1.grpo, fused kernels), then evaluation again
5. a PNG grid (reference | subject image | final image, before and after) and a reward curve
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .generate import SamplingConfig
from .grpo import GRPOConfig, GRPOTrainer
from .model import ModelConfig, Transformer, init_weights, load_transformer, save_transformer
from .rewards import RewardSet, format_reward
from .rollout import XCoTFormat, xcot_rollout
from .sft import SFTConfig, SFTTrainer
from .world import (GRID, PatchVQ, WorldTokens, all_subjects, random_scene, render, save_world,
                    subject_similarity, text_alignment)


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    codes: int = 128
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    sft_steps: int = 600
    sft_batch: int = 16
    sft_lr: float = 2e-3
    grpo_steps: int = 200
    group_size: int = 4
    prompts_per_step: int = 2
    grpo_lr: float = 3e-5
    eval_prompts: int = 48
    held_out_frac: float = 0.1


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
                      text_range=(t.token_id("<reserved08706>") + 1, t.vocab_size), max_text_tokens=24)


def make_prompts(world: WorldTokens, subjects: Sequence, n: int, seed: int) -> List[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        subj = subjects[int(torch.randint(len(subjects), (1,), generator=g))]
        scene, ref = random_scene(subj, g), random_scene(subj, g)
        ids = world.prompt_ids(render(ref), scene)
        out.append({"prompt_ids": ids + [], "scene": scene, "reference": render(ref)})
    return out


def world_rewards(world: WorldTokens, fmt: XCoTFormat) -> RewardSet:
    def decode(codes):
        return world.vq.decode(codes.cpu())

    def subject(ro, batch):
        imgs = decode(ro.final_codes)
        return torch.tensor([subject_similarity(imgs[i], b["scene"]) for i, b in enumerate(batch)]), {}

    def text(ro, batch):
        imgs = decode(ro.final_codes)
        return torch.tensor([text_alignment(imgs[i], b["scene"]) for i, b in enumerate(batch)]), {}

    return RewardSet({"format": lambda ro, b: format_reward(ro, world.image, fmt), "subject": subject, "text": text},
                     {"format": 0.5, "subject": 1.0, "text": 1.0})


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
    table = {name: mean_ci(r[:, i]) for i, name in enumerate(rewards.names)}
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
        seqs, plens = [], []
        for _ in range(cfg.sft_batch):
            subj = train_subjects[int(torch.randint(len(train_subjects), (1,), generator=g))]
            s, p = world.example(random_scene(subj, g), random_scene(subj, g))
            seqs.append(s)
            plens.append(p)
        m = tr.step(seqs, plens)
        sched.step()
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        if step % 50 == 0:
            log({"phase": "sft", "step": step, **m})
    return model.eval()


def save_grid(path: Path, before, after, prompts: List[dict], world: WorldTokens, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(prompts))
    fig, axes = plt.subplots(n, 5, figsize=(7.5, 1.6 * n))
    titles = ["reference", "subject (SFT)", "final (SFT)", "subject (GRPO)", "final (GRPO)"]
    sub_b, fin_b = world.vq.decode(before.subject_codes), world.vq.decode(before.final_codes)
    sub_a, fin_a = world.vq.decode(after.subject_codes), world.vq.decode(after.final_codes)
    for i in range(n):
        row = [prompts[i]["reference"], sub_b[i], fin_b[i], sub_a[i], fin_a[i]]
        for j, img in enumerate(row):
            ax = axes[i, j]
            ax.imshow(img.numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
        axes[i, 0].set_ylabel(prompts[i]["scene"].prompt().replace("my subject ", ""), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_curve(path: Path, history: List[Dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("reward/subject", "reward/text", "reward/format"):
        ys = [h[key] for h in history]
        k = 10
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax.plot(smooth, label=key.split("/")[1])
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (10-step moving average)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sft_only(cfg: DemoConfig) -> Path:
    """`mmr1 sft`: the world and the cold-start model only; returns the model directory."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = save_world(out / "world", PatchVQ.fit(num_codes=cfg.codes, seed=cfg.seed))
    train_subjects, _ = split_subjects(cfg.seed, cfg.held_out_frac)
    model = train_cold_start(world, train_subjects, cfg, lambda rec: None)
    save_transformer(model, out / "cold_start")
    print(f"wrote {out / 'cold_start'} and {out / 'world'}")
    return out / "cold_start"


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
    world = save_world(out / "world", PatchVQ.fit(num_codes=cfg.codes, seed=cfg.seed))
    fmt = xcot_format(world)
    train_subjects, held_out = split_subjects(cfg.seed, cfg.held_out_frac)
    print(f"world: {len(train_subjects)} training / {len(held_out)} held-out subjects, "
          f"{world.text.vocab_size} tokens, {world.vq.num_codes} image codes ({time.perf_counter() - t0:.0f}s)")
    if cold_start:
        model = load_transformer(cold_start)
    else:
        model = train_cold_start(world, train_subjects, cfg, log)
        save_transformer(model, out / "cold_start")
    eval_prompts = make_prompts(world, held_out, cfg.eval_prompts, seed=cfg.seed + 7)
    before, ro_before = evaluate(model, world, fmt, eval_prompts, seed=cfg.seed + 11)
    train_prompts = make_prompts(world, train_subjects, 512, seed=cfg.seed + 3)
    gcfg = GRPOConfig(group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step, steps=cfg.grpo_steps,
                      lr=cfg.grpo_lr, beta=0.04, cfg_scale=2.0, top_k=0, text_top_k=0, seed=cfg.seed,
                      log_path=str(out / "grpo.jsonl"))
    trainer = GRPOTrainer(model, world.image, fmt, world_rewards(world, fmt), train_prompts, gcfg)
    history = trainer.train()
    after, ro_after = evaluate(model, world, fmt, eval_prompts, seed=cfg.seed + 11)
    save_transformer(model, out / "grpo")
    save_grid(out / "grid.png", ro_before, ro_after, eval_prompts, world)
    save_curve(out / "reward_curve.png", history)
    roll = sum(h["throughput/rollout_tok_s"] for h in history) / max(len(history), 1)
    train = sum(h["throughput/train_tok_s"] for h in history) / max(len(history), 1)
    lines = ["", f"held-out subjects, {cfg.eval_prompts} prompts (mean +- 95% CI)",
             f"{'reward':10s} {'cold start (SFT)':>20s} {'after GRPO':>20s}"]
    for k in before:
        lines.append(f"{k:10s} {before[k][0]:>12.3f} +- {before[k][1]:.3f} {after[k][0]:>12.3f} +- {after[k][1]:.3f}")
    lines += [f"GRPO: {len(history)} steps, rollout {roll:.0f} tok/s, train {train:.0f} tok/s (fused kernels)",
              f"wrote {out / 'grid.png'}, {out / 'reward_curve.png'}, {out / 'log.jsonl'}, {out / 'grpo.jsonl'}",
              f"total {time.perf_counter() - t0:.0f}s"]
    print("\n".join(lines))
    summary = {"before": before, "after": after, "rollout_tok_s": roll, "train_tok_s": train}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="MM-R1 demo on the synthetic world (CPU, minutes)")
    ap.add_argument("--out-dir", default=DemoConfig.out_dir)
    ap.add_argument("--cold-start", default=None, help="a saved cold-start model directory (skips SFT)")
    ap.add_argument("--sft-steps", type=int, default=DemoConfig.sft_steps)
    ap.add_argument("--grpo-steps", type=int, default=DemoConfig.grpo_steps)
    ap.add_argument("--eval-prompts", type=int, default=DemoConfig.eval_prompts)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run(DemoConfig(out_dir=args.out_dir, sft_steps=args.sft_steps, grpo_steps=args.grpo_steps,
                   eval_prompts=args.eval_prompts, seed=args.seed), args.cold_start)


if __name__ == "__main__":
    main()
