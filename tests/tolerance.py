"""Tolerances from error analysis, per element, for the kernels against the fp64 oracle on the same inputs.

Inputs are rounded to their dtype first and the oracle sees those rounded values, so the only errors are the
kernels' own: fp32 math (fp64 for fp64 inputs) and, for outputs in the input dtype (the logits gradient), that
dtype's rounding. With u the unit roundoff of the math, S = max |z| / T over the vocab window and V its width:

- log-prob / logsumexp: z/T is rounded (u S), exp's argument z/T - max carries that error (u S), the exp polynomial
  and the blocked V-term sum add about (1.5 + log2 V) u relative to the sum, i.e. absolute in log space:
      E = C (S + log2 V + 2) u,                                       C = 3
- ratio r = exp(logp - old): relative E + u;  k3 KL: |e^d - 1| E + u (e^d + |d| + 1);
  token loss: |A| (ratio's error) + beta (KL's error) + u |loss|; d loss / d logp likewise.
- logits gradient dz_j = g/T (1[j = y] - p_j): p_j = exp(z_j/T - lse) has relative error E, the output is rounded
  to the logits dtype (u_out |dz|), plus the smallest subnormal step of that dtype and, for probabilities that
  underflow, the smallest normal of the math dtype (times |g|/T); an error in g itself scales the whole row.
- from hidden states (fused linear): the head GEMM runs in the input dtype and rounds the logits to it
  (u_in max|z|, plus d u_in max|h| max|w| of accumulation for 16-bit inputs accumulated in fp32), which adds
  2 Ez / T to E; the gradients are GEMMs in the input dtype again: u_in times the |.|-weighted sums.

``record`` keeps the worst observed-error / tolerance ratio per check; ``MMR1_TOLERANCE_REPORT=1 pytest ...`` prints
them at the end (the tolerances are meant to sit within ~10x of what is observed).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
TINY = {torch.float64: 2.0 ** -1074, torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133,
        torch.float16: 2.0 ** -24}
C = 3.0
WORST: Dict[str, float] = {}


def math_unit(input_dtype: torch.dtype) -> float:
    """The kernels compute in fp32, or in fp64 for fp64 inputs."""
    return UNIT[torch.float64 if input_dtype == torch.float64 else torch.float32]


def window_scale(logits: torch.Tensor, lo: int, hi: int, temperature: float) -> torch.Tensor:
    """S per row: max |z| / T over the finite logits of the window, [N] for logits [..., V]."""
    z = logits[..., lo:hi].detach().double().cpu().reshape(-1, hi - lo)
    return torch.where(torch.isfinite(z), z.abs(), 0.0).max(-1).values / temperature


def logprob_error(input_dtype: torch.dtype, scale, V: int):
    """Per row: the kernel's error plus the fp64 oracle's own (which matters only for fp64 inputs)."""
    return C * (scale + math.log2(max(V, 1)) + 2.0) * (math_unit(input_dtype) + UNIT[torch.float64])


def value_error(E, value: torch.Tensor, input_dtype: torch.dtype):
    """Per-element tolerance of a log-prob / logsumexp value: the row's E plus the final rounding, 2 u |value|."""
    v = torch.nan_to_num(value.detach().double().cpu().abs(), nan=0.0, posinf=0.0)  # NaN / inf: matched exactly
    return torch.as_tensor(E, dtype=torch.float64).reshape(v.shape) + 2 * math_unit(input_dtype) * v


def token_errors(input_dtype, E, adv, ratio, kl_delta, beta, loss):
    """Per-token tolerances (ratio, kl, loss, d loss / d logp) given the log-prob error E (scalar or tensor)."""
    u = math_unit(input_dtype)
    t_ratio = ratio * (E + 2 * u)
    ed = torch.exp(kl_delta.clamp(-20, 20))
    t_kl = (ed - 1).abs() * E + u * (ed + kl_delta.abs() + 1)
    a = adv.abs()
    t_loss = a * t_ratio + beta * t_kl + 2 * u * loss.abs()
    t_coef = a * t_ratio + beta * ed * (E + 2 * u)
    return t_ratio, t_kl, t_loss, t_coef


