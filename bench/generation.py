"""Benchmark: CFG image generation throughput on a Lumina-shaped small model.

    python -m bench.generation [--quick]
    python -m bench.generation --lumina7b    # Lumina-mGPT-7B width (d 4096, 32 heads), 2 layers, bf16 on CUDA

Model: vocab 65536, image window 8192 (ids 4..8195), hidden 512, 4 layers,
8 heads; 32 x 32-code images (1060-token blocks, as 512 px in Lumina-mGPT);
CFG 3, image top-k 2000.

Ours: mmr1.generate.generate_images -- cond + uncond rows on one static cache,
one batched forward per token, structure tokens from the layout table (no
head or sampling at those positions), CFG on the final hidden states, a
window-only head, the fused sampler, no host sync.

Lumina-style (faithful to lumina_mgpt/inference_solver.py): a conditional and a
separate unconditional forward per token, full-vocab logits for both, the
transformers CFG processor, the structure mask (image ids only; newline / end
forced by host logic reading the generated length), the top-k warper, softmax,
torch.multinomial and a host sync (.item()) every step. It runs on the same
model and the same static cache (kinder to it than HF's DynamicCache).
"""
from __future__ import annotations

import argparse
import time
from typing import List

import torch

from mmr1.generate import CachedDecoder, SamplingConfig, generate_images
from mmr1.model import ModelConfig, Transformer, init_weights
from mmr1.tokens import ImageVocab

from .common import DEVICE, Row, ensure_bench_env, format_table, machine_info, save_rows


def lumina_shaped_model(layers=4, hidden=512, heads=8, dtype=torch.float32) -> Transformer:
    cfg = ModelConfig(vocab_size=65536, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers,
                      num_heads=heads, num_kv_heads=heads, max_seq_len=2048)
    return init_weights(Transformer(cfg), seed=0).eval().to(DEVICE, dtype)


@torch.no_grad()
def lumina_style_generate(model: Transformer, prompts, vocab: ImageVocab, hw, cfg_scale=3.0, top_k=2000):
    from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor, TopKLogitsWarper

    h, w = hw
    B = len(prompts)
    L = vocab.block_length(h, w)
    dec = CachedDecoder(model, 2 * B, max(len(p) for p in prompts) + L + 1)
    cond_rows, uncond_rows = torch.arange(B), torch.arange(B, 2 * B)
    cfg_proc, topk = ClassifierFreeGuidanceLogitsProcessor(cfg_scale), TopKLogitsWarper(top_k)
    image_ids = vocab.code_to_token
    allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=DEVICE)
    allowed[image_ids] = True
    dec.prefill(cond_rows, prompts)
    dec.restart(B, 2 * B)
    seq: List[List[int]] = [[] for _ in range(B)]
    cond_rows, uncond_rows = cond_rows.to(DEVICE), uncond_rows.to(DEVICE)
    x = torch.full((B,), vocab.boi, dtype=torch.long, device=DEVICE)
    forward_s = 0.0
    for t in range(L):
        for r in range(B):
            seq[r].append(int(x[r]))  # host-side sequence, as HF generate keeps input_ids
        if t == L - 1:
            break
        t0 = time.perf_counter()
        hc = dec.step(x, cond_rows)
        hu = dec.step(x, uncond_rows)
        forward_s += time.perf_counter() - t0
        n = len(seq[0])  # tokens so far in the block (host logic per token, as MultiModalLogitsProcessor)
        if n == 1:
            x = torch.full((B,), vocab.size_token(h), dtype=torch.long, device=DEVICE)
            continue
        if n == 2:
            x = torch.full((B,), vocab.size_token(w), dtype=torch.long, device=DEVICE)
            continue
        logits = torch.cat([model.logits(hc), model.logits(hu)]).float()  # full vocab, both branches
        scores = cfg_proc(torch.zeros(B, 1, dtype=torch.long, device=DEVICE), logits)
        k = n - 3
        if (k + 1) % (w + 1) == 0:
            x = torch.full((B,), vocab.newline if k + 1 < h * (w + 1) else vocab.eoi, dtype=torch.long,
                           device=DEVICE)
        elif k == h * (w + 1):
            x = torch.full((B,), vocab.eoi, dtype=torch.long, device=DEVICE)
        else:
            scores = scores.masked_fill(~allowed, float("-inf"))
            scores = topk(None, scores)
            x = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]
        _ = x[0].item()  # HF generate's per-step host sync (stopping criteria, processors reading ids)
    dec.close()
    return torch.tensor(seq), forward_s


