"""KV-cached CFG generation and X-CoT rollouts on a tiny Lumina-layout model."""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1.generate import CachedDecoder, SamplingConfig, generate_images
from mmr1.model import ModelConfig, Transformer, init_weights
from mmr1.rollout import XCoTFormat, xcot_rollout
from mmr1.tokens import ImageVocab

V = 96
VOCAB = ImageVocab(torch.arange(4, 36), boi=37, eoi=36, newline=38, size_base=40, size_unit=1, vocab_size=V)
FMT = XCoTFormat(think_open=60, think_close=61, end_of_turn=62, subject_hw=(2, 3), final_hw=(3, 3),
                 text_range=(50, V), max_text_tokens=6)


def tiny_model(seed=0):
    cfg = ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=128)
    return init_weights(Transformer(cfg), std=0.3, seed=seed).eval()


PROMPTS = [[1, 70, 71, 72, 62], [1, 80, 62], [1, 90, 91, 92, 93, 94, 62]]


def test_generate_images_structure_and_head_modes_agree():
    model = tiny_model()
    h, w = 3, 4
    kw = dict(cfg_scale=3.0, top_k=10, seed=7)
    a = generate_images(model, [p for p in PROMPTS][:2], VOCAB, (h, w), num_samples=2,
                        scfg=SamplingConfig(head_mode="hidden_cfg", **kw))
    b = generate_images(model, [p for p in PROMPTS][:2], VOCAB, (h, w), num_samples=2,
                        scfg=SamplingConfig(head_mode="logits", **kw))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    for r in range(4):
        assert torch.equal(VOCAB.decode_block(a.tokens[r]), a.codes[r])
    assert a.codes.shape == (4, h, w)
    assert torch.all(a.logprobs[~a.chosen] == 0) and torch.all(a.logprobs[a.chosen] < 0)
    assert not torch.equal(a.codes[0], a.codes[1]), "samples of one prompt must differ (own RNG rows)"


@pytest.mark.parametrize("attention", ["shared_prefix", "sdpa"])
def test_decode_attends_to_the_live_prefix_only_and_matches_a_full_forward(attention, monkeypatch):
    """Hidden states of CachedDecoder steps equal a cache-free causal forward, including rows stepped as a
    sub-range. "sdpa" reads only the first kv_len slots of a 300-slot cache (the bound rounded to 64); "shared_prefix"
    keeps the 70-token prompts in the prefix store, each row's own 230 slots hold only what followed, and every step
    reads exactly the live own slots (lengths = steps so far)."""
    import mmr1.kv_cache as M

    cfg = ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=320)
    model = init_weights(Transformer(cfg), std=0.3, seed=4).eval()
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(4, V, (4, 150), generator=g)
    full = model(seqs)
    dec = CachedDecoder(model, 4, 300, attention=attention, prompt_len=70)
    seen, lengths = [], []
    orig = model.forward
    model.forward = lambda *a, **k: seen.append(k.get("kv_len")) or orig(*a, **k)
    real = M.decode_attention
    monkeypatch.setattr(M, "decode_attention", lambda q, k, v, n, **kw: lengths.append(n.tolist()) or real(q, k, v, n,
                                                                                                          **kw))
    try:
        h0 = dec.prefill(torch.arange(4), [s[:70].tolist() for s in seqs])
        torch.testing.assert_close(h0, full[:, 69], atol=1e-5, rtol=1e-5)
        for t in range(70, 150):
            if t % 2:  # half the steps feed the rows in two contiguous halves
                h = torch.cat([dec.step(seqs[:2, t], torch.arange(2)), dec.step(seqs[2:, t], torch.arange(2, 4))])
            else:
                h = dec.step(seqs[:, t])
            torch.testing.assert_close(h, full[:, t], atol=1e-5, rtol=1e-5)
        cache = model.kv_cache
        if attention == "shared_prefix":  # the prompts once in the store, own slots for the 80 steps (230 allocated)
            assert cache.prefix_k[0].shape[:2] == (4, 70) and cache.k[0].shape[1] == 230
            per_layer = [n for n in lengths[::cfg.num_layers]]
            want = []
            for t in range(80):
                want += [[t, t], [t, t]] if (70 + t) % 2 else [[t] * 4]
            assert per_layer == want
        else:
            assert isinstance(cache, M.SDPACache) and cache.k[0].shape[1] == 300 and not lengths
    finally:
        model.forward = orig
        dec.close()
    if attention == "sdpa":
        assert seen[1] == 128 and max(seen) == 192  # never the whole 300-slot cache
    with pytest.raises(ValueError, match="contiguous range"):
        CachedDecoder(model, 4, 100, attention=attention).step(seqs[:2, 0], torch.tensor([0, 2]))
    if attention == "shared_prefix":  # a row may not write past its own slots: 100 - 60 after a 60-token prompt
        dec = CachedDecoder(model, 2, 100, attention=attention, prompt_len=60)
        dec.prefill(torch.arange(2), [seqs[0, :60].tolist(), seqs[1, :60].tolist()])
        for t in range(40):
            dec.step(seqs[:2, t])
        with pytest.raises(ValueError, match="row 0: position 100 is past its cache"):
            dec.step(seqs[:2, 40])
        dec.close()
    with pytest.raises(ValueError, match="shorter than the decoder's prompt_len"):
        CachedDecoder(model, 2, 100, prompt_len=60).prefill(torch.arange(2), [[1] * 59, [1] * 60])


