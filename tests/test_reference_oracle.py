"""The spec (mmr1_kernels.reference) and the public ops against the tests' own fp64 oracle (tests/oracle.py).

The reference is what CPU tensors run when the C++ extension is missing, what the trainer's reference path runs, and
what the backend tests compare against; here it is checked against an independent implementation in fp64 -- values,
metrics and gradients (the oracle's by autograd, the reference's from its closed-form ``grpo_token_coef``) -- on the
cases where GRPO's terms differ: clipping on both sides, the +-20 clamps of the log-ratio and of the KL's delta,
masks, vocab windows, temperatures, every loss type and explicit ``loss_weights``.
"""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R

import oracle as O

F64 = torch.float64


def _case(B=3, T=5, V=60, window=(4, 50), seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    targets = torch.randint(*window, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    base = O.logprobs(logits, targets, 0.8, *window)
    old = base + torch.randn(B, T, generator=g, dtype=F64) * 0.5  # ratios on both sides of the clip range
    ref = base + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    if extreme:  # beyond the +-20 clamps: log-ratio and KL delta
        old[0, 0], old[1, 1] = base[0, 0] - 25.0, base[1, 1] + 25.0
        ref[0, 2], ref[2, 3] = base[0, 2] + 30.0, base[2, 3] - 30.0
        mask[0, 0] = mask[1, 1] = mask[0, 2] = mask[2, 3] = True
    adv = torch.randn(B, generator=g, dtype=F64)
    return logits, targets, mask, adv, old, ref


@pytest.mark.parametrize("loss_type", list(R.LOSS_TYPES))
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("token_adv", [False, True])
def test_reference_grpo_loss_and_gradient_match_the_oracle(loss_type, beta, extreme, token_adv):
    logits, targets, mask, adv, old, ref = _case(extreme=extreme)
    if token_adv:
        adv = adv[:, None] * torch.linspace(-1, 2, targets.shape[1], dtype=F64)
    kw = dict(temperature=0.8, vocab_range=(4, 50), epsilon=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type)

    def spec(z):
        return R.grpo_loss(z, targets, adv, mask, old, ref, dtype=F64, **kw)

    def want(z):
        return O.grpo_loss(z, targets, adv, mask, old, ref, **kw)

    got_loss, got_grad = O.grad(lambda z: spec(z)[0], logits)
    exp_loss, exp_grad = O.grad(lambda z: want(z)[0], logits)
    torch.testing.assert_close(got_loss, exp_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_grad, exp_grad, atol=1e-12, rtol=1e-10)
    O.metrics_close(spec(logits)[1], want(logits)[1], atol=1e-12)
    if extreme:  # the clamped tokens carry no surrogate / KL gradient
        assert spec(logits)[1]["clip_ratio/low_mean"] > 0 or spec(logits)[1]["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_closed_form_token_coefficient_is_the_oracles_derivative(beta):
    """grpo_token_coef (what the no-extension fallback's backward and the kernels compute) == d loss / d logp by
    autograd of the oracle, including both clamp regions and both clip sides."""
    g = torch.Generator().manual_seed(3)
    n = 400
    logp = -torch.rand(n, generator=g, dtype=F64) * 5
    old = logp + torch.randn(n, generator=g, dtype=F64) * 0.6
    ref = logp + torch.randn(n, generator=g, dtype=F64) * 0.6
    old[:10] = logp[:10] + 21 + torch.rand(10, generator=g, dtype=F64)  # log-ratio < -20
    old[10:20] = logp[10:20] - 21 - torch.rand(10, generator=g, dtype=F64)  # log-ratio > 20
    ref[20:30] = logp[20:30] + 25  # delta > 20
    ref[30:40] = logp[30:40] - 25  # delta < -20
    adv = torch.randn(n, generator=g, dtype=F64)
    coef = R.grpo_token_coef(logp, adv, old, ref, 0.2, 0.28, beta)
    _, expected = O.grad(lambda x: O.token_terms(x, adv, old, ref, 0.2, 0.28, beta)[0].sum(), logp)
    torch.testing.assert_close(coef, expected, atol=1e-12, rtol=1e-12)
    assert bool((coef[:20] == (0.0 if beta == 0 else coef[:20])).all())
    on_policy = R.grpo_token_coef(logp, adv, None, ref, 0.2, 0.28, 0.0)
    torch.testing.assert_close(on_policy, -adv, atol=0, rtol=0)  # on-policy: d loss / d logp = -A exactly


def test_explicit_loss_weights_replace_the_aggregation():
    logits, targets, mask, adv, old, ref = _case(seed=5)
    w = torch.rand(targets.shape, dtype=F64)
    kw = dict(temperature=0.8, vocab_range=(4, 50), beta=0.05)
    got, g_got = O.grad(lambda z: R.grpo_loss(z, targets, adv, mask, old, ref, loss_weights=w, dtype=F64, **kw)[0],
                        logits)
    want, g_want = O.grad(lambda z: O.grpo_loss(z, targets, adv, mask, old, ref, loss_weights=w, **kw)[0], logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-10)
    # and the public op (C++ on CPU, fp64 path) takes the same weights
    op_loss, op_grad = O.grad(lambda z: K.grpo_loss(z, targets, adv, mask, old.float(), ref.float(), loss_weights=w,
                                                   **kw)[0], logits)
    want32, g32 = O.grad(lambda z: O.grpo_loss(z, targets, adv, mask, old.float(), ref.float(), loss_weights=w,
                                               **kw)[0], logits)
    torch.testing.assert_close(op_loss, want32, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(op_grad, g32, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss_type", list(R.LOSS_TYPES))
def test_public_ops_at_the_clamps_match_the_oracle(loss_type):
    """The public op (C++ kernels on CPU, in fp64) at log-ratios and KL deltas beyond +-20."""
    logits, targets, mask, adv, old, ref = _case(extreme=True, seed=7)
    kw = dict(temperature=0.8, vocab_range=(4, 50), epsilon=0.2, epsilon_high=0.28, beta=0.1, loss_type=loss_type)
    got, g_got = O.grad(lambda z: K.grpo_loss(z, targets, adv, mask, old, ref, **kw)[0], logits)
    want, g_want = O.grad(lambda z: O.grpo_loss(z, targets, adv, mask, old, ref, **kw)[0], logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-9)


def test_reference_token_logprobs_match_the_oracle():
    logits, targets, mask, *_ = _case(V=300, window=(7, 290))
    logits[0, 1, 10] = float("-inf")
    lp, lse = R.token_logprobs(logits, targets, 0.7, 7, 290, mask=mask, dtype=F64)
    want = torch.where(mask, O.logprobs(logits, targets, 0.7, 7, 290), 0.0)
    torch.testing.assert_close(lp, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, torch.where(mask, O.logsumexp(logits, 0.7, 7, 290), 0.0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo", "batch"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_reference_group_advantages_match_the_oracle(mode, unbiased):
    g = torch.Generator().manual_seed(11)
    rewards = torch.randn(23, generator=g, dtype=F64)
    groups = torch.randint(0, 6, (23,), generator=g)
    rewards[3] = float("nan")
    rewards[groups == 2] = 0.7  # a constant group
    _, index = torch.unique(groups, return_inverse=True)
    adv, _, _ = R.group_advantages(rewards[:, None], index, int(index.max()) + 1, mode=mode, unbiased=unbiased)
    want = torch.tensor(O.group_advantages(rewards.tolist(), index.tolist(), mode, 1e-4, unbiased), dtype=F64)
    torch.testing.assert_close(adv.double(), want, atol=1e-6, rtol=1e-6)  # the reference returns fp32
    public, _ = K.group_advantages(rewards.float(), group_ids=groups, mode=mode, unbiased=unbiased)
    torch.testing.assert_close(public.double(), want, atol=2e-6, rtol=2e-6)
