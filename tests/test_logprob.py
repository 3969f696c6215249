"""token_logprobs / grpo_loss: every backend against the tests' fp64 oracle, with tolerances from error analysis
(tests/tolerance.py): the oracle (tests/oracle.py) is independent of mmr1_kernels.reference."""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R
from mmr1_kernels._library import op

import oracle as O
import tolerance as TOL
from conftest import requires_cpp, triton_device

# (name, leading shape, V, vocab window)
SHAPES = [
    ("N1_V1", (1,), 1, None),
    ("N5_V3", (5,), 3, None),
    ("N7_V8191", (7,), 8191, None),
    ("N3_V65536_window", (3,), 65536, (4, 8196)),
    ("B2T3_V1000_window", (2, 3), 1000, (100, 900)),
]
REGIMES = ["normal", "large", "negative", "with_neg_inf"]


def make_logits(lead, V, regime, dtype, device="cpu", strided=False):
    shape = (*lead, V)
    if strided and len(lead) == 2:  # logits[:, :-1] of a [B, T+1, V] tensor: not flattenable to 2-D
        base = make_logits((lead[0], lead[1] + 1), V, regime, dtype, device)
        return base[:, :-1]
    z = torch.randn(shape, dtype=torch.float64)
    if regime == "normal":
        z = z * 3
    elif regime == "large":
        z = z * 1e4
    elif regime == "negative":
        z = -1e4 + z
    elif regime == "with_neg_inf":
        z = z * 3
        z[..., ::7] = float("-inf")
    return z.to(dtype).to(device)


def make_targets(lead, V, window, logits):
    lo, hi = window if window else (0, V)
    t = torch.randint(lo, hi, lead)
    # never target a -inf logit (its log-prob is -inf, fine, but it makes errors inf - inf)
    finite = torch.isfinite(logits.gather(-1, t.unsqueeze(-1).to(logits.device)).squeeze(-1).cpu())
    return torch.where(finite, t, torch.full_like(t, lo + 1 if hi - lo > 1 else lo))


def oracle(logits, targets, mask, T, lo, hi, adv=None, old=None, ref=None, epsilon=0.2, epsilon_high=0.2, beta=0.0):
    """fp64 per-token (logp, lse[, loss, ratio, kl, delta]) from tests/oracle.py; masked tokens give 0 (ratio 1)."""
    z = logits.reshape(-1, logits.shape[-1]).double().cpu()
    t = targets.cpu()
    m = torch.ones_like(t, dtype=torch.bool) if mask is None else mask.cpu()
    logp = torch.where(m, O.logprobs(z, torch.where(m, t, lo), T, lo, hi), 0.0)
    lse = torch.where(m, O.logsumexp(z, T, lo, hi), 0.0)
    if adv is None:
        return logp, lse
    o = None if old is None else old.double().cpu()
    r_ = None if ref is None else ref.double().cpu()
    loss, ratio, kl = O.token_terms(logp, adv.double().cpu(), o, r_, epsilon, epsilon_high, beta)
    delta = (r_ - logp) if r_ is not None else torch.zeros_like(logp)
    zero = torch.zeros_like(loss)
    return (logp, lse, torch.where(m, loss, zero), torch.where(m, ratio, 1.0), torch.where(m, kl, zero),
            torch.where(m, delta, zero))


def forward(backend, logits, targets, mask, T, lo, hi, *grpo):
    if backend == "ops":
        if grpo:
            return op("grpo_token_loss")(logits, targets, *grpo[:1], mask, *grpo[1:3], T, lo, hi, *grpo[3:])
        return op("token_logprobs")(logits, targets, mask, T, lo, hi)[:2]
    from mmr1_kernels.gpu import logprob as G

    if grpo:
        adv, old, ref, el, eh, beta = grpo
        return G.logprob_forward(logits, targets, mask, T, lo, hi, adv, old, ref, el, eh, beta)
    return G.logprob_forward(logits, targets, mask, T, lo, hi)[:2]


