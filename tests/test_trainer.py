"""Rewards, SFT, the GRPO trainer, checkpoints and multi-process training (tiny models made here)."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

from mmr1.sharded_checkpoint import export_consolidated, latest_checkpoint, load_sharded, save_sharded
from mmr1.grpo import GRPOConfig, GRPOTrainer
from mmr1.model import ModelConfig, Transformer, init_weights
from mmr1.rewards import RewardSet, format_reward
from mmr1.rewards.self_reward import generation_self_reward, understanding_self_reward
from mmr1.rollout import XCoTFormat, xcot_rollout
from mmr1.generate import SamplingConfig
from mmr1.sft import SFTConfig, SFTTrainer, sft_loss
from mmr1.tokens import ImageVocab

V = 96
VOCAB = ImageVocab(torch.arange(4, 36), boi=37, eoi=36, newline=38, size_base=40, size_unit=1, vocab_size=V)
FMT = XCoTFormat(think_open=60, think_close=61, end_of_turn=62, subject_hw=(2, 2), final_hw=(2, 3),
                 text_range=(50, V), max_text_tokens=4)
PROMPTS = [{"prompt_ids": [1, 70 + i, 71, 62], "target": i} for i in range(4)]


def tiny_model(seed=0):
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                      max_seq_len=96)
    return init_weights(Transformer(cfg), std=0.2, seed=seed)


def code_reward(ro, batch):
    """A toy reward: large final codes (deterministic, cheap)."""
    return ro.final_codes.float().mean((1, 2)) / 32.0, {}


def reward_set():
    return RewardSet({"format": lambda ro, b: format_reward(ro, VOCAB, FMT), "codes": code_reward},
                     {"format": 0.5, "codes": 1.0})


def grpo_cfg(**kw):
    """The tests' GRPOConfig: keyword arguments that name SamplingConfig fields go into its ``sampling``."""
    sampling = {k: kw.pop(k) for k in list(kw) if k in SamplingConfig.__dataclass_fields__ and k != "seed"}
    base = dict(group_size=4, prompts_per_step=2, steps=4, lr=1e-2, beta=0.04, seed=3,
                sampling=SamplingConfig(**{"cfg_scale": 2.0, **sampling}))
    base.update(kw)
    return GRPOConfig(**base)


# --------------------------------------------------------------------------- rewards


def test_format_reward_and_reward_set_errors():
    ro = xcot_rollout(tiny_model(), [p["prompt_ids"] for p in PROMPTS[:2]], VOCAB, FMT, SamplingConfig(seed=1),
                      num_samples=2)
    r, m = format_reward(ro, VOCAB, FMT)
    assert r.tolist() == [1.0] * 4 and m["format/valid_frac"] == 1.0
    bad = ro.tokens.clone()
    L = int(ro.lengths[0])
    bad[0, L - 3] = VOCAB.boi  # a code inside the final block replaced by a structure token
    ro.tokens = bad
    assert format_reward(ro, VOCAB, FMT)[0].tolist()[0] == 0.0
    with pytest.raises(ValueError, match="inf"):
        RewardSet({"x": lambda ro, b: (torch.full((4,), float("inf")), {})}, {})(ro, [{}] * 4)
    with pytest.raises(ValueError, match="returned 3 values"):
        RewardSet({"x": lambda ro, b: (torch.zeros(3), {})}, {})(ro, [{}] * 4)
    with pytest.raises(ValueError, match="unknown rewards"):
        RewardSet({"x": code_reward}, {"y": 1.0})


def _tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    d = tmp_path / "clip"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=40, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=4), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_clip_scores_from_a_local_directory(tmp_path):
    from mmr1.rewards.vision import CLIPScorer

    clip = CLIPScorer(_tiny_clip(tmp_path))
    imgs = torch.rand(3, 3, 48, 40) * 2 - 1
    t = clip.text_alignment(imgs, ["a sks dog", "a dog", "red"])
    assert t.shape == (3,) and torch.all(t.abs() <= 1)
    # the identifier is stripped: "a sks dog" scores exactly like "a dog"
    assert t[0].item() == pytest.approx(clip.text_alignment(imgs[:1], ["a dog"])[0].item(), abs=1e-6)
    pick = clip.preference_score(imgs, ["a dog", "a dog", "red"])
    assert pick[1].item() == pytest.approx(t[1].item() * clip.model.logit_scale.exp().item(), rel=1e-5)
    same = clip.image_similarity(imgs, imgs)
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="no model directory"):
        CLIPScorer(tmp_path / "missing")


def test_dino_and_psr_with_whole_image_fallback(tmp_path):
    from transformers import ViTConfig, ViTModel

    from mmr1.rewards.vision import DINOScorer, SubjectLocator, psr_subject_consistency

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4)).save_pretrained(tmp_path / "dino")
    dino = DINOScorer(tmp_path / "dino")
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(dino.similarity(a, a), torch.ones(2), atol=1e-5, rtol=0)
    scores, m = psr_subject_consistency(dino, SubjectLocator(None), a, [[a[0], b[0]], [b[1]]], [["dog", "cat"], ["cat"]])
    expect0 = (1.0 + float(dino.similarity(a[:1], b[:1])[0])) / 2
    assert scores[0].item() == pytest.approx(expect0, abs=1e-5)
    assert m["psr/detected_frac"] == 0.0
    with pytest.raises(ValueError, match="one reference image per subject"):
        psr_subject_consistency(dino, SubjectLocator(None), a[:1], [[a[0]]], [["dog", "cat"]])


def test_dual_self_rewards_match_direct_log_softmax():
    model = tiny_model(4).eval()
    codes = torch.randint(0, 32, (2, 2, 3))
    blocks = [VOCAB.encode_block(c).tolist() for c in codes]
    prompts = [[70, 71, 72], [80, 81]]
    r, _ = generation_self_reward(model, blocks, prompts, prefix=[75], sep=62)
    with torch.no_grad():
        for i in range(2):
            seq = [1, 75] + blocks[i] + [62] + prompts[i]
            lp = torch.log_softmax(model.logits(model(torch.tensor([seq]))[0]).double(), -1)
            start = len(seq) - len(prompts[i])
            expect = sum(lp[t - 1, seq[t]] for t in range(start, len(seq))) / len(prompts[i])
            assert r[i].item() == pytest.approx(float(expect), abs=1e-5)
    u, _ = understanding_self_reward(model, prompts, codes, VOCAB, sep=62)
    with torch.no_grad():
        seq = [1] + prompts[0] + [62] + blocks[0]
        z = model.logits(model(torch.tensor([seq]))[0]).double()[:, 4:36]
        lp = torch.log_softmax(z, -1)
        code_pos = [t for t in range(len(seq)) if VOCAB.token_to_code[seq[t]] >= 0]
        expect = sum(lp[t - 1, seq[t] - 4] for t in code_pos) / len(code_pos)
        assert u[0].item() == pytest.approx(float(expect), abs=1e-5)


