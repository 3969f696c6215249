"""Fused CFG sampler for KV-cached decoding: registration and public API.

``cfg_sample`` reads only the vocab window of the cond (and uncond) logits,
once, in their dtype; applies guidance, temperature, exact top-k / top-p, and
draws by Philox Gumbel-max keyed by (seed, row_id, offset, token id), so the
draw of a row depends only on its own logits, parameters and key: the same in
a batch of 1 or 256, on CPU (C++) and GPU (Triton). Returns the token and its
log-prob under the distribution actually sampled from (and optionally the
conditional branch's log-prob), so a GRPO trainer can compare sampler and
trainer log-probs token by token.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _checks as C
from . import reference_sampler as ref
from ._library import HAS_TRITON, impl, op

Scalar = Union[int, float, torch.Tensor]
STATUS_MESSAGES = {ref.STATUS_NAN: "NaN logits in the vocab window",
                   ref.STATUS_EMPTY: "empty kept set (every logit in the window is -inf after guidance)"}


@impl("cfg_sample", "CompositeExplicitAutograd")
def _cfg_sample_ref(cond, uncond, cfg_scale, temperature, top_k, top_p, forced, seed, offset, row_ids, vocab_lo,
                    vocab_hi, return_cond_logprobs):
    return ref.cfg_sample(cond, uncond, cfg_scale, temperature, top_k, top_p, forced, int(seed),
                          offset if offset.numel() != 1 else int(offset), row_ids, vocab_lo, vocab_hi,
                          return_cond_logprobs)


if HAS_TRITON:

    @impl("cfg_sample", "CUDA")
    def _cfg_sample_cuda(cond, uncond, cfg_scale, temperature, top_k, top_p, forced, seed, offset, row_ids, vocab_lo,
                         vocab_hi, return_cond_logprobs):
        from .gpu import sampler as K

        return K.cfg_sample(cond, uncond, cfg_scale, temperature, top_k, top_p, forced, seed, offset, row_ids,
                            vocab_lo, vocab_hi, return_cond_logprobs)


@torch.library.register_fake("mmr1::cfg_sample")
def _cfg_sample_fake(cond, uncond, cfg_scale, temperature, top_k, top_p, forced, seed, offset, row_ids, vocab_lo,
                     vocab_hi, return_cond_logprobs):
    B = cond.shape[0]
    return (cond.new_empty(B, dtype=torch.int64), cond.new_empty(B, dtype=torch.float32),
            cond.new_empty(B if return_cond_logprobs else 0, dtype=torch.float32), cond.new_empty(B, dtype=torch.int32))


def _per_row(name: str, value: Scalar, B: int, device, dtype, low=None, high=None, low_inclusive=True) -> torch.Tensor:
    """A Python scalar or a [B] tensor -> a [B] tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        C.check_tensor(name, value, device=device)
        if value.dim() == 0:
            value = value.expand(B)
        C.check_shape(name, value, (B,))
        if dtype.is_floating_point:
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        elif value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        value = value.to(dtype).contiguous()
        if not C.tracing() and value.numel():
            bad = ~torch.isfinite(value.double()) if dtype.is_floating_point else torch.zeros_like(value, dtype=torch.bool)
            if low is not None:
                bad |= (value < low) if low_inclusive else (value <= low)
            if high is not None:
                bad |= value > high
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"{name}[{i}] = {value[i].item()} is out of range")
        return value
    if dtype.is_floating_point:
        v = C.check_scalar(name, value, low=low, low_inclusive=low_inclusive, high=high)
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if low is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
        v = value
    return torch.full((B,), v, dtype=dtype, device=device)


def _rng_word(name: str, value, device) -> torch.Tensor:
    """seed/offset: a Python int (any 64-bit pattern) or a 0-dim int64 tensor (CUDA-graph friendly)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.numel() != 1:
            raise TypeError(f"{name} must be an int or a 0-dim int64 tensor, got {value.dtype} {tuple(value.shape)}")
        return value.reshape(()).to(device)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a 0-dim int64 tensor, got {type(value).__name__}")
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"{name} must fit in 64 bits, got {value}")
    if value >= 2**63:
        value -= 2**64  # same bit pattern
    return torch.tensor(value, dtype=torch.int64, device=device)


def _offsets(value, B: int, device) -> torch.Tensor:
    """offset: an int / 0-dim int64 tensor for every row, or a [B] int64 tensor, one per row."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        if value.dtype != torch.int64:
            raise TypeError(f"offset must be an int or an int64 tensor (0-dim or [B]), got {value.dtype}")
        C.check_shape("offset", value, (B,))
        return value.to(device).contiguous()
    return _rng_word("offset", value, device)