BACKENDS = [
    pytest.param("ops", torch.float32, id="cpu-fp32"),
    pytest.param("ops", torch.bfloat16, id="cpu-bf16"),
    pytest.param("ops", torch.float16, id="cpu-fp16"),
    pytest.param("ops", torch.float64, id="cpu-fp64"),
    pytest.param("triton", torch.float32, id="triton-fp32"),
    pytest.param("triton", torch.float16, id="triton-fp16"),
]


def _device(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_kernels")
        return triton_device()
    return "cpu"


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name,lead,V,window", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_token_logprobs_matches_fp64(request, backend, dtype, name, lead, V, window, regime, T):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 runs on the reference")
    dev = _device(backend, request)
    logits = make_logits(lead, V, regime, dtype, dev, strided=True)
    targets = make_targets(lead, V, window, logits).reshape(-1).to(dev)
    lo, hi = window if window else (0, V)
    logp, lse = forward(backend, logits, targets, None, T, lo, hi)
    ref_logp, ref_lse = oracle(logits, targets, None, T, lo, hi)
    E = TOL.logprob_error(dtype, TOL.window_scale(logits, lo, hi, T), hi - lo)
    TOL.assert_within(f"token_logprobs logp {backend} {dtype}", logp, ref_logp,
                      TOL.value_error(E, ref_logp, dtype))
    TOL.assert_within(f"token_logprobs lse {backend} {dtype}", lse, ref_lse, TOL.value_error(E, ref_lse, dtype))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True])
def test_grpo_token_loss_matches_fp64(request, backend, dtype, beta, with_old):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 runs on the reference")
    dev = _device(backend, request)
    N, V, lo, hi = 37, 3001, 1, 2049
    logits = make_logits((N,), V, "normal", dtype, dev)
    targets = make_targets((N,), V, (lo, hi), logits).to(dev)
    mask = (torch.rand(N) > 0.25).to(dev)
    mask[0] = False
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    ref_logp, _ = oracle(logits, targets, None, 0.9, lo, hi)
    adv = torch.randn(N, dtype=vec).to(dev)
    old = (ref_logp + 0.3 * torch.randn(N, dtype=torch.float64)).to(vec).to(dev) if with_old else None
    ref = (ref_logp + 0.3 * torch.randn(N, dtype=torch.float64)).to(vec).to(dev)
    outs = forward(backend, logits, targets, mask, 0.9, lo, hi, adv, old, ref, 0.2, 0.28, beta)
    logp, lse, loss, coef, ratio, kl = outs
    e_logp, e_lse, e_loss, e_ratio, e_kl, delta = oracle(logits, targets, mask, 0.9, lo, hi, adv, old, ref, 0.2, 0.28,
                                                         beta)
    m = mask.cpu()
    x = e_logp.clone().requires_grad_(True)  # d loss / d logp by autograd of the oracle
    l2, _, _ = O.token_terms(x, adv.double().cpu(), None if old is None else old.double().cpu(), ref.double().cpu(),
                             0.2, 0.28, beta)
    (e_coef,) = torch.autograd.grad(l2.sum(), x)
    e_coef = torch.where(m, e_coef, 0.0)
    E = TOL.logprob_error(dtype, TOL.window_scale(logits, lo, hi, 0.9), hi - lo)
    t_ratio, t_kl, t_loss, t_coef = TOL.token_errors(dtype, E, adv.double().cpu(), e_ratio, delta, beta, e_loss)
    tag = f"{backend} {dtype} beta={beta} old={with_old}"
    for name, got, exp, tol in (("logp", logp, e_logp, E), ("lse", lse, e_lse, E), ("loss", loss, e_loss, t_loss),
                                ("ratio", ratio, e_ratio, t_ratio), ("kl", kl, e_kl, t_kl),
                                ("dloss/dlogp", coef, e_coef, t_coef)):
        TOL.assert_within(f"grpo_token_loss {name} {tag}", got, exp, tol)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_logprob_backward_matches_fp64(request, backend, dtype, inplace):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 runs on the reference")
    dev = _device(backend, request)
    B, T_, V, lo, hi, temp = 3, 4, 2500, 7, 2100, 1.3
    logits = make_logits((B, T_), V, "normal", dtype, dev, strided=True)
    targets = make_targets((B, T_), V, (lo, hi), logits).reshape(-1).to(dev)
    _, lse = oracle(logits, targets, None, temp, lo, hi)
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(B * T_, dtype=vec)
    g[2] = 0.0  # a masked token: zero gradient row
    lse_v, g_v = lse.to(vec).to(dev), g.to(dev)
    z = logits.reshape(-1, V).double().cpu()[:, lo:hi] / temp
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(targets.cpu() - lo, hi - lo).double()
    expected = torch.zeros(B * T_, V, dtype=torch.float64)
    expected[:, lo:hi] = (g.double() / temp)[:, None] * (onehot - p)
    if backend == "ops":
        if inplace:
            out = logits.clone()
            op("logprob_backward_")(out, targets, lse_v, g_v, temp, lo, hi)
        else:
            out = op("logprob_backward")(logits, targets, lse_v, g_v, temp, lo, hi)
    else:
        from mmr1_kernels.gpu import logprob as G

        out = G.logprob_backward(logits, targets, lse_v, g_v, temp, lo, hi, out=logits.clone() if inplace else None)
    assert out.dtype == dtype and out.shape == logits.shape
    E = TOL.logprob_error(dtype, TOL.window_scale(logits, lo, hi, temp), hi - lo) + 2 * TOL.UNIT[vec] * lse.abs()
    # (lse is handed over rounded to fp32)
    tol = torch.zeros(B * T_, V, dtype=torch.float64)
    tol[:, lo:hi] = TOL.logits_grad_error(dtype, g.double(), temp, p, onehot, expected[:, lo:hi], E)
    TOL.assert_within(f"logprob_backward {backend} {dtype} inplace={inplace}", out.reshape(-1, V), expected,
                      tol + TOL.TINY[dtype])
    assert torch.all(out[..., :lo] == 0) and torch.all(out[..., hi:] == 0)
    assert torch.all(out.reshape(-1, V)[2] == 0)


