"""Janus-Pro on mmr1's engine (mmr1/janus.py), checked against transformers' JanusForConditionalGeneration at random
weights of a small configuration with the real structure (GQA, odd sizes, a 2-layer generation aligner, the
Linear -> GELU -> Linear image head): both checkpoint layouts load, text and image-code logits agree to fp32
rounding, greedy CFG image generation draws transformers' tokens one for one, seeded sampling follows its
probabilities, and GRPO trains the generation head through the fused kernels."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from mmr1.generate import SamplingConfig, generate_images
from mmr1.janus import Janus, JanusConfig, load_janus, save_janus
from mmr1.model import ModelConfig, init_weights

V_TEXT, CODES, BOI, EOI, PAD = 97, 300, 95, 94, 0
SIDE = 4  # 64 px / 16 px patches: 4 x 4 = 16 codes per image


def hf_janus(seed: int = 0):
    """A small transformers Janus with the real structure and weights large enough that argmaxes are clear."""
    from transformers import JanusConfig as HFJanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=V_TEXT, hidden_size=48, intermediate_size=83, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                       rope_theta=10000.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=SIDE * 16,
                               patch_size=16, projection_dim=48, depth=2, num_image_tokens=SIDE * SIDE, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=CODES, base_channels=32, channel_multiplier=[1, 1],
                          num_res_blocks=1, latent_channels=32, projection_dim=48, image_token_embed_dim=48,
                          num_hidden_layers=2)
    cfg = HFJanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=96,
                        tie_word_embeddings=False)
    model = JanusForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = PAD, 1
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, its save_pretrained directory, ours loaded from it)."""
    hf = hf_janus()
    path = tmp_path_factory.mktemp("janus_hf")
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["boi_token_id"], cfg["eoi_token_id"] = BOI, EOI  # the ids the processor's tokenizer would name
    (path / "config.json").write_text(json.dumps(cfg))
    return hf, path, load_janus(path)


def prompts(n=2, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 90, (length - 1,), generator=g).tolist() for _ in range(n)]


