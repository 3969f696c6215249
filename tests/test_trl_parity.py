"""mmr1_kernels.policy_loss against TRL's own GRPOTrainer._compute_loss (the installed TRL, pinned in the Makefile's
test dependencies): identical per-token log-probs / entropies / advantages / masks in, loss, gradients and logged
metrics out, equal to fp64 round-off, for every loss type x importance level x correction x masks x KL option."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

trl = pytest.importorskip("trl")

from bench.peers import trl_loss_fn  # noqa: E402
from mmr1_kernels import policy as PL  # noqa: E402
from mmr1_kernels.policy import POLICY_LOSS_TYPES, PolicyLossConfig, policy_loss  # noqa: E402

SUPPORTED_TRL = ("1.16",)  # the release whose _compute_loss these tests pin


def test_pinned_trl_version():
    assert trl.__version__.startswith(SUPPORTED_TRL), f"tests pin TRL {SUPPORTED_TRL}, installed {trl.__version__}"


def _batch(seed, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    logp = (-torch.rand(B, T, generator=g, **f64) * 4).requires_grad_(True)
    ent = (torch.rand(B, T, generator=g, **f64) * 3).requires_grad_(True)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0, 4:] = False  # a short completion
    adv = torch.randn(B, generator=g, **f64)
    adv[1] = 0.0
    noise = lambda s: s * torch.randn(B, T, generator=g, **f64)  # noqa: E731
    old = logp.detach() + noise(0.4)  # large enough that both clip sides are active
    ref = logp.detach() + noise(0.3)
    sampling = old + noise(0.5)
    sampling[2] += 1.0  # one sequence far off-policy (its mean KL exceeds the threshold)
    return logp, ent, mask, adv, old, ref, sampling


CORRECTIONS = [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
KL = [(0.0, True), (0.04, True), (0.04, False)]


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("masks", ["none", "off_policy+entropy"])
@pytest.mark.parametrize("beta,bias_corrected", KL)
@pytest.mark.parametrize("regime", ["plain", "accumulated"])
def test_policy_loss_equals_trl_compute_loss(loss_type, level, correction, masks, beta, bias_corrected, regime):
    if loss_type == "vespo" and correction is not None and correction.startswith("sequence"):
        pytest.skip("TRL rejects VESPO with sequence-level correction modes")
    case = hash((loss_type, level, correction, masks, beta, bias_corrected, regime)) % 1000
    logp, ent, mask, adv, old, ref, sampling = _batch(case)
    accumulated = regime == "accumulated"
    cfg = PolicyLossConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias_corrected,
        epsilon=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28, delta=1.3 if accumulated else None,
        off_policy_mask_threshold=0.3 if masks != "none" else None,
        top_entropy_quantile=0.6 if masks != "none" else 1.0, entropy_coef=0.01 if accumulated else 0.0,
        max_completion_length=12 if accumulated else None)
    gas = 3 if accumulated else 1
    is_ratio = None
    if correction is not None:
        is_ratio = PL.importance_sampling_ratio(old, sampling, mask, mode=correction, clip_min=0.5, clip_max=2.0)
    num_items = 41.0 if accumulated else None
    trl_call = trl_loss_fn(cfg, gradient_accumulation_steps=gas)
    want, want_metrics = trl_call(logp, ent, adv, mask, old, ref if beta else None, sampling, is_ratio,
                                  num_items_in_batch=num_items)
    # TRL's dapo-family normaliser: num_items_in_batch / num_processes * gas / steps_per_generation (here = gas)
    got, metrics = policy_loss(logp, adv, mask, old_logprobs=old, ref_logprobs=ref if beta else None, entropies=ent,
                               importance_sampling_ratio=is_ratio, sampling_logprobs=sampling,
                               num_items_in_batch=num_items, gradient_accumulation_steps=gas, config=cfg)
    want_g = torch.autograd.grad(want, (logp, ent), allow_unused=True)
    got_g = torch.autograd.grad(got, (logp, ent), allow_unused=True)
    scale = max(1.0, abs(float(want.detach())))
    assert abs(float(got.detach() - want.detach())) <= 1e-14 * scale, (float(got), float(want))
    for name, a, b in zip(("d/dlogp", "d/dentropy"), got_g, want_g):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0.0, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-16, msg=name)
    renamed = {"kl": "kl", "entropy": "entropy", "clip_ratio/low_mean": "clip_ratio/low_mean",
               "clip_ratio/high_mean": "clip_ratio/high_mean", "clip_ratio/region_mean": "clip_ratio/region_mean",
               "cispo_clip_ratio": "cispo_clip_ratio", "vespo/phi_seq_mean": "vespo/phi_seq_mean"}
    for ours, theirs in renamed.items():
        if theirs in want_metrics:  # (TRL divides by an fp32 token count: fp32 round-off)
            assert math.isclose(float(metrics[ours]), want_metrics[theirs], rel_tol=2e-7, abs_tol=1e-15), ours


def test_parity_cases_exercise_every_branch():
    """The batches above must make the branches matter: clipping on both sides, a sequence dropped by the
    off-policy mask, tokens dropped by the entropy mask, a truncated and a masked-out correction ratio."""
    logp, ent, mask, adv, old, ref, sampling = _batch(7)
    ratio = torch.exp(logp.detach() - old)
    assert bool(((ratio < 0.8) & (adv[:, None] < 0) & mask).any()) and bool(((ratio > 1.28) & (adv[:, None] > 0)
                                                                                & mask).any())
    opm = PL.off_policy_mask(adv[:, None], logp, sampling, mask, 0.3)
    assert 0 < float(opm.sum()) < opm.numel()
    em = PL.high_entropy_mask(ent, mask, 0.6)
    assert 0 < int(em.sum()) < int(mask.sum())
    r = PL.importance_sampling_ratio(old, sampling, mask, mode="token_mask", clip_min=0.5, clip_max=2.0)
    assert bool((r[mask] == 0).any()) and bool((r[mask] != 0).any())
    r = PL.importance_sampling_ratio(old, sampling, mask, mode="token_truncate", clip_min=0.5, clip_max=2.0)
    assert float(r.max()) == 2.0 and float(r.min()) == 0.5


def test_eval_mode_has_no_accumulation_scaling():
    logp, ent, mask, adv, old, ref, sampling = _batch(3)
    for loss_type in ("grpo", "dapo"):
        cfg = PolicyLossConfig(loss_type=loss_type, entropy_coef=0.02)
        want, _ = trl_loss_fn(cfg, gradient_accumulation_steps=4, training=False)(logp, ent, adv, mask, old,
                                                                                  num_items_in_batch=37.0)
        got, _ = policy_loss(logp, adv, mask, old_logprobs=old, entropies=ent, num_items_in_batch=37.0, config=cfg)
        assert abs(float(got) - float(want)) <= 1e-14 * max(1.0, abs(float(want)))


def test_helpers_equal_trl_static_methods():
    from trl import GRPOTrainer

    logp, ent, mask, adv, old, ref, sampling = _batch(11)
    a = adv[:, None]
    torch.testing.assert_close(PL.off_policy_mask(a, logp, sampling, mask.double(), 0.3),
                               GRPOTrainer.get_off_policy_mask(a, logp, sampling, mask.double(), 0.3), rtol=0, atol=0)
    for is_ratio in (None, PL.importance_sampling_ratio(old, sampling, mask, mode="token_truncate")):
        lr = logp.detach() - old
        ours = PL.vespo_weights(a, lr, mask.double(), is_ratio, 2.0, 3.0, 3.0, 2.0)
        theirs = GRPOTrainer.get_gamma_weights(a, lr, mask.double(), is_ratio, 2.0, 3.0, 3.0, 2.0)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    bare = GRPOTrainer.__new__(GRPOTrainer)
    from bench.peers import _OneProcessAccelerator

    object.__setattr__(bare, "accelerator", _OneProcessAccelerator())
    for q in (0.2, 0.5, 0.9):
        assert torch.equal(PL.high_entropy_mask(ent, mask, q), bare.get_high_entropy_mask(ent, mask, 1 - q))


def _ratio_oracle(old, sampling, mask, mode, lo, hi):
    """Per-element loops in Python floats: pi_old / pi_sampler, per token or per sequence, truncated or masked."""
    B, T = old.shape
    out = []
    for b in range(B):
        terms = [0.0 if not mask[b, t] or math.isnan(float(old[b, t] - sampling[b, t]))
                 else float(old[b, t] - sampling[b, t]) for t in range(T)]
        values = [math.exp(sum(terms))] if mode.startswith("sequence") else [math.exp(x) for x in terms]
        row = []
        for v in values:
            if mode.endswith("truncate"):
                v = min(max(v, lo if lo is not None else -math.inf), hi if hi is not None else math.inf)
            elif (lo is not None and v < lo) or (hi is not None and v > hi):
                v = 0.0
            row.append(v)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode,lo,hi", list(itertools.product(PL.IS_MODES, (None, 0.5), (None, 2.0))))
def test_importance_sampling_ratio_modes(mode, lo, hi):
    _, _, mask, _, old, _, sampling = _batch(5)
    sampling = sampling.clone()
    sampling[3, 2] = float("nan")  # a token the sampler could not score: ratio 1
    got = PL.importance_sampling_ratio(old, sampling, mask, mode=mode, clip_min=lo, clip_max=hi)
    torch.testing.assert_close(got, _ratio_oracle(old, sampling, mask, mode, lo, hi), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="ppo"), "loss_type must be one of"),
    (dict(importance_sampling_level="batch"), "importance_sampling_level must be one of"),
    (dict(epsilon=-0.1), "epsilon must be >= 0"),
    (dict(delta=0.9), "delta must be None or a finite float > 1"),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile must be in"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg must be > 0"),
    (dict(max_completion_length=0), "max_completion_length must be None or a positive int"),
    (dict(beta=float("nan")), "beta must be a finite float"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**bad)


def test_call_errors_name_the_argument():
    logp, ent, mask, adv, old, ref, sampling = _batch(1)
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        policy_loss(logp, adv, mask, config=PolicyLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="entropies is required"):
        policy_loss(logp, adv, mask, config=PolicyLossConfig(top_entropy_quantile=0.5))
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(logp, adv[:3], mask)
    with pytest.raises(ValueError, match="old_logprobs must have the shape"):
        policy_loss(logp, adv, mask, old_logprobs=old[:, :3])
    with pytest.raises(ValueError, match="importance_sampling_ratio must have shape"):
        policy_loss(logp, adv, mask, importance_sampling_ratio=torch.ones(6, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be a positive int"):
        policy_loss(logp, adv, mask, gradient_accumulation_steps=0)
    with pytest.raises(TypeError, match="config must be a PolicyLossConfig"):
        policy_loss(logp, adv, mask, config={"loss_type": "grpo"})
    with pytest.raises(ValueError, match="mode must be one of"):
        PL.importance_sampling_ratio(old, sampling, mask, mode="token")


@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("dapo", "token"), ("vespo", "token"),
                                             ("sapo", "token")])
def test_policy_loss_compiles_fullgraph(loss_type, level):
    logp, ent, mask, adv, old, ref, sampling = _batch(4)
    cfg = PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04, top_entropy_quantile=0.5,
                           off_policy_mask_threshold=0.3, entropy_coef=0.01)

    def f(lp, en):
        return policy_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref, entropies=en,
                           sampling_logprobs=sampling, config=cfg)[0]

    torch._dynamo.reset()
    want = torch.autograd.grad(f(logp, ent), (logp, ent))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(logp, ent), (logp, ent))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_entropy_mask_with_no_unmasked_token_keeps_nothing():
    ent = torch.rand(2, 3)
    assert not PL.high_entropy_mask(ent, torch.zeros(2, 3, dtype=torch.bool), 0.5).any()
