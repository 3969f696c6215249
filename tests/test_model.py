"""The Chameleon / Lumina model: parity with transformers, checkpoint loading, the static KV cache."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

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


# --------------------------------------------------------------------------- shared-prefix training passes

def _grouped_rows(prompt_lens, completion_lens, G, seed=0, vocab=90):
    """Right-padded rows [N, T]: prompt p (of prompt_lens[p] tokens) continued by G completions of the given
    lengths (completion_lens[p][g])."""
    g = torch.Generator().manual_seed(seed)
    rows, plens = [], []
    for p, L in enumerate(prompt_lens):
        prompt = torch.randint(3, vocab, (L,), generator=g).tolist()
        for i in range(G):
            rows.append(prompt + torch.randint(3, vocab, (completion_lens[p][i],), generator=g).tolist())
            plens.append(L)
    tokens, lengths = pad_sequences(rows)
    return tokens, lengths, torch.tensor(plens)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_pass_equals_the_per_row_pass(checkpointing):
    """Each prompt run once for its G completions gives every completion target the hidden state of the whole-row
    pass, and the same gradients, to fp32 rounding: prompts of 1 (the prompt's last hidden state is position 0),
    3 and 6 tokens, completions of 1 to 7 tokens, GQA, blocks recomputed in the backward or not."""
    from mmr1.model import shared_prefix_hidden, split_shared_prefix, teacher_forced_hidden

    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64)
    model = init_weights(Transformer(cfg), std=0.3, seed=3)
    model.activation_checkpointing = checkpointing
    tokens, lengths, plens = _grouped_rows([1, 6, 3], [[4, 1, 7], [2, 5, 5], [7, 7, 3]], G=3)
    split = split_shared_prefix(tokens, lengths, plens)
    assert split.group_size == 3 and split.prefix.tokens.shape == (3, 6) and split.completions.shape == (9, 7)
    assert split.prefix.lengths.tolist() == [1, 6, 3]
    T, d = tokens.shape[1], cfg.hidden_size
    h = shared_prefix_hidden(model, split)  # [N, Tc, d]
    full = teacher_forced_hidden(model, tokens, lengths)  # [N, T-1, d]
    want = full.gather(1, split.index[..., None].expand(-1, -1, d))
    valid = split.valid
    assert int(valid.sum()) == int((lengths - plens).sum())
    # the targets themselves: completion j of a row is its token at prompt_length + j
    assert torch.equal(split.completions[valid], split.gather(tokens[:, 1:])[valid])
    torch.testing.assert_close(h[valid], want[valid], atol=2e-5, rtol=1e-5)
    # gradients of one functional of the completion positions, through both passes
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)) * valid[..., None]
    grads = []
    for out, weight in ((h, w), (full, split.scatter(w, T))):
        model.zero_grad()
        (out * weight).sum().backward(retain_graph=False)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == len(list(model.parameters())) - 1  # all but the head
    for n in grads[0]:
        scale = float(grads[1][n].abs().max())
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5 * scale + 1e-8, rtol=0, msg=n)  # seen: 1.2e-6


def test_split_shared_prefix_finds_only_equal_groups_and_maps_targets_both_ways():
    from mmr1.model import split_shared_prefix

    tokens, lengths, plens = _grouped_rows([2, 4], [[3, 1], [2, 6]], G=2)
    split = split_shared_prefix(tokens, lengths, plens)
    assert split is not None and split.group_size == 2
    # gather then scatter is the identity on the completion targets, 0 on the prompts' and the padding
    x = torch.randn(tokens.shape[0], tokens.shape[1] - 1)
    back = split.scatter(split.gather(x), tokens.shape[1])
    assert torch.equal(split.scatter(split.gather(x[..., None].expand(-1, -1, 3)), tokens.shape[1]),
                       back[..., None].expand(-1, -1, 3))  # trailing dims (hidden states) alike
    target = torch.arange(1, tokens.shape[1])[None]
    completion = (target >= plens[:, None]) & (target < lengths[:, None])
    assert torch.equal(back[completion], x[completion]) and torch.count_nonzero(back[~completion]) == 0
    # a prompt of one token: its target u = 0 is real, and the padding must not overwrite it
    one = split_shared_prefix(*_grouped_rows([1, 1], [[3, 1], [1, 1]], G=2))
    assert torch.equal(one.scatter(torch.ones(4, 3), 4)[:, 0], torch.ones(4))
    # a prompt drawn twice in a row (runs of 4, 2: the groups are of 2) splits into two groups of it
    a, la, pa = _grouped_rows([3], [[2, 1]], G=2, seed=5)
    a = F.pad(a, (0, tokens.shape[1] - a.shape[1]))
    twice = split_shared_prefix(torch.cat([a, a, tokens[:2]]), torch.cat([la, la, lengths[:2]]),
                                torch.cat([pa, pa, plens[:2]]))
    assert twice is not None and twice.group_size == 2 and twice.prefix.lengths.tolist() == [3, 3, 2]
    # not GRPO-shaped: rows of one group differ, unequal groups, groups of 1, a prompt longer than its row
    other = tokens.clone()
    other[1, 1] = (other[1, 1] + 1) % 90 + 3
    assert split_shared_prefix(other, lengths, plens) is None
    t3, l3, p3 = _grouped_rows([2, 4], [[3, 1], [2, 6]], G=2)
    assert split_shared_prefix(t3[:3], l3[:3], p3[:3]) is None
    assert split_shared_prefix(tokens, lengths, plens, min_group=3) is None
    assert split_shared_prefix(tokens, lengths, lengths + 1) is None


def test_shared_prefix_forward_errors():
    from mmr1.model import SharedPrefix

    model = init_weights(Transformer(ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=16, num_layers=1,
                                                 num_heads=2, num_kv_heads=2, max_seq_len=32)), seed=0)
    prompts = SharedPrefix(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"rows \(3\) must be a positive multiple of the shared prompts \(2\)"):
        model(torch.ones(3, 4, dtype=torch.long), shared_prefix=prompts)
    with pytest.raises(ValueError, match="shared_prefix.lengths must have shape"):
        model(torch.ones(4, 4, dtype=torch.long), shared_prefix=SharedPrefix(prompts.tokens, torch.tensor([3])))
    model.setup_cache(4, 8)
    with pytest.raises(ValueError, match="clear the KV cache"):
        model(torch.ones(4, 4, dtype=torch.long), shared_prefix=prompts)