def test_reference_backend_draws_the_same_rollouts():
    """backend="reference" (full-vocab logits + the sampler's PyTorch spec) is the fused path's baseline: it must
    draw the same tokens with the same log-probs, text and image phases alike."""
    model = tiny_model(3)
    kw = dict(cfg_scale=2.5, top_k=12, top_p=0.9, text_top_k=8, seed=11)
    a = xcot_rollout(model, PROMPTS, VOCAB, FMT, SamplingConfig(**kw), num_samples=2)
    b = xcot_rollout(model, PROMPTS, VOCAB, FMT, SamplingConfig(backend="reference", **kw), num_samples=2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.chosen, b.chosen)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="backend must be"):
        SamplingConfig(backend="cuda")


@pytest.mark.parametrize("decode", ["sequential", "jacobi"])
def test_sampler_logprobs_equal_teacher_forced_logprobs(decode):
    """No CFG, no filtering: the sampler's log-probs are exactly the policy's (what GRPO's ratio assumes) -- for
    Jacobi too: an accepted token's log-prob comes from the forward in which its whole prefix was final."""
    model = tiny_model(1)
    scfg = SamplingConfig(cfg_scale=1.0, temperature=0.8, top_k=0, text_temperature=0.8, text_top_k=0, seed=3,
                          decode=decode, jacobi_window=5)
    ro = xcot_rollout(model, PROMPTS, VOCAB, FMT, scfg, num_samples=2)
    with torch.no_grad():
        mask = torch.arange(ro.tokens.shape[1])[None] < ro.lengths[:, None]
        hidden = model(ro.tokens, attention_mask=mask)
    targets = ro.tokens[:, 1:]
    h = hidden[:, :-1]
    chosen = ro.chosen[:, 1:]
    img = ro.image_positions[:, 1:]
    lp_img = K.fused_linear_logprobs(h, model.lm_head.weight, targets.clamp(*[VOCAB.window[0], VOCAB.window[1] - 1]),
                                     temperature=0.8, vocab_range=VOCAB.window)
    txt_t = targets.clamp(FMT.text_range[0], FMT.text_range[1] - 1)
    lp_txt = K.fused_linear_logprobs(h, model.lm_head.weight, txt_t, temperature=0.8, vocab_range=FMT.text_range)
    recomputed = torch.where(img, lp_img, lp_txt)
    sampler = ro.logprobs[:, 1:]
    assert chosen.sum() > 20
    torch.testing.assert_close(recomputed[chosen], sampler[chosen], atol=2e-5, rtol=2e-5)