@torch.no_grad()
def forward_only_seconds(model: Transformer, B: int, prompt_len: int, L: int, cfg: bool) -> float:
    """The transformer forwards alone (same rows and steps as one generation): the floor of any decode loop."""
    rows = 2 * B if cfg else B
    dec = CachedDecoder(model, rows, prompt_len + L + 1)
    x = torch.full((rows,), 5, dtype=torch.long, device=DEVICE)
    t0 = time.perf_counter()
    for _ in range(L - 1):
        dec.step(x)
    dt = time.perf_counter() - t0
    dec.close()
    return dt


def main(argv=None) -> List[Row]:
    if argv is None:
        ensure_bench_env("bench.generation")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8x8-code images, 2 layers")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--lumina7b", action="store_true",
                    help="Lumina-mGPT-7B width: d 4096, 32 heads, 2 layers, bf16 on CUDA (fp32 on CPU)")
    ap.add_argument("--smoke", action="store_true", help="implies --quick: the smallest shapes, one repeat -- that the suite runs end to end (the GPU check's dry run); its figures mean nothing")
    args = ap.parse_args(argv)
    args.quick |= args.smoke
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 3)
    hw = (4, 4) if args.smoke else (8, 8) if args.quick else (32, 32)
    if args.lumina7b:
        model = lumina_shaped_model(layers=2, hidden=4096, heads=32,
                                    dtype=torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    else:
        model = lumina_shaped_model(layers=2 if args.quick else 4)
    vocab = ImageVocab.lumina()
    meta = {**machine_info(), "model": f"{model.config.num_layers}L d{model.config.hidden_size} V65536 "
                                       f"{str(next(model.parameters()).dtype).replace('torch.', '')}",
            "image": f"{hw[0]}x{hw[1]} codes"}
    print("machine:", meta)
    rows: List[Row] = []
    scfg = SamplingConfig(cfg_scale=3.0, top_k=2000, seed=0)
    for B in (1, 2) if args.smoke else (1, 8):
        prompts = [[1] + list(range(9000, 9020)) for _ in range(B)]
        L = vocab.block_length(*hw)
        codes = B * hw[0] * hw[1]
        res = {"mmr1": [], "Lumina-style loop": []}
        fwd_lumina = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate_images(model, prompts[:1], vocab, hw, num_samples=B, scfg=scfg)
            res["mmr1"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, fs = lumina_style_generate(model, prompts, vocab, hw)
            res["Lumina-style loop"].append(time.perf_counter() - t0)
            fwd_lumina.append(fs)
        fwd_ours = forward_only_seconds(model, B, len(prompts[0]), L, cfg=True)
        med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
        for name, t in res.items():
            m = med[name]
            q = sorted(t)
            outside = 1 - (fwd_ours if name == "mmr1" else sorted(fwd_lumina)[len(fwd_lumina) // 2]) / m
            rows.append(Row(bench="image generation (CFG 3, top-k 2000)", case=f"B={B} {hw[0]}x{hw[1]} codes",
                            provider=name, median_ms=m * 1e3, p25_ms=q[0] * 1e3, p75_ms=q[-1] * 1e3,
                            ratio_vs_ours=m / med["mmr1"],
                            note=f"{codes / m:.0f} image tok/s, {m / (L - 1) * 1e3:.2f} ms/step, "
                                 f"{100 * max(outside, 0):.0f}% of a step outside the transformer forward",
                            extra={"image_tokens_per_s": codes / m, "ms_per_step": m / (L - 1) * 1e3,
                                   "outside_forward_frac": max(outside, 0.0)}))
    print(format_table(rows))
    path = save_rows("generation" + ("_lumina7b" if args.lumina7b else "") + ("_quick" if args.quick else ""), rows,
                     meta)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
