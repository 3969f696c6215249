"""Fused token log-prob / GRPO loss ops: registration and public API.

Ops (schemas in _library.py):
  mmr1::token_logprobs    logits -> (logp, lse)                     fp32 [N]
  mmr1::grpo_token_loss   logits -> (logp, lse, loss, dloss/dlogp, ratio, kl)  fp32 [N]
  mmr1::logprob_backward  (logits, lse, g) -> dz = g/T (onehot - softmax) [N, V]
  mmr1::logprob_backward_ the same, written into the logits' storage

Backends: C++ (CPU), Triton (CUDA), reference (anything else). Autograd is
registered on the forward ops; their backward is the fused backward op, so
the [N, V] softmax is never stored between forward and backward (only the
fp32 logsumexp per token is).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _checks as C
from . import reference as ref
from ._library import HAS_TRITON, impl, op

# --------------------------------------------------------------------------- reference fallback


def _rows(logits: torch.Tensor) -> int:
    return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[1]


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(_rows(logits), logits.shape[-1])


@impl("token_logprobs", "CompositeExplicitAutograd")
def _token_logprobs_ref(logits, targets, mask, temperature, vocab_lo, vocab_hi, with_entropy=False):
    rows, dtype = _as_rows(logits), C.acc_dtype(logits.dtype)
    logp, lse = ref.token_logprobs(rows, targets, temperature, vocab_lo, vocab_hi, mask=mask, dtype=dtype)
    ent = (ref.token_entropy(rows, temperature, vocab_lo, vocab_hi, mask=mask, dtype=dtype) if with_entropy
           else logp.new_empty(0))
    return logp, lse, ent


@impl("grpo_token_loss", "CompositeExplicitAutograd")
def _grpo_token_loss_ref(logits, targets, advantages, mask, old_logprobs, ref_logprobs, temperature, vocab_lo,
                         vocab_hi, eps_low, eps_high, beta, inplace_backward=False):
    logp, lse = ref.token_logprobs(_as_rows(logits), targets, temperature, vocab_lo, vocab_hi, mask=mask,
                                   dtype=C.acc_dtype(logits.dtype))
    # below the Autograd dispatch keys autograd cannot be re-entered: the closed-form derivative
    loss, ratio, kl = ref.grpo_token_terms(logp, advantages, old_logprobs, ref_logprobs, eps_low, eps_high, beta)
    coef = ref.grpo_token_coef(logp, advantages, old_logprobs, ref_logprobs, eps_low, eps_high, beta)
    if mask is not None:
        zero = torch.zeros_like(logp)
        loss, coef, kl = (torch.where(mask, t, zero) for t in (loss, coef, kl))
        ratio = torch.where(mask, ratio, torch.ones_like(ratio))
    return logp, lse, loss.detach(), coef, ratio.detach(), kl.detach()


@impl("logprob_backward", "CompositeExplicitAutograd")
def _logprob_backward_ref(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy=None,
                          grad_entropy=None):
    return ref.logprob_backward(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy,
                                grad_entropy)


@impl("logprob_backward_", "CompositeExplicitAutograd")
def _logprob_backward_inplace_ref(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy=None,
                                  grad_entropy=None):
    logits.copy_(ref.logprob_backward(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy,
                                      grad_entropy))


# --------------------------------------------------------------------------- Triton (CUDA)
if HAS_TRITON:

    # The Triton kernels compute in fp32; fp64 logits (validation only) take the reference.

    @impl("token_logprobs", "CUDA")
    def _token_logprobs_cuda(logits, targets, mask, temperature, vocab_lo, vocab_hi, with_entropy=False):
        from .gpu import logprob as K

        if logits.dtype == torch.float64:
            return _token_logprobs_ref(logits, targets, mask, temperature, vocab_lo, vocab_hi, with_entropy)
        return K.logprob_forward(logits, targets, mask, temperature, vocab_lo, vocab_hi, with_entropy=with_entropy)

    @impl("grpo_token_loss", "CUDA")
    def _grpo_token_loss_cuda(logits, targets, advantages, mask, old_logprobs, ref_logprobs, temperature, vocab_lo,
                              vocab_hi, eps_low, eps_high, beta, inplace_backward=False):
        from .gpu import logprob as K

        if logits.dtype == torch.float64:
            return _grpo_token_loss_ref(logits, targets, advantages, mask, old_logprobs, ref_logprobs, temperature,
                                        vocab_lo, vocab_hi, eps_low, eps_high, beta)
        return K.logprob_forward(logits, targets, mask, temperature, vocab_lo, vocab_hi, advantages, old_logprobs,
                                 ref_logprobs, eps_low, eps_high, beta)

    @impl("logprob_backward", "CUDA")
    def _logprob_backward_cuda(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy=None,
                               grad_entropy=None):
        from .gpu import logprob as K

        if logits.dtype == torch.float64:
            return _logprob_backward_ref(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi,
                                         entropy, grad_entropy)
        return K.logprob_backward(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi,
                                  entropy=entropy, grad_entropy=grad_entropy)

    @impl("logprob_backward_", "CUDA")
    def _logprob_backward_inplace_cuda(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi,
                                       entropy=None, grad_entropy=None):
        from .gpu import logprob as K

        if logits.dtype == torch.float64:
            return _logprob_backward_inplace_ref(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi,
                                                 entropy, grad_entropy)
        K.logprob_backward(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, out=logits,
                           entropy=entropy, grad_entropy=grad_entropy)


# --------------------------------------------------------------------------- fake (meta) impls


def _fp32_rows(logits, k):
    n, dtype = _rows(logits), C.acc_dtype(logits.dtype)
    return tuple(logits.new_empty(n, dtype=dtype) for _ in range(k))


@torch.library.register_fake("mmr1::token_logprobs")
def _token_logprobs_fake(logits, targets, mask, temperature, vocab_lo, vocab_hi, with_entropy=False):
    logp, lse = _fp32_rows(logits, 2)
    return logp, lse, logp.new_empty(logp.shape[0] if with_entropy else 0)


@torch.library.register_fake("mmr1::grpo_token_loss")
def _grpo_token_loss_fake(logits, targets, advantages, mask, old_logprobs, ref_logprobs, temperature, vocab_lo,
                          vocab_hi, eps_low, eps_high, beta, inplace_backward=False):
    return _fp32_rows(logits, 6)


@torch.library.register_fake("mmr1::logprob_backward")
def _logprob_backward_fake(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy=None,
                           grad_entropy=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("mmr1::logprob_backward_")
def _logprob_backward_inplace_fake(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy=None,
                                   grad_entropy=None):
    return None


# --------------------------------------------------------------------------- autograd


def _masked_grad(g, mask, dtype):
    g = g.to(dtype).contiguous()
    return torch.where(mask, g, torch.zeros_like(g)) if mask is not None else g


def _setup_logprobs(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for unused outputs
    logits, targets, mask, temperature, lo, hi, *_with_entropy = inputs
    ctx.save_for_backward(logits, targets, output[1], output[2], mask)
    ctx.params = (temperature, lo, hi)


def _backward_logprobs(ctx, grad_logp, grad_lse, grad_entropy):
    # lse is returned for reuse (e.g. z-loss) and is not differentiable; the entropy is.
    logits, targets, lse, entropy, mask = ctx.saved_tensors
    if entropy.numel() != lse.numel():  # the entropy was not computed (with_entropy=False): it has no gradient
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 7
    g = _masked_grad(grad_logp if grad_logp is not None else torch.zeros_like(lse), mask, lse.dtype)
    if grad_entropy is None:
        dz = op("logprob_backward")(logits, targets, lse, g, *ctx.params)
    else:
        gh = _masked_grad(grad_entropy, mask, lse.dtype)
        dz = op("logprob_backward")(logits, targets, lse, g, *ctx.params, entropy, gh)
    return (dz,) + (None,) * 6


torch.library.register_autograd("mmr1::token_logprobs", _backward_logprobs, setup_context=_setup_logprobs)


def _setup_grpo(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for the unused metric outputs
    logits, targets, _adv, mask, _old, _ref, temperature, lo, hi, *_rest, inplace = inputs
    ctx.save_for_backward(logits, targets, output[1], output[3], mask)
    ctx.params = (temperature, lo, hi)
    ctx.inplace = inplace


def _backward_grpo(ctx, grad_logp, grad_lse, grad_loss, grad_coef, grad_ratio, grad_kl):
    # d/dz of sum(g_loss * loss + g_logp * logp) = (g_loss * dloss/dlogp + g_logp) * dlogp/dz
    logits, targets, lse, coef, mask = ctx.saved_tensors
    if grad_loss is None and grad_logp is None:
        return (None,) * 13
    g = torch.zeros_like(coef)
    if grad_loss is not None:
        g = g + grad_loss.to(coef.dtype) * coef
    if grad_logp is not None:
        g = g + grad_logp.to(coef.dtype)
    g = _masked_grad(g, mask, coef.dtype)
    if ctx.inplace:
        op("logprob_backward_")(logits, targets, lse, g, *ctx.params)
        dz = logits
    else:
        dz = op("logprob_backward")(logits, targets, lse, g, *ctx.params)
    return (dz,) + (None,) * 12


torch.library.register_autograd("mmr1::grpo_token_loss", _backward_grpo, setup_context=_setup_grpo)


# --------------------------------------------------------------------------- public API


def _prepare_logits(logits):
    C.check_tensor("logits", logits, dtypes=C.LOGIT_DTYPES)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [..., V] with at least 2 dims, got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocab dim")
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def _prepare_targets(targets, logits_shape, device):
    C.check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), device=device)
    C.check_shape("targets", targets, logits_shape[:-1])
    return targets.reshape(-1).long().contiguous()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   vocab_range: Optional[Tuple[int, int]] = None, mask: Optional[torch.Tensor] = None,
                   return_entropy: bool = False):
    """log softmax(logits / T over the vocab window)[targets], fp32, shaped like ``targets``.

    Never materializes the [N, V] log-softmax; differentiable w.r.t. ``logits``.
    ``logits`` [..., V] (fp32/bf16/fp16, any leading strides with a unit vocab
    stride, e.g. ``model_logits[:, :-1]``); ``targets`` [...] int64;
    ``vocab_range=(lo, hi)`` restricts the softmax to ids lo..hi-1 (targets of
    unmasked tokens must lie inside); ``mask`` [...] bool: masked tokens get 0
    and are not read. ``return_entropy=True`` returns ``(logp, entropy)``: the
    Shannon entropy of softmax(logits / T) over the window, per token, from the
    same pass over the logits (fp32, 0 for masked tokens), differentiable too.
    """
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    shape = logits.shape if isinstance(logits, torch.Tensor) else None
    logits = _prepare_logits(logits)
    tgt = _prepare_targets(targets, shape, logits.device)
    temperature = C.check_scalar("temperature", temperature, low=0.0, low_inclusive=False)
    lo, hi = C.vocab_window(vocab_range, logits.shape[-1])
    m = C.as_mask("mask", mask, shape[:-1], logits.device)
    m = m.reshape(-1).contiguous() if m is not None else None
    C.check_targets_in_window(tgt, lo, hi, m)
    logp, _, ent = op("token_logprobs")(logits, tgt, m, temperature, lo, hi, return_entropy)
    if return_entropy:
        return logp.reshape(shape[:-1]), ent.reshape(shape[:-1])
    return logp.reshape(shape[:-1])


def grpo_loss(logits: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
              mask: Optional[torch.Tensor] = None, old_logprobs: Optional[torch.Tensor] = None,
              ref_logprobs: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
              vocab_range: Optional[Tuple[int, int]] = None, epsilon: Optional[float] = None,
              epsilon_high: Optional[float] = None, beta: float = 0.0, loss_type: str = "grpo",
              inplace_backward: bool = False, loss_weights: Optional[torch.Tensor] = None,
              eps_low: Optional[float] = None,
              eps_high: Optional[float] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Fused GRPO loss (clipped surrogate + beta * k3 KL) from logits [B, T, V].

    Returns ``(loss, metrics)``: a scalar fp32 loss differentiable w.r.t.
    ``logits``, and 0-dim tensors ``ratio_mean``, ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``kl``, ``logp_mean``
    (masked token means; the names of ``policy_loss`` and TRL). Clip widths:
    ``epsilon`` (default 0.2) below and ``epsilon_high`` (default: epsilon)
    above, TRL's names (``eps_low`` / ``eps_high``: the previous release's, with
    a FutureWarning).
    ``advantages`` [B] or [B, T]; ``old_logprobs``/``ref_logprobs`` [B, T]
    (old defaults to the detached current log-probs; ref is needed when
    beta != 0). ``loss_type``: grpo (mean of per-sequence token means), bnpo /
    dapo (token sum / mask sum), dr_grpo (token sum / (B*T)).
    ``inplace_backward=True`` writes d loss/d logits into the logits' storage
    (no second [B, T, V] buffer; the logits are destroyed by backward).
    ``loss_weights`` [B, T] replaces the loss_type aggregation: loss = sum(w * token_loss)
    over unmasked tokens (e.g. weights normalized over a union of masks split across calls).
    """
    eps_low, eps_high = ref.clip_epsilons(epsilon, epsilon_high, eps_low, eps_high)
    C.check_tensor("logits", logits, dtypes=C.LOGIT_DTYPES, ndim=3)
    B, T, V = logits.shape
    logits = _prepare_logits(logits)
    a = C.grpo_args(B, T, V, logits.device, C.acc_dtype(logits.dtype), targets, advantages, mask, old_logprobs,
                    ref_logprobs, temperature, vocab_range, eps_low, eps_high, beta, loss_type, loss_weights)
    logp, _lse, token_loss, _coef, ratio, kl = op("grpo_token_loss")(
        logits, a.targets, a.advantages, a.mask, a.old_logprobs, a.ref_logprobs, a.temperature, a.vocab_lo,
        a.vocab_hi, a.eps_low, a.eps_high, a.beta, inplace_backward)
    loss = (token_loss * a.token_weights).sum()
    return loss, ref.grpo_metrics(logp.detach(), ratio, kl, a.advantages, a.mask, a.eps_low, a.eps_high)
