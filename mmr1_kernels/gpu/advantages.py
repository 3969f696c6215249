"""Triton kernels: segmented (group-wise) reward statistics and advantages.

Rows are first sorted by group (CSR layout: ``order`` holds row ids grouped by
group, ``starts[g]:starts[g+1]`` its span), so any labels, any order and any
group sizes work without atomics. One program per group runs a shifted
two-pass over its members: values relative to the group's first valid value,
so a constant group gives deviations, std and advantages of exactly 0.0 in
fp32 (no E[x^2]-E[x]^2 residue). Batch-level statistics (modes batch/gdpo) use
the same kernel with a single group spanning every row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .specs import KernelSpec

BLOCK = 256  # group members per tile; groups are usually 4-64 rows


@triton.jit
def group_stats_kernel(values_ptr, order_ptr, starts_ptr, mean_ptr, std_ptr, count_ptr, shift_ptr, ssum_ptr,
                       UNBIASED: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    begin = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    cols = tl.arange(0, BLOCK)
    # shift = first valid (non-NaN) value of the group, in sorted order
    first_pos = end
    for s in range(begin, end, BLOCK):
        idx = s + cols
        x = tl.load(values_ptr + tl.load(order_ptr + idx, mask=idx < end, other=0), mask=idx < end, other=float("nan"))
        first_pos = tl.minimum(first_pos, tl.min(tl.where(x == x, idx, end), axis=0))
    has = first_pos < end
    shift = tl.load(values_ptr + tl.load(order_ptr + tl.where(has, first_pos, 0)), mask=has, other=0.0)
    acc = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.float32)
    for s in range(begin, end, BLOCK):
        idx = s + cols
        x = tl.load(values_ptr + tl.load(order_ptr + idx, mask=idx < end, other=0), mask=idx < end, other=float("nan"))
        ok = x == x
        acc += tl.where(ok, x - shift, 0.0)
        cnt += tl.where(ok, 1.0, 0.0)
    n = tl.sum(cnt, axis=0)
    ssum = tl.sum(acc, axis=0)
    mean = shift + ssum / tl.maximum(n, 1.0)
    m2 = tl.zeros([BLOCK], tl.float32)
    for s in range(begin, end, BLOCK):
        idx = s + cols
        x = tl.load(values_ptr + tl.load(order_ptr + idx, mask=idx < end, other=0), mask=idx < end, other=float("nan"))
        d = tl.where(x == x, x - mean, 0.0)
        m2 += d * d
    dof = n - 1.0 if UNBIASED else n
    std = tl.where((n > 1.0) & (dof > 0.0), tl.sqrt(tl.sum(m2, axis=0) / tl.maximum(dof, 1.0)), 0.0)
    tl.store(mean_ptr + g, tl.where(n > 0, mean, float("nan")))
    tl.store(std_ptr + g, std)
    tl.store(count_ptr + g, n)
    tl.store(shift_ptr + g, shift)
    tl.store(ssum_ptr + g, ssum)


def group_stats(values: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, unbiased: bool):
    """(mean, std, count, shift, shifted_sum) per group, fp32. ``values`` fp32 [N] (NaN = missing)."""
    G = starts.numel() - 1
    outs = [torch.empty(G, dtype=torch.float32, device=values.device) for _ in range(5)]
    if G > 0:
        group_stats_kernel[(G,)](values, order, starts, *outs, UNBIASED=unbiased, BLOCK=BLOCK, num_warps=4)
    return outs


def csr(group_index: torch.Tensor, num_groups: int):
    """Sort rows by group: (order [N], starts [G+1]) int64."""
    order = torch.argsort(group_index, stable=True)
    counts = torch.bincount(group_index, minlength=num_groups)
    starts = torch.zeros(num_groups + 1, dtype=torch.int64, device=group_index.device)
    starts[1:] = torch.cumsum(counts, 0)
    return order, starts


def _scaled(d, denom):
    return torch.where(d == 0, 0.0, d / denom)  # constant groups stay exactly 0, even with eps = 0


def group_advantages(rewards, group_index, num_groups, weights, mode, eps, unbiased):
    """Triton path of mmr1::group_advantages (mode ints as in _library / advantages.MODES)."""
    r = rewards.float()
    N, R = r.shape
    w = torch.ones(R, dtype=torch.float32, device=r.device) if weights is None else weights.float()
    nan = torch.isnan(r)
    any_valid = (~nan).any(dim=1)
    combined = torch.where(nan, 0.0, r * w).sum(dim=1) if R > 1 else r[:, 0] * w[0]
    combined = torch.where(any_valid, combined, float("nan")).contiguous()
    order, starts = csr(group_index, num_groups)
    mean, std, count, shift, ssum = group_stats(combined, order, starts, unbiased)
    whole = torch.tensor([0, N], dtype=torch.int64, device=r.device)
    ident = torch.arange(N, device=r.device)
    gi = group_index
    if mode == 4:  # gdpo
        summed = torch.zeros(N, dtype=torch.float32, device=r.device)
        for j in range(R):
            col = r[:, j].contiguous()
            m_j, s_j, *_ = group_stats(col, order, starts, unbiased)
            z = _scaled(col - m_j[gi], s_j[gi] + eps)
            summed += w[j] * torch.where(nan[:, j], 0.0, z)
        summed = torch.where(any_valid, summed, float("nan")).contiguous()
        bm, bs, *_ = group_stats(summed, ident, whole, unbiased)
        adv = _scaled(summed - bm[0], bs[0] + eps)
    elif mode == 0:
        adv = _scaled(combined - mean[gi], std[gi] + eps)
    elif mode == 1:
        adv = combined - mean[gi]
    elif mode == 3:
        _, bs, *_ = group_stats(combined, ident, whole, unbiased)
        adv = _scaled(combined - mean[gi], bs[0] + eps)
    else:  # rloo
        n = count[gi]
        xs = combined - shift[gi]
        adv = torch.where(n > 1, xs - (ssum[gi] - xs) / (n - 1).clamp(min=1), 0.0)
    adv = torch.where(any_valid, adv, 0.0)
    return adv.float(), mean, std


def aot_specs():
    sig = {"values_ptr": "*fp32", "order_ptr": "*i64", "starts_ptr": "*i64", "mean_ptr": "*fp32", "std_ptr": "*fp32",
           "count_ptr": "*fp32", "shift_ptr": "*fp32", "ssum_ptr": "*fp32"}
    yield KernelSpec("group_stats", group_stats_kernel, sig, dict(UNBIASED=True, BLOCK=BLOCK), 4)
