"""Decode attention over a rollout's KV cache, with one copy of each prompt for its G samples: registration and API.

A GRPO rollout decodes G samples of every prompt, with classifier-free guidance doubling the rows: the conditional
rows hold [prompt; completion so far], the unconditional rows only the image block being drawn. ``decode_attention``
takes that shape as it is -- each row's own cache with its own length, and an optional store of shared prompt
prefixes that rows point into -- so a step reads each prompt once per group and each row only its live slots
(DESIGN.md "Kernel semantics" 4). C++ on CPU (csrc/attention.cpp), Triton on CUDA (gpu/attention.py, flash-decoding),
the reference (mmr1_kernels.reference.decode_attention) elsewhere. Inference only: no backward.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

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


__all__ = ["decode_attention"]
