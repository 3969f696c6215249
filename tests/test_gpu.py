"""The GPU path through the public ops: CUDA dispatch, autograd, every dtype, and the cross-backend sampler claim.

On a CUDA machine (``make gpu-check``) these run on the GPU: the public ops dispatch to the Triton kernels, in fp32,
bf16 and fp16 (bf16 is what the interpreter cannot run), with gradients, against the fp64 oracle and the tolerances
of tests/tolerance.py; the sampler's distribution and batch invariance on the device; and the C++ (CPU) and Triton
(GPU) samplers drawing identical tokens from the same fp32 logits at Lumina's shapes. Without a GPU (the dry run in
``make test``) the same tests run the public ops on CPU (C++) and the Triton launchers under the interpreter at
small shapes, so a change that breaks the GPU run fails here first.
"""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels._library import op

import oracle as O
import tolerance as TOL
from test_logprob import _grpo_inputs, expected_loss_and_tolerances

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEV.type == "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_backend_is_the_device_kernel():
    assert K.backend_for(DEV) == ("triton" if ON_GPU else "cpp")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_public_grpo_loss_on_the_device_matches_the_oracle(dtype, loss_type):
    logits, targets, mask, adv, old, ref = _grpo_inputs(dtype=dtype)
    kw = dict(temperature=0.8, vocab_range=(50, 650), epsilon=0.2, epsilon_high=0.28, beta=0.04, loss_type=loss_type)
    x = logits.to(DEV).requires_grad_(True)
    loss, metrics = K.grpo_loss(x, targets.to(DEV), adv.to(DEV), mask.to(DEV), old.to(DEV), ref.to(DEV), **kw)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.device.type == DEV.type and grad.dtype == dtype and grad.device.type == DEV.type
    eloss, emetrics, egrad, tol_loss, tol_metrics, tol_grad = expected_loss_and_tolerances(
        logits, targets, adv, mask, old, ref, 0.8, (50, 650), 0.2, 0.28, 0.04, loss_type, dtype)
    tag = f"{DEV.type} {dtype} {loss_type}"
    TOL.assert_within(f"device grpo_loss loss {tag}", loss, eloss, tol_loss)
    for k in emetrics:
        TOL.assert_within(f"device grpo_loss {k} {tag}", metrics[k], emetrics[k], tol_metrics[k])
    TOL.assert_within(f"device grpo_loss grad {tag}", grad, egrad, tol_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_token_logprobs_and_fused_linear_on_the_device(dtype):
    g = torch.Generator().manual_seed(1)
    B, T, V, d, lo, hi = 2, 5, 900, 32, 4, 800
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(lo, hi, (B, T), generator=g)
    x = logits.to(DEV).requires_grad_(True)
    lp = K.token_logprobs(x, targets.to(DEV), 0.9, (lo, hi))
    lp.sum().backward()
    want, gwant = O.grad(lambda z: O.logprobs(z, targets, 0.9, lo, hi).sum(), logits)
    E = TOL.logprob_error(dtype, TOL.window_scale(logits, lo, hi, 0.9), hi - lo)
    want = O.logprobs(logits, targets, 0.9, lo, hi)
    TOL.assert_within(f"device token_logprobs {DEV.type} {dtype}", lp, want, TOL.value_error(E, want, dtype))
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad.float()).all())
    torch.testing.assert_close(x.grad.double().cpu(), gwant, atol=4 * TOL.UNIT[dtype] + 1e-6, rtol=4 * TOL.UNIT[dtype])
    hidden = torch.randn(B, T, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype)
    h = hidden.to(DEV).requires_grad_(True)
    w = weight.to(DEV).requires_grad_(True)
    fl = K.fused_linear_logprobs(h, w, targets.to(DEV), 0.9, (lo, hi))
    fl.sum().backward()
    z = hidden.double() @ weight.double().T
    head = (2 * TOL.UNIT[dtype] * z.abs() + 4 * TOL.math_unit(dtype) * d ** 0.5 * (hidden.double().abs() @
                                                                                   weight.double().abs().T))
    E2 = TOL.logprob_error(dtype, TOL.window_scale(z, lo, hi, 0.9), hi - lo) + 2 * head[..., lo:hi].amax(-1).reshape(-1) / 0.9
    want = O.logprobs(z, targets, 0.9, lo, hi)
    TOL.assert_within(f"device fused_linear_logprobs {DEV.type} {dtype}", fl, want, TOL.value_error(E2, want, dtype))
    assert h.grad.dtype == dtype and w.grad.shape == weight.shape and bool((w.grad[:lo] == 0).all())