def test_text_and_image_code_logits_equal_transformers(pair):
    from mmr1.janus import from_transformers

    hf, _, ours = pair
    converted = from_transformers(hf, BOI, EOI)  # in memory: the same weights as the saved-and-loaded copy
    assert converted.janus == ours.janus
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in converted.state_dict().items())
    assert ours.janus.num_codes == CODES and ours.config.num_kv_heads == 2 and not ours.config.qk_norm
    ids = torch.tensor(prompts(3, 9))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours.logits(ours(ids))[..., :V_TEXT]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # a prompt, then image codes fed through the generation embedding + aligner; the generation head's logits
    codes = torch.randint(0, CODES, (3, 5))
    with torch.no_grad():
        emb = torch.cat([hf.get_input_embeddings()(ids), hf.prepare_embeddings_for_image_generation(codes)], 1)
        hidden = hf.model.language_model(inputs_embeds=emb).last_hidden_state
        want = hf.model.generation_head(hidden)
        mine = ours.logits(ours(torch.cat([ids, codes + V_TEXT], 1)))
    torch.testing.assert_close(mine[..., V_TEXT:], want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(mine[..., :V_TEXT], hf.lm_head(hidden), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("attention,decode", [("shared_prefix", "sequential"), ("sdpa", "sequential"),
                                              ("shared_prefix", "jacobi")])
def test_greedy_cfg_generation_draws_transformers_tokens(pair, attention, decode):
    """generate(generation_mode="image", do_sample=False, guidance_scale=g): the same 16 codes per image, with the
    unconditional rows (BOS + pads) stored once for both prompts in the shared-prefix cache."""
    hf, _, ours = pair
    ps = prompts(2, 7)
    with torch.no_grad():
        ids = torch.tensor([p + [BOI] for p in ps])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False,
                           guidance_scale=3.0)
    vocab = ours.image_vocab()
    got = generate_images(ours, ps, vocab, (SIDE, SIDE), scfg=SamplingConfig(
        cfg_scale=3.0, temperature=0.0, attention=attention, decode=decode, jacobi_window=4))
    assert torch.equal(got.codes.reshape(2, -1), want), (got.codes.reshape(2, -1), want)
    assert got.tokens[:, 0].eq(BOI).all() and got.tokens[:, -1].eq(EOI).all()


def test_seeded_sampling_follows_transformers_probabilities(pair):
    """Chi-square: the first code of 2000 samples (CFG 2, temperature 1) against the guided softmax transformers'
    forward gives at that position (its logits processor's formula on the generation head)."""
    from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

    hf, _, ours = pair
    p = prompts(1, 7)[0]
    uncond = [1] + [PAD] * (len(p) - 1) + [BOI]
    with torch.no_grad():
        h = hf.model.language_model(input_ids=torch.tensor([p + [BOI], uncond])).last_hidden_state[:, -1]
        scores = ClassifierFreeGuidanceLogitsProcessor(2.0)(torch.zeros(1, 1), hf.model.generation_head(h))
    probs = torch.softmax(scores[0].double(), -1)
    n = 2000
    got = generate_images(ours, [p], ours.image_vocab(), (1, 1), num_samples=n,
                          scfg=SamplingConfig(cfg_scale=2.0, seed=7)).codes.reshape(-1)
    counts = torch.bincount(got, minlength=CODES).double()
    expected = probs * n
    big = expected >= 5  # pool the rare codes into one cell
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = int(big.sum())
    # p < 1e-4 would fail: the chi-square 1e-4 quantile ~ dof + 3.72 sqrt(2 dof) + 8 (Wilson-Hilferty, loose)
    assert chi2 < dof + 3.72 * math.sqrt(2 * dof) + 8, (chi2, dof)


# transformers' names -> DeepSeek's MultiModalityCausalLM names (the SigLIP tower: timm_siglip; the VQ: LlamaGen's)
_TO_DEEPSEEK = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.generation_embeddings.", "gen_embed."),
                ("model.generation_aligner.fc1.", "gen_aligner.layers.0."),
                ("model.generation_aligner.hidden_layers.0.", "gen_aligner.layers.2."),
                ("model.generation_head.proj_out.", "gen_head.output_mlp_projector."),
                ("model.generation_head.vision_head.", "gen_head.vision_head."),
                ("model.aligner.fc1.", "aligner.layers.0."), ("model.aligner.hidden_layers.0.", "aligner.layers.2.")]
_VQ_TO_LLAMAGEN = [("encoder.down.", "encoder.conv_blocks."), ("decoder.up.", "decoder.conv_blocks."),
                   (".block.", ".res."), ("mid.block_1.", "mid.0."), ("mid.attn_1.", "mid.1."),
                   ("mid.block_2.", "mid.2.")]


def save_deepseek_layout(hf, d, boi: int, eoi: int) -> None:
    """A transformers Janus written as DeepSeek's original checkpoint: MultiModalityCausalLM names (SigLIP in timm's,
    the VQ in LlamaGen's) and config.json (model_type "multi_modality"; the small sizes in extra params keys)."""
    from safetensors.torch import save_file

    state = timm_siglip(hf)
    for k, v in hf.state_dict().items():
        if k.startswith("model.vision_model."):
            continue
        if k.startswith("model.vqmodel."):
            k = k[len("model.vqmodel."):]
            for a, b in _VQ_TO_LLAMAGEN:
                k = k.replace(a, b)
            k = "gen_vision_model." + k
        for a, b in _TO_DEEPSEEK:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        state[k] = v.contiguous()
    c, vq, vis = hf.config, hf.config.vq_config, hf.config.vision_config
    state["gen_vision_model.quantize.codebook_used"] = torch.zeros(vq.num_embeddings)  # in DeepSeek's file, unused
    d.mkdir(parents=True, exist_ok=True)
    save_file(state, str(d / "model.safetensors"))
    text = c.text_config.to_dict()
    (d / "config.json").write_text(json.dumps({
        "model_type": "multi_modality", "boi_token_id": boi, "eoi_token_id": eoi,
        "language_config": {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                                 "max_position_embeddings", "pad_token_id", "bos_token_id")},
        "gen_vision_config": {"params": {"image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim,
                                         "base_channels": vq.base_channels, "channel_multiplier": vq.channel_multiplier,
                                         "latent_channels": vq.latent_channels, "num_res_blocks": vq.num_res_blocks,
                                         "num_patches": vq.num_patches}},
        "gen_aligner_config": {"params": {"depth": 2, "input_dim": vq.embed_dim, "n_embed": text["hidden_size"]}},
        "gen_head_config": {"params": {"image_token_embed": vq.image_token_embed_dim,
                                       "image_token_size": vq.num_embeddings, "n_embed": text["hidden_size"]}},
        "vision_config": {"params": {"image_size": vis.image_size, "patch_size": vis.patch_size,
                                     "hidden_size": vis.hidden_size, "num_hidden_layers": vis.num_hidden_layers,
                                     "num_attention_heads": vis.num_attention_heads, "mlp_ratio": vis.mlp_ratio}},
        "aligner_config": {"params": {"depth": vis.depth, "input_dim": vis.hidden_size,
                                      "n_embed": vis.projection_dim}}}))