def logits_grad_error(out_dtype, g, temperature, p, onehot, dz, E, g_err=0.0):
    """Per-element tolerance of dz [N, W] for an upstream gradient g [N] (g_err: its own per-row error)."""
    gt = (g.abs() / temperature)[:, None]
    E = torch.as_tensor(E, dtype=torch.float64).reshape(-1, 1)
    # exp() near underflow: probabilities below the math dtype's smallest normal carry an absolute error up to it;
    # the exp argument z_j/T - lse rounds once more than a log-prob does (the subtraction): 2 E
    min_normal = 2.0 ** -1022 if out_dtype == torch.float64 else 2.0 ** -126
    return (gt * (2 * p * E + 2 * min_normal) + (torch.as_tensor(g_err) / temperature).reshape(-1, 1) * (onehot + p)
            + 2 * UNIT[out_dtype] * dz.abs() + TINY[out_dtype])


def entropy_error(E, entropy: torch.Tensor, W: int, input_dtype: torch.dtype):
    """Per row: H = log s - sum p x / s (x = z/T - max): each p_j carries the relative error E and x_j its own, so
    |dH| <= E (1 + sum p |x|) = E (1 + log s - H) <= E (1 + ln W), plus the final rounding 2 u |H|."""
    h = torch.nan_to_num(entropy.detach().double().cpu().abs(), nan=0.0)
    E = torch.as_tensor(E, dtype=torch.float64).reshape(h.shape)
    return E * (1.0 + math.log(max(W, 1))) + 2 * math_unit(input_dtype) * h


def entropy_grad_error(out_dtype, gh, temperature, p, logp, H, E, t_H):
    """Per element [N, W]: d(gh H)/dz_j = -gh/T p_j (log p_j + H); p_j has relative error E, log p_j absolute E,
    H absolute t_H (per row)."""
    gt = (gh.abs() / temperature)[:, None]
    E = torch.as_tensor(E, dtype=torch.float64).reshape(-1, 1)
    t_H = torch.as_tensor(t_H, dtype=torch.float64).reshape(-1, 1)
    term = torch.where(p > 0, p * (logp + H.reshape(-1, 1)), torch.zeros_like(p)).abs()
    min_normal = 2.0 ** -1022 if out_dtype == torch.float64 else 2.0 ** -126
    return gt * (2 * E * term + p * (E + t_H) + 2 * min_normal * 90)


