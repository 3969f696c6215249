"""Benchmark: fused log-prob / GRPO loss / fused-linear GRPO / group advantages vs what users would use instead.

    python -m bench.logprob            # full shapes (B*T = 4096 and 16384 tokens, V = 65536, window 8192)
    python -m bench.logprob --quick    # small shapes, < 1 minute

Providers per case: ours (mmr1_kernels), the eager reference (mmr1_kernels.reference,
fp32 math: what a careful PyTorch user writes), torch.compile of that
reference, TRL (selective_log_softmax + GRPOTrainer loss math), Liger-Kernel
(LigerFusedLinearGRPOLoss, its chunked torch path runs on CPU).
"""
from __future__ import annotations

import argparse
import statistics
from typing import List

import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R

from . import peers
from .common import (DEVICE, Row, copy_bandwidth_gbs, ensure_bench_env, format_table, machine_info, peak_extra_mib,
                     save_rows, summarize, time_providers)

V = 65536
WINDOW = (4, 8196)  # Lumina-mGPT image codes: ids 4..8195
W = WINDOW[1] - WINDOW[0]
KW = dict(temperature=1.0, vocab_range=WINDOW, epsilon=0.2, epsilon_high=0.28, beta=0.04)


def _grpo_inputs(N, dtype, T=1024):
    B = max(1, N // T)
    T = N // B
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).to(DEVICE)
    targets = torch.randint(*WINDOW, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.05).to(DEVICE)
    with torch.no_grad():
        base = K.token_logprobs(logits, targets, vocab_range=WINDOW)
    old = base + 0.1 * torch.randn(B, T, generator=g).to(DEVICE)
    ref = base + 0.1 * torch.randn(B, T, generator=g).to(DEVICE)
    return logits, targets, mask, torch.randn(B, generator=g).to(DEVICE), old, ref


def _grad_call(loss_fn, logits):
    def run():
        x = logits.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(x), x)
        return g

    return run


def bench_logprob(N: int, dtype: torch.dtype, bw: float, repeats: int) -> List[Row]:
    logits, targets, mask, adv, old, ref = _grpo_inputs(N, dtype)
    s = logits.element_size()
    case = f"N={N} V={V} W={W} {str(dtype).replace('torch.', '')}"
    rows = []

    # ---- forward: token log-probs
    compiled_ref = torch.compile(lambda z, t: R.token_logprobs(z, t, 1.0, *WINDOW)[0])
    fwd = {
        "mmr1": lambda: K.token_logprobs(logits, targets, vocab_range=WINDOW),
        "eager reference": lambda: R.token_logprobs(logits, targets, 1.0, *WINDOW)[0],
        "torch.compile(reference)": lambda: compiled_ref(logits, targets),
    }
    if peers.have("trl"):
        fwd["TRL selective_log_softmax"] = lambda: peers.trl_token_logprobs(logits, targets, temperature=1.0,
                                                                               vocab_range=WINDOW)
    times = time_providers(fwd, repeats, warmup=2)
    peaks = {k: peak_extra_mib(f) for k, f in fwd.items()}
    floor = (N * W * s + N * (8 + 8)) / (bw * 1e9)
    rows += summarize("token_logprobs fwd", case, times, "mmr1", peaks, floor)

    # ---- forward + backward: GRPO loss
    def ours(x):
        return K.grpo_loss(x, targets, adv, mask, old, ref, **KW)[0]

    def eager(x):
        return R.grpo_loss(x, targets, adv, mask, old, ref, **KW)[0]

    compiled = torch.compile(eager)
    def ours_inplace():  # the gradient is written over a scratch copy of the logits (no [N, V] allocation)
        x = scratch.detach().requires_grad_(True)  # a leaf sharing scratch's storage
        loss = K.grpo_loss(x, targets, adv, mask, old, ref, inplace_backward=True, **KW)[0]
        (g,) = torch.autograd.grad(loss, x)
        scratch.copy_(logits)  # restore for the next call (counted in the time)
        return g

    scratch = logits.clone()
    fb = {
        "mmr1": _grad_call(ours, logits),
        "mmr1 (inplace_backward)": ours_inplace,
        "eager reference": _grad_call(eager, logits),
        "torch.compile(reference)": _grad_call(compiled, logits),
    }
    if peers.have("trl"):
        fb["TRL selective_log_softmax + loss"] = _grad_call(
            lambda x: peers.trl_grpo_loss(x, targets, adv, mask, old, ref, **KW), logits)
    if logits.is_cuda and peers.have("liger_kernel"):  # Liger's Triton GRPO kernel is GPU-only
        fb["Liger triton_grpo_loss"] = _grad_call(
            lambda x: peers.liger_triton_grpo_loss(x, targets, adv, mask, old, ref, **KW), logits)
    times = time_providers(fb, repeats, warmup=2)
    peaks = {k: peak_extra_mib(f) for k, f in fb.items()}
    # read the window twice (fwd + bwd), write the full-size gradient, small vectors
    floor = (2 * N * W * s + N * V * s + N * 30) / (bw * 1e9)
    rows += summarize("grpo_loss fwd+bwd", case, times, "mmr1", peaks, floor,
                      {"mmr1 (inplace_backward)": "grad written over the logits; time includes restoring them"})
    return rows