# --------------------------------------------------------------------------- public API + autograd


def _grpo_inputs(B=4, T=9, V=700, dtype=torch.float32, window=(50, 650)):
    logits = (torch.randn(B, T, V, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(*window, (B, T))
    mask = torch.rand(B, T) > 0.2
    mask[1] = False  # a fully masked sequence
    targets[~mask] = -100  # padding outside the window is fine where masked
    ref_logp, _ = R.token_logprobs(logits.double(), targets.clamp(min=0), 1.0, *window, dtype=torch.float64)
    old = (ref_logp + 0.25 * torch.randn(B, T, dtype=torch.float64)).float()
    ref = (ref_logp + 0.25 * torch.randn(B, T, dtype=torch.float64)).float()
    return logits, targets, mask, torch.randn(B), old, ref


def expected_loss_and_tolerances(logits, targets, adv, mask, old, ref, temperature, window, epsilon, epsilon_high, beta,
                                 loss_type, dtype):
    """The oracle's loss, metrics and logits gradient, and their tolerances propagated from the per-token errors
    through the aggregation weights (w = d loss / d token_loss, by autograd of the oracle's aggregation)."""
    kw = dict(temperature=temperature, vocab_range=window, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
              loss_type=loss_type)
    eloss, egrad = O.grad(lambda z: O.grpo_loss(z, targets, adv, mask, old, ref, **kw)[0], logits)
    _, emetrics = O.grpo_loss(logits.double(), targets, adv, mask, old, ref, **kw)
    B, T, V = logits.shape
    lo, hi = window
    m = mask.reshape(-1)
    a = adv.double()[:, None].expand(B, T).reshape(-1) if adv.dim() == 1 else adv.double().reshape(-1)
    e_logp, _, e_loss, e_ratio, e_kl, delta = oracle(logits, torch.where(mask, targets, lo).reshape(-1), m,
                                                     temperature, lo, hi, a, old.reshape(-1), ref.reshape(-1),
                                                     epsilon, epsilon_high, beta)
    x = e_logp.clone().requires_grad_(True)
    l2, _, _ = O.token_terms(x, a, old.reshape(-1).double(), ref.reshape(-1).double(), epsilon, epsilon_high, beta)
    (coef,) = torch.autograd.grad(l2.sum(), x)
    _, w = O.grad(lambda tl: O.aggregate(tl.reshape(B, T), mask, loss_type), torch.zeros(B * T))
    w = torch.where(m, w, 0.0)
    E = TOL.logprob_error(dtype, TOL.window_scale(logits, lo, hi, temperature), hi - lo)
    t_ratio, t_kl, t_loss, t_coef = TOL.token_errors(dtype, E, a, e_ratio, delta, beta, e_loss)
    u = TOL.math_unit(dtype)
    n = max(int(m.sum()), 1)
    tol_loss = float((w.abs() * t_loss).detach().sum()) + 4 * u * abs(float(eloss))
    z = logits.reshape(-1, V).double()[:, lo:hi] / temperature
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(torch.where(m, targets.reshape(-1), lo) - lo, hi - lo).double()
    g = w * torch.where(m, coef, 0.0)
    tol_grad = torch.zeros(B * T, V, dtype=torch.float64)
    tol_grad[:, lo:hi] = TOL.logits_grad_error(dtype, g, temperature, p, onehot,
                                               egrad.reshape(-1, V)[:, lo:hi], E, w.abs() * t_coef)
    near_clip = bool(((e_ratio - (1 - epsilon)).abs() < t_ratio).any() | ((e_ratio - (1 + epsilon_high)).abs() < t_ratio).any())
    tol_metrics = {"ratio_mean": float(t_ratio[m].sum()) / n, "kl": float(t_kl[m].sum()) / n,
                   "logp_mean": float(E[m].sum()) / n,
                   "clip_ratio/low_mean": 1.0 / n if near_clip else 0.0, "clip_ratio/high_mean": 1.0 / n if near_clip else 0.0,
                   "clip_ratio/region_mean": 1.0 / n if near_clip else 0.0}
    tol_metrics = {k: v + 4 * u * abs(float(emetrics[k])) for k, v in tol_metrics.items()}
    return eloss, emetrics, egrad, tol_loss, tol_metrics, tol_grad.reshape(B, T, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", list(R.LOSS_TYPES))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_grpo_loss_and_grad_match_the_oracle(dtype, loss_type, temperature):
    logits, targets, mask, adv, old, ref = _grpo_inputs(dtype=dtype)
    kw = dict(temperature=temperature, vocab_range=(50, 650), epsilon=0.2, epsilon_high=0.28, beta=0.04,
              loss_type=loss_type)
    x = logits.clone().requires_grad_(True)
    loss, metrics = K.grpo_loss(x, targets, adv, mask, old, ref, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    eloss, emetrics, egrad, tol_loss, tol_metrics, tol_grad = expected_loss_and_tolerances(
        logits, targets, adv, mask, old, ref, temperature, (50, 650), 0.2, 0.28, 0.04, loss_type, dtype)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    tag = f"{dtype} {loss_type}"
    TOL.assert_within(f"grpo_loss loss {tag}", loss, eloss, tol_loss)
    for k in emetrics:
        TOL.assert_within(f"grpo_loss {k} {tag}", metrics[k], emetrics[k], tol_metrics[k])
    assert grad.dtype == dtype
    TOL.assert_within(f"grpo_loss grad {tag}", grad, egrad, tol_grad)
    assert torch.all(grad[1] == 0), "fully masked sequence must get zero gradient"


def test_grpo_loss_inplace_backward_reuses_logits_storage():
    logits, targets, mask, adv, old, ref = _grpo_inputs()
    x = logits.clone().requires_grad_(True)
    loss, _ = K.grpo_loss(x, targets, adv, mask, old, ref, vocab_range=(50, 650), beta=0.04)
    (g_expected,) = torch.autograd.grad(loss, x)
    leaf = logits.clone()
    y = leaf.clone().requires_grad_(True)  # non-leaf storage we let backward overwrite
    loss2, _ = K.grpo_loss(y, targets, adv, mask, old, ref, vocab_range=(50, 650), beta=0.04, inplace_backward=True)
    (g_inplace,) = torch.autograd.grad(loss2, y)
    assert g_inplace.data_ptr() == y.data_ptr()
    torch.testing.assert_close(g_inplace, g_expected)


def test_on_policy_ratio_is_one_loss_is_minus_advantage_and_gradient_is_minus_advantage_times_dlogp():
    """old = None: ratio 1, no clipping, the loss value is -A under the aggregation, and the gradient is exactly
    -A w d logp / dz, i.e. (A w / T)(softmax - onehot) on the window."""
    logits, targets, mask, adv, _, _ = _grpo_inputs()
    x = logits.clone().requires_grad_(True)
    loss, metrics = K.grpo_loss(x, targets, adv, mask, vocab_range=(50, 650), loss_type="dr_grpo")
    (grad,) = torch.autograd.grad(loss, x)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["clip_ratio/low_mean"].item() == 0 and metrics["clip_ratio/high_mean"].item() == 0
    expected = -(adv[:, None] * mask).sum() / mask.numel()  # dr_grpo weights: 1 / (B T)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    B, T, V = logits.shape
    p = torch.softmax(logits.double()[..., 50:650], -1)
    onehot = torch.nn.functional.one_hot(torch.where(mask, targets, 50) - 50, 600).double()
    want = torch.zeros(B, T, V, dtype=torch.float64)
    want[..., 50:650] = (adv.double()[:, None, None] * mask[..., None] / (B * T)) * (p - onehot)
    torch.testing.assert_close(grad.double(), want, atol=1e-9, rtol=1e-5)


def test_token_logprobs_public_shapes_mask_and_grad():
    logits = torch.randn(2, 5, 300, dtype=torch.float64)
    targets = torch.randint(0, 300, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = False
    targets[0, 1] = 10_000  # masked: may be anything
    x = logits.clone().requires_grad_(True)
    lp = K.token_logprobs(x, targets, temperature=0.8, mask=mask)
    assert lp.shape == (2, 5) and lp[0, 1] == 0
    (lp * torch.arange(10.0, dtype=torch.float64).reshape(2, 5)).sum().backward()
    xr = logits.clone().requires_grad_(True)
    e, _ = R.token_logprobs(xr, targets.clamp(max=299), 0.8, 0, 300, mask=mask, dtype=torch.float64)
    (e * torch.arange(10.0, dtype=torch.float64).reshape(2, 5)).sum().backward()
    torch.testing.assert_close(lp, e)
    torch.testing.assert_close(x.grad, xr.grad)
    assert torch.all(x.grad[0, 1] == 0)


def test_gradcheck_fp64():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(2, 9, (2, 3))
    adv = torch.tensor([0.7, -1.2], dtype=torch.float64)
    with torch.no_grad():
        base, _ = R.token_logprobs(logits, targets, 1.0, 2, 9, dtype=torch.float64)
    old = base + 0.05  # ratios near 1, away from the clip boundaries (min/clip are not smooth there)
    ref = base - 0.1
    assert torch.autograd.gradcheck(lambda z: K.token_logprobs(z, targets, 0.7, (2, 9)), (logits,))
    assert torch.autograd.gradcheck(
        lambda z: K.grpo_loss(z, targets, adv, None, old, ref, temperature=0.7, vocab_range=(2, 9), beta=0.1,
                              epsilon=0.3, epsilon_high=0.3)[0], (logits,))


def test_nan_logits_give_nan_not_garbage():
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    lp = K.token_logprobs(logits, torch.tensor([1, 2, 3]))
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isfinite(lp[2])


# --------------------------------------------------------------------------- registration / compile


@requires_cpp
def test_cpu_kernels_are_the_cpp_ones():
    assert K.backend_for(torch.device("cpu")) == "cpp"


def test_opcheck_every_logprob_op():
    logits = torch.randn(2, 3, 40, requires_grad=True)
    targets = torch.randint(5, 30, (6,))
    mask = torch.tensor([True, False, True, True, True, True])
    adv, old, ref = torch.randn(6), torch.randn(6) - 3, torch.randn(6) - 3
    torch.library.opcheck(op("token_logprobs"), (logits, targets, mask, 0.9, 5, 30))
    torch.library.opcheck(op("grpo_token_loss"), (logits, targets, adv, mask, old, ref, 0.9, 5, 30, 0.2, 0.3, 0.05))
    torch.library.opcheck(op("grpo_token_loss"), (logits, targets, adv, None, None, None, 1.0, 0, 40, 0.2, 0.2, 0.0))
    lse = torch.randn(6)
    g = torch.randn(6)
    torch.library.opcheck(op("logprob_backward"), (logits.detach(), targets, lse, g, 0.9, 5, 30))
    torch.library.opcheck(op("logprob_backward_"), (logits.detach().clone(), targets, lse, g, 0.9, 5, 30))
    # with the entropy output and its gradient
    torch.library.opcheck(op("token_logprobs"), (logits, targets, mask, 0.9, 5, 30, True))
    ent, gh = torch.rand(6) * 3, torch.randn(6)
    torch.library.opcheck(op("logprob_backward"), (logits.detach(), targets, lse, g, 0.9, 5, 30, ent, gh))
    torch.library.opcheck(op("logprob_backward_"), (logits.detach().clone(), targets, lse, g, 0.9, 5, 30, ent, gh))


def test_torch_compile_fullgraph_matches_eager():
    logits, targets, mask, adv, old, ref = _grpo_inputs(B=2, T=5, V=300, window=(10, 290))
    kw = dict(vocab_range=(10, 290), beta=0.04, loss_type="bnpo")

    def step(z):
        loss, m = K.grpo_loss(z, targets, adv, mask, old, ref, **kw)
        lp = K.token_logprobs(z.detach(), targets.clamp(min=10), vocab_range=(10, 290))
        return loss * 2.0, m["kl"], lp

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    out_e, out_c = step(x1), compiled(x2)
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(a, b)
    out_e[0].backward()
    out_c[0].backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.slow
def test_torch_compile_inductor():
    logits, targets, mask, adv, old, ref = _grpo_inputs(B=2, T=5, V=300, window=(10, 290))

    def step(z):
        return K.grpo_loss(z, targets, adv, mask, old, ref, vocab_range=(10, 290), beta=0.04)[0]

    x = logits.clone().requires_grad_(True)
    torch.compile(step, fullgraph=True)(x).backward()
    y = logits.clone().requires_grad_(True)
    step(y).backward()
    torch.testing.assert_close(x.grad, y.grad)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,exc,match", [
    (lambda z, t: K.token_logprobs(z.long(), t), TypeError, "logits must have dtype"),
    (lambda z, t: K.token_logprobs(z, t.float()), TypeError, "targets must have dtype"),
    (lambda z, t: K.token_logprobs(z, t[:, :-1]), ValueError, "targets must have shape"),
    (lambda z, t: K.token_logprobs(z[0, 0], t), ValueError, "at least 2 dims"),
    (lambda z, t: K.token_logprobs(z, t, temperature=float("inf")), ValueError, "temperature must be finite"),
    (lambda z, t: K.token_logprobs(z, t, temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda z, t: K.token_logprobs(z, t, vocab_range=(5, 3)), ValueError, "vocab_range"),
    (lambda z, t: K.token_logprobs(z, t, vocab_range=(0, 10**6)), ValueError, "vocab_range"),
    (lambda z, t: K.token_logprobs(z, t, vocab_range=(40, 50)), ValueError, "targets must lie in the vocab window"),
    (lambda z, t: K.token_logprobs(z, t + 1000), ValueError, "targets must lie in the vocab window"),
    (lambda z, t: K.grpo_loss(z, t, torch.randn(3)), ValueError, "advantages must have shape"),
    (lambda z, t: K.grpo_loss(z, t, torch.randn(2), beta=0.1), ValueError, "ref_logprobs"),
    (lambda z, t: K.grpo_loss(z, t, torch.randn(2), loss_type="sum"), ValueError, "loss_type"),
    (lambda z, t: K.grpo_loss(z, t, torch.randn(2), old_logprobs=torch.randn(2, 4)), ValueError, "old_logprobs"),
    (lambda z, t: K.grpo_loss(z, t, torch.randn(2), mask=torch.ones(2, 4)), ValueError, "mask must have shape"),
    (lambda z, t: K.grpo_loss(z, t, torch.randn(2), epsilon=1.5), ValueError, "epsilon"),
    (lambda z, t: K.grpo_loss(z, t, torch.randn(2), beta=float("nan")), ValueError, "beta must be finite"),
    (lambda z, t: K.grpo_loss(z.reshape(6, 50), t.reshape(6), torch.randn(6)), ValueError, "logits must have 3"),
])
def test_bad_input_raises_clear_error(call, exc, match):
    z = torch.randn(2, 3, 50)
    t = torch.randint(0, 30, (2, 3))
    with pytest.raises(exc, match=match):
        call(z, t)


def test_kernel_never_reads_out_of_window_targets():
    # the raw op (unchecked) gives NaN for an out-of-window target instead of reading memory
    logits = torch.randn(2, 100)
    lp, _, _ = op("token_logprobs")(logits, torch.tensor([5, 10**9]), None, 1.0, 0, 50)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1])
    lp, _, _ = op("token_logprobs")(logits, torch.tensor([-(10**9), 7]), None, 1.0, 0, 50)
    assert torch.isnan(lp[0]) and torch.isfinite(lp[1])


def test_loss_ops_take_trls_names_and_the_old_ones_for_one_release():
    """grpo_loss / fused_linear_grpo_loss speak policy_loss's (TRL's) vocabulary: epsilon / epsilon_high in,
    clip_ratio/*_mean and kl out. The previous names still work for one release, with a FutureWarning, and give the
    same numbers; both spellings of one bound at once is an error."""
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 40), torch.randint(0, 40, (3, 5))
    adv, old = torch.randn(3), torch.randn(3, 5) * 0.3 - 3.7
    h, w = torch.randn(3, 5, 8), torch.randn(40, 8)
    for fn, args in ((K.grpo_loss, (logits, targets)), (K.fused_linear_grpo_loss, (h, w, targets))):
        new_loss, new = fn(*args, adv, None, old, epsilon=0.1, epsilon_high=0.3)
        assert {"ratio_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl",
                "logp_mean"} == set(new)
        assert new["clip_ratio/region_mean"] >= max(new["clip_ratio/low_mean"], new["clip_ratio/high_mean"])
        with pytest.warns(FutureWarning, match="eps_low= is now called epsilon="):
            old_loss, _ = fn(*args, adv, None, old, eps_low=0.1, eps_high=0.3)
        assert torch.equal(old_loss, new_loss)
        with pytest.warns(FutureWarning, match="'clip_low_frac' is now called 'clip_ratio/low_mean'"):
            assert torch.equal(new["clip_low_frac"], new["clip_ratio/low_mean"])
        with pytest.warns(FutureWarning, match="'kl_mean' is now called 'kl'"):
            assert new.get("kl_mean") is new["kl"]
        with pytest.raises(TypeError, match="not both"):
            fn(*args, adv, None, old, epsilon=0.1, eps_low=0.1)
        # epsilon_high defaults to epsilon (TRL): the same loss as giving both
        assert torch.equal(fn(*args, adv, None, old, epsilon=0.25)[0], fn(*args, adv, None, old, epsilon=0.25,
                                                                         epsilon_high=0.25)[0])
