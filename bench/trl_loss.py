"""Benchmark: mmr1_kernels against TRL 1.16's own fused kernels and loss code, same run, same shapes.

    python -m bench.trl_loss            # N = 4096 tokens, d = 1024, V = 65536 (full vocab and Lumina's 8192 window)
    python -m bench.trl_loss --quick    # small shapes, < 1 minute

1. Per-token log-probs (+ entropy) from hidden states, fwd+bwd: ``fused_linear_logprobs(return_entropy=...)`` vs
   ``trl.kernels.ChunkedLogProbFunction`` (what TRL's ``fused_lm_head`` runs: cuBLAS/CPU GEMM tiles of 4096 tokens
   x 32768 vocab columns folded into online-logsumexp statistics; its torch tile path on CPU), on the full vocab
   and on the image window (TRL has no vocab window: it is given the window's rows of the head).
2. The policy loss over [B, T] scalars, fwd+bwd: ``policy_loss`` vs TRL's ``GRPOTrainer._compute_loss`` itself
   (a bare trainer object, the model's log-prob function stubbed; bench.peers.trl_loss_fn).
3. A whole GRPO loss from hidden states on the window (grpo, token ratios, beta = 0.04, with entropy): our
   grads-in-forward ``fused_linear_grpo_loss``, our composition (fused_linear_logprobs + policy_loss), and TRL's
   (ChunkedLogProbFunction + _compute_loss).

The yardstick for 1 and 3 is the GEMM floor: 3 head GEMMs (logits, d hidden, d weight) at the measured GEMM
throughput; a recompute backward needs a 4th.
"""
from __future__ import annotations

import argparse
import statistics
from typing import List

import torch

import mmr1_kernels as K
from mmr1_kernels.policy import PolicyLossConfig

from . import peers
from .common import (DEVICE, Row, ensure_bench_env, format_table, machine_info, peak_extra_mib, save_rows, summarize,
                     time_providers)

V = 65536
WINDOW = (4, 8196)
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def _trl_logprobs(h, w, targets, entropy, temperature=1.0):
    from trl.kernels import ChunkedLogProbFunction

    out = ChunkedLogProbFunction.apply(h, w, None, targets, temperature, TRL_CHUNK, None, 1.0,
                                       ("entropy",) if entropy else ())
    return out[0], out[1]


def _inputs(N, d, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, d, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype).to(DEVICE)
    targets = torch.randint(*WINDOW, (N,), generator=g).to(DEVICE)
    return hidden, weight, targets


def _gemm_floor(hidden, w):
    gemm = statistics.median(time_providers({"mm": lambda: hidden @ w.T}, 5, warmup=1)["mm"])
    return gemm, 3 * gemm


def bench_logprobs(N: int, d: int, repeats: int, dtype=torch.float32) -> List[Row]:
    hidden, weight, targets = _inputs(N, d, dtype)
    lo, hi = WINDOW
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(N, generator=gen).to(DEVICE), torch.randn(N, generator=gen).to(DEVICE)
    rows = []
    for label, w_full, tgt in (("full vocab", weight, targets), ("window rows", weight[lo:hi], targets - lo)):
        def run(fn, entropy, w=w_full, t=tgt):
            def call():
                h = hidden.detach().requires_grad_(True)
                ww = w.detach().requires_grad_(True)
                lp, ent = fn(h, ww, t, entropy)
                loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
                return torch.autograd.grad(loss, (h, ww))

            return call

        def ours(h, w, t, entropy):
            out = K.fused_linear_logprobs(h, w, t, return_entropy=entropy)
            return out if entropy else (out, None)

        provs = {"mmr1 fused_linear_logprobs": run(ours, False),
                 "mmr1 fused_linear_logprobs +entropy": run(ours, True)}
        if peers.have("trl"):
            provs["TRL ChunkedLogProbFunction"] = run(_trl_logprobs, False)
            provs["TRL ChunkedLogProbFunction +entropy"] = run(_trl_logprobs, True)
        times = time_providers(provs, repeats, warmup=1, budget_s=240)
        peaks = {k: peak_extra_mib(f) for k, f in provs.items()}
        gemm, floor = _gemm_floor(hidden, w_full)
        case = f"N={N} d={d} {label} (W={w_full.shape[0]}) {str(dtype).replace('torch.', '')}"
        for ours_name, suffix in (("mmr1 fused_linear_logprobs", ""), ("mmr1 fused_linear_logprobs +entropy",
                                                                        " +entropy")):
            pair = {k: v for k, v in times.items() if k.endswith("logprobs" + suffix) or
                    k.endswith("Function" + suffix)}
            part = summarize("logprobs from hidden fwd+bwd" + suffix, case, pair, ours_name, peaks, floor)
            for r in part:
                r.extra["gemm_ms"] = gemm * 1e3
            rows += part
    return rows