def test_xcot_rollout_format_and_masks():
    model = tiny_model(2)
    ro = xcot_rollout(model, PROMPTS, VOCAB, FMT, SamplingConfig(cfg_scale=3.0, top_k=8, text_top_k=5, seed=1),
                      num_samples=2, vq_decode=lambda c: torch.zeros(c.shape[0], 3, 8 * c.shape[1], 8 * c.shape[2]))
    assert ro.num_samples == 6 and ro.subject_codes.shape == (6, 2, 3) and ro.final_codes.shape == (6, 3, 3)
    assert ro.final_images.shape == (6, 3, 24, 24)
    for r in range(6):
        seq = ro.tokens[r, : ro.lengths[r]].tolist()
        p = ro.prompt_lengths[r]
        assert seq[p - 1] == FMT.think_open and seq[-1] == FMT.end_of_turn
        assert FMT.think_close in seq[p:]
        spans = VOCAB.find_blocks(seq[p:])
        assert len(spans) == 2
        assert torch.equal(VOCAB.decode_block(seq[p + spans[0][0]: p + spans[0][1]]), ro.subject_codes[r])
        assert torch.equal(VOCAB.decode_block(seq[p + spans[1][0]: p + spans[1][1]]), ro.final_codes[r])
        chosen = ro.chosen[r, : ro.lengths[r]]
        assert not chosen[:p].any(), "prompt tokens are never policy tokens"
        structure = torch.tensor([t in (VOCAB.boi, VOCAB.eoi, VOCAB.newline, FMT.end_of_turn) or t >= VOCAB.size_base
                                  and t < VOCAB.size_base + 4 for t in seq])
        assert not (chosen & structure).any(), "forced structure tokens are masked"
        n_codes = 2 * 3 + 3 * 3
        assert int(ro.image_positions[r].sum()) == n_codes
        assert torch.all(ro.logprobs[r][ro.chosen[r]] <= 0)


def test_rollout_is_reproducible_and_batch_invariant():
    model = tiny_model(3)
    scfg = SamplingConfig(cfg_scale=2.0, top_k=6, text_top_k=4, seed=11)
    a = xcot_rollout(model, PROMPTS, VOCAB, FMT, scfg, num_samples=1, row_ids=torch.tensor([5, 6, 7]))
    b = xcot_rollout(model, PROMPTS[1:2], VOCAB, FMT, scfg, num_samples=1, row_ids=torch.tensor([6]))
    L = int(b.lengths[0])
    assert torch.equal(a.tokens[1, :L], b.tokens[0, :L])


def test_generation_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompts must not be empty"):
        generate_images(model, [], VOCAB, (2, 2))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_images(model, [[1] * 120], VOCAB, (4, 4))
    with pytest.raises(ValueError, match="head_mode"):
        generate_images(model, [[1]], VOCAB, (2, 2), scfg=SamplingConfig(head_mode="fast"))


# --------------------------------------------------------------------------- Jacobi decoding


