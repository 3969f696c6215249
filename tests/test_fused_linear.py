"""fused_linear_logprobs / fused_linear_grpo_loss against the materialized-logits reference."""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R
from mmr1_kernels._library import op

from conftest import GRAD_TOLERANCES, TOLERANCES


def _inputs(B=3, T=7, d=24, V=300, window=(20, 277), dtype=torch.float32):
    hidden = torch.randn(B, T, d, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, d, dtype=torch.float64) / d**0.5 * 3).to(dtype)
    targets = torch.randint(*window, (B, T))
    mask = torch.rand(B, T) > 0.2
    mask[0, :] = False
    targets[~mask] = -1
    with torch.no_grad():
        base, _ = R.token_logprobs(hidden.double() @ weight.double().T, targets.clamp(min=window[0]), 1.0, *window,
                                   dtype=torch.float64)
    old = (base + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    ref = (base + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    return hidden, weight, targets, mask, torch.randn(B), old, ref


def _close(actual, expected, dtype, grad=False):
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    scale = float(expected.abs().max()) if grad else 10.0
    # the head GEMM itself runs in the input dtype (as in every framework), so
    # bf16/fp16 logits carry that dtype's rounding before the fp32 kernel math
    if dtype in (torch.bfloat16, torch.float16):
        atol, rtol = max(atol, 2e-2), max(rtol, 2e-2)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * max(1.0, scale), rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_fused_linear_grpo_loss_matches_reference(dtype, loss_type, chunk_size):
    hidden, weight, targets, mask, adv, old, ref = _inputs(dtype=dtype)
    kw = dict(temperature=0.8, vocab_range=(20, 277), eps_low=0.2, eps_high=0.28, beta=0.05, loss_type=loss_type)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, metrics = K.fused_linear_grpo_loss(h, w, targets, adv, mask, old, ref, chunk_size=chunk_size, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    hr = hidden.double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    eloss, emetrics = R.fused_linear_grpo_loss(hr, wr, targets.clamp(min=20), adv, mask, old, ref, dtype=torch.float64,
                                               **kw)
    egh, egw = torch.autograd.grad(eloss, (hr, wr))
    _close(loss, eloss, dtype)
    for k in emetrics:
        _close(metrics[k], emetrics[k], dtype)
    assert gh.dtype == dtype and gw.dtype == dtype and gw.shape == weight.shape
    _close(gh, egh, dtype, grad=True)
    _close(gw, egw, dtype, grad=True)
    assert torch.all(gw[:20] == 0) and torch.all(gw[277:] == 0), "rows outside the window get no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_and_grad(dtype):
    hidden, weight, targets, mask, *_ = _inputs(dtype=dtype)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp = K.fused_linear_logprobs(h, w, targets, temperature=1.2, vocab_range=(20, 277), mask=mask, chunk_size=4)
    coeffs = torch.randn(lp.shape, dtype=torch.float64)
    gh, gw = torch.autograd.grad((lp.double() * coeffs).sum(), (h, w))
    hr = hidden.double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    e, _ = R.token_logprobs(hr @ wr.T, targets.clamp(min=20), 1.2, 20, 277, mask=mask, dtype=torch.float64)
    egh, egw = torch.autograd.grad((e * coeffs).sum(), (hr, wr))
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    _close(lp, e, dtype)
    _close(gh, egh, dtype, grad=True)
    _close(gw, egw, dtype, grad=True)


def test_no_grad_path_computes_no_gradients():
    hidden, weight, targets, mask, adv, old, ref = _inputs()
    with torch.no_grad():
        loss, _ = K.fused_linear_grpo_loss(hidden, weight, targets, adv, mask, old, ref, beta=0.05,
                                           vocab_range=(20, 277))
    out = op("fused_linear_grpo_loss")(hidden.reshape(21, 24), weight, targets.reshape(-1).clamp(min=20),
                                       adv.repeat_interleave(7), torch.full((21,), 1 / 21), None, None, None, 1.0, 20,
                                       277, 0.2, 0.2, 0.0, 8, False)
    assert out[4].numel() == 0 and out[5].numel() == 0
    assert torch.isfinite(loss)


def test_fused_linear_gradcheck_fp64():
    torch.manual_seed(3)
    hidden = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(2, 11, (2, 3))
    adv = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: K.fused_linear_logprobs(h, w, targets, 0.9, (2, 11), chunk_size=4), (hidden, weight))
    # explicit old log-probs: with old=None the loss value is constant (ratio == 1) by design and only its
    # gradient (-A dlogp) is meaningful, which finite differences cannot see
    with torch.no_grad():
        old = K.fused_linear_logprobs(hidden, weight, targets, 1.0, (2, 11)) + 0.05
        ref = old - 0.15
    assert torch.autograd.gradcheck(
        lambda h, w: K.fused_linear_grpo_loss(h, w, targets, adv, None, old, ref, vocab_range=(2, 11), beta=0.1,
                                              eps_low=0.3, eps_high=0.3, chunk_size=2)[0],
        (hidden, weight))


def test_opcheck_fused_linear_ops():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(5, 30, (6,))
    torch.library.opcheck(op("fused_linear_logprobs"), (hidden, weight, targets, None, 1.0, 5, 30, 4))
    torch.library.opcheck(op("fused_linear_logprobs_backward"),
                          (hidden.detach(), weight.detach(), targets, torch.randn(6) + 5, torch.randn(6), 1.0, 5, 30, 4))
    torch.library.opcheck(op("fused_linear_grpo_loss"),
                          (hidden, weight, targets, torch.randn(6), torch.full((6,), 1 / 6), None, None, None, 1.0, 5,
                           30, 0.2, 0.2, 0.0, 4, True))


def test_torch_compile_fullgraph_fused_linear():
    hidden, weight, targets, mask, adv, old, ref = _inputs()

    def step(h, w):
        loss, m = K.fused_linear_grpo_loss(h, w, targets, adv, mask, old, ref, beta=0.05, vocab_range=(20, 277),
                                           chunk_size=8)
        return loss, m["ratio_mean"]

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    e = step(h1, w1)
    c = torch.compile(step, fullgraph=True, backend="aot_eager")(h2, w2)
    torch.testing.assert_close(e, c)
    e[0].backward()
    c[0].backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("call,exc,match", [
    (lambda h, w, t: K.fused_linear_grpo_loss(h, w.double(), t, torch.randn(2)), TypeError, "weight dtype"),
    (lambda h, w, t: K.fused_linear_grpo_loss(h, w[:, :5], t, torch.randn(2)), ValueError, "weight must have shape"),
    (lambda h, w, t: K.fused_linear_grpo_loss(h[0], w, t, torch.randn(2)), ValueError, "hidden must have shape"),
    (lambda h, w, t: K.fused_linear_grpo_loss(h, w, t, torch.randn(2), chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, t: K.fused_linear_logprobs(h, w, t, vocab_range=(0, 10)), ValueError, "targets must lie"),
    (lambda h, w, t: K.fused_linear_logprobs(h, w, t[:, :2]), ValueError, "targets must have shape"),
])
def test_fused_linear_bad_input(call, exc, match):
    h = torch.randn(2, 3, 8)
    w = torch.randn(50, 8)
    t = torch.randint(20, 50, (2, 3))
    with pytest.raises(exc, match=match):
        call(h, w, t)
