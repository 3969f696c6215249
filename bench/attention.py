"""Benchmark: attention over a GRPO rollout's KV cache -- mmr1_kernels.decode_attention vs the previous path.

    python -m bench.attention [--quick] [--repeats N]

A GRPO rollout decodes G samples of every prompt with classifier-free guidance: 2 x P x G cache rows. The previous
path (CachedDecoder(attention="sdpa")) copies each prompt into its G rows and runs one masked SDPA in which every
row reads the longest row's context (kv_len); the unconditional rows hold only the image block being drawn but
read as far. decode_attention reads each prompt once per group (a prefix store) and each row only its own live
slots. Four parts, every provider in one process, interleaved, medians:

1. one layer's attention at the demo model's shapes (6 heads of 32) at its GRPO batch (8 prompts, half of them
   two-reference (140 tokens), half one-reference (72), x G = 4, CFG: 64 rows), at three points of the final image
   block, for a decode step (W = 1) and a Jacobi window (W = 8). Providers: decode_attention with the prefix store;
   decode_attention on the copies layout (per-row lengths only: what sharing adds on top); the previous path
   (masked SDPA over kv_len); a math path (matmul + softmax over the same mask); on CUDA also flash-attn's
   flash_attn_with_kvcache (copies, cache_seqlens) and FlashInfer's batch decode when installed. Bytes read per step
   are computed from the layout, and ours is reported as a % of the copy bandwidth measured in the same run.
2. the same for a Lumina-mGPT-7B-shaped layer: 32 heads of 128, bf16, a ~1060-token reference prompt, G = 8, CFG,
   completions ~2200 tokens into the final image; bytes read per step and the KV cache's memory of both layouts at
   G = 8, with the ratio the arithmetic predicts.
3. the demo model's X-CoT rollout at the GRPO batch, sequential and Jacobi (W = 8), previous path vs decode layout:
   wall-clock, attention time per decode step (torch.profiler), the KV cache's bytes; the tokens are checked equal.
4. one GRPO step of the demo's trainer (rollout + rewards + update) with each layout.
5. the GRPO update itself through the shared prefix (GRPOConfig.update_prefix): on one real rollout of the demo
   model at its GRPO batch, the policy's forward + loss + backward and the reference model's forward, each prompt
   run once per group (mmr1_kernels.shared_prefix_attention) vs every sequence whole; train tokens/s (the rows'
   tokens, prompts included, per second, as the trainer logs it), the peak memory one call adds (activations and
   gradients), the same loss checked.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import mmr1_kernels as K

from .common import (DEVICE, Row, copy_bandwidth_gbs, ensure_bench_env, format_table, machine_info, peak_extra_mib,
                     save_rows, summarize, time_providers)

DEMO = dict(heads=6, head_dim=32, prompts=(140, 72, 140, 72, 140, 72, 140, 72), G=4, text=40, block=60)
LUMINA = dict(heads=32, head_dim=128, prompts=(1060,), G=8, block=1060, completion=2200)


def _layouts(prompts, G, own_cond, own_uncond, H, D, dtype, W):
    """Tensors of both layouts for one layer: rows = P*G conditional + P*G unconditional.
    own_cond: each conditional row's slots after its prompt (text + blocks so far); own_uncond: the unconditional
    rows' image-block slots. Returns (ours, copies) dicts and the byte counts each layout reads per step."""
    dev = DEVICE
    P = len(prompts)
    n = P * G
    R = 2 * n
    Sp = max(prompts)
    S_own = own_cond + W
    plen = torch.tensor(prompts, device=dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
    q = rnd(R, W, H, D)
    k, v = rnd(R, S_own, H, D), rnd(R, S_own, H, D)
    pk, pv = rnd(P, Sp, H, D), rnd(P, Sp, H, D)
    lengths = torch.cat([torch.full((n,), own_cond), torch.full((n,), own_uncond)]).to(dev)
    of_row = torch.cat([torch.arange(P).repeat_interleave(G), torch.full((n,), -1)]).to(dev)
    ours = dict(q=q, k=k, v=v, lengths=lengths, prefix_k=pk, prefix_v=pv, prefix_lengths=plen, prefix_of_row=of_row)
    # the previous layout: prompt copies; each row's context from slot 0; kv_len = the longest row, rounded to 64
    ctx = torch.cat([plen.repeat_interleave(G) + own_cond, torch.full((n,), own_uncond, device=dev)])  # before W
    S_full = -(-(int(ctx.max()) + W) // 64) * 64
    kf, vf = torch.zeros(R, S_full, H, D, device=dev, dtype=dtype), torch.zeros(R, S_full, H, D, device=dev, dtype=dtype)
    for r in range(R):  # the same keys and values: [prompt; own slots] for the conditional rows, own for the others
        p, t = (r // G, int(plen[r // G])) if r < n else (0, 0)
        if t:
            kf[r, :t], vf[r, :t] = pk[p, :t], pv[p, :t]
        m = min(S_own, S_full - t)
        kf[r, t:t + m], vf[r, t:t + m] = k[r, :m], v[r, :m]
    copies = dict(q=q, k=kf, v=vf, lengths=ctx)
    elt = torch.tensor([], dtype=dtype).element_size()
    per_key = 2 * H * D * elt  # K and V of one token, one layer
    bytes_ours = per_key * (int(plen.sum()) + n * (own_cond + W) + n * (own_uncond + W))
    bytes_rows = per_key * int((ctx + W).sum())  # per-row lengths on the copies layout
    bytes_prev = per_key * R * S_full  # every row reads kv_len slots
    return ours, copies, dict(ours=bytes_ours, per_row=bytes_rows, previous=bytes_prev), S_full


def _providers(ours, copies, S_full, W):
    q, kf, vf, ctx = copies["q"], copies["k"], copies["v"], copies["lengths"]
    R, _, H, D = q.shape
    pos = ctx[:, None] + torch.arange(W, device=q.device)[None]  # [R, W] positions of the window
    mask = torch.arange(S_full, device=q.device)[None, None, None, :] <= pos[:, None, :, None]
    qs, ks, vs = q.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2)  # (R, H, *, D)
    scale = D ** -0.5

    def math():
        s = (qs @ ks.transpose(-1, -2)).float() * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        return (p.to(vs.dtype) @ vs).transpose(1, 2)

    fns = {
        "mmr1 decode_attention (shared prefix)": lambda: K.decode_attention(
            ours["q"], ours["k"], ours["v"], ours["lengths"], prefix_k=ours["prefix_k"], prefix_v=ours["prefix_v"],
            prefix_lengths=ours["prefix_lengths"], prefix_of_row=ours["prefix_of_row"], check=False),
        "mmr1 decode_attention (copies, per-row lengths)": lambda: K.decode_attention(q, kf, vf, ctx, check=False),
        "previous path: masked SDPA over kv_len": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        .transpose(1, 2),
        "math: matmul + softmax (same mask)": math,
    }
    if q.is_cuda:
        try:
            from flash_attn import flash_attn_with_kvcache

            if q.dtype in (torch.float16, torch.bfloat16):
                seqlens = (ctx + W).to(torch.int32)  # valid keys, the window's included (queries align to the end)
                fns["flash-attn flash_attn_with_kvcache (copies)"] = lambda: flash_attn_with_kvcache(
                    q, kf, vf, cache_seqlens=seqlens, causal=True)
        except ImportError:
            pass
        fns.update(_flashinfer(ours, copies, W))
    return fns


def _flashinfer(ours, copies, W) -> Dict[str, callable]:
    """FlashInfer's paged batch decode over the copies layout (W = 1 only), when installed."""
    if W != 1:
        return {}
    try:
        import flashinfer
    except ImportError:
        return {}
    q, kf, vf, ctx = copies["q"], copies["k"], copies["v"], copies["lengths"]
    R, _, H, D = q.shape
    S = kf.shape[1]
    page = 16
    pages = S // page
    kv = torch.stack([kf, vf], 1).reshape(R, 2, pages, page, H, D).permute(0, 2, 1, 3, 4, 5).reshape(
        R * pages, 2, page, H, D).contiguous()
    seq = (ctx + 1).to(torch.int32)
    used = (seq + page - 1) // page
    indptr = torch.zeros(R + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = torch.cumsum(used, 0)
    indices = torch.cat([torch.arange(r * pages, r * pages + int(u), device=q.device, dtype=torch.int32)
                         for r, u in enumerate(used.tolist())])
    last = (seq - (used - 1) * page).to(torch.int32)
    ws = torch.empty(128 * 2**20, dtype=torch.uint8, device=q.device)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(indptr, indices, last, H, H, D, page, q_data_type=q.dtype)
    q1 = q[:, 0].contiguous()
    return {"FlashInfer batch decode (paged copies)": lambda: w.run(q1, kv)}


def bench_layer(name: str, prompts, G, own_cond, own_uncond, H, D, dtype, W, repeats, bw) -> List[Row]:
    ours, copies, nbytes, S_full = _layouts(prompts, G, own_cond, own_uncond, H, D, dtype, W)
    fns = _providers(ours, copies, S_full, W)
    ref = fns["math: matmul + softmax (same mask)"]().float()
    for prov, fn in fns.items():  # every provider computes the same attention (a benchmark of a wrong answer is void)
        err = (fn().float() - ref).abs().max().item()
        tol = (1e-5 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
        if not err <= tol:
            raise AssertionError(f"{name}: {prov} differs from the math path by {err} (> {tol})")
    times = time_providers(fns, repeats)
    floor = nbytes["ours"] / (bw * 1e9)
    case = (f"{name}, W={W}, {len(prompts)} prompts x G={G}, CFG ({2 * len(prompts) * G} rows), own {own_cond}"
            f"/{own_uncond} slots, {str(dtype).replace('torch.', '')}")
    notes = {
        "mmr1 decode_attention (shared prefix)": f"reads {nbytes['ours'] / 2**20:.1f} MiB",
        "mmr1 decode_attention (copies, per-row lengths)": f"reads {nbytes['per_row'] / 2**20:.1f} MiB",
        "previous path: masked SDPA over kv_len": f"reads {nbytes['previous'] / 2**20:.1f} MiB (kv_len {S_full})",
    }
    rows = summarize("decode attention, one layer", case, times, "mmr1 decode_attention (shared prefix)",
                     floor_s=floor, notes=notes)
    for r in rows:
        r.extra = {"bytes_ours": nbytes["ours"], "bytes_previous": nbytes["previous"],
                   "bytes_per_row": nbytes["per_row"], "copy_gbs": bw, "W": W}
        if r.provider != "mmr1 decode_attention (shared prefix)":
            r.floor_pct = float("nan")
    return rows


def lumina_memory(G: int = 8, prompts: int = 2) -> Dict[str, float]:
    """KV cache bytes of one 7B rollout batch (32 layers, 32 heads of 128, bf16): previous layout vs decode."""
    per_token = 32 * 2 * 32 * 128 * 2
    P, Tp, C, blk = prompts, LUMINA["prompts"][0], LUMINA["completion"], LUMINA["block"]
    prev = 2 * P * G * (Tp + C) * per_token
    ours = (P * Tp + P * G * C + P * G * C) * per_token  # own slots are allocated alike for both halves of the rows
    ours_tight = (P * Tp + P * G * C + P * G * blk) * per_token  # if the unconditional rows had a cache of their own
    return {"per_token_kib": per_token / 1024, "previous_gb": prev / 1e9, "decode_gb": ours / 1e9,
            "decode_uncond_tight_gb": ours_tight / 1e9}


# --------------------------------------------------------------------------- end to end on the demo model

def _demo_parts():
    from mmr1.model import load_transformer
    from mmr1.world import load_world
    from mmr1.world.demo import DemoConfig, shipped_cold_start
    from mmr1.world.tasks import make_prompts, split_subjects, xcot_format

    root = shipped_cold_start(DemoConfig())
    if root is None:
        raise SystemExit("error: mmr1/assets/demo is missing or stale (make cold-start)")
    world, model = load_world(root / "world"), load_transformer(root / "cold_start").to(DEVICE)
    train, _ = split_subjects(0, DemoConfig.held_out_frac)
    prompts = [p["prompt_ids"] for p in make_prompts(world, train, 8, seed=3, pair_frac=0.5)]
    return world, model, prompts, xcot_format(world)


def bench_rollout(repeats: int) -> List[Row]:
    from torch.profiler import ProfilerActivity, profile

    from mmr1.generate import CachedDecoder, SamplingConfig
    from mmr1.rollout import xcot_rollout

    world, model, prompts, fmt = _demo_parts()
    rows = []
    for decode in ("sequential", "jacobi"):
        runs, cache, attn = {}, {}, {}
        for att in ("sdpa", "shared_prefix"):
            scfg = SamplingConfig(cfg_scale=2.0, top_k=0, text_top_k=0, seed=5, decode=decode, jacobi_window=8,
                                  attention=att)
            runs[att] = (lambda s=scfg: xcot_rollout(model, prompts, world.image, fmt, s, num_samples=4))
            real = CachedDecoder.close

            def close(self, att=att):
                cache[att] = self.cache_bytes()
                real(self)
            CachedDecoder.close = close
            try:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    runs[att]()
            finally:
                CachedDecoder.close = real
            ev = [e for e in prof.key_averages() if e.key in ("mmr1::decode_attention",
                                                             "aten::_scaled_dot_product_flash_attention_for_cpu",
                                                             "aten::_scaled_dot_product_efficient_attention",
                                                             "aten::_scaled_dot_product_flash_attention")]
            attn[att] = (sum(e.self_cpu_time_total for e in ev) / 1e3, sum(e.count for e in ev))
        a, b = runs["sdpa"](), runs["shared_prefix"]()
        if not torch.equal(a.tokens, b.tokens):
            raise AssertionError(f"{decode}: the shared_prefix layout drew other tokens than SDPA over prompt copies")
        times = time_providers({"SDPA over prompt copies": runs["sdpa"],
                                "mmr1 shared_prefix layout (decode_attention)": runs["shared_prefix"]}, repeats)
        case = f"demo model, X-CoT rollout, 8 prompts x G=4, CFG 2, {decode}" + (" W=8" if decode == "jacobi" else "")
        rr = summarize("X-CoT rollout end to end", case, times, "mmr1 shared_prefix layout (decode_attention)")
        for r in rr:
            att = "sdpa" if r.provider.startswith("SDPA") else "shared_prefix"
            ms, calls = attn[att]
            r.extra = {"attention_ms_per_call": ms / max(calls, 1), "attention_ms_total": ms, "attention_calls": calls,
                       "kv_cache_mib": cache[att] / 2**20, "same_tokens": 1.0}
            r.note = (f"attention {ms / max(calls, 1):.2f} ms/layer-step ({ms:.0f} ms of the rollout, profiler); "
                      f"KV cache {cache[att] / 2**20:.1f} MiB")
        rows += rr
    return rows


def bench_grpo_step(repeats: int) -> List[Row]:
    from dataclasses import replace

    from mmr1.grpo import GRPOTrainer
    from mmr1.world.demo import DemoConfig, grpo_trainer
    from mmr1.world.identity import IdentityJudge
    from mmr1.world.tasks import split_subjects

    world, model, _, _ = _demo_parts()
    train, _ = split_subjects(0, DemoConfig.held_out_frac)
    base = grpo_trainer(model, world, IdentityJudge(world.vq), DemoConfig(), train, None)
    import copy

    rows = []
    metrics: Dict[str, List[Dict[str, float]]] = {}
    for att in ("sdpa", "shared_prefix"):
        tr = GRPOTrainer(copy.deepcopy(model), base.vocab, base.fmt, base.rewards, base.prompts,
                         replace(base.cfg, sampling=replace(base.cfg.sampling, attention=att), log_path=None), ref_model=base.ref)
        metrics[att] = [tr.step().metrics for _ in range(repeats)]
    case = "demo GRPO step (8 prompts x G=4, CFG 2, Jacobi W=8 rollouts), same steps from the same weights"
    for att, label in (("shared_prefix", "mmr1 shared_prefix layout"), ("sdpa", "SDPA over prompt copies")):
        h = metrics[att]
        for key in ("time/rollout_s", "time/train_s"):
            ms = [m[key] * 1e3 for m in h]
            q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
            rows.append(Row(bench="GRPO step end to end", case=case, provider=f"{label}: {key.split('/')[1]}",
                            median_ms=statistics.median(ms), p25_ms=q[0], p75_ms=q[2]))
    ours = {r.provider.split(": ")[1]: r.median_ms for r in rows if r.provider.startswith("mmr1")}
    for r in rows:
        r.ratio_vs_ours = r.median_ms / ours[r.provider.split(": ")[1]]
    return rows


def bench_update(repeats: int, prompts: int = 8) -> List[Row]:
    import copy
    import dataclasses

    from mmr1.world.demo import DemoConfig, grpo_trainer
    from mmr1.world.identity import IdentityJudge
    from mmr1.world.tasks import split_subjects

    world, model, _, _ = _demo_parts()
    train, _ = split_subjects(0, DemoConfig.held_out_frac)
    dcfg = DemoConfig(prompts_per_step=prompts)
    base = grpo_trainer(model, world, IdentityJudge(world.vq), dcfg, train, None)
    rnd = base._round(0, 0)
    ro, rewards, weights = rnd.rollout, rnd.rewards, rnd.weights
    adv, _ = K.group_advantages(rewards, group_size=base.cfg.group_size, weights=weights)
    adv = adv + 0.1 * torch.randn(adv.shape, generator=torch.Generator().manual_seed(0))  # every row trains
    tokens = float(ro.lengths.sum())
    trainers = {}
    for mode in ("shared", "per_row"):  # one policy, optimizer and reference model; no optimizer step is taken
        t = copy.copy(base)
        t.cfg = dataclasses.replace(base.cfg, update_prefix=mode)
        t.policy.train()
        trainers[mode] = t
    ref = base.ref_logprobs(ro)
    losses = {}
    for mode, t in trainers.items():  # the same loss both ways, before anything is timed
        t.optimizer.zero_grad(set_to_none=True)
        losses[mode] = float(t._loss_and_backward(ro, adv, None, t.ref_logprobs(ro), backward=True)[0])
    if abs(losses["shared"] - losses["per_row"]) > 1e-5 * max(1.0, abs(losses["per_row"])):
        raise AssertionError(f"update_prefix='shared' changed the loss: {losses}")

    def update(t):
        t.optimizer.zero_grad(set_to_none=True)
        t._loss_and_backward(ro, adv, None, ref, backward=True)

    labels = {"shared": "mmr1 shared prefix (update_prefix='shared')", "per_row": "every sequence whole ('per_row')"}
    Tc = int((ro.lengths - ro.prompt_lengths).max())
    case = (f"demo model, GRPO update on one rollout: {prompts} prompts x G={dcfg.group_size}, "
            f"{int(ro.prompt_lengths.min())}-{int(ro.prompt_lengths.max())}-token prompts, completions <= {Tc}, "
            f"{int(tokens)} tokens")
    rows = []
    for bench, fn in (("GRPO update: policy forward + loss + backward", update),
                      ("GRPO update: reference log-probs (forward)", lambda t: t.ref_logprobs(ro))):
        times = time_providers({labels[m]: (lambda t=t: fn(t)) for m, t in trainers.items()}, repeats)
        peaks = {labels[m]: peak_extra_mib(lambda t=t: fn(t)) for m, t in trainers.items()}  # activations
        rr = summarize(bench, case, times, labels["shared"], peaks=peaks)
        for r in rr:
            tok_s = tokens / (r.median_ms / 1e3)
            r.extra = {"train_tok_s": tok_s}
            r.note = f"{tok_s:,.0f} train tok/s"
        rows += rr
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    if argv is None:  # from the command line (a caller passing argv has set the environment)
        ensure_bench_env("bench.attention")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="implies --quick: one point per part, one repeat -- that the "
                    "suite runs end to end (the GPU check's dry run); its figures mean nothing")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers-only", action="store_true", help="parts 1 and 2 only (the one-layer benchmarks)")
    ap.add_argument("--update-only", action="store_true", help="part 5 only (the GRPO update through the shared prefix)")
    args = ap.parse_args(argv)
    args.quick |= args.smoke
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 15)
    if args.update_only:  # part 5 alone, replacing its rows in the last full run's results
        import json
        from .common import RESULTS_DIR

        rows = bench_update(args.repeats or (3 if args.quick else 9), 2 if args.quick else 8)
        name = "attention_quick" if args.quick else "attention"
        old = RESULTS_DIR / f"{name}.json"
        data = json.loads(old.read_text()) if old.exists() else {"meta": machine_info(), "rows": []}
        kept = [Row(**r) for r in data["rows"] if not r["bench"].startswith("GRPO update:")]
        meta = {**data["meta"], "update_rows": "part 5 re-run alone (--update-only): " + time.strftime("%Y-%m-%d %H:%M")}
        path = save_rows(name, kept + rows, meta)
        print(format_table(rows))
        print(f"wrote {path}")
        return
    bw = copy_bandwidth_gbs()
    rows: List[Row] = []
    d = DEMO
    fp = torch.float32
    block = d["block"]
    points = (block // 2,) if args.quick else (6, block // 2, block)
    for W in ((8,) if args.smoke else (1, 8)):
        for done in points:  # conditional rows: text + subject block + the final block so far
            rows += bench_layer("demo layer", d["prompts"], d["G"], d["text"] + block + done, done, d["heads"],
                                d["head_dim"], fp, W, repeats, bw)
    lum = LUMINA
    dt = torch.bfloat16
    if args.quick:
        rows += bench_layer("Lumina-7B-shaped layer (quick: 1/8 lengths)", (lum["prompts"][0] // 8,), 2,
                            lum["completion"] // 8, lum["block"] // 8, lum["heads"], lum["head_dim"], dt, 1,
                            repeats, bw)
    else:
        for W in (1, 8):
            rows += bench_layer("Lumina-7B-shaped layer", lum["prompts"] * 2, lum["G"], lum["completion"],
                                lum["block"], lum["heads"], lum["head_dim"], dt, W, max(3, repeats // 3), bw)
    if not args.quick and not args.layers_only:
        rows += bench_rollout(max(3, repeats // 3))
        rows += bench_grpo_step(3)
    if not args.layers_only:
        rows += bench_update(repeats if args.smoke else args.repeats or (3 if args.quick else 9),
                             2 if args.quick else 8)  # quick: 2 prompts
    mem = lumina_memory()
    meta = {**machine_info(), "copy_gbs": bw, "quick": args.quick, "lumina_kv_memory": mem}
    path = save_rows("attention_quick" if args.quick else "attention", rows, meta)
    print(format_table(rows))
    print(f"Lumina-mGPT-7B rollout KV cache at G=8, 2 prompts of {lum['prompts'][0]} tokens, {lum['completion']}-token "
          f"completions: previous {mem['previous_gb']:.1f} GB, decode layout {mem['decode_gb']:.1f} GB "
          f"({mem['decode_uncond_tight_gb']:.1f} GB with the unconditional rows' cache sized to their block)")
    print(f"copy bandwidth {bw:.1f} GB/s; wrote {path}")


if __name__ == "__main__":
    main()
