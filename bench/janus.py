"""Benchmark: Janus-Pro image-token rollouts -- mmr1's engine vs transformers' own JanusForConditionalGeneration.generate.

    python -m bench.janus [--layers 2] [--repeats 1] [--shape both|t2i|mmr1] [--skip-update] [--quick]

The same random weights in both (mmr1.janus.from_transformers shares them): Janus-Pro-1B's width (d 2048, 16 heads,
MLP 5632, text vocab 102,400, 16,384 codes, head 2048) with fewer layers so that a CPU run takes minutes; one prompt
x G = 8 samples with CFG 5 (16 rows), 576 image tokens (384 px). Both decode greedily here, so the tokens must be
equal (checked before any time is reported); sampling would add transformers' softmax + multinomial per step.

Two GRPO shapes:
- T2I-R1's: a short text prompt (32 tokens);
- MM-R1's: a reference image in the prompt (576 understanding tokens) + text -- 608 prompt tokens. The prompt is
  stand-in text ids of that length: what the rollout's cost depends on is the prompt's length, and the
  understanding tower runs once per prompt in either engine.

transformers: a static cache of 2 x G rows, each holding its own copy of the prompt (the unconditional rows: BOS
and pads), a Python loop over the 576 tokens, full attention over each row's cache, the CFG logits processor.
mmr1: generate_images -- the prompt stored once for its G rows and the unconditional context (BOS + pads) once for
all of them (the shared-prefix cache), per-row lengths, guidance in the head's features, the fused sampler.
KV cache bytes: ours measured (the cache the decoder held), transformers' computed from its static cache's shape.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import List

import torch

from mmr1.generate import CachedDecoder, SamplingConfig, generate_images
from mmr1.janus import from_transformers

from .common import DEVICE, Row, ensure_bench_env, format_table, machine_info, save_rows, summarize

BOI, EOI, PAD = 100016, 100593, 100002


def hf_janus_pro(layers: int, hidden: int = 2048, dtype=torch.float32):
    """transformers' Janus at Janus-Pro-1B's width with ``layers`` layers (a small VQ and vision tower: unused)."""
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=102400, hidden_size=hidden, intermediate_size=5632 * hidden // 2048,
                       num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                       max_position_embeddings=16384, rms_norm_eps=1e-6, pad_token_id=PAD, bos_token_id=100000,
                       eos_token_id=100001, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=hidden,
                               num_image_tokens=576)
    vq = JanusVQVAEConfig(base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, latent_channels=32,
                          projection_dim=hidden, image_token_embed_dim=hidden)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                                      image_token_id=100581, tie_word_embeddings=False))
    with torch.no_grad():  # weights that make the argmax decisive (transformers' init is std 0.02)
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() > 1:
                p.normal_(0.0, 0.05)
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = PAD, 100000
    return model.eval().to(DEVICE, dtype)


def bench_update(ours, G: int, side: int, plen: int, repeats: int) -> List[Row]:
    """One GRPO update (forward + loss + backward) over G sequences of a plen-token prompt and a side x side image:
    mmr1's trainer (the image codes' loss through fused_linear_grpo_loss over the generation head: no [N, 16384]
    logits) vs what a T2I-R1-style loop writes (the generation head's full fp32 logits at the image positions,
    log_softmax, gather, the same clipped loss). The same backbone forward and backward in both; time and the peak
    memory one update adds."""
    from mmr1.grpo import GRPOConfig, GRPOTrainer
    from mmr1.model import teacher_forced_hidden
    from mmr1.rewards import RewardSet
    from mmr1.rollout import Rollout, XCoTFormat

    from .common import peak_extra_mib

    vocab = ours.image_vocab()
    L = vocab.block_length(side, side)
    gen = torch.Generator().manual_seed(2)
    prompt = [100000] + torch.randint(100, 90000, (plen - 1,), generator=gen).tolist()
    lo, hi = vocab.window
    rows = []
    for _ in range(G):  # a rollout's shape: prompt | boi, codes, eoi | end of turn (the codes drawn at random)
        block = [BOI] + torch.randint(lo, hi, (L - 2,), generator=gen).tolist() + [EOI]
        rows.append(prompt + block + [100001])
    tokens = torch.tensor(rows, device=DEVICE)
    T = tokens.shape[1]
    img = torch.zeros(G, T, dtype=torch.bool)
    img[:, plen + 1:plen + L - 1] = True
    ro = Rollout(tokens=tokens, lengths=torch.full((G,), T), prompt_lengths=torch.full((G,), plen), chosen=img.clone(),
                 logprobs=torch.zeros(G, T), image_positions=img, subject_codes=None,
                 final_codes=torch.zeros(G, side, side, dtype=torch.long),
                 image_blocks=torch.tensor([[[plen, L]]] * G))
    fmt = XCoTFormat(think_open=0, think_close=0, end_of_turn=100001, subject_hw=(side, side), final_hw=(side, side),
                     text_range=(3, ours.text_vocab), reasoning=False, subject_image=False)
    cfg = GRPOConfig(group_size=G, prompts_per_step=1, beta=0.0, sampling=SamplingConfig(cfg_scale=5.0),
                     update_prefix="per_row")
    tr = GRPOTrainer(ours, vocab, fmt, RewardSet({"none": lambda r, b: (torch.zeros(r.num_samples), {})}, {}),
                     [{"prompt_ids": prompt}], cfg)
    adv = torch.linspace(-1, 1, G, device=DEVICE)
    targets, mask = tokens[:, 1:], img[:, 1:].to(DEVICE)
    ours.train()

    def fused():
        loss, _ = tr.loss(ro, adv, None, None)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def eager():  # T2I-R1's: the generation head's logits at the image positions, log_softmax, gather
        h = teacher_forced_hidden(ours, tokens, ro.lengths.to(DEVICE))
        logits = ours.gen_head(h[mask]).float()  # [n_image_tokens, 16384]
        logp = torch.log_softmax(logits, -1).gather(-1, (targets[mask] - lo)[:, None])[:, 0]
        ratio = torch.exp(logp - logp.detach())
        a = adv[:, None].expand_as(mask)[mask]
        loss = -torch.min(ratio * a, ratio.clamp(0.8, 1.28) * a).mean()
        loss.backward()
        ours.zero_grad(set_to_none=True)

    times = {"mmr1 trainer (fused loss over the generation head)": [], "T2I-R1-style (full fp32 code logits)": []}
    for i in range(repeats + 1):  # the first round warms up
        for name, fn in zip(times, (fused, eager)):
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    peaks = {name: peak_extra_mib(fn) for name, fn in zip(times, (fused, eager))}
    ours.eval()
    n = int(mask.sum())
    return summarize("Janus-Pro GRPO update (fwd + loss + bwd)", f"G={G}, {plen}-token prompt, {n} image tokens",
                     times, next(iter(times)), peaks, None,
                     {k: f"{G * T / statistics.median(v):.0f} train tok/s" for k, v in times.items()})


def main(argv=None) -> List[Row]:
    if argv is None:
        ensure_bench_env("bench.janus")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--shape", choices=["both", "t2i", "mmr1"], default="both", help="which prompt shape(s)")
    ap.add_argument("--skip-update", action="store_true", help="rollouts only (no GRPO update comparison)")
    ap.add_argument("--quick", action="store_true", help="d 512, 64 image tokens: that it runs (figures mean little)")
    ap.add_argument("--smoke", action="store_true", help="d 64, 16 image tokens, G = 2: that the suite runs end to "
                    "end (the GPU check's dry run); its figures mean nothing")
    args = ap.parse_args(argv)
    args.quick |= args.smoke
    if args.smoke:
        args.group = 2
    hidden = 64 if args.smoke else 512 if args.quick else 2048
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    hf = hf_janus_pro(args.layers, hidden, dtype)
    if args.quick:
        hf.model.vision_model.config.num_image_tokens = 16 if args.smoke else 64
    ours = from_transformers(hf, BOI, EOI).to(DEVICE)
    side = int(hf.model.vision_model.config.num_image_tokens ** 0.5)
    G, g = args.group, 5.0
    meta = {**machine_info(), "model": f"Janus-Pro-1B width d{hidden}, {args.layers} layers, "
                                       f"{str(dtype).replace('torch.', '')}", "image": f"{side}x{side} codes",
            "G": G, "cfg": g}
    print("machine:", meta)
    rows: List[Row] = []
    gen = torch.Generator().manual_seed(1)
    shapes = {"t2i": ("T2I-R1 (32-token text prompt)", 32), "mmr1": ("MM-R1 (576 image + 32 text prompt tokens)", 608)}
    for key, (shape, plen) in shapes.items():
        if args.shape not in ("both", key):
            continue
        prompt = [100000] + torch.randint(100, 90000, (plen - 1,), generator=gen).tolist()
        ids = torch.tensor([prompt + [BOI]] * G, device=DEVICE)  # G rows (greedy refuses num_return_sequences)
        kv = {}
        real_close = CachedDecoder.close

        def close(self):
            kv["ours"] = self.cache_bytes()
            real_close(self)

        def run_ours():
            CachedDecoder.close = close
            try:
                return generate_images(ours, [prompt], ours.image_vocab(), (side, side), num_samples=G,
                                       scfg=SamplingConfig(cfg_scale=g, temperature=0.0)).codes.reshape(G, -1)
            finally:
                CachedDecoder.close = real_close

        def run_hf():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False,
                               guidance_scale=g)

        with torch.no_grad():
            a, b = run_ours(), run_hf()
        if not torch.equal(a.cpu(), b.cpu()):
            raise AssertionError(f"{shape}: mmr1 and transformers drew different greedy tokens "
                                 f"({int((a.cpu() != b.cpu()).sum())} of {a.numel()})")
        times = {"mmr1 (shared-prefix cache, fused sampler)": [], "transformers JanusForConditionalGeneration."
                 "generate": []}
        for _ in range(args.repeats):
            for name, fn in zip(times, (run_ours, run_hf)):
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn()
                times[name].append(time.perf_counter() - t0)
        cfg = hf.config.text_config
        L = max(hf.generation_config.max_length or 0, side * side + plen + 1)
        kv["hf"] = 2 * cfg.num_hidden_layers * 2 * G * L * cfg.num_key_value_heads * (
            cfg.hidden_size // cfg.num_attention_heads) * torch.finfo(dtype).bits // 8
        toks = G * side * side
        notes, ours_name = {}, next(iter(times))
        for name, t in times.items():
            med = sorted(t)[len(t) // 2]
            kb = kv["ours"] if name == ours_name else kv["hf"]
            notes[name] = f"{toks / med:.0f} image tok/s, KV cache {kb / 2**20:.0f} MiB, same greedy tokens"
        rr = summarize("Janus-Pro image-token rollout (CFG 5, G=8, greedy)", shape, times, ours_name, notes=notes)
        for r in rr:
            r.extra = {"image_tokens_per_s": toks / (r.median_ms / 1e3),
                       "kv_cache_mib": (kv["ours"] if r.provider == ours_name else kv["hf"]) / 2**20}
        rows += rr
        print(format_table(rr), flush=True)
    if not args.skip_update:
        upd = bench_update(ours, G, side, 32, args.repeats)
        print(format_table(upd), flush=True)
        rows += upd
    # the default run writes results/janus.json (BENCHMARKS.md's section); other settings a file of their own
    variant = "".join([f"_layers{args.layers}" if args.layers != 2 else "", f"_{args.shape}" if args.shape != "both"
                       else "", "_rollouts" if args.skip_update else ""])
    path = save_rows("janus" + ("_quick" if args.quick else variant), rows, meta)
    print(format_table(rows))
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