def test_deepseek_layout_loads_to_the_same_model(pair, tmp_path):
    """DeepSeek's MultiModalityCausalLM names and config.json (model_type "multi_modality") give the same weights."""
    hf, path, ours = pair
    save_deepseek_layout(hf, tmp_path, BOI, EOI)
    from mmr1.janus import load_janus_understanding

    pixels = torch.rand(2, 3, SIDE * 16, SIDE * 16) * 2 - 1
    with torch.no_grad():
        want = hf.model.get_image_features(pixels).pooler_output
    assert torch.equal(load_janus_understanding(tmp_path).features(pixels), want)
    theirs = load_janus(tmp_path)
    mine = ours.state_dict()
    assert set(theirs.state_dict()) == set(mine)
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, mine[k]), k
    # and our own save / load round trip
    save_janus(theirs, tmp_path / "ours")
    again = load_janus(tmp_path / "ours")
    assert all(torch.equal(v, mine[k]) for k, v in again.state_dict().items())


def timm_siglip(hf):
    """transformers' SigLIP weights in DeepSeek's names (timm's VisionTransformer under vision_model.vision_tower.:
    fused qkv, pos_embed [1, N, C], patch_embed.proj, norm) plus an attention-pooling head Janus does not use."""
    out = {}
    pre = "model.vision_model."
    sd = {k[len(pre):]: v for k, v in hf.state_dict().items() if k.startswith(pre)}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        a = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{a}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[f"{a}self_attn.projection_layer.{kind}"]
            for j in (1, 2):
                out[f"blocks.{i}.norm{j}.{kind}"] = sd[f"{a}layer_norm{j}.{kind}"]
            for fc in ("fc1", "fc2"):
                out[f"blocks.{i}.mlp.{fc}.{kind}"] = sd[f"{a}mlp.{fc}.{kind}"]
    out["pos_embed"] = sd["embeddings.position_embedding.weight"][None]
    for kind in ("weight", "bias"):
        out[f"patch_embed.proj.{kind}"] = sd[f"embeddings.patch_embedding.{kind}"]
        out[f"norm.{kind}"] = sd[f"post_layernorm.{kind}"]
    out["attn_pool.latent"] = torch.zeros(1, 1, 32)
    return {"vision_model.vision_tower." + k: v.contiguous() for k, v in out.items()}


IMAGE_PLACEHOLDER, T_IMAGE = 96, SIDE * SIDE  # hf_janus's image_token_id; 64 px / 16 px patches


