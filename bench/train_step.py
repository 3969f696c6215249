"""Benchmark: one GRPO step broken down by phase, and one cold-start SFT step, fused vs reference.

    python -m bench.train_step [--quick]

Model: Lumina-shaped small (vocab 65536, image window 8192, hidden 512,
4 layers); X-CoT rollouts with a 16 x 16-code subject and final image (8 x 8
with --quick), G = 4 samples x 2 prompts, CFG 3.
GRPO phases: rollout (KV-cached CFG generation), rewards (format + the dual
self-reward, one teacher-forced pass), advantages, reference log-probs,
policy update (forward + loss + backward + AdamW). The loss phase is measured
two ways on the same rollout: the fused path (mmr1_kernels.fused_linear_*;
only the vocab windows of the head, no logits) and the reference path (full
[N, T, 65536] logits from the head, then the reference GRPO math, as a
transformers + TRL-style trainer computes it).
SFT: fused_linear_logprobs vs full logits + torch cross-entropy.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Dict, List

import torch
import torch.nn.functional as F

import mmr1_kernels as K
from mmr1.generate import SamplingConfig
from mmr1.grpo import GRPOConfig, GRPOTrainer
from mmr1.rewards import RewardSet, format_reward
from mmr1.rewards.self_reward import generation_self_reward
from mmr1.rollout import XCoTFormat
from mmr1.sft import sft_loss
from mmr1.tokens import ImageVocab

from .common import Row, ensure_bench_env, format_table, machine_info, peak_extra_mib, save_rows
from .generation import lumina_shaped_model

VOCAB = ImageVocab.lumina()


def _fmt(side: int) -> XCoTFormat:
    return XCoTFormat(think_open=9000, think_close=9001, end_of_turn=8710, subject_hw=(side, side),
                      final_hw=(side, side), text_range=(8900, 65536), max_text_tokens=8)


def _reward_set(fmt: XCoTFormat, model) -> RewardSet:
    def self_reward(ro, batch):
        blocks = [ro.tokens[r, ro.prompt_lengths[r]:ro.lengths[r]].tolist() for r in range(ro.num_samples)]
        finals = [b[len(b) - VOCAB.block_length(*fmt.final_hw) - 1:-1] for b in blocks]
        return generation_self_reward(model, finals, [b["prompt_ids"][1:-1] for b in batch], prefix=[9100], sep=8710)

    return RewardSet({"format": lambda ro, b: format_reward(ro, VOCAB, fmt), "self": self_reward},
                     {"format": 1.0, "self": 0.1})


def bench_grpo_step(side: int, repeats: int, layers: int = 4, hidden: int = 512) -> List[Row]:
    torch.manual_seed(0)
    model = lumina_shaped_model(layers, hidden)
    fmt = _fmt(side)
    prompts = [{"prompt_ids": [1] + list(range(9200 + 10 * i, 9210 + 10 * i)) + [8710]} for i in range(4)]
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, lr=1e-5, beta=0.04,
                     sampling=SamplingConfig(cfg_scale=3.0, top_k=2000, text_top_k=50))
    tr = GRPOTrainer(model, VOCAB, fmt, _reward_set(fmt, model), prompts, cfg)
    phases: Dict[str, List[float]] = {k: [] for k in ("rollout", "rewards", "advantages", "ref logprobs",
                                                      "update (fused)", "update (reference path)",
                                                      "rollout (jacobi W=8)")}
    jacobi = replace(cfg, sampling=replace(cfg.sampling, decode="jacobi", jacobi_window=8))
    peaks = {}
    for rep in range(repeats):
        batch = tr.batch_for(rep)
        t0 = time.perf_counter()
        model.eval()
        ro = tr.rollout_fn(model, batch, 4, cfg.sampling_for(rep), torch.arange(8))
        t1 = time.perf_counter()
        # the same rollout by Jacobi windows, before the update changes the policy: the same tokens (checked)
        ro_j = tr.rollout_fn(model, batch, 4, jacobi.sampling_for(rep), torch.arange(8))
        tj = time.perf_counter() - t1
        if (ro_j.tokens != ro.tokens).float().mean() > 1e-3:
            raise AssertionError("Jacobi rollout tokens differ from the sequential ones")
        t1 = time.perf_counter()
        rewards, weights, _ = tr.rewards(ro, [b for b in batch for _ in range(4)])
        t2 = time.perf_counter()
        adv, _ = K.group_advantages(rewards, group_size=4, weights=weights)
        t3 = time.perf_counter()
        ref = tr.ref_logprobs(ro)
        t4 = time.perf_counter()
        model.train()

        def fused_update():
            loss, _ = tr.loss(ro, adv, None, ref)
            tr.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            tr.optimizer.step()

        def reference_update():  # the trainer's backend="reference": full logits + the reference math
            kernels = tr.cfg
            tr.cfg = replace(kernels, sampling=replace(kernels.sampling, backend="reference"))
            try:
                loss, _ = tr.loss(ro, adv, None, ref)
            finally:
                tr.cfg = kernels
            tr.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            tr.optimizer.step()

        fused_update()
        t5 = time.perf_counter()
        reference_update()
        t6 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, tj)):
            phases[k].append(v)
        if rep == 0:
            peaks["update (fused)"] = peak_extra_mib(fused_update)
            peaks["update (reference path)"] = peak_extra_mib(reference_update)
    tokens = int(ro.lengths.sum())
    case = f"G=4 x 2 prompts, {side}x{side}-code images, {tokens} tokens/step"
    rows = []
    fused_med = statistics.median(phases["update (fused)"])
    for k, v in phases.items():
        med = statistics.median(v)
        rows.append(Row(bench="GRPO step by phase", case=case, provider=k, median_ms=med * 1e3,
                        p25_ms=min(v) * 1e3, p75_ms=max(v) * 1e3, peak_mib=peaks.get(k, float("nan")),
                        ratio_vs_ours=med / fused_med if k.startswith("update") else float("nan"),
                        note=f"{tokens / med:.0f} train tok/s" if k.startswith("update") else
                        f"x{statistics.median(phases['rollout']) / med:.2f} vs the sequential rollout (random "
                        f"model: the worst case for Jacobi)" if k.startswith("rollout (") else ""))
    return rows


def bench_cfg_loss(side: int, repeats: int, layers: int = 4, hidden: int = 512) -> List[Row]:
    """The update (forward + loss + backward) under each GRPOConfig.cfg_loss on one rollout: the guided conventions
    add the unconditional sequences' forward (Lumina-mGPT: each image block alone) and its backward ("guided",
    "guided_scaled") or only the forward ("guided_detached")."""
    from mmr1.grpo import CFG_LOSSES

    torch.manual_seed(0)
    model = lumina_shaped_model(layers, hidden)
    fmt = _fmt(side)
    prompts = [{"prompt_ids": [1] + list(range(9200 + 10 * i, 9210 + 10 * i)) + [8710]} for i in range(4)]
    times: Dict[str, List[float]] = {}
    tokens = 0
    for cfg_loss in CFG_LOSSES:
        cfg = GRPOConfig(group_size=4, prompts_per_step=2, lr=1e-5, beta=0.0, cfg_loss=cfg_loss,
                         sampling=SamplingConfig(cfg_scale=3.0, text_top_k=50))
        tr = GRPOTrainer(model, VOCAB, fmt, _reward_set(fmt, model), prompts, cfg)
        model.eval()
        ro = tr.rollout_fn(model, tr.batch_for(0), 4, cfg.sampling_for(0), torch.arange(8))
        tokens = int(ro.lengths.sum())
        adv = torch.linspace(-1, 1, ro.num_samples)
        model.train()
        times[cfg_loss] = []
        for _ in range(repeats + 1):  # the first: warm-up
            t0 = time.perf_counter()
            loss, _ = tr.loss(ro, adv, None, None)
            loss.backward()
            model.zero_grad(set_to_none=True)
            times[cfg_loss].append(time.perf_counter() - t0)
        times[cfg_loss] = times[cfg_loss][1:]
    from .common import summarize

    return summarize("GRPO update by cfg_loss (fwd + loss + bwd)", f"G=4 x 2 prompts, {side}x{side}-code images, "
                     f"{tokens} tokens, CFG 3", times, "cond", {}, None,
                     {k: "+ the unconditional forward" + ("" if k == "guided_detached" else " and backward")
                      for k in times if k != "cond"})


def bench_sft_step(repeats: int, B: int = 8, T: int = 512, layers: int = 4, hidden: int = 512) -> List[Row]:
    torch.manual_seed(0)
    model = lumina_shaped_model(layers, hidden)
    seqs = [torch.randint(4, 65536, (T,)).tolist() for _ in range(B)]
    plen = [T // 4] * B

    def fused():
        model.zero_grad(set_to_none=True)
        sft_loss(model, seqs, plen)[0].backward()

    def reference():
        model.zero_grad(set_to_none=True)
        tokens = torch.tensor(seqs)
        logits = model.logits(model(tokens)[:, :-1]).float()  # [B, T-1, 65536]
        labels = tokens[:, 1:].clone()
        labels[:, : T // 4 - 1] = -100
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100).backward()

    times = {"mmr1 (fused_linear_logprobs)": [], "eager (full logits + cross_entropy)": []}
    for _ in range(repeats):
        for name, fn in zip(times, (fused, reference)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    peaks = {"mmr1 (fused_linear_logprobs)": peak_extra_mib(fused),
             "eager (full logits + cross_entropy)": peak_extra_mib(reference)}
    from .common import summarize

    return summarize("SFT step (fwd+bwd)", f"B={B} T={T} V=65536 d={hidden}", times, "mmr1 (fused_linear_logprobs)",
                     peaks, None, {k: f"{B * T / statistics.median(v):.0f} tok/s" for k, v in times.items()})


def main(argv=None) -> List[Row]:
    if argv is None:
        ensure_bench_env("bench.train_step")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="implies --quick: the smallest shapes, one repeat -- that the suite runs end to end (the GPU check's dry run); its figures mean nothing")
    args = ap.parse_args(argv)
    args.quick |= args.smoke
    # --smoke: 1 layer, d 64 (the vocabulary stays Lumina's: the image window and text range live in it)
    layers, hidden = (1, 64) if args.smoke else (4, 512)
    meta = {**machine_info(), "model": f"{layers}L d{hidden} V65536"}
    print("machine:", meta)
    if args.smoke:
        rows = bench_grpo_step(2, 1, layers, hidden) + bench_sft_step(1, B=2, T=32, layers=layers, hidden=hidden)
        rows += bench_cfg_loss(2, 1, layers, hidden)
    else:
        rows = bench_grpo_step(8 if args.quick else 16, 2 if args.quick else 3)
        rows += bench_sft_step(2 if args.quick else 3, T=128 if args.quick else 512)
        rows += bench_cfg_loss(8 if args.quick else 16, 3 if args.quick else 5)
    print(format_table(rows))
    path = save_rows("train_step" + ("_quick" if args.quick else ""), rows, meta)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
