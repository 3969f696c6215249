"""GRPO must be seen to learn: on a task whose answer is known, the policy's expected reward rises under GRPO and
falls when the advantages are negated -- for every loss type, advantage mode, mu and LR schedule the trainer offers.

The task (tiny model, the X-CoT format of test_trainer): the reasoning's first token should be one of the eleven
ids 50..60 of the 46-id text window (a bandit with a known answer, chance about 1/4), and the final image's codes
should be large (image window, CFG). The expected reward is measured on a fixed evaluation rollout (64 samples, fixed Philox seed), so the
comparison is deterministic and sees the policy, not sampling noise.
"""
from __future__ import annotations

import pytest
import torch

import mmr1.grpo as grpo_module
from mmr1.generate import SamplingConfig
from mmr1.grpo import GRPOTrainer
from mmr1.rewards import RewardSet
from mmr1.rollout import xcot_rollout

from test_trainer import FMT, PROMPTS, VOCAB, code_reward, grpo_cfg, tiny_model


def bandit_reward(ro, batch):
    first = torch.tensor([r[0] if r else -1 for r in ro.reasoning])
    return ((first >= 50) & (first < 61)).float(), {}


def rewards():
    return RewardSet({"bandit": bandit_reward, "codes": code_reward}, {"bandit": 1.0, "codes": 1.0})


@torch.no_grad()
def expected_reward(model, samples=16):
    """Mean of each reward over a fixed evaluation rollout: 4 prompts x 16 samples, seed 999."""
    model.eval()
    ro = xcot_rollout(model, [p["prompt_ids"] for p in PROMPTS], VOCAB, FMT,
                      SamplingConfig(cfg_scale=2.0, top_k=0, text_top_k=0, seed=999), num_samples=samples)
    batch = [p for p in PROMPTS for _ in range(samples)]
    return float(bandit_reward(ro, batch)[0].mean()), float(code_reward(ro, batch)[0].mean())


def train(steps, negate=False, monkeypatch=None, **cfg):
    model = tiny_model(6)
    before = expected_reward(model)
    if negate:
        real = grpo_module.K.group_advantages

        def negated(*args, **kwargs):
            adv, stats = real(*args, **kwargs)
            return -adv, stats

        monkeypatch.setattr(grpo_module.K, "group_advantages", negated)
    tr = GRPOTrainer(model, VOCAB, FMT, rewards(), PROMPTS, grpo_cfg(steps=steps, **{"lr": 1e-2, **cfg}))
    tr.train(progress=False)
    return before, expected_reward(model), tr


CASES = [
    pytest.param({}, id="grpo"),
    pytest.param({"loss_type": "bnpo", "adv_mode": "rloo"}, id="bnpo-rloo"),
    pytest.param({"loss_type": "dr_grpo", "adv_mode": "dr_grpo"}, id="dr_grpo"),
    pytest.param({"loss_type": "dapo", "adv_mode": "batch", "mu": 2}, id="dapo-batch-mu2"),
    pytest.param({"adv_mode": "gdpo", "lr_schedule": "cosine", "warmup_steps": 3}, id="gdpo-cosine-warmup"),
    pytest.param({"backend": "reference"}, id="reference-backend"),
]


@pytest.mark.parametrize("cfg", CASES)
def test_grpo_raises_the_expected_reward_and_negated_advantages_lower_it(cfg, monkeypatch):
    """20 steps: the total expected reward (bandit + codes, each in [0, 1]) rises by > 0.3 and each part rises;
    the same run with the advantages negated inside the trainer lowers the total by > 0.3."""
    (b0, c0), (b1, c1), tr = train(20, **cfg)
    assert b1 > b0 + 0.3 and c1 > c0, f"bandit {b0:.3f} -> {b1:.3f}, codes {c0:.3f} -> {c1:.3f}"
    (nb0, nc0), (nb1, nc1), _ = train(20, negate=True, monkeypatch=monkeypatch, **cfg)
    assert (nb0, nc0) == (b0, c0)  # the same start
    assert nb1 + nc1 < nb0 + nc0 - 0.3 and nb1 < nb0 and nc1 < nc0, \
        f"negated: bandit {nb0:.3f} -> {nb1:.3f}, codes {nc0:.3f} -> {nc1:.3f}"
    if cfg.get("lr_schedule") == "cosine":  # the schedule really ran: warmup, then decay towards 0
        lrs = [h["lr"] for h in tr.history]
        assert lrs[0] < lrs[2] and lrs[-1] < 0.1 * max(lrs)


def test_loss_gradient_sign_follows_the_advantage():
    """d loss / d z_target < 0 for a positive advantage (GRPO raises its log-prob) and > 0 for a negative one, in
    every backend that computes the loss: the C++ op, the reference and the fused-linear path."""
    import mmr1_kernels as K

    torch.manual_seed(0)
    B, T, V = 2, 3, 40
    logits = torch.randn(B, T, V)
    targets = torch.randint(0, V, (B, T))
    adv = torch.tensor([1.5, -0.7])
    onehot = torch.nn.functional.one_hot(targets, V).bool()
    x = logits.clone().requires_grad_(True)
    K.grpo_loss(x, targets, adv)[0].backward()
    xr = logits.clone().requires_grad_(True)
    K.reference.grpo_loss(xr, targets, adv)[0].backward()
    h = torch.randn(B, T, 16)
    w = torch.randn(V, 16)
    hl = h.clone().requires_grad_(True)
    K.fused_linear_grpo_loss(hl, w, targets, adv)[0].backward()
    for name, g in (("cpp", x.grad), ("reference", xr.grad)):
        at_target = g[onehot].view(B, T)
        assert bool((at_target[0] < 0).all()) and bool((at_target[1] > 0).all()), name
        assert bool((g.sum(-1).abs() < 1e-6).all()), name  # softmax gradient rows sum to 0
    # fused linear: a step along -grad raises the positive-advantage rows' log-probs and lowers the negative ones
    with torch.no_grad():
        lp0 = K.token_logprobs(h @ w.T, targets)
        lp1 = K.token_logprobs((h - 1e-2 * hl.grad) @ w.T, targets)
    assert bool((lp1[0] > lp0[0]).all()) and bool((lp1[1] < lp0[1]).all())