def test_an_image_in_the_prompt_is_understood_as_transformers_does(pair):
    """Understanding: SigLIP + aligner features equal transformers' get_image_features exactly; a prompt with an
    image (boi, the image's T ids, eoi) gives transformers' logits for the same prompt with T <image_placeholder>
    tokens and pixel_values; the same image gets the same ids, stored once; another image changes the logits."""
    from mmr1.janus import load_janus_understanding

    hf, path, _ = pair
    ours = load_janus(path)  # a fresh model: an empty prompt-image bank
    und = load_janus_understanding(path)
    torch.manual_seed(3)
    pixels = torch.rand(2, 3, SIDE * 16, SIDE * 16) * 2 - 1
    feats = und.features(pixels)
    with torch.no_grad():
        assert torch.equal(feats, hf.model.get_image_features(pixels).pooler_output)
    text = prompts(2, 6)
    hf_ids = torch.tensor([t[:2] + [BOI] + [IMAGE_PLACEHOLDER] * T_IMAGE + [EOI] + t[2:] for t in text])
    image_ids = [ours.prompt_image_ids(f) for f in feats]
    ids = torch.tensor([t[:2] + [BOI] + image_ids[i] + [EOI] + t[2:] for i, t in enumerate(text)])
    with torch.no_grad():
        want = hf(input_ids=hf_ids, pixel_values=pixels).logits
        got = ours.logits(ours(ids))[..., :V_TEXT]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert image_ids[0][0] == V_TEXT + CODES and image_ids[1][0] == V_TEXT + CODES + T_IMAGE
    assert ours.prompt_image_ids(feats[0]) == image_ids[0] and len(ours.prompt_images) == 2 * T_IMAGE
    swapped = torch.tensor([t[:2] + [BOI] + image_ids[1 - i] + [EOI] + t[2:] for i, t in enumerate(text)])
    with torch.no_grad():
        assert (ours.logits(ours(swapped))[:, -1, :V_TEXT] - got[:, -1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"features must be \[T, 48\]"):
        ours.prompt_image_ids(feats)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 64, 64\]"):
        und.features(pixels[:, :, :32])


@pytest.mark.parametrize("attention,decode", [("shared_prefix", "sequential"), ("sdpa", "sequential"),
                                              ("shared_prefix", "jacobi")])
def test_xcot_rollouts_on_janus_read_reference_images(pair, attention, decode):
    """MM-R1's X-CoT on Janus (reasoning text, a subject image, the final image) with a reference image in each
    prompt: greedy tokens of two prompts x 2 samples (shared-prefix or SDPA cache, sequential or Jacobi windows)
    equal each prompt's sequential SDPA rollout alone; the reference matters."""
    from mmr1.janus import load_janus_understanding
    from mmr1.rollout import XCoTFormat, xcot_rollout

    _, path, _ = pair
    ours = load_janus(path)
    und = load_janus_understanding(path)
    torch.manual_seed(4)
    feats = und.features(torch.rand(2, 3, SIDE * 16, SIDE * 16) * 2 - 1)
    refs = [[BOI] + ours.prompt_image_ids(f) + [EOI] for f in feats]
    text = prompts(2, 5, seed=5)
    ps = [t[:1] + refs[i] + t[1:] for i, t in enumerate(text)]
    fmt = XCoTFormat(think_open=90, think_close=91, end_of_turn=2, subject_hw=(SIDE, SIDE), final_hw=(SIDE, SIDE),
                     text_range=(3, 92), max_text_tokens=6)
    scfg = SamplingConfig(cfg_scale=3.0, temperature=0.0, text_temperature=0.0, attention=attention, decode=decode,
                          jacobi_window=4)
    with torch.no_grad():
        both = xcot_rollout(ours, ps, ours.image_vocab(), fmt, scfg, num_samples=2)
        alone = [xcot_rollout(ours, [p], ours.image_vocab(), fmt, replace(scfg, attention="sdpa", decode="sequential"))
                 for p in ps]
        swapped = xcot_rollout(ours, [text[0][:1] + refs[1] + text[0][1:]], ours.image_vocab(), fmt, scfg)
    for i, one in enumerate(alone):
        n = int(one.lengths[0])
        assert torch.equal(both.tokens[2 * i, :n], one.tokens[0, :n]) and int(both.lengths[2 * i]) == n
        assert torch.equal(both.final_codes[2 * i], one.final_codes[0])
    assert not torch.equal(swapped.tokens[0, len(ps[0]):], both.tokens[0, len(ps[0]):int(both.lengths[0])]) or \
        not torch.equal(swapped.final_codes[0], both.final_codes[0])


