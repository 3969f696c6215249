"""fused_linear_logprobs / fused_linear_grpo_loss against the tests' fp64 oracle on materialized logits, with
tolerances from error analysis (tests/tolerance.py): the head GEMM's rounding in the input dtype, then the log-prob
kernel's, then the gradient GEMMs'."""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R
from mmr1_kernels._library import op

import oracle as O
import tolerance as TOL


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


def _head_error(hidden, weight, lo, hi, dtype):
    """Per row: the error of the window logits z = h W^T computed in the input dtype: rounded to it (u_in |z|) and
    accumulated over d terms in fp32 (blocked sums: about sqrt(d) u_32 sum |h||w|, the usual statistical bound --
    the worst case d u_32 sits ~100x above what is observed)."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()[lo:hi]
    absdot = h.abs() @ w.abs().T
    u_in = TOL.UNIT[dtype] if dtype != torch.float64 else TOL.UNIT[torch.float64]
    acc = 2 * TOL.math_unit(dtype) * hidden.shape[-1] ** 0.5
    return (2 * u_in * (h @ w.T).abs() + acc * absdot).max(-1).values


def _expected(hidden, weight, targets, mask, temperature, window, dtype, loss_fn, coeff_fn):
    """Oracle value, d/dh, d/dW (fp64 autograd on the rounded inputs) and tolerances for a loss that is
    sum_t c_t logp_t-like: coeff_fn(logp, E) -> (g per token, error of g per token, tolerance of the value)."""
    lo, hi = window
    z_err = _head_error(hidden, weight, lo, hi, dtype)  # [N]
    hr = hidden.detach().double().requires_grad_(True)
    wr = weight.detach().double().requires_grad_(True)
    value = loss_fn(hr @ wr.T)
    egh, egw = torch.autograd.grad(value, (hr, wr))
    z = (hidden.double() @ weight.double().T).reshape(-1, weight.shape[0])
    S = TOL.window_scale(z, lo, hi, temperature)
    E = TOL.logprob_error(dtype, S, hi - lo) + 2 * z_err / temperature
    m = mask.reshape(-1)
    t = torch.where(m, targets.reshape(-1), lo)
    logp = torch.where(m, O.logprobs(z, t, temperature, lo, hi), 0.0)
    g, g_err, tol_value = coeff_fn(logp, E)
    p = torch.softmax(z[:, lo:hi] / temperature, -1)
    onehot = torch.nn.functional.one_hot(t - lo, hi - lo).double()
    dz = (g / temperature)[:, None] * (onehot - p)
    dz_tol = TOL.logits_grad_error(dtype if dtype != torch.float64 else torch.float64, g, temperature, p, onehot, dz,
                                   E, g_err)
    h2, w2 = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()[lo:hi]
    u_in = TOL.UNIT[dtype]
    gemm = 2 * TOL.math_unit(dtype) * (hi - lo) ** 0.5
    tol_gh = dz_tol @ w2.abs() + (2 * u_in + gemm) * (dz.abs() @ w2.abs())
    tol_gw = torch.zeros_like(weight, dtype=torch.float64)
    tol_gw[lo:hi] = dz_tol.T @ h2.abs() + (2 * u_in + 2 * TOL.math_unit(dtype) * h2.shape[0] ** 0.5) * (dz.abs().T @ h2.abs())
    return value.detach(), egh, egw, tol_value, tol_gh.reshape(hidden.shape), tol_gw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_fused_linear_grpo_loss_matches_the_oracle(dtype, loss_type, chunk_size):
    hidden, weight, targets, mask, adv, old, ref = _inputs(dtype=dtype)
    lo, hi, T = 20, 277, 0.8
    kw = dict(temperature=T, vocab_range=(lo, hi), epsilon=0.2, epsilon_high=0.28, beta=0.05, loss_type=loss_type)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, metrics = K.fused_linear_grpo_loss(h, w, targets, adv, mask, old, ref, chunk_size=chunk_size, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    B, T_ = targets.shape
    a = adv.double()[:, None].expand(B, T_).reshape(-1)
    _, wts = O.grad(lambda tl: O.aggregate(tl.reshape(B, T_), mask, loss_type), torch.zeros(B * T_))

    def coeff(logp, E):
        x = logp.clone().requires_grad_(True)
        tl, r, _ = O.token_terms(x, a, old.reshape(-1).double(), ref.reshape(-1).double(), 0.2, 0.28, 0.05)
        (c,) = torch.autograd.grad(tl.sum(), x)
        delta = ref.reshape(-1).double() - logp
        _, _, t_loss, t_coef = TOL.token_errors(dtype, E, a, r.detach(), delta, 0.05, tl.detach())
        m = mask.reshape(-1)
        return (torch.where(m, wts * c, 0.0), torch.where(m, wts.abs() * t_coef, 0.0),
                float(torch.where(m, wts.abs() * t_loss, 0.0).sum()))

    value, egh, egw, tol_loss, tol_gh, tol_gw = _expected(
        hidden, weight, targets, mask, T, (lo, hi), dtype,
        lambda z: O.grpo_loss(z, targets, adv, mask, old, ref, **kw)[0], coeff)
    tag = f"{dtype} {loss_type} chunk={chunk_size}"
    TOL.assert_within(f"fused_linear_grpo_loss loss {tag}", loss, value, tol_loss + 4 * TOL.math_unit(dtype) * value.abs())
    _, emetrics = O.grpo_loss(hidden.double() @ weight.double().T, targets, adv, mask, old, ref, **kw)
    assert metrics.keys() == emetrics.keys()
    assert gh.dtype == dtype and gw.dtype == dtype and gw.shape == weight.shape
    TOL.assert_within(f"fused_linear_grpo_loss d/dhidden {tag}", gh, egh, tol_gh + TOL.TINY[dtype])
    TOL.assert_within(f"fused_linear_grpo_loss d/dweight {tag}", gw, egw, tol_gw + TOL.TINY[dtype])
    assert torch.all(gw[:lo] == 0) and torch.all(gw[hi:] == 0), "rows outside the window get no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_logprobs_and_grad_match_the_oracle(dtype):
    hidden, weight, targets, mask, *_ = _inputs(dtype=dtype)
    lo, hi, T = 20, 277, 1.2
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp = K.fused_linear_logprobs(h, w, targets, temperature=T, vocab_range=(lo, hi), mask=mask, chunk_size=4)
    coeffs = torch.randn(lp.shape, dtype=torch.float64)
    gh, gw = torch.autograd.grad((lp.double() * coeffs).sum(), (h, w))
    m = mask.reshape(-1)
    cf = torch.where(m, coeffs.reshape(-1), 0.0)
    safe = torch.where(mask, targets, lo)

    def coeff(logp, E):
        return cf, torch.zeros_like(cf), float((cf.abs() * E).sum())

    value, egh, egw, _, tol_gh, tol_gw = _expected(
        hidden, weight, targets, mask, T, (lo, hi), dtype,
        lambda z: (torch.where(mask, O.logprobs(z, safe, T, lo, hi), 0.0) * coeffs).sum(), coeff)
    z = (hidden.double() @ weight.double().T)
    E = TOL.logprob_error(dtype, TOL.window_scale(z, lo, hi, T), hi - lo) + 2 * _head_error(hidden, weight, lo, hi,
                                                                                            dtype) / T
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    want = torch.where(mask, O.logprobs(z, safe, T, lo, hi), 0.0)
    TOL.assert_within(f"fused_linear_logprobs logp {dtype}", lp, want, TOL.value_error(E, want, dtype))
    TOL.assert_within(f"fused_linear_logprobs d/dhidden {dtype}", gh, egh, tol_gh + TOL.TINY[dtype])
    TOL.assert_within(f"fused_linear_logprobs d/dweight {dtype}", gw, egw, tol_gw + TOL.TINY[dtype])


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
                                              epsilon=0.3, epsilon_high=0.3, chunk_size=2)[0],
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
