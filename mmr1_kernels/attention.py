"""Decode attention over a rollout's KV cache, with one copy of each prompt for its G samples: registration and API.

A GRPO rollout decodes G samples of every prompt, with classifier-free guidance doubling the rows: the conditional
rows hold [prompt; completion so far], the unconditional rows only the image block being drawn. ``decode_attention``
takes that shape as it is -- each row's own cache with its own length, and an optional store of shared prompt
prefixes that rows point into -- so a step reads each prompt once per group and each row only its live slots
(docs/kernel-semantics.md, sections 5-6). C++ on CPU (csrc/attention.cpp), Triton on CUDA (gpu/attention.py, flash-decoding),
the reference (mmr1_kernels.reference.decode_attention) elsewhere. Inference only: no backward.

``shared_prefix_attention`` is the training-time counterpart (the policy update and the reference forward): the G
completions of every prompt, each causal over itself, all attending to one copy of their prompt's keys, with a
backward. On CPU it is two calls of ATen's flash-attention kernel -- the group's G x T queries against the prompt
once (Hydragen's batching), each row causally against itself -- merged by their log-sum-exps; the backward runs
the same kernel's backward on both parts with the merged output and log-sum-exp, which is exactly the gradient of
attention over the concatenation. Elsewhere each row gathers its prompt's keys and one masked SDPA runs.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _checks as C
from . import reference as ref
from ._library import HAS_TRITON, impl, op

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


@impl("decode_attention", "CompositeExplicitAutograd")
def _decode_attention_ref(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale):
    return ref.decode_attention(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale,
                                dtype=C.acc_dtype(q.dtype))


if HAS_TRITON:

    @impl("decode_attention", "CUDA")
    def _decode_attention_cuda(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale):
        from .gpu import attention as K

        return K.decode_attention(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale)


@torch.library.register_fake("mmr1::decode_attention")
def _decode_attention_fake(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale):
    R, W, H, D = q.shape
    return q.new_empty(R, W, H, D), q.new_empty(R, W, H, dtype=C.acc_dtype(q.dtype))


def _check_index(name: str, t, n: int, device) -> None:
    C.check_tensor(name, t, dtypes=INDEX_DTYPES, ndim=1, device=device)
    C.check_shape(name, t, (n,))


def _check_range(name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    bad = (t < low) | (t > high)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {int(t[i])} is out of range: {what}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *,
                     prefix_k: Optional[torch.Tensor] = None, prefix_v: Optional[torch.Tensor] = None,
                     prefix_lengths: Optional[torch.Tensor] = None, prefix_of_row: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False,
                     check: bool = True) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of a window of W queries per row over the row's context: its shared prefix, then its own cache.

    q [R, W, H, D]: W = 1 for a decode step, or a Jacobi window. k, v [R, S, Hkv, D]: each row's own cache;
    H must be a multiple of Hkv (GQA: head h reads kv head h // (H / Hkv)). lengths [R] (int64/int32): the row's
    slots before the window; the window's own keys must already be written at slots lengths[r] .. lengths[r] + W - 1,
    and query w sees own slots < lengths[r] + w + 1 (causal inside the window).
    Shared prefix (all four or none): prefix_k, prefix_v [P, Sp, Hkv, D], one entry per distinct prompt;
    prefix_lengths [P]; prefix_of_row [R], the prompt of each row (-1: none). Row r then attends to
    prefix_k[p, :prefix_lengths[p]] followed by its own slots -- the result equals attention over the concatenation
    (the two parts are merged by their log-sum-exps), while each prefix is read once for all its rows.
    scale: default 1 / sqrt(D). fp32 / bf16 / fp16 (fp32 accumulation) and fp64.

    Returns out [R, W, H, D] in q's dtype (and with return_lse the log-sum-exp of the scaled scores [R, W, H],
    fp32; fp64 for fp64 inputs). A query that sees no key gets 0 (lse -inf). check=True validates lengths, prefix_lengths and
    prefix_of_row against the shapes (one host sync); check=False skips that (no host sync: a CUDA graph can
    capture the call) and out-of-range values are clamped, never read out of bounds.
    """
    C.check_tensor("q", q, dtypes=DTYPES, ndim=4)
    R, W, H, D = q.shape
    dev = q.device
    for name, t in (("k", k), ("v", v)):
        C.check_tensor(name, t, dtypes=(q.dtype,), ndim=4, device=dev)
    if k.shape != v.shape or k.shape[0] != R or k.shape[3] != D:
        raise ValueError(f"k and v must both be [R={R}, S, Hkv, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    S, Hkv = k.shape[1], k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's kv heads ({Hkv})")
    _check_index("lengths", lengths, R, dev)
    given = [t is not None for t in (prefix_k, prefix_v, prefix_lengths, prefix_of_row)]
    if any(given) and not all(given):
        raise ValueError("prefix_k, prefix_v, prefix_lengths and prefix_of_row must be given together")
    if all(given):
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            C.check_tensor(name, t, dtypes=(q.dtype,), ndim=4, device=dev)
        P, Sp = prefix_k.shape[0], prefix_k.shape[1]
        if prefix_v.shape != prefix_k.shape or prefix_k.shape[2:] != (Hkv, D):
            raise ValueError(f"prefix_k and prefix_v must both be [P, Sp, Hkv={Hkv}, D={D}], got "
                             f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
        _check_index("prefix_lengths", prefix_lengths, P, dev)
        _check_index("prefix_of_row", prefix_of_row, R, dev)
    if scale is None:
        scale = D ** -0.5
    scale = C.check_scalar("scale", scale)
    if check and not C.tracing():
        if R:
            _check_range("lengths", lengths, 0, S - W, f"a row's {W}-query window must fit its {S} cache slots "
                         f"(0 <= lengths <= S - W = {S - W})")
        if all(given):
            if P:
                _check_range("prefix_lengths", prefix_lengths, 0, Sp, f"must lie in [0, Sp={Sp}]")
            if R:
                _check_range("prefix_of_row", prefix_of_row, -1, P - 1, f"must be -1 (no prefix) or a prompt in "
                             f"[0, P={P})")
    out, lse = op("decode_attention")(q, k, v, lengths, prefix_k, prefix_v, prefix_lengths, prefix_of_row, scale)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- shared-prefix attention (training)

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
PREFIX_IMPLS = ("auto", "merge", "gather")


def _group_layout(t: torch.Tensor, P: int) -> torch.Tensor:
    """[N, T, H, D] (N = P * G rows, group-major, contiguous) -> the view [P, H, G * T, D]: a group's G x T queries
    as one sequence against its prompt (no copy)."""
    N, T, H, D = t.shape
    return t.reshape(P, (N // P) * T, H, D).transpose(1, 2)


def _from_group_layout(t: torch.Tensor, N: int, T: int) -> torch.Tensor:
    """[P, H, G * T, D] -> [N, T, H, D]."""
    P, H, _, D = t.shape
    return t.transpose(1, 2).reshape(N, T, H, D)


class _SharedPrefixMerge(torch.autograd.Function):
    """Two flash-attention calls merged by log-sum-exp (CPU). Inputs have H heads everywhere (GQA expanded by the
    caller, whose repeat_interleave sums the gradients back); ``bias`` [P, 1, 1, Sp] is 0 / -inf over the prompt
    slots (ATen's CPU kernel wants an additive mask in the inputs' dtype); ``empty`` [N, 1, 1] marks rows whose
    prompt has length 0 (the kernel reports lse 0, not -inf, for a query that sees no key)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, bias, empty, scale):
        N, T, H, D = q.shape
        P = prefix_k.shape[0]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qg = _group_layout(q, P)
        pk, pv = prefix_k.transpose(1, 2), prefix_v.transpose(1, 2)  # [P, H, Sp, D]
        o1, l1 = _FLASH_CPU(qg, pk, pv, 0.0, False, attn_mask=bias, scale=scale)
        o2, l2 = _FLASH_CPU(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, True, scale=scale)
        # lse [P, H, G*T] -> [N, H, T]; outputs -> [N, T, H, D] (the kernel writes them in its inputs' layout)
        l1 = l1.view(P, H, N // P, T).transpose(1, 2).reshape(N, H, T)
        l1 = l1.masked_fill(empty, float("-inf"))
        o1, o2 = _from_group_layout(o1, N, T), o2.transpose(1, 2)
        lse = torch.logaddexp(l1, l2)  # l2 is finite: every query sees its own key
        w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]  # [N, T, H, 1], 0 for an empty prompt
        w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
        acc = C.acc_dtype(q.dtype)
        out = (o1.to(acc) * w1 + o2.to(acc) * w2).to(q.dtype)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, prefix_k, prefix_v, bias, out, lse = ctx.saved_tensors
        N, T, H, D = q.shape
        P = prefix_k.shape[0]
        grad_out = grad_out.contiguous()
        # the flash backward with the merged output and lse is the exact gradient of each part of the concatenation:
        # p_ij = exp(s_ij - lse_i) and D_i = rowsum(dO_i * O_i) are the full softmax's
        lse_g = lse.view(P, N // P, H, T).transpose(1, 2).reshape(P, H, (N // P) * T)
        dq1, dpk, dpv = _FLASH_CPU_BACKWARD(_group_layout(grad_out, P), _group_layout(q, P),
                                            prefix_k.transpose(1, 2), prefix_v.transpose(1, 2),
                                            _group_layout(out, P), lse_g, 0.0, False, attn_mask=bias, scale=ctx.scale)
        dq2, dk, dv = _FLASH_CPU_BACKWARD(grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), out.transpose(1, 2), lse, 0.0, True, scale=ctx.scale)
        dq = _from_group_layout(dq1, N, T) + dq2.transpose(1, 2)
        return (dq, dk.transpose(1, 2), dv.transpose(1, 2), dpk.transpose(1, 2), dpv.transpose(1, 2), None, None,
                None)


def _expand_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    return t if t.shape[2] == H else t.repeat_interleave(H // t.shape[2], dim=2)


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, prefix_lengths: torch.Tensor, *, scale: Optional[float] = None,
                            impl: str = "auto", check: bool = True) -> torch.Tensor:
    """Attention of G completions per prompt over [their prompt; themselves], differentiable (training).

    q [N, T, H, D], k, v [N, T, Hkv, D]: N = P * G rows in groups of G consecutive rows, row r continuing prompt
    r // G; each row is causal over its own T positions (right padding needs no mask: a real query never sees a
    later slot). prefix_k, prefix_v [P, Sp, Hkv, D]: each prompt's keys once, its first prefix_lengths[p] slots
    real. Equals decode_attention(q, k, v, zeros, prefix..., prefix_of_row=arange(P).repeat_interleave(G)) -- the
    concatenation -- in value and gradient, while each prompt is computed and read once per group.
    impl: "merge" (CPU: flash attention on both parts, log-sum-exp merge), "gather" (each row's prompt gathered,
    one masked SDPA; any device), "auto" (merge on CPU, gather elsewhere). Returns out [N, T, H, D] in q's dtype.
    """
    C.check_tensor("q", q, dtypes=DTYPES, ndim=4)
    N, T, H, D = q.shape
    dev = q.device
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        C.check_tensor(name, t, dtypes=(q.dtype,), ndim=4, device=dev)
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (N, T) or k.shape[3] != D:
        raise ValueError(f"k and v must both be [N={N}, T={T}, Hkv, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's kv heads ({Hkv})")
    if prefix_v.shape != prefix_k.shape or prefix_k.shape[2:] != (Hkv, D):
        raise ValueError(f"prefix_k and prefix_v must both be [P, Sp, Hkv={Hkv}, D={D}], got "
                         f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    P, Sp = prefix_k.shape[:2]
    if P < 1 or N % P:
        raise ValueError(f"q's rows ({N}) must be a positive multiple of the prompts ({P}): G rows per prompt")
    _check_index("prefix_lengths", prefix_lengths, P, dev)
    if impl not in PREFIX_IMPLS:
        raise ValueError(f"impl must be one of {PREFIX_IMPLS}, got {impl!r}")
    if impl == "merge" and dev.type != "cpu":
        raise ValueError(f"impl='merge' runs ATen's CPU flash-attention kernel; q is on {dev} (use 'gather')")
    scale = C.check_scalar("scale", D ** -0.5 if scale is None else scale)
    if check and not C.tracing() and P:
        _check_range("prefix_lengths", prefix_lengths, 0, Sp, f"must lie in [0, Sp={Sp}]")
    G = N // P
    if N == 0 or T == 0:
        return q.new_zeros(q.shape)
    k, v, pk, pv = (_expand_heads(t, H) for t in (k, v, prefix_k, prefix_v))
    seen = torch.arange(Sp, device=dev)[None] < prefix_lengths.long()[:, None]  # [P, Sp]
    if impl == "gather" or dev.type != "cpu":
        of_row = torch.arange(P, device=dev).repeat_interleave(G)
        keys, vals = torch.cat([pk[of_row], k], 1), torch.cat([pv[of_row], v], 1)  # [N, Sp + T, H, D]
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([seen[of_row][:, None, :].expand(N, T, Sp), causal[None].expand(N, T, T)], 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                             attn_mask=mask[:, None], scale=scale)
        return out.transpose(1, 2)
    bias = torch.zeros(P, 1, 1, Sp, dtype=q.dtype, device=dev).masked_fill(~seen[:, None, None], float("-inf"))
    empty = (prefix_lengths == 0).repeat_interleave(G)[:, None, None]
    return _SharedPrefixMerge.apply(q, k, v, pk, pv, bias, empty, scale)


__all__ = ["decode_attention", "shared_prefix_attention"]
