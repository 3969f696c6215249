"""Argument validation for the public wrappers.

Every check raises ValueError/TypeError naming the argument and what was
expected, before any kernel runs. Checks that need the values of a tensor (a
host sync: targets inside the vocab window, finite rewards) are skipped while
torch.compile traces; the kernels themselves never read or write out of bounds
for such inputs (they produce NaN / a status code instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

# float64 is accepted for validation and gradcheck: computed in fp64 by the C++
# kernels and the reference (per-token outputs are then fp64 too).
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-token vectors (log-probs, advantages, ...) for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tracing() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None, ndim=None,
                 device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed_ndim:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed_ndim))} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like logits), got {t.device}")


def check_shape(name: str, t: torch.Tensor, shape: Tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_scalar(name: str, value, *, low=None, low_inclusive=True, high=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def vocab_window(vocab_range, V: int) -> Tuple[int, int]:
    if vocab_range is None:
        return 0, V
    try:
        lo, hi = (int(x) for x in vocab_range)
    except (TypeError, ValueError):
        raise TypeError(f"vocab_range must be a (lo, hi) pair of ints, got {vocab_range!r}") from None
    if not 0 <= lo < hi <= V:
        raise ValueError(f"vocab_range must satisfy 0 <= lo < hi <= V={V}, got ({lo}, {hi})")
    return lo, hi


def check_targets_in_window(targets: torch.Tensor, lo: int, hi: int, mask: Optional[torch.Tensor]) -> None:
    """Targets of unmasked tokens must lie in [lo, hi) (a host sync; skipped under torch.compile)."""
    if tracing() or targets.numel() == 0:
        return
    bad = (targets < lo) | (targets >= hi)
    if mask is not None:
        bad &= mask.bool()
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"targets must lie in the vocab window [{lo}, {hi}) (masked positions excepted); "
            f"targets{list(idx)} = {int(targets[idx])}"
        )


def as_mask(name: str, mask, shape, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    check_tensor(name, mask, device=device)
    check_shape(name, mask, shape)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            if not tracing() and bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{name} must contain only 0/1 (or be bool)")
        mask = mask != 0
    return mask


def as_float_vector(name: str, t, shape, device, dtype=torch.float32) -> torch.Tensor:
    check_tensor(name, t, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), device=device)
    check_shape(name, t, shape)
    return t.detach().to(dtype).contiguous().reshape(-1)


@dataclass
class GrpoArgs:
    """Validated, flattened [B*T] inputs shared by grpo_loss and fused_linear_grpo_loss."""

    targets: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor  # bool [B*T]
    old_logprobs: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    token_weights: torch.Tensor  # loss = sum(token_weights * token_loss)
    vocab_lo: int
    vocab_hi: int
    temperature: float
    eps_low: float
    eps_high: float
    beta: float


def grpo_args(B: int, T: int, V: int, device, vec_dtype, targets, advantages, mask, old_logprobs, ref_logprobs,
              temperature, vocab_range, eps_low, eps_high, beta, loss_type, loss_weights=None) -> GrpoArgs:
    from .reference import LOSS_TYPES
    from .reference import loss_weights as _loss_weights

    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), device=device)
    check_shape("targets", targets, (B, T))
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    temperature = check_scalar("temperature", temperature, low=0.0, low_inclusive=False)
    eps_low = check_scalar("epsilon", eps_low, low=0.0, high=1.0)
    eps_high = check_scalar("epsilon_high", eps_high, low=0.0)
    beta = check_scalar("beta", beta, low=0.0)
    lo, hi = vocab_window(vocab_range, V)
    check_tensor("advantages", advantages, device=device, ndim=(1, 2))
    if advantages.dim() == 1:
        check_shape("advantages", advantages, (B,))
        advantages = advantages[:, None].expand(B, T)
    adv = as_float_vector("advantages", advantages, (B, T), device, vec_dtype)
    m2d = as_mask("mask", mask, (B, T), device)
    if m2d is None:
        m2d = torch.ones(B, T, dtype=torch.bool, device=device)
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs [B, T] is required when beta != 0")
    old = as_float_vector("old_logprobs", old_logprobs, (B, T), device, vec_dtype) if old_logprobs is not None else None
    ref = as_float_vector("ref_logprobs", ref_logprobs, (B, T), device, vec_dtype) if ref_logprobs is not None else None
    tgt = targets.reshape(-1).long().contiguous()
    m = m2d.reshape(-1).contiguous()
    check_targets_in_window(tgt, lo, hi, m)
    if loss_weights is None:
        w = _loss_weights(m2d, loss_type, vec_dtype)
    else:  # explicit weights, e.g. normalized over a union of masks split across several calls
        check_tensor("loss_weights", loss_weights, dtypes=(torch.float32, torch.float64), device=device)
        check_shape("loss_weights", loss_weights, (B, T))
        w = torch.where(m2d, loss_weights.detach(), torch.zeros_like(loss_weights))
    w = w.reshape(-1).to(vec_dtype).contiguous()
    return GrpoArgs(tgt, adv, m, old, ref, w, lo, hi, temperature, eps_low, eps_high, beta)
