"""Triton kernels: fused token log-prob / GRPO surrogate / k3 KL, and its backward.

Forward: one program per token row. The vocab window is streamed once in
BLOCK_V-wide tiles with a per-lane online max/sum (fp32), so HBM traffic is
exactly one read of the window (8192 x 2 B = 16 KiB per bf16 row at Lumina's
image window) plus the target logit; the ratio / clip / KL math is a handful of
scalar ops fused after the reduction. Only fp32 [N] vectors are written.

Backward: a 2-D grid (row, vocab tile): each tile recomputes softmax from the
saved logsumexp and writes dz = g/T (onehot - p) in the logits dtype, zeros
outside the window, optionally into the logits' own storage (inplace: no
second [N, V] buffer; every element is read before the same program writes it).

Launchers accept tensors on any device so the kernels also run on CPU tensors
under TRITON_INTERPRET=1 (used by the tests on machines without a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .specs import KernelSpec

# 2048 lanes x 8 warps = 8 elements per thread per tile. At 4096 x 8 warps
# ptxas caps sm_90 at 64 registers/thread and spills 8 B to the stack
# (measured with mmr1_kernels.aot); 2048 x 8 needs 32 registers, 0 spills on
# sm_80 and sm_90, and a bf16 tile is still 4 KiB per load (W=8192: 4 tiles).
FWD_BLOCK_V = 2048
FWD_WARPS = 8
BWD_BLOCK_V = 2048
BWD_WARPS = 4


@triton.jit
def _row_base(logits_ptr, row, rows_per_batch, stride_b, stride_t):
    # [N, V] or [B, T, V] with unit vocab stride; int64 offsets (N*V > 2^31 at
    # 16k tokens x 65536 vocab).
    return logits_ptr + (row // rows_per_batch) * stride_b + (row % rows_per_batch) * stride_t


@triton.jit
def logprob_fwd_kernel(
    logits_ptr, targets_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr,
    logp_ptr, lse_ptr, loss_ptr, coef_ptr, ratio_ptr, kl_ptr, ent_ptr,
    rows_per_batch, stride_b, stride_t, vocab_lo, W,
    inv_t, eps_low, eps_high, beta,
    HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, COMPUTE_LOSS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        base = _row_base(logits_ptr, row, rows_per_batch, stride_b, stride_t) + vocab_lo
        cols = tl.arange(0, BLOCK_V)
        m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK_V], tl.float32)
        t_vec = tl.zeros([BLOCK_V], tl.float32)  # sum e^(z-m) (z-m) per lane, for the entropy
        for start in range(0, W, BLOCK_V):
            offs = start + cols
            z = tl.load(base + offs, mask=offs < W, other=float("-inf")).to(tl.float32) * inv_t
            new_m = tl.maximum(m_vec, z)
            # guards keep -inf lanes at 0 (exp(-inf - -inf) would be NaN); a NaN
            # logit still poisons the sum, so NaN rows give NaN, never garbage.
            alpha = tl.where(m_vec == new_m, 1.0, tl.exp(m_vec - new_m))
            p = tl.where(z == float("-inf"), 0.0, tl.exp(z - new_m))
            if WITH_ENTROPY:
                # re-centre the lane's t on the new max: t' = alpha (t + s (m_old - m_new)); an empty lane
                # (s = 0, m_old = -inf) stays 0 instead of 0 * -inf
                shift = tl.where(s_vec == 0.0, 0.0, m_vec - new_m)
                t_vec = alpha * (t_vec + s_vec * shift) + tl.where(z == float("-inf"), 0.0, p * (z - new_m))
            s_vec = s_vec * alpha + p
            m_vec = new_m
        m = tl.max(m_vec, axis=0)
        lane_scale = tl.where(m_vec == m, 1.0, tl.exp(m_vec - m))
        s = tl.sum(s_vec * lane_scale, axis=0)
        lse = m + tl.log(s)
        if WITH_ENTROPY:
            lane_shift = tl.where(s_vec == 0.0, 0.0, m_vec - m)
            t = tl.sum(lane_scale * (t_vec + s_vec * lane_shift), axis=0)
            tl.store(ent_ptr + row, tl.where(m == float("-inf"), float("nan"), tl.log(s) - t / s))
        t = tl.load(targets_ptr + row) - vocab_lo
        inside = (t >= 0) & (t < W)
        z_t = tl.load(base + tl.where(inside, t, 0)).to(tl.float32) * inv_t
        logp = tl.where(inside, z_t - lse, float("nan"))  # out-of-window target: NaN, no OOB read
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)
        if COMPUTE_LOSS:
            adv = tl.load(adv_ptr + row)
            old = logp
            if HAS_OLD:
                old = tl.load(old_ptr + row)
            log_ratio = logp - old
            lr_free = (log_ratio <= 20.0) & (log_ratio >= -20.0)
            ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
            unclipped = ratio * adv
            clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
            loss = -tl.minimum(unclipped, clipped)
            coef = tl.where((unclipped <= clipped) & lr_free, -adv * ratio, 0.0)
            kl = 0.0
            if HAS_REF:
                delta_raw = tl.load(ref_ptr + row) - logp
                delta = tl.minimum(tl.maximum(delta_raw, -20.0), 20.0)
                e = tl.exp(delta)
                kl = e - delta - 1.0
                loss += beta * kl
                coef += tl.where((delta_raw <= 20.0) & (delta_raw >= -20.0), beta * (1.0 - e), 0.0)
            tl.store(loss_ptr + row, loss)
            tl.store(coef_ptr + row, coef)
            tl.store(ratio_ptr + row, ratio)
            tl.store(kl_ptr + row, kl)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, 0.0)
        if COMPUTE_LOSS:
            tl.store(loss_ptr + row, 0.0)
            tl.store(coef_ptr + row, 0.0)
            tl.store(ratio_ptr + row, 1.0)
            tl.store(kl_ptr + row, 0.0)


@triton.jit
def logprob_bwd_kernel(
    logits_ptr, out_ptr, targets_ptr, lse_ptr, grad_ptr, ent_ptr, gent_ptr,
    rows_per_batch, stride_b, stride_t, out_stride_b, out_stride_t, vocab_lo, vocab_hi, V,
    inv_t,
    HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = offs < V
    in_win = (offs >= vocab_lo) & (offs < vocab_hi)
    g = tl.load(grad_ptr + row)
    lse = tl.load(lse_ptr + row)
    t = tl.load(targets_ptr + row)
    base = _row_base(logits_ptr, row, rows_per_batch, stride_b, stride_t)
    obase = _row_base(out_ptr, row, rows_per_batch, out_stride_b, out_stride_t)
    live = g != 0.0
    if HAS_ENTROPY_GRAD:
        gh = tl.load(gent_ptr + row)
        h = tl.load(ent_ptr + row)
        live = live | (gh != 0.0)
    need = in_v & in_win & ((tl.zeros([BLOCK_V], tl.float32) + live.to(tl.float32)) != 0.0)  # masked row: no read
    z = tl.load(base + offs, mask=need, other=0.0).to(tl.float32)
    logq = z * inv_t - lse
    p = tl.exp(logq)
    if HAS_ENTROPY_GRAD:
        # d(gh * H)/dz_j = -gh/T p_j (log p_j + H); p_j = 0 (a -inf logit) contributes 0, not 0 * -inf
        d = tl.where(offs == t, g * inv_t, 0.0) - inv_t * tl.where(p > 0.0, p * (g + gh * (logq + h)), 0.0)
    else:
        d = tl.where(offs == t, g * inv_t, 0.0) - (g * inv_t) * p
    d = tl.where(need, d, 0.0)
    tl.store(obase + offs, d.to(out_ptr.dtype.element_ty), mask=in_v)


def _geometry(logits: torch.Tensor):
    if logits.dim() == 2:
        return max(logits.shape[0], 1), 0, logits.stride(0)
    return max(logits.shape[1], 1), logits.stride(0), logits.stride(1)


def _rows(logits: torch.Tensor) -> int:
    return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[1]


def _fwd_block(W: int) -> int:
    return min(FWD_BLOCK_V, triton.next_power_of_2(max(W, 16)))


def logprob_forward(logits, targets, mask, temperature, vocab_lo, vocab_hi, advantages=None, old_logprobs=None,
                    ref_logprobs=None, eps_low=0.2, eps_high=0.2, beta=0.0, with_entropy=False):
    """Launch the forward. Returns (logp, lse, entropy) (entropy empty unless ``with_entropy``) or, with
    ``advantages``, the 6 GRPO outputs."""
    N, dev = _rows(logits), logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N if with_entropy else 0, **f32)
    compute_loss = advantages is not None
    if compute_loss:
        loss, coef, ratio, kl = (torch.empty(N, **f32) for _ in range(4))
    else:
        loss = coef = ratio = kl = logp  # unused by the kernel (COMPUTE_LOSS=False)
    if N == 0:
        return (logp, lse, loss, coef, ratio, kl) if compute_loss else (logp, lse, ent)
    dummy = logp
    rows_per_batch, sb, st = _geometry(logits)
    W = vocab_hi - vocab_lo
    logprob_fwd_kernel[(N,)](
        logits, targets, mask if mask is not None else dummy,
        advantages if compute_loss else dummy,
        old_logprobs if old_logprobs is not None else dummy,
        ref_logprobs if ref_logprobs is not None else dummy,
        logp, lse, loss, coef, ratio, kl, ent if with_entropy else dummy,
        rows_per_batch, sb, st, vocab_lo, W,
        1.0 / temperature, eps_low, eps_high, beta,
        HAS_MASK=mask is not None, HAS_OLD=old_logprobs is not None,
        HAS_REF=compute_loss and beta != 0.0 and ref_logprobs is not None, COMPUTE_LOSS=compute_loss,
        WITH_ENTROPY=with_entropy, BLOCK_V=_fwd_block(W), num_warps=FWD_WARPS,
    )
    return (logp, lse, loss, coef, ratio, kl) if compute_loss else (logp, lse, ent)


def logprob_backward(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, out=None, entropy=None,
                     grad_entropy=None):
    """dz into ``out`` (a new tensor shaped like logits, or the logits themselves for in-place); with
    ``grad_entropy`` (and the forward's ``entropy``) the entropy's gradient is added in the same pass."""
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy must be given together")
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    N, V = _rows(logits), logits.shape[-1]
    if N == 0 or V == 0:
        return out
    rows_per_batch, sb, st = _geometry(logits)
    _, osb, ost = _geometry(out)
    logprob_bwd_kernel[(N, triton.cdiv(V, BWD_BLOCK_V))](
        logits, out, targets, lse, grad_logprobs,
        entropy if entropy is not None else lse, grad_entropy if grad_entropy is not None else lse,
        rows_per_batch, sb, st, osb, ost, vocab_lo, vocab_hi, V,
        1.0 / temperature,
        HAS_ENTROPY_GRAD=grad_entropy is not None, BLOCK_V=BWD_BLOCK_V, num_warps=BWD_WARPS,
    )
    return out


def aot_specs():
    """Launch configurations compiled ahead of time by tests/test_aot.py (sm_80/sm_90, no spills)."""
    vec = {name: "*fp32" for name in ("adv_ptr", "old_ptr", "ref_ptr", "logp_ptr", "lse_ptr", "loss_ptr",
                                      "coef_ptr", "ratio_ptr", "kl_ptr", "ent_ptr")}
    scalars = {"rows_per_batch": "i64", "stride_b": "i64", "stride_t": "i64", "vocab_lo": "i64", "W": "i64",
               "inv_t": "fp32", "eps_low": "fp32", "eps_high": "fp32", "beta": "fp32"}
    for dtype in ("fp32", "bf16", "fp16"):
        for loss, ent in ((False, False), (False, True), (True, False)):
            sig = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "mask_ptr": "*i1", **vec, **scalars}
            const = dict(HAS_MASK=True, HAS_OLD=loss, HAS_REF=loss, COMPUTE_LOSS=loss, WITH_ENTROPY=ent,
                         BLOCK_V=FWD_BLOCK_V)
            yield KernelSpec(f"logprob_fwd[{dtype},loss={loss},entropy={ent}]", logprob_fwd_kernel, sig, const,
                             FWD_WARPS)
        sig = {"logits_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "targets_ptr": "*i64", "lse_ptr": "*fp32",
               "grad_ptr": "*fp32", "ent_ptr": "*fp32", "gent_ptr": "*fp32", "rows_per_batch": "i64",
               "stride_b": "i64", "stride_t": "i64", "out_stride_b": "i64", "out_stride_t": "i64", "vocab_lo": "i64",
               "vocab_hi": "i64", "V": "i64", "inv_t": "fp32"}
        for ent in (False, True):
            yield KernelSpec(f"logprob_bwd[{dtype},entropy={ent}]", logprob_bwd_kernel, sig,
                             dict(HAS_ENTROPY_GRAD=ent, BLOCK_V=BWD_BLOCK_V), BWD_WARPS)
