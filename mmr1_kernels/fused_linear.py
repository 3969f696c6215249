"""Log-probs and GRPO loss straight from hidden states: logits are never materialized.

The head is applied chunk by chunk over token rows, and only to the vocab
window's rows of the weight (``weight[lo:hi]``, a view): for Lumina's image
window (8192 of 65536 ids) that is 1/8 of the head FLOPs and 1/8 of the
logits. Per chunk of C rows:

    z   = h_c @ W_win^T                  [C, W]  (the only vocab-sized buffer)
    fwd = mmr1::grpo_token_loss(z, ...)   fused log-prob / ratio / k3-KL
    z  <- mmr1::logprob_backward_(z, ...) dloss/dz written over z (in place)
    dh_c = z @ W_win ;  dW_win += z^T @ h_c   (fp32 accumulation)

so peak extra memory is O(C x W) + the [W, d] weight-grad accumulator, never
O(N x V). The loss op computes its gradients during the forward (the loss is
a scalar, so the backward only scales them): 3 GEMMs per chunk instead of the
4 a recompute-in-backward design needs. ``fused_linear_logprobs`` (reference
and old-policy log-probs, usually under no_grad) saves only the fp32
logsumexp and recomputes the chunk logits in its backward.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _checks as C
from . import reference as ref
from ._library import _lib, impl, op
from .logprob import _masked_grad

_lib.define(
    "fused_linear_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? mask, float temperature, "
    "int vocab_lo, int vocab_hi, int chunk_size, bool with_entropy=False) -> (Tensor logprobs, Tensor lse, "
    "Tensor entropy)"
)
_lib.define(
    "fused_linear_logprobs_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor grad_logprobs, "
    "float temperature, int vocab_lo, int vocab_hi, int chunk_size, Tensor? entropy=None, "
    "Tensor? grad_entropy=None) -> (Tensor grad_hidden, Tensor grad_weight)"
)
_lib.define(
    "fused_linear_grpo_loss(Tensor hidden, Tensor weight, Tensor targets, Tensor advantages, Tensor token_weights, "
    "Tensor? mask, Tensor? old_logprobs, Tensor? ref_logprobs, float temperature, int vocab_lo, int vocab_hi, "
    "float eps_low, float eps_high, float beta, int chunk_size, bool compute_grad) -> (Tensor loss, "
    "Tensor logprobs, Tensor ratio, Tensor kl, Tensor grad_hidden, Tensor grad_weight)"
)

# Rows per chunk so that one chunk of fp32 logits is ~32 MiB: 1024 rows at the
# 8192-wide image window, 128 rows at a full 65536 vocab. Larger chunks buy
# little GEMM efficiency and cost memory linearly.
CHUNK_ELEMENTS = 1 << 23


def auto_chunk_size(num_rows: int, window: int) -> int:
    return max(1, min(max(num_rows, 1), CHUNK_ELEMENTS // window))


def _opt(t: Optional[torch.Tensor], s: int, e: int) -> Optional[torch.Tensor]:
    return None if t is None else t[s:e]


# The three GEMMs of a chunk on CPU in 16-bit. On CPUs without bf16 / fp16 matrix instructions (AVX2 and most
# AVX-512 parts) torch.mm in bf16 takes a slow path, worst for a long reduction: measured on the 2-core EPYC dev
# machine at V=151,936, d=256, 55 rows: dh = z @ W 13.5 s in bf16 vs 0.037 s in fp32 (365x), logits h @ W^T
# 0.31 vs 0.065 s -- a TRL bf16 step took 74 s through these GEMMs against 5.4 s for TRL's own head. So on CPU the
# GEMMs run in fp32 over blocks of the weight window's rows, each converted on the fly (8192 rows x d=256: 8 MiB):
# the same fp32-accumulated, once-rounded results (z is still stored in the input dtype), dh 0.05 s there.
_UPCAST_BLOCK = 8192


def _upcast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _logits_into(h: torch.Tensor, w_win: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [c, W] = h @ w_win^T."""
    if not _upcast(h):
        return torch.mm(h, w_win.t(), out=out)
    hf = h.float()
    for s in range(0, w_win.shape[0], _UPCAST_BLOCK):
        out[:, s:s + _UPCAST_BLOCK].copy_(torch.mm(hf, w_win[s:s + _UPCAST_BLOCK].float().t()))
    return out