def test_each_loader_reads_only_its_own_tensors(pair, monkeypatch):
    """The language model, the VQ and the understanding tower load from one directory; each reads only its tensors
    (at 7B, reading the whole checkpoint three times at start-up would be 3 x 14 GB)."""
    import safetensors

    from mmr1.janus import load_janus_understanding, load_janus_vq

    real, read = safetensors.safe_open, []

    class Spy:  # safe_open, recording which tensors are read
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    _, path, _ = pair
    for load, own in ((load_janus_vq, ("model.vqmodel.",)),
                      (load_janus_understanding, ("model.vision_model.", "model.aligner.")),
                      (load_janus, ("model.language_model.", "model.generation_", "lm_head."))):
        read.clear()
        load(path)
        assert read and all(k.startswith(own) for k in read), (load.__name__, sorted(set(read))[:5])


def test_load_errors_name_what_is_wrong(pair, tmp_path):
    _, path, _ = pair
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="not a Janus config: model_type 'qwen2'"):
        load_janus(tmp_path)
    from safetensors.torch import load_file, save_file

    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {}
    for f in path.glob("*.safetensors"):
        state.update({k: v for k, v in load_file(str(f)).items() if not k.startswith("model.generation_head.")})
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no image-generation head"):
        load_janus(tmp_path)


def test_janus_image_vocab_blocks():
    model = Janus(JanusConfig(ModelConfig(vocab_size=V_TEXT, hidden_size=32, intermediate_size=64, num_layers=1,
                                          num_heads=4, num_kv_heads=2, qk_norm=False), num_codes=CODES,
                              code_embed_dim=8, head_dim=24, boi_id=BOI, eoi_id=EOI))
    vocab = model.image_vocab()
    assert vocab.window == (V_TEXT, V_TEXT + CODES) and vocab.block_length(3, 5) == 17 and vocab.row_stride(5) == 5
    codes = torch.randint(0, CODES, (3, 3))
    block = vocab.encode_block(codes)
    assert block[0] == BOI and block[-1] == EOI and block.numel() == 11
    assert torch.equal(vocab.decode_block(block), codes)
    with pytest.raises(ValueError, match="qk_norm=False"):
        Janus(JanusConfig(ModelConfig(vocab_size=V_TEXT, hidden_size=32, intermediate_size=64, num_layers=1,
                                      num_heads=4, num_kv_heads=2)))
    with pytest.raises(ValueError, match="mixes text ids and image codes"):
        model.output_head(torch.zeros(1, 32), (V_TEXT - 1, V_TEXT + 1))


def tiny_janus(seed: int = 0) -> Janus:
    cfg = JanusConfig(ModelConfig(vocab_size=V_TEXT, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                  num_kv_heads=2, max_seq_len=128, qk_norm=False), num_codes=64, code_embed_dim=8,
                      head_dim=24, pad_id=PAD, boi_id=BOI, eoi_id=EOI, image_size=64, patch=16)
    return init_weights(Janus(cfg), seed=seed)


# --------------------------------------------------------------------------- GRPO on Janus

def t2i_format():
    from mmr1.rollout import XCoTFormat

    # text-to-image: prompt | boi, 2 x 2 codes, eoi | end of turn (no reasoning, no subject image)
    return XCoTFormat(think_open=90, think_close=91, end_of_turn=2, subject_hw=(2, 2), final_hw=(2, 2),
                      text_range=(3, V_TEXT), reasoning=False, subject_image=False)


T2I_PROMPTS = [{"prompt_ids": p} for p in prompts(4, 5, seed=3)]


def low_codes(ro, batch):
    """The known answer: the share of the final image's codes below 8 (of 64: chance 1/8)."""
    return (ro.final_codes.reshape(ro.num_samples, -1) < 8).float().mean(1), {}