def test_understanding_direction_trains_with_the_same_grpo_loop():
    """Dual self-reward, understanding side: sample captions of images, reward = log p(image | caption)."""
    from mmr1.rollout import caption_rollout

    images = {i: torch.randint(0, 32, (2, 2)) for i in range(4)}
    prompts = [{"prompt_ids": [1] + VOCAB.encode_block(images[i]).tolist() + [75], "image": i} for i in range(4)]

    def rollout_fn(policy, batch, G, scfg, row_ids):
        codes = torch.stack([images[b["image"]] for b in batch])
        return caption_rollout(policy, [b["prompt_ids"] for b in batch], codes, VOCAB, end_of_caption=62,
                               text_range=(50, V), max_tokens=4, scfg=scfg, num_samples=G, row_ids=row_ids)

    def understanding(ro, batch):
        caps = [[t for t in c if t != 62] for c in ro.reasoning]
        return understanding_self_reward(tr.policy, caps, ro.final_codes, VOCAB, sep=62)

    tr = GRPOTrainer(tiny_model(12), VOCAB, FMT, RewardSet({"understanding": understanding}, {}), prompts,
                     grpo_cfg(cfg_scale=1.0), rollout_fn=rollout_fn)
    m = tr.step().metrics
    assert "reward/understanding" in m and "text/logp_mean" in m and "image/logp_mean" not in m
    assert torch.isfinite(torch.tensor(m["loss"]))


# --------------------------------------------------------------------------- SFT


def test_sft_loss_is_masked_ce_and_learns():
    model = tiny_model(5)
    seqs = [[1, 70, 62, 60, 55, 61, 62], [1, 71, 72, 62, 60, 56, 61, 62]]
    plen = [3, 4]
    loss, m = sft_loss(model, seqs, plen)
    with torch.no_grad():
        total, n = 0.0, 0
        for s, p in zip(seqs, plen):
            lp = torch.log_softmax(model.logits(model(torch.tensor([s]))[0]).double(), -1)
            for t in range(p, len(s)):
                total -= float(lp[t - 1, s[t]])
                n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5) and m["tokens"] == n
    tr = SFTTrainer(model, SFTConfig(lr=3e-2))
    first = tr.step(seqs, plen)["loss"]
    for _ in range(30):
        last = tr.step(seqs, plen)["loss"]
    assert last < 0.3 * first
    with pytest.raises(ValueError, match="no assistant tokens"):
        sft_loss(model, [[1, 2, 3]], [3])


# --------------------------------------------------------------------------- GRPO