def _grad_hidden_into(dz: torch.Tensor, w_win: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [c, d] = dz @ w_win."""
    if not _upcast(dz):
        return torch.mm(dz, w_win, out=out)
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for s in range(0, w_win.shape[0], _UPCAST_BLOCK):
        acc.addmm_(dz[:, s:s + _UPCAST_BLOCK].float(), w_win[s:s + _UPCAST_BLOCK].float())
    return out.copy_(acc)


class _ChunkLogits:
    """One [chunk, W] buffer reused by every chunk (torch.mm(out=...)): a fresh
    32 MiB tensor per chunk would pay its page faults again each time."""

    def __init__(self, hidden: torch.Tensor, w_win: torch.Tensor, chunk_size: int):
        self.w_win = w_win
        self.buf = hidden.new_empty(min(chunk_size, hidden.shape[0]), w_win.shape[0])

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return _logits_into(h, self.w_win, self.buf[: h.shape[0]])


@impl("zeros_untouched", "CompositeExplicitAutograd")
def _zeros_untouched_ref(like, size, dtype):
    return torch.zeros(size, dtype=dtype, device=like.device)


@torch.library.register_fake("mmr1::zeros_untouched")
def _zeros_untouched_fake(like, size, dtype):
    return like.new_empty(size, dtype=dtype)


class _WeightGradAccumulator:
    """d weight [V, d], accumulated on the window rows only: dW[lo:hi] += z^T @ h.

    The [V, d] buffer comes from mmr1::zeros_untouched, so rows outside the
    window cost no memory traffic (and, on CPU, no resident pages) until someone
    writes them. Accumulation is fp32 (fp64 for fp64 weights): a bf16
    accumulator would lose the small per-chunk terms.
    """

    def __init__(self, weight: torch.Tensor, lo: int, hi: int):
        self.exact = weight.dtype in (torch.float32, torch.float64)
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.weight, self.lo, self.hi = weight, lo, hi
        self.acc = op("zeros_untouched")(weight, list(weight.shape), acc)
        self.win = self.acc[lo:hi]

    def add(self, dz: torch.Tensor, h: torch.Tensor) -> None:
        if self.exact:
            self.win.addmm_(dz.t(), h)
        elif _upcast(dz):
            hf = h.float()
            for s in range(0, dz.shape[1], _UPCAST_BLOCK):
                self.win[s:s + _UPCAST_BLOCK].addmm_(dz[:, s:s + _UPCAST_BLOCK].t().float(), hf)
        else:
            self.win += torch.mm(dz.t(), h).float()

    def result(self) -> torch.Tensor:
        if self.acc.dtype == self.weight.dtype:
            return self.acc
        out = op("zeros_untouched")(self.weight, list(self.weight.shape), self.weight.dtype)
        out[self.lo:self.hi].copy_(self.win)
        return out


@impl("fused_linear_logprobs", "CompositeExplicitAutograd")
def _fl_logprobs(hidden, weight, targets, mask, temperature, vocab_lo, vocab_hi, chunk_size, with_entropy=False):
    N, W = hidden.shape[0], vocab_hi - vocab_lo
    w_win = weight[vocab_lo:vocab_hi]
    local = targets - vocab_lo
    logp = hidden.new_empty(N, dtype=C.acc_dtype(hidden.dtype))
    lse = hidden.new_empty(N, dtype=C.acc_dtype(hidden.dtype))
    ent = hidden.new_empty(N if with_entropy else 0, dtype=C.acc_dtype(hidden.dtype))
    logits_of = _ChunkLogits(hidden, w_win, chunk_size)
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        z = logits_of(hidden[s:e])
        lp, ls, en = op("token_logprobs")(z, local[s:e], _opt(mask, s, e), temperature, 0, W, with_entropy)
        logp[s:e], lse[s:e] = lp, ls
        if with_entropy:
            ent[s:e] = en
    return logp, lse, ent


@impl("fused_linear_logprobs_backward", "CompositeExplicitAutograd")
def _fl_logprobs_backward(hidden, weight, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, chunk_size,
                          entropy=None, grad_entropy=None):
    N, W = hidden.shape[0], vocab_hi - vocab_lo
    w_win = weight[vocab_lo:vocab_hi]
    local = targets - vocab_lo
    grad_hidden = torch.empty_like(hidden)
    gw = _WeightGradAccumulator(weight, vocab_lo, vocab_hi)
    logits_of = _ChunkLogits(hidden, w_win, chunk_size)
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        h = hidden[s:e]
        z = logits_of(h)
        op("logprob_backward_")(z, local[s:e], lse[s:e], grad_logprobs[s:e], temperature, 0, W,
                                _opt(entropy, s, e), _opt(grad_entropy, s, e))
        _grad_hidden_into(z, w_win, grad_hidden[s:e])
        gw.add(z, h)
    return grad_hidden, gw.result()


@impl("fused_linear_grpo_loss", "CompositeExplicitAutograd")
def _fl_grpo(hidden, weight, targets, advantages, token_weights, mask, old_logprobs, ref_logprobs, temperature,
             vocab_lo, vocab_hi, eps_low, eps_high, beta, chunk_size, compute_grad):
    N, W = hidden.shape[0], vocab_hi - vocab_lo
    w_win = weight[vocab_lo:vocab_hi]
    local = targets - vocab_lo
    f32 = dict(dtype=C.acc_dtype(hidden.dtype), device=hidden.device)
    loss = torch.zeros((), **f32)
    logp, ratio, kl = (torch.empty(N, **f32) for _ in range(3))
    grad_hidden = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
    gw = _WeightGradAccumulator(weight, vocab_lo, vocab_hi) if compute_grad else None
    logits_of = _ChunkLogits(hidden, w_win, chunk_size)
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        h = hidden[s:e]
        z = logits_of(h)
        lp, lse, tl, coef, r, k = op("grpo_token_loss")(
            z, local[s:e], advantages[s:e], _opt(mask, s, e), _opt(old_logprobs, s, e), _opt(ref_logprobs, s, e),
            temperature, 0, W, eps_low, eps_high, beta)
        w_c = token_weights[s:e]
        loss += (tl * w_c).sum()
        logp[s:e], ratio[s:e], kl[s:e] = lp, r, k
        if compute_grad:
            op("logprob_backward_")(z, local[s:e], lse, coef * w_c, temperature, 0, W)
            _grad_hidden_into(z, w_win, grad_hidden[s:e])
            gw.add(z, h)
    grad_w = gw.result() if compute_grad else weight.new_empty(0)
    return loss, logp, ratio, kl, grad_hidden, grad_w


@torch.library.register_fake("mmr1::fused_linear_logprobs")
def _fl_logprobs_fake(hidden, weight, targets, mask, temperature, vocab_lo, vocab_hi, chunk_size, with_entropy=False):
    n, dtype = hidden.shape[0], C.acc_dtype(hidden.dtype)
    return hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype), \
        hidden.new_empty(n if with_entropy else 0, dtype=dtype)


@torch.library.register_fake("mmr1::fused_linear_logprobs_backward")
def _fl_logprobs_backward_fake(hidden, weight, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi,
                               chunk_size, entropy=None, grad_entropy=None):
    return torch.empty_like(hidden), torch.empty_like(weight)


@torch.library.register_fake("mmr1::fused_linear_grpo_loss")
def _fl_grpo_fake(hidden, weight, targets, advantages, token_weights, mask, old_logprobs, ref_logprobs, temperature,
                  vocab_lo, vocab_hi, eps_low, eps_high, beta, chunk_size, compute_grad):
    n = hidden.shape[0]
    f32 = dict(dtype=C.acc_dtype(hidden.dtype))
    gh = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
    gw = torch.empty_like(weight) if compute_grad else weight.new_empty(0)
    return hidden.new_empty((), **f32), hidden.new_empty(n, **f32), hidden.new_empty(n, **f32), \
        hidden.new_empty(n, **f32), gh, gw


def _scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale, without the copy when the upstream gradient is exactly 1 (loss.backward())."""
    # only for a plain eager tensor: under tracing (torch.compile, opcheck) a subclass stands in
    # for it and a data-dependent branch is not allowed
    if type(scale) is torch.Tensor and not torch.compiler.is_compiling() and scale.numel() == 1 and bool(scale == 1):
        return grad
    return grad * scale.to(grad.dtype)


def _setup_fl_logprobs(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled grads for unused outputs (lse)
    hidden, weight, targets, mask, temperature, lo, hi, chunk, *_with_entropy = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1], output[2], mask)
    ctx.params = (temperature, lo, hi, chunk)