def janus_trainer(model, **kw):
    from mmr1.grpo import GRPOConfig, GRPOTrainer
    from mmr1.rewards import RewardSet

    parallel = kw.pop("parallel", "none")
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, steps=kw.pop("steps", 4), lr=kw.pop("lr", 1e-2), beta=0.04,
                     seed=3, sampling=SamplingConfig(cfg_scale=2.0, backend=kw.pop("backend", "kernels")), **kw)
    return GRPOTrainer(model, model.image_vocab(), t2i_format(), RewardSet({"codes": low_codes}, {"codes": 1.0}),
                       T2I_PROMPTS, cfg, parallel=parallel)


def test_the_reference_model_reads_the_policys_prompt_images():
    """The KL reference (a deep copy of the policy) shares the prompt-image bank: an image added after the copy
    embeds the same in both."""
    model = tiny_janus(5)
    tr = janus_trainer(model)
    assert tr.ref is not model and tr.ref.prompt_images is model.prompt_images
    ids = model.prompt_image_ids(torch.randn(3, 32))
    tokens = torch.tensor([[1, BOI] + ids + [EOI, 7]])
    with torch.no_grad():
        torch.testing.assert_close(tr.ref(tokens), model(tokens), rtol=0, atol=0)


def test_grpo_loss_through_the_generation_head_equals_the_full_logits_path():
    """The fused path (proj_out + GELU as features, [vision_head | bias] through fused_linear_grpo_loss: no
    [N, 16384] logits) gives the loss and the gradients of the full-logits reference path, bias included."""
    import copy

    from mmr1_kernels import group_advantages

    base = tiny_janus(1)
    runs = {}
    for backend in ("kernels", "reference"):
        model = copy.deepcopy(base)
        tr = janus_trainer(model, backend=backend)
        rnd = tr._round(0, 0)
        adv, _ = group_advantages(rnd.rewards, group_size=4, weights=rnd.weights)
        ref = tr.ref_logprobs(rnd.rollout)
        model.train()
        loss, m = tr.loss(rnd.rollout, adv + 0.5, None, ref)  # + 0.5: a gradient even if a group is constant
        loss.backward()
        runs[backend] = (rnd.rollout.tokens, loss.detach(), m, {n: p.grad.clone() for n, p in model.named_parameters()
                                                                if p.grad is not None})
    (tk, lk, mk, gk), (tr_, lr_, mr, gr) = runs["kernels"], runs["reference"]
    assert torch.equal(tk, tr_) and mk["image/tokens"] == 2 * 4 * 4 > 0
    torch.testing.assert_close(lk, lr_, atol=1e-6, rtol=1e-5)
    assert set(gk) <= set(gr) and "gen_head.vision_head.bias" in gk and "gen_aligner.fc1.weight" in gk
    for name in set(gr) - set(gk):  # the text head: no text token is trained, the full-logits path gives it 0
        assert not gr[name].any(), name
    for name in gk:
        torch.testing.assert_close(gk[name], gr[name], atol=1e-6, rtol=1e-4, msg=name)
    assert gk["gen_head.vision_head.bias"].abs().sum() > 0


@torch.no_grad()
def expected_low_codes(model):
    from mmr1.rollout import xcot_rollout

    model.eval()
    ro = xcot_rollout(model, [p["prompt_ids"] for p in T2I_PROMPTS], model.image_vocab(), t2i_format(),
                      SamplingConfig(cfg_scale=2.0, seed=999), num_samples=16)
    return float(low_codes(ro, None)[0].mean())


@pytest.mark.parametrize("negate", [False, True])
def test_grpo_on_janus_learns_and_negated_advantages_unlearn(negate, monkeypatch):
    """20 GRPO steps on a tiny Janus raise the expected share of low codes (a fixed evaluation rollout, 64
    samples); the same run with the advantages negated lowers it."""
    import mmr1.grpo as grpo_module

    model = tiny_janus(2)
    before = expected_low_codes(model)
    if negate:
        real = grpo_module.K.group_advantages
        monkeypatch.setattr(grpo_module.K, "group_advantages", lambda *a, **k: (lambda r: (-r[0], r[1]))(real(*a, **k)))
    janus_trainer(model, steps=20).train(progress=False)
    after = expected_low_codes(model)
    if negate:
        assert after < before - 0.05, (before, after)
    else:
        assert after > before + 0.5, (before, after)  # measured: 0.11 -> 0.89 (negated: -> 0.02)