@pytest.mark.parametrize("window,draft,head_mode,cfg_scale,backend", [
    (1, "above", "hidden_cfg", 3.0, "kernels"),  # a window of one: the sequential loop, one token per forward
    (2, "above", "hidden_cfg", 3.0, "kernels"),
    (5, "left", "hidden_cfg", 3.0, "kernels"),
    (16, "above", "logits", 2.0, "kernels"),
    (7, "above", "hidden_cfg", 1.0, "kernels"),  # no CFG: one row per sample
    (4, "above", "hidden_cfg", 2.5, "reference"),
])
def test_jacobi_draws_the_sequential_tokens(window, draft, head_mode, cfg_scale, backend):
    """Jacobi decoding is a faster route to the same sample: tokens equal, log-probs equal to fp32 rounding (a
    W-token forward vs a 1-token one), in fewer forwards, with prompts of different lengths in one batch."""
    model = tiny_model(5)
    kw = dict(cfg_scale=cfg_scale, top_k=12, top_p=0.95, seed=21, head_mode=head_mode, backend=backend)
    seq = generate_images(model, PROMPTS, VOCAB, (4, 5), num_samples=2, scfg=SamplingConfig(**kw))
    jac = generate_images(model, PROMPTS, VOCAB, (4, 5), num_samples=2,
                          scfg=SamplingConfig(decode="jacobi", jacobi_window=window, jacobi_draft=draft, **kw))
    assert torch.equal(jac.tokens, seq.tokens)
    torch.testing.assert_close(jac.logprobs, seq.logprobs, atol=2e-5, rtol=2e-5)
    assert torch.equal(jac.chosen, seq.chosen) and torch.equal(jac.codes, seq.codes)
    L = VOCAB.block_length(4, 5)
    assert seq.forwards == L - 1 and 1 <= jac.forwards <= L - 1
    assert jac.forwards == int(jac.row_forwards.max())
    if window == 1:
        assert jac.forwards == L - 1  # log-probs: equal to rounding (another attention length), checked above
    else:  # rows advance independently: some finish before others
        assert int(jac.row_forwards.min()) < jac.forwards, jac.row_forwards


def test_jacobi_xcot_rollout_equals_sequential():
    """Two image blocks on one cache (the subject image, its eoi fed, then the final image): the cache left by
    a Jacobi block must be what the sequential loop leaves, or the final image would differ."""
    model = tiny_model(3)
    kw = dict(cfg_scale=2.5, top_k=12, text_top_k=8, seed=11)
    a = xcot_rollout(model, PROMPTS, VOCAB, FMT, SamplingConfig(**kw), num_samples=2)
    b = xcot_rollout(model, PROMPTS, VOCAB, FMT, SamplingConfig(decode="jacobi", jacobi_window=6, **kw),
                     num_samples=2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.chosen, b.chosen)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.image_positions, b.image_positions)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-5, rtol=2e-5)


def test_jacobi_accepts_whole_windows_when_the_draws_do_not_depend_on_the_prefix():
    """A model whose hidden states are all zero (final norm weight 0) samples from uniform logits: each draw is
    a function of its Philox key alone, so the previous forward's draws are right and windows are accepted in
    bulk -- the acceptance logic, not only the fallback of one token per forward, is exercised."""
    model = tiny_model(1)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    h, w, W = 6, 7, 8
    L = VOCAB.block_length(h, w)
    kw = dict(cfg_scale=2.0, top_k=0, seed=4)
    seq = generate_images(model, PROMPTS[:2], VOCAB, (h, w), scfg=SamplingConfig(**kw))
    jac = generate_images(model, PROMPTS[:2], VOCAB, (h, w),
                          scfg=SamplingConfig(decode="jacobi", jacobi_window=W, **kw))
    assert torch.equal(jac.tokens, seq.tokens)
    # each forward after the first accepts every drawn draft up to the first fresh guess: about W / 2 tokens
    assert jac.forwards <= 2 * L // W + 2, (jac.forwards, L)


def test_jacobi_config_errors():
    with pytest.raises(ValueError, match="decode must be"):
        SamplingConfig(decode="speculative")
    with pytest.raises(ValueError, match="jacobi_window must be an int >= 1"):
        SamplingConfig(decode="jacobi", jacobi_window=0)
    with pytest.raises(ValueError, match="jacobi_draft must be"):
        SamplingConfig(jacobi_draft="random")


