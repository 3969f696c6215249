"""Triton kernel: fused CFG sampler (guidance, temperature, exact top-k/top-p, Philox Gumbel-max).

One program per row. The vocab window is streamed in BLOCK-wide tiles; every
pass recomputes z = (u + s (c - u)) / T from the input rows (bf16: 2 x 16 KiB
per row at W = 8192, L2-resident after the first pass) instead of keeping an
fp32 copy in HBM. The thresholds are exact: bisection on the order-preserving
uint32 key of z, one counting pass per step (top-k stops once exactly k values
are above the pivot; top-p bisects the kept mass), then one race pass
argmax q / -log U with U from Philox4x32-10 keyed by (seed, row_id, offset, j)
-- the same stream as csrc/sampler.cpp and the reference, so all backends
draw the same token from the same fp32 logits. seed/offset are read from
device tensors (no host sync: a decode step can be captured in a CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .specs import KernelSpec

# 1024 lanes x 8 warps: 4 values per thread per tile; only scalars stay live
# across tiles. 1024 x 4 warps needed 96 registers and spilled 8 B on sm_80;
# 1024 x 8: 97 (sm_80) / 60 (sm_90) registers, 0 spills (tests/test_aot.py).
BLOCK = 1024
WARPS = 8


@triton.jit
def _guided(c_row, u_row, offs, n, s, inv_t, HAS_UNCOND: tl.constexpr):
    inside = offs < n
    c = tl.load(c_row + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_row + offs, mask=inside, other=0.0).to(tl.float32)
        c = u + s * (c - u)
    return c * inv_t


@triton.jit
def _key(z):  # order-preserving float -> uint32
    b = z.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@triton.jit
def _unkey(k):
    b = tl.where((k >> 31) != 0, k & 0x7FFFFFFF, ~k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _kept_mass(c_row, u_row, cols, W, s, inv_t, thr, m, HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr):
    """sum of exp(z - m) over the kept entries (z >= thr, finite)."""
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, W, BLOCK):
        offs = start + cols
        z = _guided(c_row, u_row, offs, W, s, inv_t, HAS_UNCOND)
        keep = (offs < W) & (z >= thr) & (z > float("-inf"))
        total += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), axis=0)
    return total


@triton.jit
def cfg_sample_kernel(
    cond_ptr, uncond_ptr, cfg_ptr, temp_ptr, topk_ptr, topp_ptr, forced_ptr, seed_ptr, offset_ptr, rowid_ptr,
    tokens_ptr, logp_ptr, cond_lp_ptr, status_ptr,
    stride_c, stride_u, stride_off, vocab_lo, W,
    HAS_UNCOND: tl.constexpr, HAS_FORCED: tl.constexpr, WANT_COND: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    forced = -1
    if HAS_FORCED:
        forced = tl.load(forced_ptr + r)
    if forced >= 0:  # structure token: no logits read
        tl.store(tokens_ptr + r, forced)
        tl.store(logp_ptr + r, 0.0)
        if WANT_COND:
            tl.store(cond_lp_ptr + r, 0.0)
        tl.store(status_ptr + r, 0)
    else:
        c_row = cond_ptr + r * stride_c + vocab_lo
        u_row = uncond_ptr + r * stride_u + vocab_lo
        s = tl.load(cfg_ptr + r)
        temp = tl.load(temp_ptr + r)
        greedy = temp == 0.0
        inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
        # ---- pass 1: max and NaN count (greedy: first argmax)
        m = tl.full([], float("-inf"), tl.float32)
        nan_count = tl.full([], 0, tl.int32)
        g_best = tl.full([], float("-inf"), tl.float32)
        g_idx = tl.full([], 0, tl.int64) + W
        for start in range(0, W, BLOCK):
            offs = start + cols
            z = _guided(c_row, u_row, offs, W, s, inv_t, HAS_UNCOND)
            z = tl.where(offs < W, z, float("-inf"))
            nan_count += tl.sum(tl.where(z != z, 1, 0), axis=0).to(tl.int32)
            bmax = tl.max(z, axis=0)
            bidx = tl.min(tl.where(z == bmax, offs, W), axis=0)
            take = bmax > g_best
            g_idx = tl.where(take, bidx, g_idx)
            g_best = tl.where(take, bmax, g_best)
            m = tl.maximum(m, bmax)
        status = tl.where(nan_count > 0, 1, 0).to(tl.int32)
        idx = g_idx
        logp = tl.full([], 0.0, tl.float32)
        if (nan_count == 0) & (temp != 0.0):
            # ---- top-k threshold: largest key K with count(z >= K) >= k
            k = tl.load(topk_ptr + r)
            thr = tl.full([], float("-inf"), tl.float32)
            if (k > 0) & (k < W):
                lo = _key(tl.full([], float("-inf"), tl.float32))
                hi = _key(m) + 1
                while hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    t = _unkey(mid)
                    cnt = tl.full([], 0, tl.int64)
                    for start in range(0, W, BLOCK):
                        offs = start + cols
                        z = _guided(c_row, u_row, offs, W, s, inv_t, HAS_UNCOND)
                        cnt += tl.sum(tl.where((offs < W) & (z >= t), 1, 0), axis=0).to(tl.int64)
                    lo = tl.where(cnt >= k, mid, lo)
                    hi = tl.where(cnt == k, mid + 1, tl.where(cnt >= k, hi, mid))
                # the smallest value >= the pivot: exactly the k-th largest
                t = _unkey(lo)
                thr = tl.full([], float("inf"), tl.float32)
                for start in range(0, W, BLOCK):
                    offs = start + cols
                    z = _guided(c_row, u_row, offs, W, s, inv_t, HAS_UNCOND)
                    thr = tl.minimum(thr, tl.min(tl.where((offs < W) & (z >= t), z, float("inf")), axis=0))
            # ---- kept mass
            total = _kept_mass(c_row, u_row, cols, W, s, inv_t, thr, m, HAS_UNCOND, BLOCK)
            # ---- top-p threshold: largest key K with mass(z >= K) >= p * total
            p = tl.load(topp_ptr + r)
            if (p < 1.0) & (total > 0.0):
                target = p * total
                lo = _key(tl.full([], 0.0, tl.float32) + thr)
                hi = _key(m) + 1
                while hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    t = _unkey(mid)
                    mass = tl.full([], 0.0, tl.float32)
                    for start in range(0, W, BLOCK):
                        offs = start + cols
                        z = _guided(c_row, u_row, offs, W, s, inv_t, HAS_UNCOND)
                        keep = (offs < W) & (z >= t) & (z >= thr) & (z > float("-inf"))
                        mass += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), axis=0)
                    lo = tl.where(mass >= target, mid, lo)
                    hi = tl.where(mass >= target, hi, mid)
                thr = tl.maximum(thr, _unkey(lo))
                total = _kept_mass(c_row, u_row, cols, W, s, inv_t, thr, m, HAS_UNCOND, BLOCK)
            status = tl.where(total > 0.0, status, 2).to(tl.int32)
            # ---- exponential race (Gumbel-max) with Philox4x32-10
            seed = tl.load(seed_ptr)
            off = tl.load(offset_ptr + r * stride_off)  # stride 0: one offset for the batch
            off_lo = (off & 0xFFFFFFFF).to(tl.uint32)
            off_hi = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
            row = (tl.load(rowid_ptr + r) & 0xFFFFFFFF).to(tl.uint32)
            best = tl.full([], -2.0, tl.float32)
            idx = tl.full([], 0, tl.int64)
            for start in range(0, W, BLOCK):
                offs = start + cols
                z = _guided(c_row, u_row, offs, W, s, inv_t, HAS_UNCOND)
                keep = (offs < W) & (z >= thr) & (z > float("-inf"))
                q = tl.where(keep, tl.exp(z - m), 0.0)
                j = offs + vocab_lo
                zero = tl.zeros([BLOCK], tl.uint32)
                r0, r1, r2, r3 = tl.philox(seed, (j >> 2).to(tl.uint32), zero + row, zero + off_lo, zero + off_hi)
                lane = j & 3
                bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
                unif = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-8
                race = tl.where(q > 0.0, q / -tl.log(unif), -1.0)
                bmax = tl.max(race, axis=0)
                bidx = tl.min(tl.where(race == bmax, offs, W), axis=0)
                take = bmax > best
                idx = tl.where(take, bidx, idx)
                best = tl.where(take, bmax, best)
            idx = tl.minimum(idx, W - 1)
            z_tok = _guided(c_row, u_row, idx + tl.arange(0, 1), W, s, inv_t, HAS_UNCOND)
            logp = tl.sum(z_tok, axis=0) - m - tl.log(total)
        ok = status == 0
        idx = tl.where(ok, idx, 0)
        tl.store(tokens_ptr + r, (vocab_lo + idx).to(tl.int64))
        tl.store(logp_ptr + r, tl.where(ok, logp, float("nan")))
        tl.store(status_ptr + r, status.to(tl.int32))
        if WANT_COND:
            # log_softmax(c / T over the window)[token] (T = 1 for greedy rows)
            cm = tl.full([], float("-inf"), tl.float32)
            for start in range(0, W, BLOCK):
                offs = start + cols
                c = tl.load(c_row + offs, mask=offs < W, other=float("-inf")).to(tl.float32) * inv_t
                cm = tl.maximum(cm, tl.max(c, axis=0))
            cs = tl.full([], 0.0, tl.float32)
            for start in range(0, W, BLOCK):
                offs = start + cols
                c = tl.load(c_row + offs, mask=offs < W, other=float("-inf")).to(tl.float32) * inv_t
                cs += tl.sum(tl.where(offs < W, tl.exp(c - cm), 0.0), axis=0)
            c_tok = tl.load(c_row + idx).to(tl.float32) * inv_t
            tl.store(cond_lp_ptr + r, tl.where(ok, c_tok - cm - tl.log(cs), float("nan")))


def cfg_sample(cond, uncond, cfg_scale, temperature, top_k, top_p, forced, seed, offset, row_ids, vocab_lo, vocab_hi,
               return_cond_logprobs):
    B = cond.shape[0]
    dev = cond.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float32, device=dev)
    cond_lp = torch.empty(B if return_cond_logprobs else 0, dtype=torch.float32, device=dev)
    status = torch.empty(B, dtype=torch.int32, device=dev)
    if B == 0:
        return tokens, logp, cond_lp, status
    cfg_sample_kernel[(B,)](
        cond, uncond if uncond is not None else cond, cfg_scale, temperature, top_k, top_p,
        forced if forced is not None else tokens, seed, offset, row_ids,
        tokens, logp, cond_lp if return_cond_logprobs else logp, status,
        cond.stride(0), uncond.stride(0) if uncond is not None else 0, 0 if offset.numel() == 1 else 1,
        vocab_lo, vocab_hi - vocab_lo,
        HAS_UNCOND=uncond is not None, HAS_FORCED=forced is not None, WANT_COND=return_cond_logprobs,
        BLOCK=BLOCK, num_warps=WARPS,
    )
    return tokens, logp, cond_lp, status


def aot_specs():
    for dtype in ("fp32", "bf16", "fp16"):
        sig = {"cond_ptr": f"*{dtype}", "uncond_ptr": f"*{dtype}", "cfg_ptr": "*fp32", "temp_ptr": "*fp32",
               "topk_ptr": "*i64", "topp_ptr": "*fp32", "forced_ptr": "*i64", "seed_ptr": "*i64",
               "offset_ptr": "*i64", "rowid_ptr": "*i64", "tokens_ptr": "*i64", "logp_ptr": "*fp32",
               "cond_lp_ptr": "*fp32", "status_ptr": "*i32", "stride_c": "i64", "stride_u": "i64", "stride_off": "i64",
               "vocab_lo": "i64", "W": "i64"}
        const = dict(HAS_UNCOND=True, HAS_FORCED=True, WANT_COND=True, BLOCK=BLOCK)
        yield KernelSpec(f"cfg_sample[{dtype}]", cfg_sample_kernel, sig, const, WARPS)