# --------------------------------------------------------------------------- the VQ-16 image tokenizer

def test_vq16_loads_from_both_layouts_and_encodes_and_decodes_as_transformers(pair, tmp_path):
    """load_janus_vq on transformers' save_pretrained directory and on DeepSeek's layout (gen_vision_model.* in
    LlamaGen's names) gives transformers' own JanusVQVAE codes and pixels, exactly; shapes and ids are checked."""
    from safetensors.torch import save_file

    from mmr1.janus import load_janus_vq

    hf, path, _ = pair
    vq = hf.model.vqmodel
    size = SIDE * 2 ** (len(hf.config.vq_config.channel_multiplier) - 1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, size, size, generator=g) * 2 - 1
    want = vq.encode(images).image_tokens.view(3, SIDE, SIDE)
    pixels = vq.decode(want.view(3, -1)).clamp(-1, 1)
    assert len(set(want.flatten().tolist())) > 3  # not one code everywhere
    ours = load_janus_vq(path)
    assert torch.equal(ours.encode(images), want)
    assert torch.equal(ours.decode(want), pixels)
    # DeepSeek's names: LlamaGen's VQ-16 under gen_vision_model.
    inverse = [("encoder.down.", "encoder.conv_blocks."), ("decoder.up.", "decoder.conv_blocks."), (".block.", ".res."),
               ("mid.block_1.", "mid.0."), ("mid.attn_1.", "mid.1."), ("mid.block_2.", "mid.2.")]
    state = {}
    for k, v in vq.state_dict().items():
        for a, b in inverse:
            k = k.replace(a, b)
        state["gen_vision_model." + k] = v.contiguous()
    state["gen_vision_model.quantize.codebook_used"] = torch.zeros(CODES)  # in DeepSeek's file, unused
    save_file(state, str(tmp_path / "model.safetensors"))
    c = hf.config.vq_config
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "multi_modality", "vision_config": {"params": {"image_size": SIDE * 16}},
        "gen_vision_config": {"params": {"image_token_size": CODES, "n_embed": c.embed_dim,
                                         "base_channels": c.base_channels, "channel_multiplier": c.channel_multiplier,
                                         "latent_channels": c.latent_channels, "num_res_blocks": c.num_res_blocks}}}))
    theirs = load_janus_vq(tmp_path)
    assert torch.equal(theirs.encode(images), want) and torch.equal(theirs.decode(want), pixels)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 8, 8\]"):
        ours.encode(images[:, :, :4])
    with pytest.raises(ValueError, match=r"codes must be \[B, 4, 4\]"):
        ours.decode(want.view(3, -1))
    with pytest.raises(ValueError, match="codes must lie in 0..299"):
        ours.decode(want + CODES)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chameleon"}))
    with pytest.raises(ValueError, match="has no Janus VQ"):
        load_janus_vq(tmp_path)


def janus_distributed_trainer(parallel: str = "none"):
    """GRPO on a tiny Janus with what a multi-GPU run uses: mu 2, micro-batches of one group, activation
    checkpointing, the guided CFG loss (an unconditional forward in the update), 2 prompts per step."""
    return janus_trainer(tiny_janus(3), mu=2, micro_batch_size=4, activation_checkpointing=True, cfg_loss="guided",
                         parallel=parallel)