def test_shared_prefill_equals_separate_prefills():
    """A prompt's G samples share one prefill: hidden states and positions equal G separate prefills. "sdpa":
    its cache rows are copied G times, every slot equal; "shared_prefix": it is stored once (3 prompts, not 9 rows), its
    rows point at it, and what is stored equals the separate prefills' keys."""
    model = tiny_model(2)
    G = 3
    a = CachedDecoder(model, 9, 40, attention="sdpa")
    ha = a.prefill(torch.arange(9), PROMPTS, repeats=G)
    ka = [k.clone() for k in model.kv_cache.k]
    a.close()
    b = CachedDecoder(model, 9, 40, attention="sdpa")
    hb = b.prefill(torch.arange(9), [p for p in PROMPTS for _ in range(G)])
    kb = [k.clone() for k in model.kv_cache.k]
    torch.testing.assert_close(ha, hb, atol=1e-6, rtol=1e-6)
    assert torch.equal(a.pos, b.pos)
    for r in range(9):
        n = len(PROMPTS[r // G])
        for x, y in zip(ka, kb):
            torch.testing.assert_close(x[r, :n], y[r, :n], atol=1e-6, rtol=1e-6)
    b.close()
    c = CachedDecoder(model, 9, 40, attention="shared_prefix", prompt_len=3)
    hc = c.prefill(torch.arange(9), PROMPTS, repeats=G)
    torch.testing.assert_close(hc, hb, atol=1e-6, rtol=1e-6)
    assert torch.equal(c.pos, b.pos)
    lay = model.kv_cache
    assert lay.prefix_of_row.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert lay.prefix_lengths.tolist() == [len(p) for p in PROMPTS] and lay.offset.tolist() == b.pos.tolist()
    for i, store in enumerate(lay.prefix_k):
        assert store.shape[0] == 3
        for p, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(store[p, :len(prompt)], kb[i][p * G, :len(prompt)], atol=1e-6, rtol=1e-6)
    c.close()
    with pytest.raises(ValueError, match="cannot hold 3 prompts x 2 samples"):
        CachedDecoder(model, 9, 40).prefill(torch.arange(9), PROMPTS, repeats=2)


@pytest.mark.parametrize("decode,window", [("sequential", 8), ("jacobi", 3), ("jacobi", 8)])
@pytest.mark.parametrize("cfg_scale", [2.5, 1.0])
def test_shared_prefix_rollouts_draw_the_prompt_copies_tokens(decode, window, cfg_scale):
    """GRPO-shaped X-CoT rollouts (3 prompts x G = 4, CFG on and off): the shared_prefix layout (one copy of each prompt,
    the unconditional rows reading only their block) draws the tokens of the sdpa layout (prompt copies), with log-probs
    equal to fp32 rounding, and holds the prompts once instead of G times."""
    model = tiny_model(3)
    kw = dict(cfg_scale=cfg_scale, top_k=12, text_top_k=8, seed=11, decode=decode, jacobi_window=window)
    ros, nbytes = {}, {}
    real = CachedDecoder.close
    for att in ("sdpa", "shared_prefix"):
        def close(self, att=att):
            nbytes[att] = self.cache_bytes()
            real(self)
        CachedDecoder.close = close
        try:
            ros[att] = xcot_rollout(model, PROMPTS, VOCAB, FMT, SamplingConfig(attention=att, **kw), num_samples=4)
        finally:
            CachedDecoder.close = real
    a, b = ros["sdpa"], ros["shared_prefix"]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.chosen, b.chosen) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-5, rtol=2e-5)
    assert nbytes["shared_prefix"] < nbytes["sdpa"]