def test_grpo_step_logs_every_metric_and_updates_the_weights(tmp_path):
    tr = GRPOTrainer(tiny_model(6), VOCAB, FMT, reward_set(), PROMPTS,
                     grpo_cfg(log_path=str(tmp_path / "log.jsonl"), mu=2))
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    m = tr.step().metrics
    for key in ("loss", "grad_norm", "reward/format", "reward/codes", "adv/zero_std_frac", "image/kl",
                "image/clip_ratio/high_mean", "image/ratio_mean", "text/logp_mean", "logp/sampler_minus_trainer",
                "throughput/rollout_tok_s", "throughput/train_tok_s", "memory/peak_mib"):
        assert key in m, key
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in m.items() if k != "step")
    assert any(not torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["step"] == 0


def test_reference_backend_computes_the_same_loss_and_gradients_off_policy():
    """GRPOConfig(backend="reference") -- full logits and mmr1_kernels.reference, the baseline the demo and the
    benchmarks time -- against the fused path where the two can differ: ratios != 1 with clipping active on both
    sides (old log-probs shifted by +-0.6), beta > 0 against a reference model that is not the policy, asymmetric
    advantages. Compared before any optimizer step: the loss, every metric, and every parameter's gradient."""
    policy = tiny_model(5)
    tr = {b: GRPOTrainer(copy.deepcopy(policy), VOCAB, FMT, reward_set(), PROMPTS,
                         grpo_cfg(backend=b, beta=0.3, eps_low=0.2, eps_high=0.28), ref_model=tiny_model(21))
          for b in ("kernels", "reference")}
    ro = xcot_rollout(policy, [p["prompt_ids"] for p in PROMPTS[:2]], VOCAB, FMT,
                      SamplingConfig(cfg_scale=2.0, top_k=0, text_top_k=0, seed=4), num_samples=4)
    adv = torch.tensor([2.0, -0.5, -0.5, -1.0, 0.3, 0.3, 1.2, -1.8])
    shift = torch.where(torch.arange(ro.tokens.shape[1] - 1) % 2 == 0, 0.6, -0.6)
    old = ro.logprobs[:, 1:] + shift
    out = {}
    for b, t in tr.items():
        ref = t.ref_logprobs(ro)
        t.policy.zero_grad()
        loss, metrics = t.loss(ro, adv, old, ref)
        loss.backward()
        out[b] = (float(loss.detach()), metrics, {k: p.grad.clone() for k, p in t.policy.named_parameters()}, ref)
    (lk, mk, gk, rk), (lr_, mr, gr, rr) = out["kernels"], out["reference"]
    m_img = ro.chosen[:, 1:] & ro.image_positions[:, 1:]
    torch.testing.assert_close(rk[m_img], rr[m_img], atol=2e-6, rtol=1e-6)
    assert mk["image/clip_ratio/low_mean"] > 0 and mk["image/clip_ratio/high_mean"] > 0 and mk["image/kl"] > 0.01
    assert lk == pytest.approx(lr_, rel=1e-5, abs=1e-7)
    assert set(mk) == set(mr)
    for key in mk:
        assert mk[key] == pytest.approx(mr[key], rel=1e-5, abs=1e-7), key
    for k in gk:
        scale = float(gr[k].abs().max())
        torch.testing.assert_close(gk[k], gr[k], atol=1e-6 * scale + 1e-10, rtol=1e-5, msg=k)  # observed: 3e-7 * scale
    with pytest.raises(ValueError, match="backend must be"):
        grpo_cfg(backend="triton")


def test_trainer_loss_matches_the_oracle_on_full_logits():
    """GRPOTrainer.loss against tests/oracle.py in fp64 on the full logits of the same hidden states: the image codes
    over the image window at ``temperature``, the reasoning over the text window at ``text_temperature``, one set of
    weights over the union of the two masks, asymmetric eps with clipping active, beta against another model."""
    import oracle as O

    from mmr1.model import teacher_forced_hidden

    policy = tiny_model(5)
    cfg = grpo_cfg(beta=0.3, eps_low=0.15, eps_high=0.35, temperature=0.9, text_temperature=0.7)
    tr = GRPOTrainer(policy, VOCAB, FMT, reward_set(), PROMPTS, cfg, ref_model=tiny_model(21))
    ro = xcot_rollout(policy, [p["prompt_ids"] for p in PROMPTS[:2]], VOCAB, FMT,
                      SamplingConfig(cfg_scale=2.0, top_k=0, text_top_k=0, seed=4), num_samples=4)
    adv = torch.tensor([2.0, -0.5, -0.5, -1.0, 0.3, 0.3, 1.2, -1.8])
    shift = torch.where(torch.arange(ro.tokens.shape[1] - 1) % 2 == 0, 0.6, -0.6)
    old = ro.logprobs[:, 1:] + shift
    ref = tr.ref_logprobs(ro)
    loss, metrics = tr.loss(ro, adv, old, ref)
    with torch.no_grad():
        logits = policy.logits(teacher_forced_hidden(policy, ro.tokens, ro.lengths)).double()
    targets = ro.tokens[:, 1:]
    chosen, img = ro.chosen[:, 1:], ro.image_positions[:, 1:]
    m_img, m_txt = chosen & img, chosen & ~img
    both = (m_img | m_txt).double()
    w = both / both.sum(1, keepdim=True).clamp(min=1) / both.shape[0]  # grpo: mean of per-sequence token means
    want = 0.0
    for mask, window, temp in ((m_img, VOCAB.window, 0.9), (m_txt, FMT.text_range, 0.7)):
        part, m = O.grpo_loss(logits, targets, adv, mask, old, ref, temp, window, 0.15, 0.35, 0.3,
                              loss_weights=w)
        want = want + part
        name = "image" if window == VOCAB.window else "text"
        for k in ("ratio_mean", "kl", "logp_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"):
            assert metrics[f"{name}/{k}"] == pytest.approx(float(m[k]), rel=1e-4, abs=1e-6), (name, k)
    assert metrics["image/clip_ratio/low_mean"] > 0 and metrics["image/clip_ratio/high_mean"] > 0
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    # the KL term is there: the same loss with beta = 0 differs by beta * the KL part
    tr0 = GRPOTrainer(policy, VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(beta=0.0, eps_low=0.15, eps_high=0.35,
                                                                          temperature=0.9, text_temperature=0.7))
    assert abs(float(tr0.loss(ro, adv, old, None)[0].detach()) - float(loss.detach())) > 1e-3


def test_trainer_passes_the_reward_weights_to_the_advantages(monkeypatch):
    """RewardSet weights, overridden by GRPOConfig.reward_weights, are what the group advantages combine."""
    import mmr1.grpo as G

    seen = []
    real = G.K.group_advantages

    def spy(rewards, **kw):
        seen.append(kw["weights"].tolist())
        return real(rewards, **kw)

    monkeypatch.setattr(G.K, "group_advantages", spy)
    GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg()).step()
    GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(reward_weights={"codes": 0.25})).step()
    assert seen == [[0.5, 1.0], [0.5, 0.25]]


def test_reference_backend_takes_the_same_steps_with_mu_2():
    """Two full steps with mu=2 (the second inner update is off-policy: ratio != 1) on both paths: the same
    rollouts, metrics and weights."""
    tr = {b: GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS,
                         grpo_cfg(backend=b, lr=1e-3, mu=2, beta=0.1), ref_model=tiny_model(22))
          for b in ("kernels", "reference")}
    for _ in range(2):
        m = {b: t.step().metrics for b, t in tr.items()}
        assert m["kernels"]["image/ratio_mean"] != 1.0
        for key in ("loss", "grad_norm", "reward/codes", "image/kl", "image/ratio_mean", "image/logp_mean",
                    "text/logp_mean", "image/clip_ratio/low_mean", "image/clip_ratio/high_mean"):
            assert m["reference"][key] == pytest.approx(m["kernels"][key], rel=1e-4, abs=1e-6), key
    ref_state = tr["reference"].policy.state_dict()
    for k, v in tr["kernels"].policy.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], atol=1e-5, rtol=1e-4)


def test_resume_is_bit_identical(tmp_path):
    """2 steps, save, 2 more in a fresh trainer == 4 uninterrupted steps, bit for bit -- with a warmup + cosine
    schedule and mu = 2, so a resume without the scheduler's state or AdamW's moments is caught."""
    cfg = dict(lr_schedule="cosine", warmup_steps=2, mu=2)
    full = GRPOTrainer(tiny_model(7), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(**cfg))
    full.train(4, progress=False)
    part = GRPOTrainer(tiny_model(7), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(**cfg))
    part.train(2, progress=False)
    part.save(tmp_path / "ckpt")
    resumed = GRPOTrainer(tiny_model(123), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(**cfg),
                          ref_model=tiny_model(7).requires_grad_(False))
    resumed.load(tmp_path / "ckpt")
    assert resumed.step_idx == 2
    resumed.train(2, progress=False)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history[2:]]
    for k, v in full.policy.state_dict().items():
        assert torch.equal(v, resumed.policy.state_dict()[k]), k


def test_checkpoint_restores_the_rng_streams(tmp_path):
    import random

    import numpy as np

    save_sharded(tmp_path / "ckpt", 1, tiny_model(8))
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move every stream on
    load_sharded(tmp_path / "ckpt", tiny_model(8))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], again[0]) and expect[1:] == again[1:]
    torch.rand(5)
    load_sharded(tmp_path / "ckpt", tiny_model(8), restore_rng=False)
    assert not torch.equal(torch.rand(3), expect[0])