def _backward_fl_logprobs(ctx, grad_logp, grad_lse, grad_entropy):
    hidden, weight, targets, lse, entropy, mask = ctx.saved_tensors
    temperature, lo, hi, chunk = ctx.params
    if entropy.numel() != lse.numel():  # the entropy was not computed (with_entropy=False): it has no gradient
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 9
    g = _masked_grad(grad_logp if grad_logp is not None else torch.zeros_like(lse), mask, lse.dtype)
    extra = () if grad_entropy is None else (entropy, _masked_grad(grad_entropy, mask, lse.dtype))
    gh, gw = op("fused_linear_logprobs_backward")(hidden, weight, targets, lse, g, temperature, lo, hi, chunk, *extra)
    return (gh if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), \
        None, None, None, None, None, None, None


torch.library.register_autograd("mmr1::fused_linear_logprobs", _backward_fl_logprobs,
                                setup_context=_setup_fl_logprobs)


def _setup_fl_grpo(ctx, inputs, output):
    # Without this, autograd would zero-fill a gradient for every unused output before calling
    # the backward -- including a [V, d] one for the grad_weight output (measured: +256 MiB).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[4], output[5])


def _backward_fl_grpo(ctx, grad_loss, *_unused):
    gh, gw = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 16
    if gh.numel() == 0 and gw.numel() == 0:
        raise RuntimeError("fused_linear_grpo_loss was called with compute_grad=False; it has no backward")
    grad_hidden = _scaled(gh, grad_loss) if ctx.needs_input_grad[0] else None
    grad_weight = _scaled(gw, grad_loss) if ctx.needs_input_grad[1] else None
    return (grad_hidden, grad_weight) + (None,) * 14