def cfg_sample(cond: torch.Tensor, uncond: Optional[torch.Tensor] = None, *, cfg_scale: Scalar = 1.0,
               temperature: Scalar = 1.0, top_k: Scalar = 0, top_p: Scalar = 1.0,
               vocab_range: Optional[Tuple[int, int]] = None, forced: Optional[torch.Tensor] = None,
               seed: Union[int, torch.Tensor], offset: Union[int, torch.Tensor],
               row_ids: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
               return_cond_logprobs: bool = False, check: bool = True):
    """Sample one token per row from guided, tempered, top-k/top-p filtered logits.

    cond, uncond: [B, V] logits (fp32/bf16/fp16); z = u + cfg_scale (c - u).
    cfg_scale, temperature (0 = greedy), top_k (0 = off), top_p (1 = off):
    Python scalars or [B] tensors. vocab_range=(lo, hi): only ids lo..hi-1 can
    be sampled and only that slice is read. forced: [B] int64, -1 = free, else
    that token is returned with log-prob 0 and the row's logits are not read.
    seed, offset: ints or 0-dim int64 tensors (e.g. offset = decode step);
    offset may also be a [B] int64 tensor, one per row (rows at different
    positions, e.g. a Jacobi window: row b draws exactly what a call with
    offset=offset[b] would draw for it);
    row_ids: [B] int64 RNG stream per row (default arange(B)). out: optional
    [B] int64 to write the tokens into (e.g. a column of the sequence buffer).
    check=True raises on NaN rows / empty kept sets (one host sync); with
    check=False such rows return lo and a NaN log-prob, never an invalid id.

    Returns (tokens int64 [B], logprobs fp32 [B]) or, with
    return_cond_logprobs, also log_softmax(cond / T over the window)[token].
    """
    C.check_tensor("cond", cond, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    B, V = cond.shape
    dev = cond.device
    if uncond is not None:
        C.check_tensor("uncond", uncond, dtypes=(cond.dtype,), ndim=2, device=dev)
        C.check_shape("uncond", uncond, (B, V))
    if cond.stride(-1) != 1:
        cond = cond.contiguous()
    if uncond is not None and uncond.stride(-1) != 1:
        uncond = uncond.contiguous()
    lo, hi = C.vocab_window(vocab_range, V)
    cfg = _per_row("cfg_scale", cfg_scale, B, dev, torch.float32)
    temp = _per_row("temperature", temperature, B, dev, torch.float32, low=0.0)
    k = _per_row("top_k", top_k, B, dev, torch.int64, low=0)
    p = _per_row("top_p", top_p, B, dev, torch.float32, low=0.0, low_inclusive=False, high=1.0)
    if forced is not None:
        C.check_tensor("forced", forced, dtypes=(torch.int64,), ndim=1, device=dev)
        C.check_shape("forced", forced, (B,))
        if not C.tracing() and bool(((forced < -1) | (forced >= V)).any()):
            raise ValueError(f"forced must be -1 (free) or a token id in [0, {V})")
        forced = forced.contiguous()
    if row_ids is None:
        row_ids = torch.arange(B, device=dev)
    else:
        C.check_tensor("row_ids", row_ids, dtypes=(torch.int64,), ndim=1, device=dev)
        C.check_shape("row_ids", row_ids, (B,))
        row_ids = row_ids.contiguous()
    # the CPU kernel reads seed/offset on the host; CUDA reads them on the device
    rng_dev = dev if dev.type == "cuda" else torch.device("cpu")
    sd, of = _rng_word("seed", seed, rng_dev), _offsets(offset, B, rng_dev)
    if out is not None:
        C.check_tensor("out", out, dtypes=(torch.int64,), ndim=1, device=dev)
        C.check_shape("out", out, (B,))
    tokens, logp, cond_lp, status = op("cfg_sample")(cond, uncond, cfg, temp, k, p, forced, sd, of, row_ids, lo, hi,
                                                     return_cond_logprobs)
    if check and not C.tracing() and B and bool((status != 0).any()):
        r = int((status != 0).nonzero()[0])
        raise ValueError(f"cfg_sample: row {r}: {STATUS_MESSAGES.get(int(status[r]), 'invalid row')}")
    if out is not None:
        out.copy_(tokens)
        tokens = out
    return (tokens, logp, cond_lp) if return_cond_logprobs else (tokens, logp)
