"""MM-R1's claim in miniature: X-CoT (reason, draw the subject, then the image) vs direct (references + prompt ->
image), with the same model, the same cold-start budget and the same GRPO budget.

    python -m mmr1.world.ablation          (or: make ablation)

The X-CoT policy is the demo's shipped cold start when it matches the config (else trained here); the direct policy
is trained here with the same SFT settings -- same steps, batch size, learning rate, task mix and seed, so the same
references, prompts and scenes; only the completion differs. Both then run the same GRPO (steps, prompts, group
size, learning rate, rewards on the final image) and are evaluated on the same held-out prompts with the same seed.
Writes docs-ready results: ablation.md (table), ablation.png (figure), ablation.json.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional

import torch

from ..model import save_transformer
from .demo import DemoConfig, cold_start_key, eval_prompts, grpo_trainer, load_or_train
from .identity import IdentityJudge
from .tasks import evaluate, split_subjects, xcot_format

POLICIES = ("X-CoT", "direct")
COLUMNS = (("final/whole", "final image shows the subject(s)"), ("layout", "layout as asked"),
           ("text/whole", "reasoning names the subject(s)"))


def run_policy(cfg: DemoConfig, out: Path, cold_start: Optional[Path] = None) -> Dict:
    """Cold start (shipped, given, or trained here) -> evaluation -> GRPO -> evaluation, for one policy.
    ``cold_start``: a directory `mmr1 sft` wrote (world, cold_start, manifest.json) for this very config."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = None
    if cold_start is not None:
        made_with = json.loads((cold_start / "manifest.json").read_text())["config"]
        if made_with != json.loads(json.dumps(cold_start_key(cfg))):
            raise SystemExit(f"error: {cold_start} was trained with another config than this ablation's "
                             f"{'direct' if cfg.direct else 'X-CoT'} policy")
        model_dir = str(cold_start / "cold_start")
    world, model, source = load_or_train(cfg, out, model_dir, lambda rec: None)
    t_sft = time.perf_counter() - t0
    judge = IdentityJudge(world.vq)
    fmt = xcot_format(world, cfg.direct)
    train_subjects, held_out = split_subjects(cfg.seed, cfg.held_out_frac)
    prompts = eval_prompts(world, held_out, cfg)
    before, _, _ = evaluate(model, world, judge, fmt, prompts, seed=cfg.seed + 11, sampling=cfg.sampling)
    trainer = grpo_trainer(model, world, judge, cfg, train_subjects, None)
    t1 = time.perf_counter()
    trainer.train()
    t_grpo = time.perf_counter() - t1
    after, _, _ = evaluate(model, world, judge, fmt, prompts, seed=cfg.seed + 11, sampling=cfg.sampling)
    save_transformer(model, out / "grpo")
    return {"cold_start": source, "sft_s": t_sft, "grpo_s": t_grpo, "before": before, "after": after}


def _cell(v) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def markdown(results: Dict, cfg: DemoConfig) -> str:
    lines = [f"X-CoT vs direct (`make ablation`): same model ({cfg.layers} layers, d={cfg.hidden}), same cold start "
             f"budget ({cfg.sft_steps} SFT steps x {cfg.sft_batch} examples), same GRPO ({cfg.grpo_steps} steps x "
             f"{cfg.prompts_per_step} prompts x G={cfg.group_size}); held-out subjects, "
             f"{cfg.eval_prompts} one-subject and {cfg.eval_pair_prompts} two-subject prompts, one sample each "
             "(temperature 1, CFG 2), mean ± 95% CI.", ""]
    head = "| policy | stage | " + " | ".join(f"{label} (one)" for _, label in COLUMNS[:2]) + " | " + \
        " | ".join(f"{label} (two)" for _, label in COLUMNS[:2]) + " | reasoning names the subject (one / two) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for policy in POLICIES:
        for stage, key in (("cold start", "before"), ("after GRPO", "after")):
            t = results[policy][key]
            cells = [_cell(t[split][k]) for split in ("one subject", "two subjects") for k, _ in COLUMNS[:2]]
            text = " / ".join(_cell(t[s]["text/whole"]) for s in ("one subject", "two subjects")) \
                if "text/whole" in t["one subject"] else "—"
            lines.append(f"| {policy} | {stage} | " + " | ".join(cells) + f" | {text} |")
    lines += ["", "Time on 2 CPU cores: " + "; ".join(
        f"{p}: cold start {results[p]['cold_start']} ({results[p]['sft_s']:.0f} s), GRPO {results[p]['grpo_s']:.0f} s"
        for p in POLICIES)]
    return "\n".join(lines) + "\n"


def figure(results: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, split in zip(axes, ("one subject", "two subjects")):
        x = 0
        ticks, labels = [], []
        for key, label in COLUMNS[:2]:
            for i, policy in enumerate(POLICIES):
                for j, stage in enumerate(("before", "after")):
                    m, ci = results[policy][stage][split][key]
                    ax.bar(x, m, yerr=ci, capsize=3, color=("tab:blue", "tab:orange")[i],
                           alpha=0.45 if stage == "before" else 1.0)
                    ticks.append(x)
                    labels.append(f"{policy}\n{'SFT' if stage == 'before' else 'GRPO'}")
                    x += 1
            ax.text(x - 2.5, 1.04, label, ha="center", fontsize=8)
            x += 1
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylim(0, 1.12)
        ax.set_title(f"held-out, {split}", fontsize=9, pad=14)
    axes[0].set_ylabel("accuracy (mean, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description="X-CoT vs direct on the synthetic world (about 45 min on 2 cores)")
    ap.add_argument("--out-dir", default="runs/ablation")
    ap.add_argument("--docs", default="docs", help="where ablation.md / .png / .json go")
    ap.add_argument("--train-cold-start", action="store_true", help="train the X-CoT cold start too (no shipped)")
    ap.add_argument("--direct-cold-start", default=None,
                    help="a directory `mmr1 sft --direct --out-dir DIR` wrote (else the direct cold start is trained "
                         "here, about an hour)")
    ap.add_argument("--sft-steps", type=int, default=DemoConfig.sft_steps)
    ap.add_argument("--grpo-steps", type=int, default=DemoConfig.grpo_steps)
    ap.add_argument("--eval-prompts", type=int, default=DemoConfig.eval_prompts)
    ap.add_argument("--eval-pair-prompts", type=int, default=DemoConfig.eval_pair_prompts)
    args = ap.parse_args(argv)
    base = DemoConfig(sft_steps=args.sft_steps, grpo_steps=args.grpo_steps, eval_prompts=args.eval_prompts,
                      eval_pair_prompts=args.eval_pair_prompts, use_shipped=not args.train_cold_start)
    out, docs = Path(args.out_dir), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    results = {}
    for policy in POLICIES:
        cfg = replace(base, direct=policy == "direct", out_dir=str(out / policy.lower()))
        torch.manual_seed(cfg.seed)
        print(f"== {policy}")
        given = Path(args.direct_cold_start) if policy == "direct" and args.direct_cold_start else None
        results[policy] = run_policy(cfg, out / policy.lower(), given)
    text = markdown(results, base)
    print(text)
    (docs / "ablation.md").write_text(text)
    (docs / "ablation.json").write_text(json.dumps({"config": asdict(base), "results": results}, indent=1))
    figure(results, docs / "ablation.png")
    print(f"wrote {docs / 'ablation.md'}, {docs / 'ablation.png'}, {docs / 'ablation.json'}")
    return results


if __name__ == "__main__":
    main()
