"""Per-token entropy (token_logprobs / fused_linear_logprobs with return_entropy=True): every backend against the
fp64 oracle (tests/oracle.py `entropy`), values and gradients, with tolerances from tests/tolerance.py."""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R
from mmr1_kernels._library import op

import oracle as O
import tolerance as TOL
from test_logprob import BACKENDS as KERNEL_BACKENDS, REGIMES, SHAPES, _device, make_logits, make_targets

BACKENDS = KERNEL_BACKENDS + [pytest.param("reference", torch.float32, id="reference-fp32"),
                              pytest.param("reference", torch.float64, id="reference-fp64")]


def forward(backend, logits, targets, mask, T, lo, hi):
    if backend == "ops":
        return op("token_logprobs")(logits, targets, mask, T, lo, hi, True)
    if backend == "reference":  # the spec: the no-extension fallback and the fp64 CUDA path
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rows = logits.reshape(-1, logits.shape[-1])
        lp, lse = R.token_logprobs(rows, targets, T, lo, hi, mask=mask, dtype=dt)
        return lp, lse, R.token_entropy(rows, T, lo, hi, mask=mask, dtype=dt)
    from mmr1_kernels.gpu import logprob as G

    return G.logprob_forward(logits, targets, mask, T, lo, hi, with_entropy=True)