def test_jacobi_first_code_follows_the_kept_softmax():
    """Chi-square: the first code of 1500 Jacobi samples of one prompt (CFG, top-k) vs the guided, filtered
    softmax of the model at that position (computed here from a plain forward)."""
    model = tiny_model(7)
    prompt = PROMPTS[0]
    N = 1500
    scfg = SamplingConfig(cfg_scale=2.0, top_k=10, seed=5, decode="jacobi", jacobi_window=4)
    out = generate_images(model, [prompt], VOCAB, (1, 2), num_samples=N, scfg=scfg)
    first = out.codes[:, 0, 0]
    lo, hi = VOCAB.window
    with torch.no_grad():
        hc = model(torch.tensor([prompt + [VOCAB.boi, VOCAB.size_token(1), VOCAB.size_token(2)]]))[0, -1]
        hu = model(torch.tensor([[VOCAB.boi, VOCAB.size_token(1), VOCAB.size_token(2)]]))[0, -1]
        z = torch.nn.functional.linear(hu + 2.0 * (hc - hu), model.lm_head.weight[lo:hi]).double()
    kth = z.sort(descending=True).values[9]
    p = torch.where(z >= kth, torch.softmax(z, 0), 0.0)
    p = p / p.sum()
    code_of = VOCAB.token_to_code[torch.arange(lo, hi)]
    expected = torch.zeros(VOCAB.num_codes, dtype=torch.float64).index_add_(0, code_of, p) * N
    observed = torch.bincount(first, minlength=VOCAB.num_codes).double()
    assert observed[expected == 0].sum() == 0, "a code outside the top-k set was drawn"
    keep = expected > 0
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4 * (2 * dof) ** 0.5 + 10, (chi2, dof)  # ~4 sigma; a wrong distribution gives hundreds


@pytest.mark.parametrize("model_seed,flat", [(5, False), (1, True)])
def test_jacobi_adaptive_window_draws_the_sequential_tokens(model_seed, flat):
    """Windows sized from the last acceptance (jacobi_adaptive): the same tokens; on a model whose draws do not
    depend on the prefix the window grows and forwards stay few."""
    model = tiny_model(model_seed)
    if flat:
        with torch.no_grad():
            model.model.norm.weight.zero_()
    kw = dict(cfg_scale=2.0, top_k=0 if flat else 12, seed=8)
    seq = generate_images(model, PROMPTS, VOCAB, (6, 7), num_samples=2, scfg=SamplingConfig(**kw))
    jac = generate_images(model, PROMPTS, VOCAB, (6, 7), num_samples=2,
                          scfg=SamplingConfig(decode="jacobi", jacobi_window=16, jacobi_adaptive=True, **kw))
    assert torch.equal(jac.tokens, seq.tokens)
    torch.testing.assert_close(jac.logprobs, seq.logprobs, atol=2e-5, rtol=2e-5)
    L = VOCAB.block_length(6, 7)
    assert jac.forwards <= (L // 4 if flat else L - 1), jac.forwards


@pytest.mark.parametrize("decode", ["sequential", "jacobi"])
def test_cfg_logprobs_follow_the_unconditional_image_only_context(decode):
    """X-CoT with CFG: the sampler's log-prob of every code of both image blocks is the guided softmax computed from
    plain forwards -- conditional over the whole sequence so far, unconditional over the current block alone
    (Lumina-mGPT's unconditional branch), so the final block's unconditional rows must not keep the subject block."""
    model = tiny_model(4)
    s = 2.5
    ro = xcot_rollout(model, PROMPTS[:2], VOCAB, FMT, SamplingConfig(cfg_scale=s, text_top_k=5, seed=9,
                                                                     decode=decode, jacobi_window=4), num_samples=2)
    lo, hi = VOCAB.window
    checked = 0
    for r in range(ro.num_samples):
        seq = ro.tokens[r, :ro.lengths[r]].tolist()
        p = int(ro.prompt_lengths[r])
        for a, _ in VOCAB.find_blocks(seq[p:]):
            start = p + a  # the block's boi
            for t in range(start + 1, start + 8):
                if not ro.chosen[r, t]:
                    continue
                with torch.no_grad():
                    hc = model(torch.tensor([seq[:t]]))[0, -1]
                    hu = model(torch.tensor([seq[start:t]]))[0, -1]
                z = torch.nn.functional.linear(hu + s * (hc - hu), model.lm_head.weight[lo:hi]).double()
                want = torch.log_softmax(z, 0)[seq[t] - lo]
                assert abs(float(ro.logprobs[r, t]) - float(want)) < 1e-4, (r, t)
                checked += 1
    assert checked == 4 * 2 * 4  # 4 rows x 2 blocks x the first 4 codes (size tokens and newlines are forced)