def bench_fused_linear(N: int, d: int, repeats: int, dtype=torch.float32) -> List[Row]:
    g = torch.Generator().manual_seed(0)
    T = min(N, 1024)
    B = N // T
    hidden = (torch.randn(B, T, d, generator=g)).to(dtype).to(DEVICE)
    weight = (torch.randn(V, d, generator=g) / d**0.5).to(dtype).to(DEVICE)
    targets = torch.randint(*WINDOW, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.05).to(DEVICE)
    adv = torch.randn(B, generator=g).to(DEVICE)
    with torch.no_grad():
        base = K.fused_linear_logprobs(hidden, weight, targets, vocab_range=WINDOW)
    old, ref = base + 0.1, base - 0.1
    lo, hi = WINDOW
    w_win = weight[lo:hi]

    def grads(loss_fn, wt):
        def run():
            h = hidden.detach().requires_grad_(True)
            w = wt.detach().requires_grad_(True)
            return torch.autograd.grad(loss_fn(h, w), (h, w))

        return run

    def eager_full(h, w):  # what you get from a HF model: full-vocab logits, then the loss on the window
        return R.grpo_loss(h @ w.T, targets, adv, mask, old, ref, **KW)[0]

    def eager_window(h, w):  # the careful user: only the window's rows of the head
        return R.grpo_loss(h @ w.T, targets - lo, adv, mask, old, ref, **{**KW, "vocab_range": None})[0]

    def ours_window(h, w):  # same inputs and outputs as the window-rows peers
        return K.fused_linear_grpo_loss(h, w, targets - lo, adv, mask, old, ref, **{**KW, "vocab_range": None})[0]

    provs = {
        "mmr1 (window rows)": grads(ours_window, w_win),
        "mmr1 (full weight, vocab_range)": grads(
            lambda h, w: K.fused_linear_grpo_loss(h, w, targets, adv, mask, old, ref, **KW)[0], weight),
        "eager (full-vocab logits)": grads(eager_full, weight),
        "eager (window rows)": grads(eager_window, w_win),
        "torch.compile(window rows)": grads(torch.compile(eager_window), w_win),
    }
    notes = {}
    if peers.have("liger_kernel"):
        liger = peers.LigerGrpo(KW["beta"], KW["epsilon"], KW["epsilon_high"], 1.0, loss_type="grpo")
        provs["Liger FusedLinearGRPO (window rows)"] = grads(
            lambda h, w: liger(h, w, targets - lo, mask, adv, ref, old), w_win)
        notes["Liger FusedLinearGRPO (window rows)"] = "chunked torch path, compiled=True"
    times = time_providers(provs, repeats, warmup=1, budget_s=120)
    peaks = {k: peak_extra_mib(f) for k, f in provs.items()}
    # compute floor: the 3 GEMMs (logits, d hidden, d weight) over the window at the measured GEMM throughput
    a, b = hidden.reshape(-1, d), w_win
    gemm = statistics.median(time_providers({"mm": lambda: a @ b.T}, 5, warmup=1)["mm"])
    floor = 3 * gemm
    case = f"N={N} d={d} V={V} W={W} {str(dtype).replace('torch.', '')}"
    notes["mmr1 (full weight, vocab_range)"] = "grad of the full [V, d] head (compare with eager full-vocab)"
    rows = summarize("fused_linear_grpo fwd+bwd", case, times, "mmr1 (window rows)", peaks, floor, notes)
    for r in rows:
        r.extra["gemm_ms"] = gemm * 1e3
    return rows