def _loss_batch(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 4
    ent = torch.rand(B, T, generator=g) * 3
    mask = torch.rand(B, T, generator=g) > 0.05
    adv = torch.randn(B, generator=g)
    old = logp + 0.1 * torch.randn(B, T, generator=g)
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    return [x.to(DEVICE) for x in (logp, ent, mask, adv, old, ref)]


def bench_policy_loss(B: int, T: int, repeats: int) -> List[Row]:
    logp, ent, mask, adv, old, ref = _loss_batch(B, T)
    rows = []
    for loss_type, level in (("grpo", "token"), ("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"),
                             ("sapo", "token"), ("vespo", "token")):
        cfg = PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                               epsilon_high=5.0 if loss_type == "cispo" else 0.28, top_entropy_quantile=0.8,
                               entropy_coef=0.01)

        def ours_loss(lp, en):
            return K.policy_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref, entropies=en, config=cfg)[0]

        def timed(fn):
            def call():
                lp, en = logp.detach().requires_grad_(True), ent.detach().requires_grad_(True)
                return torch.autograd.grad(fn(lp, en), (lp, en))

            return call

        provs = {"mmr1 policy_loss": timed(ours_loss)}
        if peers.have("trl"):
            trl_call = peers.trl_loss_fn(cfg)
            provs["TRL GRPOTrainer._compute_loss"] = timed(
                lambda lp, en: trl_call(lp, en, adv, mask, old, ref)[0])
        times = time_providers(provs, repeats, warmup=2)
        rows += summarize("policy loss over [B, T] fwd+bwd", f"B={B} T={T} {loss_type}/{level} beta=0.04 "
                          "entropy mask+bonus", times, "mmr1 policy_loss")
    return rows


def bench_grpo_from_hidden(N: int, d: int, repeats: int, dtype=torch.float32) -> List[Row]:
    hidden, weight, targets = _inputs(N, d, dtype)
    lo, hi = WINDOW
    T = min(N, 1024)
    B = N // T
    w_win = weight[lo:hi]
    local = (targets - lo).reshape(B, T)
    _, _, mask, adv, _, _ = _loss_batch(B, T, seed=2)
    with torch.no_grad():
        base = K.fused_linear_logprobs(hidden.reshape(B, T, d), w_win, local)
    old, ref = base + 0.05, base - 0.05

    def timed(fn):
        def call():
            h = hidden.detach().requires_grad_(True)
            w = w_win.detach().requires_grad_(True)
            return torch.autograd.grad(fn(h.reshape(B, T, d), w), (h, w))

        return call

    def ours_fused(h, w):
        return K.fused_linear_grpo_loss(h, w, local, adv, mask, old, ref, epsilon=0.2, epsilon_high=0.28, beta=0.04,
                                        loss_type="grpo")[0]

    def ours_composed(h, w, entropy):
        out = K.fused_linear_logprobs(h, w, local, return_entropy=entropy)
        lp, ent = out if entropy else (out, None)
        return K.policy_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref, entropies=ent,
                             config=PolicyLossConfig(loss_type="grpo", beta=0.04, epsilon_high=0.28,
                                                     use_bias_correction_kl=False))[0]

    provs = {"mmr1 fused_linear_grpo_loss (grads in forward)": timed(ours_fused),
             "mmr1 fused_linear_logprobs + policy_loss": timed(lambda h, w: ours_composed(h, w, False)),
             "mmr1 fused_linear_logprobs +entropy + policy_loss": timed(lambda h, w: ours_composed(h, w, True))}
    if peers.have("trl"):
        trl_cfg = PolicyLossConfig(loss_type="grpo", beta=0.04, epsilon_high=0.28, use_bias_correction_kl=False)
        trl_call = peers.trl_loss_fn(trl_cfg)

        def trl_loss(h, w):  # TRL always computes the entropy in _compute_loss (compute_entropy=True)
            lp, ent = _trl_logprobs(h.reshape(N, d), w, local.reshape(N), True)
            return trl_call(lp.reshape(B, T), ent.reshape(B, T), adv, mask, old, ref)[0]

        provs["TRL ChunkedLogProbFunction +entropy + _compute_loss"] = timed(trl_loss)
    times = time_providers(provs, repeats, warmup=1, budget_s=240)
    peaks = {k: peak_extra_mib(f) for k, f in provs.items()}
    gemm, floor = _gemm_floor(hidden, w_win)
    case = f"N={N} d={d} window rows (W={hi - lo}) grpo beta=0.04 {str(dtype).replace('torch.', '')}"
    rows = summarize("GRPO loss from hidden fwd+bwd", case, times, "mmr1 fused_linear_grpo_loss (grads in forward)",
                     peaks, floor)
    for r in rows:
        r.extra["gemm_ms"] = gemm * 1e3
    return rows


def main(argv=None) -> List[Row]:
    if argv is None:
        ensure_bench_env("bench.trl_loss")  # the fixed mmap threshold the peak-memory column assumes
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (< 1 minute)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    meta = {**machine_info(), "backend": K.backend_for(DEVICE)}
    if peers.have("trl"):
        import trl

        meta["trl"] = trl.__version__
    print("machine:", meta)
    N, d = (512, 128) if args.quick else (4096, 1024)
    rows = bench_logprobs(N, d, repeats)
    rows += bench_policy_loss(8, 256 if args.quick else 1024, 5 * repeats)
    rows += bench_grpo_from_hidden(N, d, repeats)
    print(format_table(rows))
    path = save_rows("trl_loss" + ("_quick" if args.quick else ""), rows, meta)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
