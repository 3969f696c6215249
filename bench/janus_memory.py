"""Computed, not measured: per-GPU memory of GRPO on Janus-Pro-7B at T2I-R1's settings (8 x 80 GB, G = 8, CFG,
576 image tokens), for a T2I-R1-style loop and for mmr1's trainer with its memory settings.

    python -m bench.janus_memory [--prompts-per-gpu 1 2] [--cot 256] [--prompt 64]

Every figure is arithmetic on the model's shape (Janus-Pro-7B: 30 layers, d 4096, MLP 11,008, 32 heads, 102,400
text ids, 16,384 codes, ~7.1e9 trainable parameters) and the stated settings; the formulas are in the code, one per
line. What is not known about T2I-R1's runs (its prompt and reasoning lengths, prompts per GPU, whether gradient
checkpointing was on) is a parameter. No GPU has run this; treat the table as a plan, and the totals as lower bounds
(allocator fragmentation, NCCL buffers, CUDA context ~1-3 GB and temporaries are not counted).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List

GB = 1e9
LAYERS, D, FFN, V_TEXT, CODES = 30, 4096, 11008, 102400, 16384
PARAMS = 7.1e9  # trainable: the language model + the generation embedding / aligner / head
GPUS = 8
# activations kept for the backward per token per layer without recomputation, bf16 (Korthikanti et al.'s 34 d
# bytes for attention + norms, plus SwiGLU's three d_ff-wide tensors): (34 * 4096 + 6 * 11008) B ~ 205 KB
ACT_PER_TOKEN_LAYER = 34 * D + 6 * FFN


@dataclass
class Setting:
    name: str
    shared_prefix_cache: bool  # the prompt's KV once per group (mmr1) or in every row (transformers' static cache)
    logits_materialized: bool  # the loss builds fp32 logits (T2I-R1's loop) or not (mmr1's fused loss)
    reference_sharded: bool  # the frozen reference model sharded over the GPUs (ZeRO-3) or one bf16 copy per GPU
    whole_policy_in_rollout: bool  # the policy kept gathered through the rollout (mmr1 under FSDP2)
    micro_batch: int  # sequences per forward / backward of the update (0: all)
    activation_checkpointing: bool


SETTINGS = [
    Setting("T2I-R1-style loop (HF static cache, full fp32 logits, ZeRO-3 reference)", False, True, True, False, 0,
            False),
    Setting("... with gradient checkpointing", False, True, True, False, 0, True),
    Setting("mmr1 defaults (shared-prefix cache, fused loss, FSDP2)", True, False, True, True, 0, False),
    Setting("mmr1, micro_batch_size 1", True, False, True, True, 1, False),
    Setting("mmr1, micro_batch_size 1 + activation_checkpointing", True, False, True, True, 1, True),
]


def estimate(s: Setting, G: int, prompts: int, prompt_len: int, cot: int) -> Dict[str, float]:
    """Per-GPU bytes of each part and of the two phases' peaks."""
    image = 576 + 2  # boi, 24 x 24 codes, eoi
    T = prompt_len + cot + image
    n = G * prompts  # sequences per GPU
    kv_token = 2 * LAYERS * D * 2  # K and V, every layer, bf16
    out = {"train state (fp32 master + grads + AdamW, sharded)": PARAMS * 16 / GPUS,
           "reference model (bf16)": PARAMS * 2 / (GPUS if s.reference_sharded else 1)}
    if s.shared_prefix_cache:  # cond rows: prompt once per group, own reasoning + image; uncond rows: BOS + pads
        # (one per distinct length: at most G per group) + their image
        positions = prompts * (prompt_len + G * (cot + image) + G * (prompt_len + cot) + G * image)
    else:  # 2 G rows per prompt, each the full length
        positions = 2 * n * T
    out["rollout KV cache"] = positions * kv_token
    out["policy gathered for the rollout (bf16)"] = PARAMS * 2 if s.whole_policy_in_rollout else 0.0
    rows = s.micro_batch or n
    tokens = rows * T
    if s.activation_checkpointing:  # block inputs kept, one block's activations live at a time
        out["update activations"] = tokens * LAYERS * D * 2 + tokens * ACT_PER_TOKEN_LAYER
    else:
        out["update activations"] = tokens * LAYERS * ACT_PER_TOKEN_LAYER
    if s.logits_materialized:  # fp32 logits, their log_softmax and their gradient: 3 copies
        out["loss logits"] = 3 * 4 * rows * (cot * V_TEXT + 576 * CODES)
    else:  # the fused loss: one chunk of a window at a time (mmr1_kernels), under 100 MB here
        out["loss logits"] = 0.0
    base = out["train state (fp32 master + grads + AdamW, sharded)"] + out["reference model (bf16)"]
    out["peak in the rollout"] = base + out["rollout KV cache"] + out["policy gathered for the rollout (bf16)"]
    out["peak in the update"] = base + out["update activations"] + out["loss logits"]
    return out


def table(G: int, prompts_per_gpu: List[int], prompt_len: int, cot: int) -> str:
    lines = [f"Janus-Pro-7B, {GPUS} GPUs, G = {G}, CFG, a {prompt_len}-token prompt, {cot} reasoning tokens, 576 "
             "image tokens; GB per GPU (1e9 B), computed", "",
             "| setting | prompts / GPU | train state | reference | KV cache | gathered policy | activations | "
             "logits | rollout peak | update peak | fits 80 GB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in prompts_per_gpu:
        for s in SETTINGS:
            e = estimate(s, G, p, prompt_len, cot)
            peak = max(e["peak in the rollout"], e["peak in the update"])
            lines.append(f"| {s.name} | {p} | " + " | ".join(f"{v / GB:.1f}" for v in list(e.values())[:8])
                         + f" | {'yes' if peak < 80 * GB else '**no**'} ({peak / GB:.0f}) |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts-per-gpu", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (T2I-R1's template + caption; assumed)")
    ap.add_argument("--cot", type=int, default=256, help="reasoning tokens (T2I-R1's semantic CoT; assumed)")
    args = ap.parse_args(argv)
    text = table(args.group, args.prompts_per_gpu, args.prompt, args.cot)
    print(text)
    return text


if __name__ == "__main__":
    main()
