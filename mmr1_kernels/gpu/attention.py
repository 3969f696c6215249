"""Triton kernels: decode attention over a rollout's KV cache with shared prompt prefixes (flash-decoding).

Per decode step a GRPO rollout reads, per layer, every row's context. At Lumina-mGPT-7B scale (32 layers, 32 heads
of 128, bf16: 512 KiB of KV per token) a 512 px reference image is ~1060 tokens, so one prompt's prefix is ~0.55 GB
and a G = 8 group holding G copies reads 4.4 GB per step where one copy (0.55 GB) carries the same information.

Two launches of one partial-attention kernel, then a combine:
1. prefix: a program per (prompt, kv head, key split) loads its prompt's rows (a CSR built on the device: sort of
   prefix_of_row + searchsorted, no host sync) and runs *all* their queries -- rows x window x H/Hkv heads, tiles of
   up to 64 -- against each key tile, so a prefix tile is read from HBM once per group instead of once per row;
2. own: a program per (row, kv head, key split) over the row's own slots, causal inside the window (query w sees
   slots < lengths[r] + w + 1);
3. combine: per (row, window position, head), the partial (max, sum, output) states of every split of both parts
   merged by their log-sum-exps -- attention over [prefix; own] -- written in q's dtype, with the lse.
Splitting over keys (flash-decoding) keeps the GPU full when rows x kv heads is small (batch-1 generation: 32
programs for 132 SMs); the split count comes from tensor shapes only, so a CUDA graph can capture the step.
Scores use tl.dot in the log2 domain (q.k * scale * log2 e, exp2); fp32 caches run the dots in IEEE fp32 (the
default TF32 would cost ~1e-3 relative), fp16/bf16 on tensor cores with fp32 accumulation.

Launchers accept tensors on any device, so the kernels run on CPU tensors under TRITON_INTERPRET=1 in the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .specs import KernelSpec

BLOCK_N = 32  # keys per tile: a [32, 128] bf16 K tile is 8 KiB
MIN_SPLIT = 256  # keys per split at least: below that, the combine's extra traffic outweighs the parallelism
LOG2E = 1.4426950408889634


@triton.jit
def _attend_rows(q_ptr, k_ptr, v_ptr, base_len_ptr, acc_ptr, ml_ptr, rows_ptr, item, r0, r_end, g, split,
                 q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, S, split_len, split_base, R, H, qk_scale,
                 W: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, GROUPED: tl.constexpr,
                 IEEE: tl.constexpr):
    """The queries of rows r0 .. min(r0 + ROWS, r_end) (x window x the heads of kv head g) against the keys of
    split ``split`` of ``item`` (a row's own slots, or a prompt's prefix); writes their partial states."""
    base = tl.maximum(tl.load(base_len_ptr + item).to(tl.int32), 0)  # the row's length / the prefix's length
    if CAUSAL:
        top = tl.minimum(base + W, S)  # the last window position sees base + W slots
    else:
        top = tl.minimum(base, S)
    k_lo = split * split_len
    k_hi = tl.minimum(k_lo + split_len, top)
    kv_k = k_ptr + item * k_s0 + g.to(tl.int64) * k_s2  # 64-bit: a whole cache exceeds 2^31 elements
    kv_v = v_ptr + item * v_s0 + g.to(tl.int64) * v_s2
    slot = split_base + split
    i = tl.arange(0, BLOCK_Q)
    local = i // (W * REP)
    w = (i // REP) % W
    h = g * REP + i % REP
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    ri = r0 + local
    valid = (local < ROWS) & (ri < r_end)
    if GROUPED:
        row = tl.load(rows_ptr + ri, mask=valid, other=0)
    else:
        row = ri
    q = tl.load(q_ptr + row[:, None] * q_s0 + w[:, None] * q_s1 + h[:, None] * q_s2 + d[None, :],
                mask=valid[:, None] & dm[None, :], other=0.0)
    if CAUSAL:
        limit = tl.minimum(base + w + 1, S)  # causal inside the window
    else:
        limit = tl.zeros([BLOCK_Q], tl.int32) + k_hi
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        # int32 offsets inside one (item, kv head): 64-bit pointer tensors would take 2 registers per element of
        # each [BLOCK_N, D] tile
        n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (n < k_hi)[:, None] & dm[None, :]
        k = tl.load(kv_k + (n[:, None] * k_s1 + d[None, :]), mask=kv_mask, other=0.0)
        v = tl.load(kv_v + (n[:, None] * v_s1 + d[None, :]), mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n[None, :] < limit[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp2(-inf - 0) = 0
        alpha = tl.exp2(m_i - ref)
        p = tl.exp2(s - ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # partial state of query (row, w, h) in split slot ``slot``
    qi = slot.to(tl.int64) * R * W * H + (row * W + w) * H + h
    tl.store(acc_ptr + qi[:, None] * D + d[None, :], acc, mask=valid[:, None] & dm[None, :])
    tl.store(ml_ptr + qi * 2, m_i, mask=valid)
    tl.store(ml_ptr + qi * 2 + 1, l_i, mask=valid)


@triton.jit
def decode_attn_partial_kernel(
    q_ptr, k_ptr, v_ptr, base_len_ptr, rows_ptr, row_start_ptr, chunk_item_ptr, chunk_row_ptr, acc_ptr, ml_ptr,
    q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2,
    S, split_len, split_base, R, H, qk_scale,
    W: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, GROUPED: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    split = tl.program_id(2)
    if GROUPED:  # a chunk of <= ROWS rows of one prompt: rows_ptr[r0 : min(r0 + ROWS, row_start[item + 1])]
        item = tl.load(chunk_item_ptr + pid)  # -1: a spare chunk (the grid is sized from shapes only)
        r0 = tl.load(chunk_row_ptr + pid)
        r_end = tl.load(row_start_ptr + tl.maximum(item, 0) + 1)
    else:  # one row
        item = pid
        r0 = pid
        r_end = pid + 1
    if item >= 0:
        _attend_rows(q_ptr, k_ptr, v_ptr, base_len_ptr, acc_ptr, ml_ptr, rows_ptr, item, r0, r_end, g, split,
                     q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, S, split_len, split_base, R, H, qk_scale,
                     W, REP, D, BLOCK_D, ROWS, BLOCK_Q, BLOCK_N, CAUSAL, GROUPED, IEEE)


@triton.jit
def decode_attn_combine_kernel(
    acc_ptr, ml_ptr, prefix_of_row_ptr, out_ptr, lse_ptr, R, W, H, out_s0, out_s1, out_s2,
    NS_PREFIX: tl.constexpr, NS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # query (r, w, h) = (r * W + w) * H + h
    r = pid // (W * H)
    w = (pid // H) % W
    h = pid % H
    s = tl.arange(0, BLOCK_S)
    use = s < NS
    if HAS_PREFIX:
        # (the row's prefix id broadcast before the compare: the interpreter rejects a scalar bool in a mask)
        has = (tl.zeros([BLOCK_S], tl.int64) + tl.load(prefix_of_row_ptr + r)) >= 0
        use = use & ((s >= NS_PREFIX) | has)
    else:
        use = use & (s >= NS_PREFIX)
    at = s.to(tl.int64) * R * W * H + pid
    m = tl.load(ml_ptr + at * 2, mask=use, other=float("-inf"))
    l = tl.load(ml_ptr + at * 2 + 1, mask=use, other=0.0)
    m_max = tl.max(m, 0)
    ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    wgt = tl.where(use, tl.exp2(m - ref), 0.0)
    total = tl.sum(l * wgt, 0)
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + at[:, None] * D + d[None, :], mask=use[:, None] & (d[None, :] < D), other=0.0)
    o = tl.sum(acc * wgt[:, None], 0)
    inv = tl.where(total == 0.0, 0.0, 1.0 / total)  # no key seen: output 0, lse -inf
    tl.store(out_ptr + r * out_s0 + w * out_s1 + h * out_s2 + d, (o * inv).to(out_ptr.dtype.element_ty), mask=d < D)
    lse = tl.where(total == 0.0, float("-inf"), (ref + tl.log2(total)) * 0.6931471805599453)
    tl.store(lse_ptr + pid, lse)


def max_queries(D: int, fp32: bool) -> int:
    """Queries per tile (rows x window x heads of one kv head). Sized so that no configuration spills (checked by
    the AOT test): [64, 128] fp32 accumulators plus the bf16 q tile take ~250 registers at 8 warps, and fp32 caches
    run their dots on FMA units (IEEE, not TF32), which holds whole operand rows per thread."""
    if fp32:
        return 16 if D > 64 else 32
    return 32 if D > 64 else 64


def _tiles(W: int, rep: int, grouped: bool, D: int, fp32: bool):
    """(rows per tile, BLOCK_Q, BLOCK_N, num_warps) for a window of W positions x rep heads per kv head."""
    per_row = W * rep
    rows = max(1, max_queries(D, fp32) // per_row) if grouped else 1
    block_q = max(16, triton.next_power_of_2(rows * per_row))
    block_n = 16 if fp32 and D > 64 else BLOCK_N  # fp32 x 128: a 32-key tile spills on sm_90 (FMA dot operands)
    return rows, block_q, block_n, 4 if block_q <= 16 else 8


def _splits(capacity: int, programs: int, sms: int) -> int:
    """Key splits per program: enough programs for ~2 waves, each split >= MIN_SPLIT keys."""
    if capacity <= MIN_SPLIT or programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(capacity, MIN_SPLIT), triton.cdiv(2 * sms, programs)))


_SMS = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests exercise the merge
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def decode_attention(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale):
    """Triton path of mmr1::decode_attention (see mmr1_kernels.attention)."""
    R, W, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    rep = H // Hkv
    dev = q.device
    out = torch.empty((R, W, H, D), dtype=q.dtype, device=dev)
    lse = torch.empty((R, W, H), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out, lse
    fp32 = q.dtype == torch.float32
    cap = max_queries(D, fp32)
    if rep > cap:  # one kv head's queries must fit a tile (GQA ratios above 16 are not in use)
        from .. import reference

        return reference.decode_attention(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    # the window in chunks whose queries fit a tile (a Jacobi window is <= 32 positions: one chunk)
    wc = max(1, cap // rep)
    if W > wc:
        for c0 in range(0, W, wc):
            c1 = min(W, c0 + wc)
            o, l_ = decode_attention(q[:, c0:c1], k, v, lengths + c0, prefix_k, prefix_v, prefix_lengths,
                                     prefix_of_row, scale)
            out[:, c0:c1], lse[:, c0:c1] = o, l_
        return out, lse
    sms = _sm_count(dev)
    block_d = max(16, triton.next_power_of_2(D))
    qk_scale = float(scale) * LOG2E
    lengths = lengths.contiguous()
    has_prefix = prefix_k is not None
    ns_p = 0
    if has_prefix:
        P, Sp = prefix_k.shape[0], prefix_k.shape[1]
        if prefix_k.stride(-1) != 1 or prefix_v.stride(-1) != 1:
            prefix_k, prefix_v = prefix_k.contiguous(), prefix_v.contiguous()
        # rows grouped by prompt, on the device; an id outside [0, P) counts as no prefix (never read out of bounds)
        of_row = torch.where((prefix_of_row >= 0) & (prefix_of_row < P), prefix_of_row, -1).to(torch.int64)
        sorted_ids, order = torch.sort(of_row, stable=True)
        row_start = torch.searchsorted(sorted_ids, torch.arange(P + 1, device=dev, dtype=torch.int64))
        ns_p = _splits(Sp, P * Hkv, sms)
    ns_o = _splits(S, R * Hkv, sms)
    ns = ns_p + ns_o
    acc = torch.empty((ns, R, W, H, D), dtype=torch.float32, device=dev)
    ml = torch.empty((ns, R, W, H, 2), dtype=torch.float32, device=dev)
    common = dict(W=W, REP=rep, D=D, BLOCK_D=block_d, IEEE=fp32)
    if has_prefix:
        rows, block_q, block_n, warps = _tiles(W, rep, True, D, fp32)
        # chunks of <= rows rows of one prompt, tabled on the device: the count is bounded by P + R / rows (shapes
        # only), spare entries are -1
        per_prompt = (row_start[1:] - row_start[:-1] + rows - 1) // rows  # [P]
        chunk_start = torch.cumsum(per_prompt, 0) - per_prompt
        bound = P + triton.cdiv(R, rows)
        j = torch.arange(bound, device=dev, dtype=torch.int64)
        owner = torch.searchsorted(chunk_start + per_prompt, j, right=True)  # first prompt whose chunks end past j
        used = owner < P
        owner_c = owner.clamp(max=P - 1)
        chunk_item = torch.where(used, owner_c, -1)
        chunk_row = torch.where(used, row_start[owner_c] + (j - chunk_start[owner_c]) * rows, 0)
        split_len = triton.cdiv(triton.cdiv(Sp, ns_p), BLOCK_N) * BLOCK_N
        decode_attn_partial_kernel[(bound, Hkv, ns_p)](
            q, prefix_k, prefix_v, prefix_lengths.contiguous(), order, row_start, chunk_item, chunk_row, acc, ml,
            q.stride(0), q.stride(1), q.stride(2), prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
            prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
            Sp, split_len, 0, R, H, qk_scale, ROWS=rows, BLOCK_Q=block_q, BLOCK_N=block_n, CAUSAL=False,
            GROUPED=True, num_warps=warps, **common)
    rows, block_q, block_n, warps = _tiles(W, rep, False, D, fp32)
    split_len = triton.cdiv(triton.cdiv(S, ns_o), BLOCK_N) * BLOCK_N
    decode_attn_partial_kernel[(R, Hkv, ns_o)](
        q, k, v, lengths, lengths, lengths, lengths, lengths, acc, ml,  # row tables unused (GROUPED=False)
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        S, split_len, ns_p, R, H, qk_scale, ROWS=rows, BLOCK_Q=block_q, BLOCK_N=block_n, CAUSAL=True,
        GROUPED=False, num_warps=warps, **common)
    decode_attn_combine_kernel[(R * W * H,)](
        acc, ml, of_row if has_prefix else lengths, out, lse, R, W, H, out.stride(0), out.stride(1), out.stride(2),
        NS_PREFIX=ns_p, NS=ns, BLOCK_S=max(2, triton.next_power_of_2(ns)), D=D, BLOCK_D=block_d,
        HAS_PREFIX=has_prefix, num_warps=1 if block_d <= 64 else 2)
    return out, lse


def aot_specs():
    """Launch configurations compiled ahead of time by tests/test_aot.py (sm_80/sm_90, no spills): the demo's
    shapes (6 heads of 32, W = 1 and a Jacobi W = 8) and Lumina-mGPT-7B's (32 heads of 128, W = 1 / 8), the own and
    the prefix launch, each cache dtype; and a GQA 4:1 layer (D = 128, W = 1)."""
    i32 = ("k_s1", "v_s1", "S", "split_len")  # offsets inside one (item, kv head) are int32 (see _attend_rows)
    scalars = {n: "i32" if n in i32 else "i64" for n in ("q_s0", "q_s1", "q_s2", "k_s0", "k_s1", "k_s2", "v_s0",
                                                          "v_s1", "v_s2", "S", "split_len", "split_base", "R", "H")}
    for dtype in ("fp32", "bf16", "fp16"):
        fp32 = dtype == "fp32"
        for D, W, rep in ((32, 1, 1), (32, 8, 1), (128, 1, 1), (128, 8, 1), (128, 1, 4)):
            for grouped in (False, True):
                rows, block_q, block_n, warps = _tiles(W, rep, grouped, D, fp32)
                sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "base_len_ptr": "*i64",
                       "rows_ptr": "*i64", "row_start_ptr": "*i64", "chunk_item_ptr": "*i64", "chunk_row_ptr": "*i64",
                       "acc_ptr": "*fp32", "ml_ptr": "*fp32", **scalars, "qk_scale": "fp32"}
                const = dict(W=W, REP=rep, D=D, BLOCK_D=max(16, D), ROWS=rows, BLOCK_Q=block_q, BLOCK_N=block_n,
                             CAUSAL=not grouped, GROUPED=grouped, IEEE=fp32)
                name = f"decode_attn_partial[{dtype},D={D},W={W},rep={rep},{'prefix' if grouped else 'own'}]"
                yield KernelSpec(name, decode_attn_partial_kernel, sig, const, warps)
        for D in (32, 128):
            sig = {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "prefix_of_row_ptr": "*i64", "out_ptr": f"*{dtype}",
                   "lse_ptr": "*fp32", "R": "i64", "W": "i64", "H": "i64", "out_s0": "i64", "out_s1": "i64",
                   "out_s2": "i64"}
            yield KernelSpec(f"decode_attn_combine[{dtype},D={D}]", decode_attn_combine_kernel, sig,
                             dict(NS_PREFIX=2, NS=6, BLOCK_S=8, D=D, BLOCK_D=D, HAS_PREFIX=True), 1 if D <= 64 else 2)


__all__ = ["decode_attention", "aot_specs"]