def bench_memory_vs_vocab(N: int, d: int, vocabs) -> List[Row]:
    """Peak extra memory of a fused-linear GRPO fwd+bwd over the full vocab, as V grows (one call each)."""
    rows = []
    for V_ in vocabs:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, N, d, generator=g).to(DEVICE)
        weight = (torch.randn(V_, d, generator=g) / d**0.5).to(DEVICE)
        targets = torch.randint(0, V_, (1, N), generator=g).to(DEVICE)
        adv, mask = torch.randn(1, generator=g).to(DEVICE), torch.ones(1, N, dtype=torch.bool, device=DEVICE)

        def grads(loss_fn):
            def run():
                h = hidden.detach().requires_grad_(True)
                w = weight.detach().requires_grad_(True)
                return torch.autograd.grad(loss_fn(h, w), (h, w))

            return run

        provs = {
            "mmr1": grads(lambda h, w: K.fused_linear_grpo_loss(h, w, targets, adv, mask)[0]),
            "eager (logits + reference loss)": grads(lambda h, w: R.grpo_loss(h @ w.T, targets, adv, mask)[0]),
        }
        if peers.have("liger_kernel"):
            liger = peers.LigerGrpo(0.0, 0.2, 0.2, 1.0, loss_type="grpo")
            provs["Liger FusedLinearGRPO"] = grads(lambda h, w: liger(h, w, targets, mask, adv, None, None))
        for name, fn in provs.items():
            fn()
            rows.append(Row(bench="memory vs vocab (fused-linear GRPO fwd+bwd)", case=f"N={N} d={d} V={V_}",
                            provider=name, median_ms=float("nan"), p25_ms=float("nan"), p75_ms=float("nan"),
                            peak_mib=peak_extra_mib(fn), extra={"V": V_}))
    return rows


def bench_advantages(N: int, repeats: int) -> List[Row]:
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(N, generator=g).to(DEVICE)
    rows = []
    # groups of 8, contiguous
    provs = {
        "mmr1": lambda: K.group_advantages(rewards, group_size=8)[0],
        "eager reference (fp64)": lambda: R.group_advantages(rewards[:, None], torch.arange(N, device=DEVICE) // 8,
                                                             N // 8)[0],
        "TRL view(-1, G)": lambda: peers.trl_group_advantages(rewards, 8),
    }
    times = time_providers(provs, repeats, warmup=2)
    floor = (N * 4 + N * 4) / (copy_bandwidth_gbs(64 * 2**20, 3) * 1e9)
    rows += summarize("group_advantages", f"N={N} groups of 8", times, "mmr1", None, floor)
    # mixed sizes 1..16, shuffled labels
    sizes = torch.randint(1, 17, (N,), generator=g)
    sizes = sizes[: int((sizes.cumsum(0) <= N).sum())]
    labels = torch.repeat_interleave(torch.randperm(len(sizes), generator=g), sizes)
    M = labels.numel()
    ids = labels[torch.randperm(M, generator=g)].to(DEVICE)
    r2 = rewards[:M]
    _, index = torch.unique(ids, return_inverse=True)
    provs = {
        "mmr1": lambda: K.group_advantages(r2, ids)[0],
        "eager reference (fp64)": lambda: R.group_advantages(r2[:, None], index, len(sizes))[0],
        "verl dict loop": lambda: peers.verl_group_advantages(r2, ids),
    }
    times = time_providers(provs, max(3, repeats // 3), warmup=1)
    rows += summarize("group_advantages", f"N={M} mixed sizes 1-16", times, "mmr1", None, floor)
    return rows


def main(argv=None) -> List[Row]:
    if argv is None:
        ensure_bench_env("bench.logprob")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (< 1 minute)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="implies --quick: the smallest shapes, one repeat -- that the suite runs end to end (the GPU check's dry run); its figures mean nothing")
    args = ap.parse_args(argv)
    args.quick |= args.smoke
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 7)
    bw = copy_bandwidth_gbs()
    meta = {**machine_info(), "copy_bandwidth_GBps": round(bw, 1), "backend": K.backend_for(DEVICE)}
    print("machine:", meta)
    rows: List[Row] = []
    if args.smoke:
        plan = [(128, torch.bfloat16)]
        fl = [(64, 32)]
        adv_n = 512
    elif args.quick:
        plan = [(1024, torch.bfloat16)]
        fl = [(512, 256)]
        adv_n = 4096
    else:
        plan = [(4096, torch.bfloat16), (4096, torch.float32), (16384, torch.bfloat16)]
        fl = [(4096, 1024), (1024, 4096)]
        adv_n = 65536
    for N, dtype in plan:
        rows += bench_logprob(N, dtype, bw, repeats)
    for N, d in fl:
        rows += bench_fused_linear(N, d, max(3, repeats // 2))
    rows += bench_advantages(adv_n, repeats)
    rows += bench_memory_vs_vocab(*((64, 32, (8192,)) if args.smoke else (512, 256, (8192, 32768)) if args.quick
                                    else (2048, 512, (8192, 32768, 65536, 131072))))
    table = format_table(rows)
    print(table)
    path = save_rows("logprob" + ("_quick" if args.quick else ""), rows, meta)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
