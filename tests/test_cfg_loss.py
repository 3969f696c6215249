"""GRPOConfig.cfg_loss: which distribution of the image codes a GRPO loss with CFG trains (T2I-R1: the conditional
branch; AR-GRPO: the guided logits, gradients through both branches; ReasonGen-R1: the unconditional branch
detached; Janus-Pro-R1: the guided logits / g). For each, on both model families (Lumina-mGPT: the unconditional
rows restart at each image block; Janus: BOS + pads before it) and both backends: the log-probs the rollout records
(from the KV-cached decode) equal the trainer's teacher-forced ones (the unconditional sequences rebuilt from the
rollout), so the first importance ratio is 1; the conventions differ where they should (values, gradients); the
fused update equals the full-logits one."""
import copy

import pytest
import torch

from mmr1.generate import SamplingConfig, image_logprobs
from mmr1.grpo import CFG_LOSSES, GRPOConfig, GRPOTrainer
from mmr1.rewards import RewardSet
from mmr1.rollout import xcot_rollout
from mmr1_kernels import group_advantages

import test_janus as J
import test_trainer as T

CONVENTIONS = sorted(CFG_LOSSES)


def trainer(family: str, cfg_loss: str, backend: str = "kernels", **kw) -> GRPOTrainer:
    if family == "lumina":  # X-CoT: reasoning text, a subject block and a final block, CFG 2
        return GRPOTrainer(T.tiny_model(5), T.VOCAB, T.FMT, T.reward_set(), T.PROMPTS,
                           T.grpo_cfg(mu=2, cfg_loss=cfg_loss, backend=backend, **kw))
    model = J.tiny_janus(1)  # text-to-image, CFG 2; weights x 5: logits far from uniform, branches that differ
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.mul_(5.0)
    cfg = GRPOConfig(**{**dict(group_size=4, prompts_per_step=2, steps=4, mu=2, lr=1e-2, beta=0.04, seed=3,
                               cfg_loss=cfg_loss, sampling=SamplingConfig(cfg_scale=2.0, backend=backend)), **kw})
    return GRPOTrainer(model, model.image_vocab(), J.t2i_format(), RewardSet({"codes": J.low_codes}, {"codes": 1.0}),
                       J.T2I_PROMPTS, cfg)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("cfg_loss", CONVENTIONS)