torch.library.register_autograd("mmr1::fused_linear_grpo_loss", _backward_fl_grpo, setup_context=_setup_fl_grpo)


# --------------------------------------------------------------------------- public API


def _check_linear(hidden, weight):
    C.check_tensor("hidden", hidden, dtypes=C.LOGIT_DTYPES)
    C.check_tensor("weight", weight, dtypes=C.LOGIT_DTYPES, ndim=2, device=hidden.device)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [..., d], got {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, d={hidden.shape[-1]}], got {tuple(weight.shape)}")


def _chunk(chunk_size, N, W):
    if chunk_size is None:
        return auto_chunk_size(N, W)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, vocab_range: Optional[Tuple[int, int]] = None,
                          mask: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                          return_entropy: bool = False):
    """log softmax((hidden @ weight[lo:hi].T) / T)[targets], fp32, shaped like ``targets``.

    hidden [..., d], weight [V, d] (the untied lm_head), targets [...] absolute
    ids. Differentiable w.r.t. hidden and weight; peak extra memory
    O(chunk_size x window). ``return_entropy=True`` returns ``(logp, entropy)``
    (the softmax's entropy over the window per token, same pass, differentiable);
    the backward recomputes each chunk's logits from the saved fp32 logsumexp.
    """
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    _check_linear(hidden, weight)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    C.check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), device=hidden.device)
    C.check_shape("targets", targets, lead)
    tgt = targets.reshape(-1).long().contiguous()
    temperature = C.check_scalar("temperature", temperature, low=0.0, low_inclusive=False)
    lo, hi = C.vocab_window(vocab_range, weight.shape[0])
    m = C.as_mask("mask", mask, lead, hidden.device)
    m = m.reshape(-1).contiguous() if m is not None else None
    C.check_targets_in_window(tgt, lo, hi, m)
    logp, _, ent = op("fused_linear_logprobs")(h, weight, tgt, m, temperature, lo, hi,
                                               _chunk(chunk_size, h.shape[0], hi - lo), return_entropy)
    if return_entropy:
        return logp.reshape(lead), ent.reshape(lead)
    return logp.reshape(lead)


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           advantages: torch.Tensor, mask: Optional[torch.Tensor] = None,
                           old_logprobs: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None,
                           *, temperature: float = 1.0, vocab_range: Optional[Tuple[int, int]] = None,
                           epsilon: Optional[float] = None, epsilon_high: Optional[float] = None,
                           beta: float = 0.0, loss_type: str = "grpo", chunk_size: Optional[int] = None,
                           loss_weights: Optional[torch.Tensor] = None, eps_low: Optional[float] = None,
                           eps_high: Optional[float] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO loss from hidden states [B, T, d] and the head weight [V, d]; see ``grpo_loss`` (the same arguments
    and metrics).

    Returns ``(loss, metrics)``; the loss is differentiable w.r.t. ``hidden``
    and ``weight`` (gradients are computed chunk by chunk during the forward).
    """
    eps_low, eps_high = ref.clip_epsilons(epsilon, epsilon_high, eps_low, eps_high)
    _check_linear(hidden, weight)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, d], got {tuple(hidden.shape)}")
    B, T, d = hidden.shape
    a = C.grpo_args(B, T, weight.shape[0], hidden.device, C.acc_dtype(hidden.dtype), targets, advantages, mask,
                    old_logprobs, ref_logprobs, temperature, vocab_range, eps_low, eps_high, beta, loss_type,
                    loss_weights)
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, logp, ratio, kl, _, _ = op("fused_linear_grpo_loss")(
        hidden.reshape(B * T, d), weight, a.targets, a.advantages, a.token_weights, a.mask, a.old_logprobs,
        a.ref_logprobs, a.temperature, a.vocab_lo, a.vocab_hi, a.eps_low, a.eps_high, a.beta,
        _chunk(chunk_size, B * T, a.vocab_hi - a.vocab_lo), compute_grad)
    return loss, ref.grpo_metrics(logp, ratio, kl, a.advantages, a.mask, a.eps_low, a.eps_high)
