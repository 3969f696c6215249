"""The Chameleon / Lumina model: parity with transformers, checkpoint loading, the static KV cache."""
from __future__ import annotations

import json

import pytest
import torch

from mmr1.model import ModelConfig, Transformer, init_weights, load_transformer, save_transformer
from mmr1.tokens import pad_sequences


def _hf_tiny(tmp_path, swin_norm=False, kv_heads=4):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    cfg = ChameleonConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, swin_norm=swin_norm,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "base_channels": 32,
                   "channel_multiplier": [1, 2], "num_res_blocks": 1, "resolution": 32},
        vocabulary_map={"<image>": 300, **{f"IMGIMG{chr(65 + i)}Z": 4 + i for i in range(10)}},
    )
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random (non-unit) norm parameters so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model, cfg


@pytest.mark.parametrize("swin_norm,kv_heads", [(False, 4), (True, 4), (False, 2)])
def test_parity_with_transformers_chameleon(tmp_path, swin_norm, kv_heads):
    hf, cfg = _hf_tiny(tmp_path, swin_norm, kv_heads)
    ours = load_transformer(tmp_path)
    assert ours.config.num_layers == 2 and ours.config.rope_theta == 5000.0 and ours.config.swin_norm == swin_norm
    tokens = torch.randint(20, 300, (3, 17))
    with torch.no_grad():
        expected = hf.model(input_ids=tokens).last_hidden_state
        got = ours(tokens)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
        hf_logits = hf(input_ids=tokens).logits
        text = torch.ones(cfg.vocab_size, dtype=torch.bool)
        text[4:14] = False  # transformers masks image-token logits to finfo.min
        torch.testing.assert_close(ours.logits(got)[..., text], hf_logits[..., text], atol=2e-5, rtol=2e-5)


def test_lumina_qk_norm_layout_and_sharded_checkpoint(tmp_path):
    from safetensors.torch import save_file

    _hf_tiny(tmp_path / "hf")
    ref = load_transformer(tmp_path / "hf")
    state = ref.state_dict()
    # Lumina: qk-norm params [model_parallel_size=1, head_dim], identical for every head
    for k in list(state):
        if "_norm." in k and "self_attn" in k:
            state[k] = state[k][:1].clone()
    keys = sorted(state)
    half = len(keys) // 2
    out = tmp_path / "lumina"
    out.mkdir()
    save_file({k: state[k].contiguous() for k in keys[:half]}, str(out / "model-00001-of-00002.safetensors"))
    save_file({k: state[k].contiguous() for k in keys[half:]}, str(out / "model-00002-of-00002.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in keys[:half]},
        **{k: "model-00002-of-00002.safetensors" for k in keys[half:]}}}))
    (out / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    lum = load_transformer(out, dtype=torch.bfloat16)
    assert lum.lm_head.weight.dtype == torch.bfloat16
    q = lum.model.layers[0].self_attn.q_norm.weight
    assert q.shape == (4, 16) and torch.equal(q[0], q[3])


def test_load_errors_name_the_problem(tmp_path):
    _hf_tiny(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): \['model.layers.2"):
        load_transformer(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
        load_transformer(tmp_path / "empty")


def test_save_and_reload_roundtrip(tmp_path):
    model = init_weights(Transformer(ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2,
                                                 num_heads=4, num_kv_heads=4, max_seq_len=64)), seed=1)
    save_transformer(model, tmp_path)
    again = load_transformer(tmp_path)
    x = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(again(x), model(x))


def test_kv_cache_decode_matches_full_forward():
    cfg = ModelConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64)
    model = init_weights(Transformer(cfg), seed=3).eval()
    seqs = [torch.randint(0, 200, (n,)).tolist() for n in (5, 9, 1)]
    extra = torch.randint(0, 200, (3, 6))
    with torch.no_grad():
        expected = [model(torch.tensor([s + extra[i].tolist()]))[0] for i, s in enumerate(seqs)]
        model.setup_cache(3, 32)
        tokens, lengths = pad_sequences(seqs)
        h = model(tokens, torch.arange(tokens.shape[1]).expand(3, -1))
        pos = lengths.clone()
        for i, s in enumerate(seqs):
            torch.testing.assert_close(h[i, : len(s)], expected[i][: len(s)], atol=1e-5, rtol=1e-5)
        for t in range(6):  # rows at different positions, one token each, no host sync needed
            h = model(extra[:, t:t + 1], pos[:, None])[:, 0]
            for i, s in enumerate(seqs):
                torch.testing.assert_close(h[i], expected[i][len(s) + t], atol=1e-5, rtol=1e-5)
            pos += 1
        model.clear_cache()


def test_padding_mask_in_uncached_forward():
    model = init_weights(Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
                                                 num_heads=2, num_kv_heads=2, max_seq_len=32)), seed=0).eval()
    a, b = torch.randint(0, 50, (7,)), torch.randint(0, 50, (4,))
    tokens, lengths = pad_sequences([a.tolist(), b.tolist()])
    mask = torch.arange(7)[None] < lengths[:, None]
    with torch.no_grad():
        h = model(tokens, attention_mask=mask)
        torch.testing.assert_close(h[1, :4], model(b[None])[0], atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=3)
