"""Benchmark: one CFG image-token sampling step, B rows (x2 for cond/uncond), V = 65536, window 8192.

    python -m bench.sampler [--quick]

Providers: ours (mmr1_kernels.cfg_sample), the eager reference spec
(mmr1_kernels.reference_sampler, Philox in torch ops), a typical eager decode
step (LlamaGen / gpt-fast style: CFG on the window, torch.topk threshold,
softmax, torch.multinomial), torch.compile of that step, and the transformers
pipeline Lumina-mGPT uses (full-vocab CFG processor, image-window mask,
temperature and top-k warpers, softmax, multinomial).
"""
from __future__ import annotations

import argparse
from typing import List

import torch

from mmr1_kernels import reference_sampler as R
from mmr1_kernels.sampler import cfg_sample

from .common import (DEVICE, Row, copy_bandwidth_gbs, ensure_bench_env, format_table, machine_info, peak_extra_mib, save_rows,
                     summarize, time_providers)

V = 65536
WINDOW = (4, 8196)
TOP_K, CFG = 2000, 4.0


def typical_step(cond, uncond, scale: float, top_k: int, lo: int, hi: int):
    z = uncond[:, lo:hi].float()
    z = z + scale * (cond[:, lo:hi].float() - z)
    kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
    z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1).squeeze(1) + lo


def transformers_step(cond, uncond, processors, image_mask):
    from transformers.generation.logits_process import LogitsProcessorList

    scores = torch.cat([cond, uncond]).float()
    ids = torch.zeros(cond.shape[0], 1, dtype=torch.long)
    scores = LogitsProcessorList(processors[:1])(ids, scores)
    scores = scores.masked_fill(~image_mask, float("-inf"))  # Lumina's MultiModalLogitsProcessor (image ids only)
    scores = LogitsProcessorList(processors[1:])(ids, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)


def bench_case(B: int, dtype: torch.dtype, bw: float, repeats: int) -> List[Row]:
    from transformers.generation.logits_process import (ClassifierFreeGuidanceLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper)

    g = torch.Generator().manual_seed(0)
    cond = (torch.randn(B, V, generator=g) * 3).to(dtype).to(DEVICE)
    uncond = (torch.randn(B, V, generator=g) * 3).to(dtype).to(DEVICE)
    lo, hi = WINDOW
    rows = torch.arange(B, device=DEVICE)
    params = [torch.full((B,), CFG, device=DEVICE), torch.ones(B, device=DEVICE),
              torch.full((B,), TOP_K, dtype=torch.long, device=DEVICE), torch.ones(B, device=DEVICE)]
    image_mask = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    image_mask[lo:hi] = True
    processors = [ClassifierFreeGuidanceLogitsProcessor(CFG), TemperatureLogitsWarper(1.0), TopKLogitsWarper(TOP_K)]
    compiled = torch.compile(typical_step)
    step = iter(range(10**9))
    provs = {
        "mmr1": lambda: cfg_sample(cond, uncond, cfg_scale=CFG, top_k=TOP_K, vocab_range=WINDOW, seed=1,
                                   offset=next(step), check=False),
        "eager reference (spec)": lambda: R.cfg_sample(cond, uncond, *params, None, 1, next(step), rows, lo, hi),
        "eager topk+multinomial": lambda: typical_step(cond, uncond, CFG, TOP_K, lo, hi),
        "torch.compile(topk+multinomial)": lambda: compiled(cond, uncond, CFG, TOP_K, lo, hi),
        "transformers processors+multinomial": lambda: transformers_step(cond, uncond, processors, image_mask),
    }
    from . import peers

    if cond.is_cuda and peers.have("flashinfer"):
        provs["FlashInfer top_k_sampling_from_logits"] = lambda: peers.flashinfer_topk_sample(cond, uncond, CFG, TOP_K,
                                                                                             lo, hi)
    times = time_providers(provs, repeats, warmup=2, budget_s=60)
    peaks = {k: peak_extra_mib(f) for k, f in provs.items()}
    floor = 2 * B * (hi - lo) * cond.element_size() / (bw * 1e9)
    notes = {"transformers processors+multinomial": "full-vocab CFG (as Lumina-mGPT)"}
    return summarize("cfg_sample", f"B={B} (x2 cond/uncond) V={V} W={hi - lo} top_k={TOP_K} "
                     f"{str(dtype).replace('torch.', '')}", times, "mmr1", peaks, floor, notes)


def main(argv=None) -> List[Row]:
    if argv is None:
        ensure_bench_env("bench.sampler")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="implies --quick: one batch size, one repeat -- that the "
                    "suite runs end to end (the GPU check's dry run); its figures mean nothing")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    args.quick |= args.smoke
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 9)
    bw = copy_bandwidth_gbs()
    from mmr1_kernels import backend_for

    meta = {**machine_info(), "copy_bandwidth_GBps": round(bw, 1), "backend": backend_for(DEVICE)}
    print("machine:", meta)
    rows: List[Row] = []
    for B in ((1,) if args.smoke else (1, 8) if args.quick else (1, 8, 32, 128)):
        rows += bench_case(B, torch.bfloat16, bw, repeats)
    print(format_table(rows))
    path = save_rows("sampler" + ("_quick" if args.quick else ""), rows, meta)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