def assert_within(name: str, actual: torch.Tensor, expected: torch.Tensor, tol) -> None:
    """|actual - expected| <= tol elementwise (NaN where the oracle has NaN); records the worst error / tol."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    tol = torch.as_tensor(tol, dtype=torch.float64).cpu().expand_as(e)
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(e) & (a == e)
    err = torch.where(both_nan | same_inf, torch.zeros_like(e), (a - e).abs())
    ratio = err / tol.clamp(min=1e-300)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    WORST[name] = max(WORST.get(name, 0.0), worst)
    if not worst <= 1.0 or bool(torch.isnan(ratio).any()):
        i = int(torch.nan_to_num(ratio, nan=float("inf")).argmax())
        raise AssertionError(f"{name}: error {float(err.reshape(-1)[i]):.3g} > tolerance {float(tol.reshape(-1)[i]):.3g}"
                             f" at flat index {i} (actual {float(a.reshape(-1)[i])!r}, expected "
                             f"{float(e.reshape(-1)[i])!r}); worst error/tolerance {worst:.3g}")


def report() -> str:
    return "\n".join(f"  {k:60s} worst error / tolerance {v:.3f}" for k, v in sorted(WORST.items()))


def attention_errors(input_dtype: torch.dtype, out: torch.Tensor, lse: torch.Tensor, stats, p_unit: float = 0.0):
    """Per-element tolerances (out [R, W, H, D], lse [R, W, H]) of decode attention against the fp64 oracle.

    With u the math unit: a score s_j = scale q.k sums D products, |ds_j| <= (D + 2) u mag (mag = scale max_j
    sum_d |q_d k_jd|), and the log2-domain multiply and the exp2 polynomial add ~3 u relative to each weight e^{s_j}:
    every normalized weight p_j is off by a relative e = 2 ((D + 2) u mag + 3 u) (numerator and denominator), plus
    p_unit when the weights are rounded before p.V (the Triton kernel's fp16/bf16 dot). Then |d out_d| <=
    e sum_j p_j (|v_jd| + |out_d|) + (n + 2) u sum_j p_j |v_jd| (the n-term sums), plus the output's rounding to its
    dtype u_out |out_d|; |d lse| <= (D + 2) u mag + (n + 4) u + u |lse|."""
    u = math_unit(input_dtype) + UNIT[torch.float64]
    mag, vabs, n = stats["mag"], stats["vabs"], stats["n"]
    D = out.shape[-1]
    o = out.detach().double().cpu().abs()
    e = (2 * ((D + 2) * u * mag + 3 * u) + p_unit)[..., None]
    t_out = e * (vabs + o) + ((n + 2) * u)[..., None] * vabs + UNIT[input_dtype] * o + TINY[input_dtype]
    lv = torch.nan_to_num(lse.detach().double().cpu().abs(), nan=0.0, posinf=0.0, neginf=0.0)
    t_lse = (D + 2) * u * mag + (n + 4) * u + u * lv
    return t_out, t_lse


def attention_grad_errors(input_dtype: torch.dtype, q, keys, vals, seen, grad_out, scale: float, p_unit: float = 0.0):
    """Per-element tolerances of (dq [N, T, H, D], dkeys, dvals [N, L, H, D]) of attention over each row's keys
    [N, L, H, D] (kv heads expanded) with visibility seen [N, T, L], against the fp64 oracle's autograd.

    From p_ij (fp64), each weight off by the relative e_i = 2 ((D + 2) u mag_i + 3 u) + p_unit of attention_errors,
    and A_ij = p_ij (|dO_i|.|v_j| + |dO_i|.|O_i|) bounding |dS_ij| = |p_ij (dO_i.v_j - dO_i.O_i)|: dS carries
    (e_i + (D + 2) u + p_unit) A_ij; a sum over n terms adds (n + 2) u of its |.|-sum. Then dV_j = sum_i p_ij dO_i,
    dQ_i = scale sum_j dS_ij k_j, dK_j = scale sum_i dS_ij q_i. Returns those three and the |.|-sums bounding each
    gradient (B_dq, B_dk, B_dv): the caller adds the rounding of the gradients (and of their partial sums over
    heads or rows) to the input dtype, u_in B."""
    u = math_unit(input_dtype) + UNIT[torch.float64]
    q, keys, vals, g = (t.detach().double().cpu() for t in (q, keys, vals, grad_out))
    seen = seen.cpu()
    N, T, H, D = q.shape
    s = torch.einsum("nthd,nlhd->nhtl", q, keys) * scale
    s = s.masked_fill(~seen[:, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # [N, H, T, L]
    out = torch.einsum("nhtl,nlhd->nthd", p, vals)
    mag = scale * torch.einsum("nthd,nlhd->nhtl", q.abs(), keys.abs()).masked_fill(~seen[:, None], 0).amax(-1)
    e = (2 * ((D + 2) * u * mag + 3 * u) + p_unit)[..., None]  # [N, H, T, 1]
    n_keys = seen.sum(-1).double()[:, None, :, None]  # [N, 1, T, 1]
    n_queries = seen.sum(1).double()[:, None, None, :]  # [N, 1, 1, L]
    ga = g.abs()
    A = p * (torch.einsum("nthd,nlhd->nhtl", ga, vals.abs()) + (ga * out.abs()).sum(-1).transpose(1, 2)[..., None])
    err_s = (e + (D + 2) * u + p_unit) * A
    t_dv = torch.einsum("nhtl,nthd->nlhd", p * (e + (n_queries + 2) * u), ga)
    t_dq = scale * torch.einsum("nhtl,nlhd->nthd", err_s + (n_keys + 2) * u * A, keys.abs())
    t_dk = scale * torch.einsum("nhtl,nthd->nlhd", err_s + (n_queries + 2) * u * A, q.abs())
    bounds = (scale * torch.einsum("nhtl,nlhd->nthd", A, keys.abs()), scale * torch.einsum("nhtl,nthd->nlhd", A, q.abs()),
              torch.einsum("nhtl,nthd->nlhd", p, ga))
    return (t_dq, t_dk, t_dv), bounds