@pytest.mark.parametrize("family", ["lumina", "janus"])
def test_recorded_logprobs_are_the_trainers_and_the_first_ratio_is_one(family, cfg_loss, backend):
    tr = trainer(family, cfg_loss, backend)
    rnd = tr._round(0, 0)
    ro = rnd.rollout
    _, m_img, m_txt = tr._masks(ro)
    recorded = ro.logprobs[:, 1:]
    teacher = tr.ref_logprobs(ro)  # the reference model is the policy's copy at step 0
    assert int(m_img.sum()) >= 8 * 4
    # fp32: the decode's and the teacher-forced pass's sums differ by rounding (observed <= 3.4e-6)
    torch.testing.assert_close(teacher[m_img], recorded[m_img], atol=2e-5, rtol=0)
    torch.testing.assert_close(teacher[m_txt], recorded[m_txt], atol=2e-5, rtol=0)
    adv, _ = group_advantages(rnd.rewards, group_size=4, weights=rnd.weights)
    tr.policy.train()
    _, m = tr.loss(ro, adv, recorded, teacher)
    assert m["image/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["image/clip_ratio/region_mean"] == 0.0
    assert m["image/kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["lumina", "janus"])
def test_the_conventions_record_different_distributions_of_the_same_tokens(family):
    """Same seed -> same tokens under every convention (the recorded log-prob never changes the draw); "guided"
    with top_k 0 is the distribution the sampler drew from (its own log-probs, from the fused CFG sampler); the
    others differ from it; "guided_scaled" is the guided logits / g, checked from the conditional and guided
    log-probs alone."""
    rec = {}
    for kind in ("sampler", "cond", "guided", "guided_scaled"):
        tr = trainer(family, "cond")
        scfg = tr.cfg.sampling_for(0)
        scfg = SamplingConfig(**{**scfg.__dict__, "cfg_logprobs": kind})
        batch = tr.batch_for(0)
        ro = tr._xcot(tr.policy, batch, 4, scfg, torch.arange(len(batch) * 4))
        rec[kind] = ro
    img = rec["sampler"].image_positions & rec["sampler"].chosen
    for kind in ("cond", "guided", "guided_scaled"):
        assert torch.equal(rec[kind].tokens, rec["sampler"].tokens)
    torch.testing.assert_close(rec["guided"].logprobs[img], rec["sampler"].logprobs[img], atol=2e-5, rtol=0)
    assert (rec["cond"].logprobs[img] - rec["guided"].logprobs[img]).abs().max() > 1e-2
    assert (rec["guided_scaled"].logprobs[img] - rec["guided"].logprobs[img]).abs().max() > 1e-2


def test_image_logprobs_against_a_by_hand_float64_computation():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    tok = torch.randint(0, 11, (5,), generator=g)
    for kind, z in (("cond", c.double()), ("guided", u.double() + 2.5 * (c.double() - u.double())),
                    ("guided_scaled", c.double() - 1.5 / 2.5 * u.double())):
        want = (z / 0.7).log_softmax(-1)[torch.arange(5), tok]
        torch.testing.assert_close(image_logprobs(c, u, tok, 2.5, 0.7, kind).double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_logprobs(c, None, tok, 2.5, 0.7, "guided"), image_logprobs(c, u, tok, 2.5, 0.7,
                                                                                                "cond"))


@pytest.mark.parametrize("cfg_loss", ["guided", "guided_detached", "guided_scaled"])
@pytest.mark.parametrize("family", ["lumina", "janus"])
def test_fused_update_equals_the_full_logits_one(family, cfg_loss):
    """The guided conventions through fused_linear_grpo_loss (the two branches' head features mixed, no logits)
    give the loss and gradients of the full-logits reference path (the two branches' logits mixed)."""
    runs = {}
    for backend in ("kernels", "reference"):
        tr = trainer(family, cfg_loss, backend)
        rnd = tr._round(0, 0)
        adv, _ = group_advantages(rnd.rewards, group_size=4, weights=rnd.weights)
        ref = tr.ref_logprobs(rnd.rollout)
        tr.policy.train()
        loss, m = tr.loss(rnd.rollout, adv + 0.5, None, ref)  # + 0.5: a gradient even if a group is constant
        loss.backward()
        runs[backend] = (rnd.rollout.tokens, loss.detach(), {n: p.grad.clone() for n, p in tr.policy.named_parameters()
                                                             if p.grad is not None})
    (tk, lk, gk), (tr_, lr_, gr) = runs["kernels"], runs["reference"]
    assert torch.equal(tk, tr_)
    torch.testing.assert_close(lk, lr_, atol=1e-6, rtol=1e-5)
    for name in gk:
        torch.testing.assert_close(gk[name], gr.get(name, torch.zeros_like(gk[name])), atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["lumina", "janus"])
def test_detaching_the_unconditional_branch_keeps_the_loss_and_changes_the_gradient(family):
    out = {}
    for cfg_loss in ("guided", "guided_detached", "cond"):
        tr = trainer(family, cfg_loss, beta=0.0)
        rnd = tr._round(0, 0)
        adv, _ = group_advantages(rnd.rewards, group_size=4, weights=rnd.weights)
        tr.policy.train()
        loss, _ = tr.loss(rnd.rollout, adv + 0.5, None, None)
        loss.backward()
        out[cfg_loss] = (loss.detach(), torch.cat([p.grad.flatten() for p in tr.policy.parameters()
                                                   if p.grad is not None]))
    torch.testing.assert_close(out["guided"][0], out["guided_detached"][0], atol=0, rtol=0)
    diff = (out["guided"][1] - out["guided_detached"][1]).abs().max()
    assert diff > 1e-4 * out["guided"][1].abs().max(), "the unconditional branch got no gradient in 'guided'"
    # on-policy the loss value is -mean(advantage) under every convention; the gradients are not
    assert (out["guided_detached"][1] - out["cond"][1]).abs().max() > 1e-4 * out["cond"][1].abs().max()


def test_cfg_loss_errors():
    with pytest.raises(ValueError, match="cfg_loss must be one of"):
        T.grpo_cfg(cfg_loss="uncond")
    with pytest.raises(ValueError, match="cfg_logprobs must be one of"):
        SamplingConfig(cfg_logprobs="guided_detached")
    tr = trainer("lumina", "guided")
    ro = tr._round(0, 0).rollout
    ro.image_blocks = None  # a custom rollout_fn that does not record its blocks
    with pytest.raises(ValueError, match="needs rollouts that record their image blocks"):
        tr.loss(ro, torch.zeros(ro.num_samples), None, None)
    assert not trainer("lumina", "guided", cfg_scale=1.0).cfg.unconditional_branch  # no CFG: nothing to mix
    # the rollouts record the loss's distribution only where a step reads them back (mu > 1): with mu = 1 the
    # sampler's own, at no extra cost
    assert T.grpo_cfg(mu=2, cfg_loss="guided_scaled").sampling_for(0).cfg_logprobs == "guided_scaled"
    assert T.grpo_cfg(mu=1, cfg_loss="guided_scaled").sampling_for(0).cfg_logprobs == "sampler"