def _skip_fp64_triton(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 runs on the reference")


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name,lead,V,window", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_entropy_matches_fp64(request, backend, dtype, name, lead, V, window, regime, T):
    _skip_fp64_triton(backend, dtype)
    dev = _device(backend, request)
    logits = make_logits(lead, V, regime, dtype, dev, strided=True)
    targets = make_targets(lead, V, window, logits).reshape(-1).to(dev)
    lo, hi = window if window else (0, V)
    logp, lse, ent = forward(backend, logits, targets, None, T, lo, hi)
    z = logits.reshape(-1, V).double().cpu()
    want = O.entropy(z, T, lo, hi)
    E = TOL.logprob_error(dtype, TOL.window_scale(logits, lo, hi, T), hi - lo)
    TOL.assert_within(f"entropy {backend} {dtype}", ent, want, TOL.entropy_error(E, want, hi - lo, dtype))
    # the log-probs of the same pass are unchanged by the entropy
    TOL.assert_within(f"entropy-pass logp {backend} {dtype}", logp, O.logprobs(z, targets.cpu(), T, lo, hi),
                      TOL.value_error(E, O.logprobs(z, targets.cpu(), T, lo, hi), dtype))
    assert ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_entropy_extremes(request, backend, dtype):
    """A one-hot softmax has entropy 0, a uniform one log W; masked tokens give 0; an all -inf window NaN."""
    _skip_fp64_triton(backend, dtype)
    dev = _device(backend, request)
    W = 1000
    z = torch.zeros(4, W, dtype=torch.float64)
    z[0, 3] = 1e4  # one-hot (fp16: 1e4 is representable)
    z[2] = float("-inf")
    z[3, :500] = float("-inf")  # uniform over half
    logits = z.to(dtype).to(dev)
    targets = torch.tensor([3, 1, 0, 700]).to(dev)
    mask = torch.tensor([True, True, True, True]).to(dev)
    _, _, ent = forward(backend, logits, targets, mask, 1.0, 0, W)
    ent = ent.cpu().double()
    u = TOL.math_unit(dtype)
    assert abs(ent[0]) <= 1e-30 + 1e4 * u and abs(ent[1] - torch.log(torch.tensor(1000.0, dtype=torch.float64))) < 50 * u
    assert torch.isnan(ent[2]) and abs(ent[3] - torch.log(torch.tensor(500.0, dtype=torch.float64))) < 50 * u
    mask[1] = False
    _, _, ent = forward(backend, logits, targets, mask, 1.0, 0, W)
    assert float(ent[1]) == 0.0


def _entropy_backward_oracle(logits, targets, g, gh, T, lo, hi):
    z = logits.reshape(-1, logits.shape[-1]).double().cpu().requires_grad_(True)
    logp = O.logprobs(z, targets.cpu(), T, lo, hi)
    H = O.entropy(z, T, lo, hi)
    (dz,) = torch.autograd.grad((logp * g.double()).sum() + (H * gh.double()).sum(), z)
    return dz, H.detach()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("with_logp_grad", [False, True])
def test_entropy_backward_matches_fp64(request, backend, dtype, inplace, with_logp_grad):
    _skip_fp64_triton(backend, dtype)
    dev = _device(backend, request)
    B, T_, V, lo, hi, temp = 3, 4, 2500, 7, 2100, 1.3
    logits = make_logits((B, T_), V, "with_neg_inf", dtype, dev, strided=True)
    targets = make_targets((B, T_), V, (lo, hi), logits).reshape(-1).to(dev)
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    N = B * T_
    g = torch.randn(N, dtype=vec) if with_logp_grad else torch.zeros(N, dtype=vec)
    gh = torch.randn(N, dtype=vec)
    g[2], gh[2] = 0.0, 0.0  # a masked token: zero gradient row
    gh[5] = 0.0  # entropy gradient absent on one live row
    expected, H = _entropy_backward_oracle(logits, targets, g, gh, temp, lo, hi)
    lse = O.logsumexp(logits.reshape(N, V).double().cpu(), temp, lo, hi)
    args = (targets, lse.to(vec).to(dev), g.to(dev), temp, lo, hi, H.to(vec).to(dev), gh.to(dev))
    if backend == "ops":
        if inplace:
            out = logits.clone()
            op("logprob_backward_")(out, *args)
        else:
            out = op("logprob_backward")(logits, *args)
    elif backend == "reference":
        out = R.logprob_backward(logits, *args)
    else:
        from mmr1_kernels.gpu import logprob as G

        out = G.logprob_backward(logits, *args[:6], out=logits.clone() if inplace else None, entropy=args[6],
                                 grad_entropy=args[7])
    assert out.dtype == dtype and out.shape == logits.shape
    zw = logits.reshape(N, V).double().cpu()[:, lo:hi] / temp
    logq = torch.log_softmax(zw, -1)
    p = logq.exp()
    onehot = torch.nn.functional.one_hot(targets.cpu() - lo, hi - lo).double()
    E = TOL.logprob_error(dtype, TOL.window_scale(logits, lo, hi, temp), hi - lo) + 2 * TOL.UNIT[vec] * lse.abs()
    t_H = TOL.entropy_error(E, H, hi - lo, dtype) + 2 * TOL.UNIT[vec] * H.abs()  # (H handed over in fp32)
    tol = torch.zeros(N, V, dtype=torch.float64)
    tol[:, lo:hi] = (TOL.logits_grad_error(dtype, g.double(), temp, p, onehot, expected[:, lo:hi], E)
                     + TOL.entropy_grad_error(dtype, gh.double(), temp, p, logq, H, E, t_H))
    TOL.assert_within(f"entropy backward {backend} {dtype} inplace={inplace}", out.reshape(N, V), expected, tol)
    assert torch.all(out.reshape(N, V)[2] == 0)
    assert torch.all(out[..., :lo] == 0) and torch.all(out[..., hi:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logprobs_entropy_autograd(dtype):
    """The public op: (logp, entropy), gradients of any combination of the two, masks, against the oracle."""
    torch.manual_seed(1)
    B, T_, V, lo, hi, temp = 2, 5, 300, 10, 290, 0.8
    logits = make_logits((B, T_), V, "with_neg_inf", dtype).requires_grad_(True)
    targets = make_targets((B, T_), V, (lo, hi), logits)
    mask = torch.rand(B, T_) > 0.3
    mask[0, 0] = False
    targets[0, 0] = -100  # padding outside the window is fine where masked
    logp, ent = K.token_logprobs(logits, targets, temperature=temp, vocab_range=(lo, hi), mask=mask,
                                 return_entropy=True)
    assert logp.shape == ent.shape == (B, T_) and float(ent[0, 0].detach()) == 0.0
    g, gh = torch.randn(B, T_, dtype=torch.float64), torch.randn(B, T_, dtype=torch.float64)
    ((logp * g.to(logp.dtype)).sum() + (ent * gh.to(ent.dtype)).sum()).backward()
    z = logits.detach().double().requires_grad_(True)
    safe = torch.where(mask, targets, lo)
    want_lp, want_H = O.logprobs(z, safe, temp, lo, hi), O.entropy(z, temp, lo, hi)
    m = mask.double()
    (want_dz,) = torch.autograd.grad((want_lp * g * m).sum() + (want_H * gh * m).sum(), z, retain_graph=True)
    u = TOL.math_unit(dtype)
    out_u = TOL.UNIT[dtype]
    scale = float(want_dz.abs().max())
    assert torch.allclose(ent.double(), torch.where(mask, want_H.detach(), 0.0), rtol=0, atol=5e3 * u)
    assert torch.allclose(logits.grad.double(), want_dz, rtol=4 * out_u, atol=5e3 * u * scale)
    # only the entropy's gradient
    logits.grad = None
    _, ent = K.token_logprobs(logits, targets, temperature=temp, vocab_range=(lo, hi), mask=mask, return_entropy=True)
    (ent * gh.to(ent.dtype)).sum().backward()
    (want_dz,) = torch.autograd.grad((want_H * gh * m).sum(), z)
    assert torch.allclose(logits.grad.double(), want_dz, rtol=4 * out_u, atol=5e3 * u * float(want_dz.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", [None, (40, 200)])
def test_fused_linear_entropy_matches_fp64(dtype, window):
    torch.manual_seed(2)
    N, d, V, temp = 37, 24, 256, 0.9
    hidden = (torch.randn(N, d, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, d, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
    lo, hi = window or (0, V)
    targets = torch.randint(lo, hi, (N,))
    mask = torch.rand(N) > 0.2
    logp, ent = K.fused_linear_logprobs(hidden, weight, targets, temperature=temp, vocab_range=window, mask=mask,
                                        chunk_size=8, return_entropy=True)
    g, gh = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ((logp * g.to(logp.dtype)).sum() + (ent * gh.to(ent.dtype)).sum()).backward()
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    z = h64 @ w64.T
    want_lp, want_H = O.logprobs(z, targets, temp, lo, hi), O.entropy(z, temp, lo, hi)
    m = mask.double()
    gh64, gw64 = torch.autograd.grad((want_lp * g * m).sum() + (want_H * gh * m).sum(), (h64, w64))
    # tolerances: the GEMM's rounding of the logits (d u max|h||w| per logit) dominates in fp32
    u = TOL.math_unit(dtype)
    Ez = d * u * float(hidden.abs().max() * weight.abs().max()) / temp
    E = TOL.logprob_error(dtype, TOL.window_scale(z.detach(), lo, hi, temp), hi - lo) + 2 * Ez
    TOL.assert_within(f"fused_linear entropy {dtype}", ent, torch.where(mask, want_H.detach(), 0.0),
                      TOL.entropy_error(E, want_H, hi - lo, dtype))
    # gradients: the per-element logits-gradient tolerance (as for token_logprobs, with this E) carried through
    # the two GEMMs by |.|, plus the GEMMs' own accumulation rounding (K terms each)
    zw = z.detach()[:, lo:hi] / temp
    logq = torch.log_softmax(zw, -1)
    p = logq.exp()
    onehot = torch.nn.functional.one_hot(targets - lo, hi - lo).double()
    gm, ghm = g * m, gh * m
    dz = (gm / temp)[:, None] * (onehot - p) - (ghm / temp)[:, None] * p * (logq + want_H.detach()[:, None])
    t_H = TOL.entropy_error(E, want_H, hi - lo, dtype)
    tol_dz = (TOL.logits_grad_error(torch.float32 if dtype != torch.float64 else dtype, gm, temp, p, onehot, dz, E)
              + TOL.entropy_grad_error(dtype, ghm, temp, p, logq, want_H.detach(), E, t_H))
    w_win, h_abs = weight.detach().double()[lo:hi].abs(), hidden.detach().double().abs()
    tol_h = tol_dz @ w_win + 2 * (hi - lo) * u * (dz.abs() @ w_win)
    tol_w = torch.zeros(V, d, dtype=torch.float64)
    tol_w[lo:hi] = tol_dz.T @ h_abs + 2 * N * u * (dz.abs().T @ h_abs)
    TOL.assert_within(f"fused_linear entropy grad_hidden {dtype}", hidden.grad, gh64, tol_h + 1e-300)
    TOL.assert_within(f"fused_linear entropy grad_weight {dtype}", weight.grad, gw64, tol_w + 1e-300)


def test_fused_linear_entropy_opcheck_and_compile():
    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets, mask = torch.randint(5, 30, (6,)), torch.tensor([True, False, True, True, True, True])
    torch.library.opcheck(op("fused_linear_logprobs"), (hidden, weight, targets, mask, 1.0, 5, 30, 4, True))

    def f(h, w):
        lp, ent = K.fused_linear_logprobs(h, w, targets, vocab_range=(5, 30), mask=mask, return_entropy=True)
        return lp.sum() - 0.1 * ent.sum()

    def g(z):
        lp, ent = K.token_logprobs(z, targets.reshape(2, 3), vocab_range=(5, 30), mask=mask.reshape(2, 3),
                                   return_entropy=True)
        return lp.sum() - 0.1 * ent.sum()

    torch._dynamo.reset()
    for fn, args in ((f, (hidden, weight)), (g, (torch.randn(2, 3, 40, requires_grad=True),))):
        eager = torch.autograd.grad(fn(*args), args)
        compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*args), args)
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_return_entropy_must_be_bool():
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        K.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), return_entropy=1)
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        K.fused_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), return_entropy="yes")