@pytest.mark.slow
def test_janus_under_ddp_and_fsdp_equals_one_process(torchrun_scenarios):
    """torchrun --nproc-per-node 2: DDP and FSDP2 (the transformer blocks and the root, the generation path
    included) take the same 2 GRPO steps on Janus as one process -- logged losses and gradient norms, final
    weights."""
    out = torchrun_scenarios("janus")
    # one thread, as each worker runs: with two, the CPU kernels reduce in another order, and after an AdamW step
    # of lr 1e-2 a parameter whose gradient is ~0 can move by ~lr (observed: 9e-4 in the weights, 1e-4 in losses)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = janus_distributed_trainer()
        single.train(2, progress=False)
    finally:
        torch.set_num_threads(threads)
    for parallel in ("ddp", "fsdp"):
        got = torch.load(out / f"{parallel}.pt", weights_only=False)
        assert len(got["history"]) == 2
        for step, (m, s) in enumerate(zip(got["history"], single.history)):
            for key in ("loss", "grad_norm", "image/ratio_mean", "image/kl", "reward/codes"):
                assert m[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), (parallel, step, key)
        for name, p in single.policy.named_parameters():
            torch.testing.assert_close(got["weights"][name], p.detach(), atol=1e-5, rtol=0, msg=f"{parallel} {name}")


def janus_sft_batch():
    """4 SFT sequences for tiny_janus: text, then codes between BOI / EOI, then text; different lengths."""
    lo = tiny_janus(0).text_vocab
    g = torch.Generator().manual_seed(1)
    seqs = [[1, 5 + i] + [7] * i + [BOI] + (lo + torch.randint(0, 64, (3 + i,), generator=g)).tolist() + [EOI, 9, 2]
            for i in range(4)]
    return seqs, [2 + i for i in range(4)]


@pytest.mark.slow
def test_janus_sft_under_ddp_equals_one_process(torchrun_scenarios):
    """torchrun --nproc-per-node 2, DDP: 2 SFT steps on Janus, each rank on half of the batch (of other token
    counts), equal one process's 2 steps on the whole batch -- logged losses, gradient norms, final weights."""
    from mmr1.sft import SFTConfig, SFTTrainer

    got = torch.load(torchrun_scenarios("janus_sft") / "sft.pt", weights_only=False)
    seqs, plens = janus_sft_batch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs (see the GRPO test above)
    try:
        tr = SFTTrainer(tiny_janus(4), SFTConfig(lr=1e-2))
        single = [tr.step(seqs, plens) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for step, (m, s) in enumerate(zip(got["history"], single)):
        for key in ("loss", "grad_norm"):
            assert m[key] == pytest.approx(s[key], rel=1e-5), (step, key)
    for name, p in tr.model.named_parameters():
        torch.testing.assert_close(got["weights"][name], p.detach(), atol=1e-5, rtol=0, msg=name)


def test_sft_on_janus_trains_text_and_codes_under_their_own_heads():
    """sft_loss on Janus: text targets under the text head's softmax, code targets under the generation head's (its
    16,384-way distribution, bias included) -- equal to those log-softmaxes computed by hand in float64, and a few
    SFT steps lower the loss."""
    from mmr1.sft import SFTConfig, SFTTrainer, sft_loss

    model = tiny_janus(4)
    lo = model.text_vocab
    g = torch.Generator().manual_seed(0)
    seqs = [[1, 5, 7, BOI] + (lo + torch.randint(0, 64, (4,), generator=g)).tolist() + [EOI, 9, 2],
            [1, 6, 8, 11, BOI] + (lo + torch.randint(0, 64, (4,), generator=g)).tolist() + [EOI, 3]]
    plens = [3, 2]
    loss, m = sft_loss(model, seqs, plens)
    nll = []
    with torch.no_grad():
        for s, p in zip(seqs, plens):
            h = model(torch.tensor([s]))[0, :-1].double()
            text = (h @ model.lm_head.weight.double().T).log_softmax(-1)
            codes = (model.gen_head.vision_head(torch.nn.functional.gelu(model.gen_head.proj_out(h.float()))).double()
                     ).log_softmax(-1)
            for t in range(p - 1, len(s) - 1):
                y = s[t + 1]
                nll.append(-(codes[t, y - lo] if y >= lo else text[t, y]))
    torch.testing.assert_close(loss.double(), torch.stack(nll).mean(), atol=1e-5, rtol=1e-5)
    assert m["tokens"] == len(nll)
    tr = SFTTrainer(model, SFTConfig(lr=1e-2))
    first = tr.step(seqs, plens)["loss"]
    for _ in range(5):
        last = tr.step(seqs, plens)["loss"]
    assert last < 0.8 * first