def test_checkpoint_is_atomic_keeps_the_last_k_and_is_config_checked(tmp_path, monkeypatch):
    """A save that fails half-way (after some shards are written) leaves the previous checkpoint published and
    loadable; the next save removes the debris; only the last keep_last checkpoints stay."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "ckpt"
    model = tiny_model(8)
    save_sharded(root, 5, model, config={"lr": 1.0})
    real_save = dcp.save

    def crash_after_writing(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # the shards are on disk ...
        raise OSError("disk full")  # ... and the process dies before publishing

    monkeypatch.setattr(dcp, "save", crash_after_writing)
    with pytest.raises(OSError, match="disk full"):  # a CheckpointWriteError (an OSError), the partial copy removed
        save_sharded(root, 6, tiny_model(9), config={"lr": 1.0})
    monkeypatch.undo()
    assert latest_checkpoint(root).name == "step-00000005" and not (root / ".step-00000006.tmp").exists()
    (root / ".step-00000006.tmp").mkdir()  # what a process killed mid-save leaves: the next save removes it
    other = tiny_model(10)
    assert load_sharded(root, other, config={"lr": 1.0})["step"] == 5  # the old checkpoint is intact
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    for step in (6, 7, 8):
        save_sharded(root, step, model, config={"lr": 1.0}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000007", "step-00000008"]
    with pytest.raises(ValueError, match="different config: lr"):
        load_sharded(root, other, config={"lr": 2.0})
    with pytest.raises(FileNotFoundError):
        load_sharded(tmp_path / "nope", other)
    with pytest.raises(ValueError, match="keep_last must be a positive int"):
        save_sharded(root, 9, model, keep_last=0)


def test_export_gives_a_directory_load_transformer_reads(tmp_path):
    from mmr1.model import load_transformer

    tr = GRPOTrainer(tiny_model(7), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg())
    tr.train(1, progress=False)
    tr.save(tmp_path / "ckpt")
    out = export_consolidated(tmp_path / "ckpt", tmp_path / "export")
    again = load_transformer(out)
    tokens = torch.randint(0, again.config.vocab_size, (2, 9))
    tr.policy.eval()
    torch.testing.assert_close(again(tokens), tr.policy(tokens), rtol=0, atol=0)


def test_trainer_bad_input():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(RuntimeError, match="torchrun"):
        GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(), parallel="ddp")
    with pytest.raises(ValueError, match="prompts must not be empty"):
        GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), [], grpo_cfg())
    with pytest.raises(ValueError, match="prompt_ids"):
        GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), [{"x": 1}], grpo_cfg())
    tr = GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(reward_weights={"nope": 1.0}))
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        tr.step()


# --------------------------------------------------------------------------- multi-process


def distributed_cfg():
    """Cosine schedule with warmup and mu=2, so a resume that forgot the scheduler or AdamW's moments differs;
    micro-batches of one group of 4 sequences (DDP syncs only on the last one, FSDP reduces every backward; each
    runs its prompt once: update_prefix "auto" is "shared" on CPU), blocks recomputed in the backward (activation
    checkpointing inside DDP / FSDP2)."""
    return grpo_cfg(steps=4, mu=2, lr=3e-3, lr_schedule="cosine", warmup_steps=1, prompts_per_step=4,
                    micro_batch_size=4, activation_checkpointing=True)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_single_process(torchrun_scenarios, parallel):
    """torchrun --nproc-per-node 2 (gloo), 2 steps, checkpoint, resume in a fresh trainer, 2 more steps == one
    process, 4 uninterrupted steps on the same global batches: the logged loss, metrics and pre-clip gradient norm
    of every step (so summing instead of averaging gradients across ranks fails: it doubles the norm), and the
    final weights and AdamW state."""
    out = torchrun_scenarios(parallel)
    multi = json.loads((out / "history.json").read_text())
    assert json.loads((out / "ref_sharded.json").read_text()) == (parallel == "fsdp")
    single = GRPOTrainer(tiny_model(11), VOCAB, FMT, reward_set(), PROMPTS, distributed_cfg())
    single.train(4, progress=False)
    assert len(multi) == len(single.history) == 4
    assert all(m["update/shared_prefix_frac"] == 1.0 for m in multi + single.history)
    for step, (m, s) in enumerate(zip(multi, single.history)):
        for key in ("loss", "grad_norm", "lr", "reward/codes", "reward/format", "adv/mean_abs", "image/kl",
                    "image/ratio_mean", "image/clip_ratio/low_mean", "image/clip_ratio/high_mean", "image/logp_mean",
                    "text/logp_mean"):
            assert m[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), (step, key)
    weights, opt = tiny_model(0), None
    opt = torch.optim.AdamW(weights.parameters())
    load_sharded(out / "final", weights, opt, restore_rng=False)  # 2 ranks' shards -> one process
    # 1e-5 = lr / 300: a resume without AdamW's moments or the LR schedule moves weights by ~lr; reductions in
    # another order move them by < 4e-6 (k_norm.bias, whose true gradient is 0, takes Adam-normalized noise steps)
    for k, v in single.policy.state_dict().items():
        torch.testing.assert_close(weights.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)
    for n, p in weights.named_parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"],
                                   single.optimizer.state[single.policy.get_parameter(n)]["exp_avg_sq"],
                                   atol=1e-10, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_fsdp_rollouts_gather_each_block_once(torchrun_scenarios):
    """Under FSDP2 a GRPO step keeps the blocks gathered through the rollout: a handful of all-gathers per step
    instead of one per block per decode step, and the same step."""
    res = json.loads((torchrun_scenarios("gather_count") / "count.json").read_text())
    blocks = tiny_model(0).config.num_layers
    assert res["same_step"], res
    # the rollout decodes > 20 tokens per sample: re-gathering every block at every step costs > 15 x blocks more
    assert res["per_step"] - res["whole"] >= 15 * blocks, res
    assert res["whole"] <= 4 * (blocks + 1), res  # rollout: once per block and the root; the update: fwd + bwd


def test_activation_checkpointing_changes_memory_not_the_update():
    """Recomputing the blocks in the backward gives the same GRPO steps and the same SFT step, bit for bit."""
    from mmr1.sft import SFTConfig, SFTTrainer

    trainers = [GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS,
                            grpo_cfg(activation_checkpointing=ckpt, mu=2, beta=0.1, lr=1e-3), ref_model=tiny_model(17))
                for ckpt in (False, True)]
    assert [t.policy.activation_checkpointing for t in trainers] == [False, True]
    for _ in range(2):
        plain, ckpt = (t.step().metrics for t in trainers)
        assert plain["loss"] == ckpt["loss"] and plain["grad_norm"] == ckpt["grad_norm"]
    for k, v in trainers[0].policy.state_dict().items():
        assert torch.equal(trainers[1].policy.state_dict()[k], v), k
    seqs, plens = [[1, 5, 6, 7, 8, 9], [1, 5, 9, 9]], [2, 1]
    sft = [SFTTrainer(tiny_model(3), SFTConfig(lr=1e-2, activation_checkpointing=c)) for c in (False, True)]
    calls = [0, 0]
    for i, t in enumerate(sft):  # a block runs once per step, or again in the backward when recomputed
        block = t.model.model.layers[0]

        def counted(*args, i=i, run=block.forward, **kw):
            calls[i] += 1
            return run(*args, **kw)

        block.forward = counted
    a, b = (t.step(seqs, plens) for t in sft)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert calls == [1, 2]


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_shared_prefix_update_equals_the_per_row_update(backend):
    """update_prefix="shared" (each prompt once per group) against "per_row" (every sequence whole) where they can
    differ: off-policy ratios with clipping on both sides, beta > 0 against another reference model, asymmetric
    advantages; the reference log-probs, the loss, every metric and every gradient, to fp32 rounding. Then the
    fallbacks: a micro-batch without equal groups, and loss positions inside a prompt, run per row."""
    policy = tiny_model(5)
    tr = {mode: GRPOTrainer(copy.deepcopy(policy), VOCAB, FMT, reward_set(), PROMPTS,
                            grpo_cfg(backend=backend, beta=0.3, update_prefix=mode), ref_model=tiny_model(21))
          for mode in ("shared", "per_row")}
    ro = xcot_rollout(policy, [PROMPTS[0]["prompt_ids"], [1, 72, 75, 76, 71, 62]], VOCAB, FMT,
                      SamplingConfig(cfg_scale=2.0, top_k=0, text_top_k=0, seed=4), num_samples=4)
    assert len(set(ro.lengths.tolist())) > 1  # rows of different lengths: prompts of 4 and 6 tokens (padding)
    adv = torch.tensor([2.0, -0.5, -0.5, -1.0, 0.3, 0.3, 1.2, -1.8])
    shift = torch.where(torch.arange(ro.tokens.shape[1] - 1) % 2 == 0, 0.6, -0.6)
    old = ro.logprobs[:, 1:] + shift
    out = {}
    for mode, t in tr.items():
        t._passes = [0, 0]
        ref = t.ref_logprobs(ro)
        t.policy.zero_grad()
        loss, metrics = t.loss(ro, adv, old, ref)
        loss.backward()
        assert t._passes == ([0, 2] if mode == "shared" else [2, 0])
        out[mode] = (float(loss.detach()), metrics, {k: p.grad.clone() for k, p in t.policy.named_parameters()}, ref)
    (ls, ms, gs, rs), (lp, mp, gp, rp) = out["shared"], out["per_row"]
    scored = ro.chosen[:, 1:]
    torch.testing.assert_close(rs[scored], rp[scored], atol=1e-5, rtol=1e-6)
    assert torch.count_nonzero(rs[~scored]) == 0  # the prompts' targets carry no reference log-prob
    assert ms["image/clip_ratio/low_mean"] > 0 and ms["image/clip_ratio/high_mean"] > 0 and ms["image/kl"] > 0.01
    assert ls == pytest.approx(lp, rel=1e-5, abs=1e-7)
    assert set(ms) == set(mp)
    for key in ms:
        assert ms[key] == pytest.approx(mp[key], rel=1e-5, abs=1e-7), key
    for k in gs:
        scale = float(gp[k].abs().max())
        torch.testing.assert_close(gs[k], gp[k], atol=1e-5 * scale + 1e-10, rtol=0, msg=k)
    # a micro-batch of 3 rows of one prompt is a group of 3; rows 3..5 (1 of one prompt, 2 of the next) are not
    # equal groups: per row; a loss position inside a prompt: per row
    shared = tr["shared"]
    shared._passes = [0, 0]
    shared.loss(ro, adv, old, rs, rows=slice(0, 3))
    shared.loss(ro, adv, old, rs, rows=slice(3, 6))
    assert shared._passes == [1, 1]
    odd = copy.copy(ro)
    odd.chosen = ro.chosen.clone()
    odd.chosen[0, 2] = True
    shared._passes = [0, 0]
    shared.loss(odd, adv, old, rs)
    assert shared._passes == [1, 0]
    # the default, "auto", is "shared" on CPU (measured faster there: bench.attention --update-only)
    auto = GRPOTrainer(copy.deepcopy(policy), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(backend=backend))
    assert auto.cfg.update_prefix == "auto"
    auto._passes = [0, 0]
    auto.loss(ro, adv, old, rs)
    assert auto._passes == [0, 1]
    with pytest.raises(ValueError, match="update_prefix must be"):
        grpo_cfg(update_prefix="once")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_micro_batches_give_the_one_pass_update(loss_type):
    """The update over micro-batches of 3 (of 8 sequences: 3 + 3 + 2) == one pass over all 8: same loss, gradient
    norm, metrics and weights after 2 steps of mu = 2 (off-policy ratios, KL), up to fp32 summation order."""
    trainers = [GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS,
                            grpo_cfg(micro_batch_size=mb, mu=2, beta=0.1, lr=1e-3, loss_type=loss_type),
                            ref_model=tiny_model(17)) for mb in (0, 3)]
    for _ in range(2):
        one, micro = (t.step().metrics for t in trainers)
        for key in ("loss", "grad_norm", "image/kl", "image/ratio_mean", "image/logp_mean", "text/logp_mean",
                    "image/clip_ratio/high_mean", "image/clip_ratio/low_mean"):
            assert micro[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert one["image/ratio_mean"] != 1.0  # the second update was off-policy
    # the last update's gradients (left in .grad) are the claim, to fp32 summation order; the weights after two
    # AdamW steps too, except that AdamW turns a rounding-level difference in a near-zero gradient element into a
    # step of its own (seen: one of 32 k_norm.bias elements 1.4e-6 apart once the C++ kernels ran multi-threaded)
    gmax = max(float(p.grad.abs().max()) for p in trainers[0].policy.parameters())
    for (k, p0), p1 in zip(trainers[0].policy.named_parameters(), trainers[1].policy.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, atol=1e-5 * gmax, rtol=0, msg=k)
        torch.testing.assert_close(p1, p0, atol=2e-5, rtol=0, msg=k)
        assert float(((p1 - p0).abs() > 1e-6).float().mean()) <= 0.05, k
    with pytest.raises(ValueError, match="micro_batch_size must be an int >= 0"):
        grpo_cfg(micro_batch_size=-1)


def test_a_step_without_signal_is_skipped_when_asked():
    """All rewards equal -> every advantage is 0: with skip_zero_signal_steps the weights and AdamW state stay as
    they are (no Adam-normalized noise step); without it the KL term still moves them."""
    flat = RewardSet({"const": lambda ro, b: (torch.ones(ro.num_samples), {})}, {})
    for skip in (True, False):
        tr = GRPOTrainer(tiny_model(6), VOCAB, FMT, flat, PROMPTS, grpo_cfg(beta=0.1, skip_zero_signal_steps=skip),
                         ref_model=tiny_model(21))
        before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
        m = tr.step().metrics
        moved = any(not torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())
        assert m["skipped"] == float(skip) and moved == (not skip)


# --------------------------------------------------------------------------- dynamic sampling (DAPO)


def half_constant_rewards():
    """Prompts with an odd target score every sample alike (no spread); even ones by their codes (spread)."""
    def fn(ro, batch):
        codes = code_reward(ro, batch)[0]
        odd = torch.tensor([b["target"] % 2 == 1 for b in batch])
        return torch.where(odd, torch.full_like(codes, 0.5), codes), {}
    return RewardSet({"r": fn}, {"r": 1.0})


def test_dynamic_sampling_keeps_only_groups_with_signal():
    tr = GRPOTrainer(tiny_model(7), VOCAB, FMT, half_constant_rewards(), PROMPTS,
                     grpo_cfg(dynamic_sampling=True, dynamic_sampling_rounds=6, prompts_per_step=4))
    seen = []
    real = tr._round

    def spy(step, round_):
        out = real(step, round_)
        seen.append([b["target"] for b in out.batch])
        return out
    tr._round = spy
    m = tr.step().metrics
    assert m["dynamic/zero_std_frac_before"] > 0 and m["adv/zero_std_frac"] == 0.0
    assert m["dynamic/unfilled_groups"] == 0 and m["dynamic/rounds"] == len(seen) >= 2
    assert m["dynamic/prompts_drawn"] == 4 * len(seen)
    assert sum(t % 2 == 0 for r in seen for t in r) >= 4  # enough even prompts were found
    # round 0's draw is the policy's unfiltered performance; the trained batch is the filtered one
    assert "reward/total_mean_trained" in m


def test_dynamic_sampling_without_constant_groups_is_the_plain_step():
    """No group lacks spread: one round, and the step (loss, metrics, weights) is the one without dynamic sampling."""
    a, b = (GRPOTrainer(tiny_model(8), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(dynamic_sampling=d),
                        ref_model=tiny_model(9)) for d in (False, True))
    ma, mb = a.step().metrics, b.step().metrics
    assert mb["dynamic/rounds"] == 1 and mb["dynamic/zero_std_frac_before"] == 0.0
    for k in ("loss", "grad_norm", "reward/total_mean", "image/kl"):
        assert ma[k] == mb[k], k
    for k, v in a.policy.state_dict().items():
        assert torch.equal(b.policy.state_dict()[k], v), k


def test_dynamic_sampling_is_bounded_and_logs_what_it_could_not_fill():
    flat = RewardSet({"const": lambda ro, b: (torch.ones(ro.num_samples), {})}, {})
    tr = GRPOTrainer(tiny_model(6), VOCAB, FMT, flat, PROMPTS,
                     grpo_cfg(dynamic_sampling=True, dynamic_sampling_rounds=3))
    m = tr.step().metrics
    assert m["dynamic/rounds"] == 3 and m["dynamic/unfilled_groups"] == 2 and m["dynamic/prompts_drawn"] == 6
    assert m["dynamic/zero_std_frac_before"] == 1.0 and m["adv/zero_std_frac"] == 1.0
    with pytest.raises(ValueError, match="dynamic_sampling_rounds must be an int >= 1"):
        grpo_cfg(dynamic_sampling_rounds=0)


@pytest.mark.slow
def test_dynamic_sampling_under_torchrun_ranks_agree(torchrun_scenarios):
    """2 processes: every rank runs the same rounds and logs the same global step (the rank-0 log and the other
    rank's agree), each rank's batch holds only groups with signal."""
    out = torchrun_scenarios("dynamic_sampling")
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        for k in ("dynamic/rounds", "dynamic/prompts_drawn", "dynamic/zero_std_frac_before", "loss", "grad_norm",
                  "adv/zero_std_frac"):
            assert a[k] == b[k], k
        assert a["adv/zero_std_frac"] == 0.0 and a["dynamic/zero_std_frac_before"] > 0


def test_train_calls_step_callbacks_with_the_step_it_trained_on(tmp_path):
    """train(callbacks=...) hands each callback the GRPOStep just taken -- its rollout is the batch the update
    used (the same tokens a second trainer's step() returns), its metrics the history entry -- and the eval records
    and the step records go through one metrics log."""
    seen = []
    log = tmp_path / "m.jsonl"
    tr = GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(steps=2, log_path=str(log)))
    twin = GRPOTrainer(tiny_model(), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(steps=2))
    assert tr.evals == [] and tr.history == []  # set in __init__, not first in train()
    hist = tr.train(progress=False, callbacks=[lambda t, s: seen.append((t.step_idx, s))],
                    eval_fn=lambda t: {"probe": float(t.step_idx)}, eval_every=1)
    assert [i for i, _ in seen] == [1, 2] and [s.step for _, s in seen] == [0, 1]
    for (_, s), h in zip(seen, hist):
        assert s.metrics is h and s.rollout.num_samples == 8 and s.advantages.shape == (8,)
        assert torch.equal(s.rollout.tokens, twin.step().rollout.tokens)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r.get("phase", "step") for r in records] == ["eval", "step", "eval", "step", "eval"]
    assert [r["probe"] for r in records if r.get("phase") == "eval"] == [0.0, 1.0, 2.0]


def test_old_layout_name_and_held_rows():
    """The "decode" layout name of the previous release still works, with a FutureWarning; a held row of
    CachedDecoder.step re-feeds its position and does not move."""
    with pytest.warns(FutureWarning, match="'decode' is now called 'shared_prefix'"):
        assert SamplingConfig(attention="decode").attention == "shared_prefix"
    with pytest.raises(ValueError, match="attention must be one of"):
        SamplingConfig(attention="paged")
    from mmr1.generate import CachedDecoder

    model = tiny_model()
    dec = CachedDecoder(model, 2, 16, prompt_len=2)
    dec.prefill(torch.arange(2), [[1, 5], [1, 6, 7]])
    dec.step(torch.tensor([8, 9]))
    before = dec.positions(0, 2)
    h = dec.step(torch.tensor([8, 10]), hold=torch.tensor([True, False]))
    assert dec.positions(0, 2).tolist() == [before[0].item(), before[1].item() + 1]
    dec.close()
    # the held row's hidden state is the one its last step produced (same token, same position)
    ref = CachedDecoder(model, 2, 16, prompt_len=2)
    ref.prefill(torch.arange(2), [[1, 5], [1, 6, 7]])
    h0 = ref.step(torch.tensor([8, 9]))
    ref.close()
    torch.testing.assert_close(h[0], h0[0], atol=1e-5, rtol=1e-5)


def test_a_nonfinite_step_is_applied_nowhere_logged_and_the_run_stops_after_max_in_a_row(tmp_path):
    """A NaN loss at step 1 (injected): the weights and AdamW's state stay as step 0 left them, the step is logged as
    skipped (which term), training goes on; max_nonfinite_steps NaN steps in a row raise, and the last checkpoint
    written before them holds finite weights."""
    tr = GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(steps=8, max_nonfinite_steps=2,
                                                                                log_path=str(tmp_path / "m.jsonl")))
    real = tr.loss
    poison = {1, 3, 4}

    def loss(*a, **k):
        value, m = real(*a, **k)
        return (value * float("nan"), m) if tr.step_idx in poison else (value, m)

    tr.loss = loss
    tr.step()
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters()}
    adam = {n: tr.optimizer.state[p]["exp_avg"].clone() for n, p in tr.policy.named_parameters()}
    with pytest.warns(RuntimeWarning, match="step 1: the loss on rank 0 is not finite; the update was applied on no"):
        m = tr.step().metrics
    assert m["step/skipped_nonfinite"] == 1.0 and m["step/nonfinite_loss_rank"] == 0.0
    for n, p in tr.policy.named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(tr.optimizer.state[p]["exp_avg"], adam[n]), n
    m = tr.step().metrics  # step 2: finite again, applied
    assert m["step/skipped_nonfinite"] == 0.0 and "step/nonfinite_loss_rank" not in m
    assert any(not torch.equal(p, before[n]) for n, p in tr.policy.named_parameters())
    tr.save(tmp_path / "ckpt")
    with pytest.warns(RuntimeWarning):
        tr.step()  # step 3: one in a row
    with pytest.raises(FloatingPointError, match=r"step 4: .*\(2 such step\(s\) in a row; the run stops at 2\)"):
        tr.step()
    logged = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step/skipped_nonfinite"] for r in logged] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert all(torch.isfinite(p).all() for p in tr.policy.parameters())
    with pytest.raises(ValueError, match="max_nonfinite_steps must be an int >= 1"):
        grpo_cfg(max_nonfinite_steps=0)


def test_a_nonfinite_loss_on_one_rank_of_two_skips_the_step_on_both(torchrun_scenarios):
    """torchrun, DDP, 2 processes: rank 1's loss is NaN at step 1; neither rank applies that step (their weights
    after step 1 equal those after step 0, and equal each other), both log it naming rank 1, step 2 trains again."""
    out = torchrun_scenarios("nonfinite")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        m = r["metrics"]
        assert [x["step/skipped_nonfinite"] for x in m] == [0.0, 1.0, 0.0]
        assert m[1]["step/nonfinite_loss_rank"] == 1.0
        w = r["weights"]
        assert w[1] == w[0] and w[2] != w[1]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # then a disk-full error on rank 1 while writing a checkpoint: both ranks raise, naming rank 1; no partial
    # directory is left; the previous checkpoint stays the latest
    for r in ranks:
        assert "rank 1: OSError" in r["write_error"] and "No space left" in r["write_error"], r["write_error"]
        assert r["latest"] == "step-00000003" and r["partial_dirs"] == []


@pytest.mark.parametrize("bad,match", [
    (lambda ro, b: (_ for _ in ()).throw(RuntimeError("CLIP server down")), "reward 'judge' raised RuntimeError: CLIP"),
    (lambda ro, b: ([0.5] * ro.num_samples, {}), "reward 'judge' returned list, expected a numeric tensor"),
    (lambda ro, b: (torch.zeros(ro.num_samples, dtype=torch.complex64), {}), "returned Tensor of torch.complex64"),
    (lambda ro, b: (torch.zeros(3), {}), "reward 'judge' returned 3 values for 8 samples"),
    (lambda ro, b: (torch.full((ro.num_samples,), float("inf")), {}), "reward 'judge' returned \\+-inf"),
])
def test_a_failing_reward_stops_the_step_before_any_weight_changes(bad, match):
    """A reward that raises or returns the wrong thing: a RewardError naming the reward and the step's prompts, and
    the policy and AdamW untouched. NaN scores are no error: counted per reward, left out of the statistics."""
    from mmr1.rewards import RewardError

    prompts = [dict(p, id=f"prompt-{i}") for i, p in enumerate(PROMPTS)]
    rs = RewardSet({"format": lambda ro, b: format_reward(ro, VOCAB, FMT), "judge": bad}, {"format": 1.0, "judge": 1.0})
    tr = GRPOTrainer(tiny_model(5), VOCAB, FMT, rs, prompts, grpo_cfg())
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters()}
    with pytest.raises(RewardError, match=match) as err:
        tr.step()
    assert "prompt-" in str(err.value) and not tr.optimizer.state and tr.step_idx == 0
    assert all(torch.equal(p, before[n]) for n, p in tr.policy.named_parameters())


def test_nan_scores_are_counted_per_reward():
    half_nan = lambda ro, b: (torch.where(torch.arange(ro.num_samples) % 2 == 0, 1.0, float("nan")), {})  # noqa: E731
    rs = RewardSet({"format": lambda ro, b: format_reward(ro, VOCAB, FMT), "judge": half_nan}, {})
    m = GRPOTrainer(tiny_model(5), VOCAB, FMT, rs, PROMPTS, grpo_cfg()).step().metrics
    assert m["reward/judge_nan_count"] == 4.0 and m["reward/judge_nan_frac"] == 0.5 and m["reward/judge"] == 1.0
    assert m["reward/format_nan_count"] == 0.0


def test_a_repeated_signal_within_the_window_is_one_request_a_later_one_exits_at_once():
    """SignalFlag: the first SIGTERM is recorded; a copy within REPEAT_WINDOW_S (torchrun forwarding the SIGTERM
    SLURM also sent the worker) changes nothing; a second signal after the window exits at once with 128 + 15."""
    import subprocess
    import sys

    code = """
import os, signal, sys, time
from mmr1.preemption import REPEAT_WINDOW_S, SignalFlag
with SignalFlag() as flag:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    print("alive", flag.signum, flush=True)
    time.sleep(REPEAT_WINDOW_S + 0.2)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["alive", "15"] and out.returncode == 128 + 2, (out.stdout, out.stderr)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sigterm_to_one_rank_stops_every_rank_after_the_step_with_a_checkpoint_and_the_rerun_is_exact(
        parallel, torchrun_scenarios):
    """torchrun, 2 processes: a real SIGTERM to rank 0 during the rollout or the update of the second step ends the
    run on both ranks after that step (it finishes) with its checkpoint; during the checkpoint save after the first
    step, after that save. A fresh trainer resumes there and its 4th step's weights and AdamW state equal an
    uninterrupted run's, bit for bit."""
    result = json.loads((torchrun_scenarios(f"preempt_{parallel}") / "result.json").read_text())
    for phase, after in (("rollout", 2), ("update", 2), ("save", 1)):
        r = result[phase]
        step, signum, ckpt = r["stopped"]
        assert (step, signum) == (after, 15) and ckpt.endswith(f"ckpt-{phase}"), (phase, r)
        assert r["resumed_at"] == after and r["same_as_uninterrupted"], (phase, r)


def test_a_hung_rank_ends_the_job_with_an_error_naming_it():
    """torchrun, 2 processes, MMR1_COLLECTIVE_TIMEOUT_S=3: rank 1's reward model hangs (120 s) in the first step;
    rank 0 raises CollectiveTimeout naming rank 1 and the phase, and the job ends long before the hang would."""
    import subprocess
    import time
    from pathlib import Path

    from soak import torchrun_command

    here = Path(__file__).resolve().parent
    t0 = time.monotonic()
    out = subprocess.run(torchrun_command(str(here / "torchrun_hang.py"), str(here)),
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MMR1_COLLECTIVE_TIMEOUT_S": "3", "OMP_NUM_THREADS": "1"})
    took = time.monotonic() - t0
    assert out.returncode != 0 and "not reached" not in out.stdout
    assert "CollectiveTimeout: rank 0 waited 3 s for the others after step 0's rollouts and rewards" in out.stderr, \
        out.stderr[-3000:]
    assert "Ranks 1 failed to pass monitoredBarrier" in out.stderr and took < 100, (took, out.stderr[-2000:])


@pytest.mark.parametrize("kind", ["distcp", ".metadata", "meta.json", "rng-rank0.pt"])
def test_a_corrupt_checkpoint_is_named_and_a_resume_falls_back_to_the_newest_that_verifies(kind, tmp_path):
    """Every checkpoint file has a SHA-256 in manifest.json. A flipped bit (first, middle or last byte), a truncated
    or a missing file in the newest checkpoint: loading that step is a CorruptCheckpoint naming the file; resuming
    from the root warns and takes the newest checkpoint that verifies; export refuses it; a checkpoint without a
    manifest (written before checksums) still loads, with a warning."""
    import shutil

    from mmr1.sharded_checkpoint import CorruptCheckpoint, verify_checkpoint

    tr = GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg())
    root = tmp_path / "ckpt"
    tr.step()
    tr.save(root)
    tr.step()
    tr.save(root)
    assert verify_checkpoint(root / "step-00000002") and verify_checkpoint(root / "step-00000001")
    files = sorted((root / "step-00000002").rglob("*"))
    target = next(f for f in files if f.is_file() and (f.name == kind or f.suffix == "." + kind))
    name = str(target.relative_to(root / "step-00000002"))
    size = target.stat().st_size

    def flip(at):
        def corrupt(f):
            data = bytearray(f.read_bytes())
            data[at(len(data))] ^= 0x10
            f.write_bytes(bytes(data))
        return corrupt

    corruptions = {"first byte": flip(lambda n: 0), "middle byte": flip(lambda n: n // 2),
                   "last byte": flip(lambda n: n - 1), "truncated": lambda f: f.write_bytes(f.read_bytes()[:size // 2]),
                   "missing": lambda f: f.unlink()}
    for what, corrupt in corruptions.items():
        copy = tmp_path / what.replace(" ", "_")
        shutil.copytree(root, copy)
        corrupt(copy / "step-00000002" / name)
        with pytest.raises(CorruptCheckpoint, match=re.escape(name)):
            tr.load(copy / "step-00000002")
        fresh = GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg())
        with pytest.warns(UserWarning, match="did not verify, resuming from .*step-00000001"):
            fresh.load(copy)
        assert fresh.step_idx == 1, what
        with pytest.raises(CorruptCheckpoint, match=re.escape(name)):
            export_consolidated(copy / "step-00000002", tmp_path / f"export-{what.replace(' ', '_')}")
    (root / "step-00000002" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="has no manifest.json .* unverified"):
        tr.load(root)
    assert tr.step_idx == 2


@pytest.mark.parametrize("phase", ["shards", "publish"])
def test_a_write_error_during_a_save_leaves_the_previous_checkpoint_loadable(phase, tmp_path, monkeypatch):
    """Disk full while the shards are written, or a permission error while the checkpoint is published: a
    CheckpointWriteError naming the rank and the cause, the partial directory removed, ``latest`` unchanged and
    loadable."""
    import errno

    import mmr1.sharded_checkpoint as sc

    tr = GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg())
    root = tmp_path / "ckpt"
    tr.step()
    tr.save(root)
    tr.step()

    def fail(*a, **k):
        raise (OSError(errno.ENOSPC, "No space left on device") if phase == "shards"
               else PermissionError(errno.EACCES, "Permission denied"))
    monkeypatch.setattr(sc, "_rng_state" if phase == "shards" else "_write_manifest", fail)
    with pytest.raises(sc.CheckpointWriteError, match="rank 0: (OSError|PermissionError).*(No space|Permission)"):
        tr.save(root)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    fresh = GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg())
    fresh.load(root)
    assert fresh.step_idx == 1