def _sampler_batch(B, V, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, V, generator=g) * 2
    uncond = torch.randn(B, V, generator=g) * 2
    return cond, uncond


def test_cpp_and_triton_samplers_draw_identical_tokens():
    """The README's claim: the C++ (CPU) and Triton (GPU) samplers draw the same tokens from the same fp32 logits.
    On a GPU at Lumina's decode shapes (V = 65536, image window 4..8196, top-k 2000, CFG 3); without one, the
    Triton kernel runs under the interpreter at a small shape."""
    from mmr1_kernels.gpu import sampler as G

    if not ON_GPU and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    B, V, (lo, hi), k = (64, 65536, (4, 8196), 2000) if ON_GPU else (6, 3000, (4, 2500), 200)
    cond, uncond = _sampler_batch(B, V, (lo, hi))
    full = lambda v, dt: torch.full((B,), v, dtype=dt)  # noqa: E731
    params = (full(3.0, torch.float32), full(1.0, torch.float32), full(k, torch.int64), full(1.0, torch.float32))
    rows = torch.arange(B) + 17
    cpu = op("cfg_sample")(cond, uncond, *params, None, torch.tensor(5), torch.tensor(11), rows, lo, hi, True)
    gdev = "cuda" if ON_GPU else "cpu"
    mv = lambda t: t.to(gdev)  # noqa: E731
    tri = G.cfg_sample(mv(cond), mv(uncond), *map(mv, params), None, torch.tensor(5, device=gdev),
                       torch.tensor(11, device=gdev), mv(rows), lo, hi, True)
    assert torch.equal(cpu[0], tri[0].cpu()), f"{int((cpu[0] != tri[0].cpu()).sum())} of {B} tokens differ"
    torch.testing.assert_close(cpu[1], tri[1].cpu(), atol=1e-4, rtol=1e-4)


def test_sampler_on_the_device_follows_the_kept_softmax_and_is_batch_invariant():
    """Draws on the device follow the kept softmax (chi-square over many rows of one distribution) and a row's
    token does not depend on the batch around it."""
    V, lo, hi = 64, 0, 64
    g = torch.Generator().manual_seed(3)
    base = torch.randn(V, generator=g) * 1.5
    n = 20000 if ON_GPU else 4000
    cond = base.expand(n, V).contiguous().to(DEV)
    toks, _ = K.cfg_sample(cond, temperature=0.8, top_k=20, seed=9, offset=0, vocab_range=(lo, hi))
    counts = torch.bincount(toks.cpu(), minlength=V).double()
    z = base.double() / 0.8
    kth = z.topk(20).values[-1]
    probs = torch.where(z >= kth, torch.softmax(torch.where(z >= kth, z, -torch.inf), 0), 0.0)
    assert bool((counts[probs == 0] == 0).all())
    keep = probs > 0
    stat = float(((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum())
    dof = int(keep.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0)))
    assert p_value > 1e-4, f"chi-square p = {p_value:.2e}"
    rows = torch.arange(n, device=DEV)
    one, _ = K.cfg_sample(cond[7:8], temperature=0.8, top_k=20, seed=9, offset=0, row_ids=rows[7:8])
    assert int(one) == int(toks[7])


def test_group_advantages_on_the_device():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(64, generator=g)
    adv, _ = K.group_advantages(rewards.to(DEV), group_size=8)
    want = torch.tensor(O.group_advantages(rewards.double().tolist(), [i // 8 for i in range(64)]), dtype=torch.float64)
    assert adv.device.type == DEV.type
    torch.testing.assert_close(adv.double().cpu(), want, atol=2e-6, rtol=2e-6)
