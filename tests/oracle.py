"""The tests' own fp64 oracle: every op written again from docs/kernel-semantics.md, as plainly as possible.

Nothing here imports mmr1_kernels. The spec (mmr1_kernels.reference) is
checked against these functions, so a bug in the spec -- which is also the
no-extension fallback and the trainer's reference path -- cannot hide behind a
comparison of the spec with itself. Gradients come from torch.autograd of the
fp64 forward here, never from a closed form.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, Optional, Sequence

import torch

CLAMP = 20.0  # docs/kernel-semantics.md: log-ratio and the KL's delta are clamped to +-20


def logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, lo: int = 0,
             hi: Optional[int] = None) -> torch.Tensor:
    """log softmax(z / T over ids lo..hi-1)[target], fp64, for logits [..., V] and targets [...]."""
    hi = logits.shape[-1] if hi is None else hi
    z = logits[..., lo:hi].double() / temperature
    lp = torch.log_softmax(z, dim=-1)
    return lp.gather(-1, (targets.long() - lo).unsqueeze(-1)).squeeze(-1)


def logsumexp(logits: torch.Tensor, temperature: float = 1.0, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
    hi = logits.shape[-1] if hi is None else hi
    z = logits[..., lo:hi].double() / temperature
    m = z.max(dim=-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
    """-sum_j p_j log p_j of softmax(z / T over ids lo..hi-1), fp64, differentiable (p_j = 0 terms are 0)."""
    hi = logits.shape[-1] if hi is None else hi
    logq = torch.log_softmax(logits[..., lo:hi].double() / temperature, dim=-1)
    q = torch.exp(logq)
    safe_logq = torch.where(q > 0, logq, torch.zeros_like(logq))  # no 0 * -inf, in the value or the gradient
    return -(q * safe_logq).sum(-1)


def token_terms(logp, adv, old=None, ref=None, epsilon=0.2, epsilon_high=0.2, beta=0.0):
    """(token loss, ratio, kl), differentiable in logp: -min(r A, clip(r) A) + beta (e^d - d - 1)."""
    old = logp.detach() if old is None else old.double()
    log_ratio = torch.clamp(logp - old, min=-CLAMP, max=CLAMP)
    r = torch.exp(log_ratio)
    a = adv.double()
    surrogate = -torch.minimum(r * a, torch.clamp(r, 1.0 - epsilon, 1.0 + epsilon_high) * a)
    if beta == 0.0:
        return surrogate, r, torch.zeros_like(r)
    d = torch.clamp(ref.double() - logp, min=-CLAMP, max=CLAMP)
    kl = torch.exp(d) - d - 1.0
    return surrogate + beta * kl, r, kl


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The loss_type aggregation, by explicit loops over sequences."""
    B, T = mask.shape
    m = mask.bool()
    if loss_type == "grpo":
        per_seq = []
        for b in range(B):
            n = int(m[b].sum())
            per_seq.append(token_loss[b][m[b]].sum() / n if n else token_loss.new_zeros(()))
        return torch.stack(per_seq).sum() / B
    total = token_loss[m].sum()
    if loss_type in ("bnpo", "dapo"):
        return total / max(int(m.sum()), 1)
    if loss_type == "dr_grpo":
        return total / (B * T)
    raise ValueError(loss_type)


def grpo_loss(logits, targets, advantages, mask=None, old=None, ref=None, temperature=1.0, vocab_range=None,
              epsilon=0.2, epsilon_high=0.2, beta=0.0, loss_type="grpo", loss_weights=None):
    """(loss, metrics) from logits [B, T, V], fp64 and differentiable in ``logits`` (pass a leaf)."""
    B, T = targets.shape
    lo, hi = vocab_range if vocab_range is not None else (0, logits.shape[-1])
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    safe_targets = torch.where(mask, targets.long(), torch.full_like(targets.long(), lo))
    logp = logprobs(logits, safe_targets, temperature, lo, hi)
    a = advantages.double()
    a = a[:, None].expand(B, T) if a.dim() == 1 else a
    fill = lambda t: None if t is None else torch.where(mask, t.double(), torch.zeros_like(t.double()))  # noqa: E731
    loss_t, r, kl = token_terms(logp, a, fill(old), fill(ref), epsilon, epsilon_high, beta)
    loss_t = torch.where(mask, loss_t, torch.zeros_like(loss_t))
    if loss_weights is not None:
        loss = (loss_t * loss_weights.double() * mask).sum()
    else:
        loss = aggregate(loss_t, mask, loss_type)
    m = mask.double()
    n = m.sum().clamp(min=1)
    with torch.no_grad():
        metrics = {"ratio_mean": (r * m).sum() / n, "kl": (kl * m).sum() / n, "logp_mean": (logp * m).sum() / n,
                   "clip_ratio/low_mean": (((r < 1 - epsilon) & (a < 0)).double() * m).sum() / n,
                   "clip_ratio/high_mean": (((r > 1 + epsilon_high) & (a > 0)).double() * m).sum() / n,
                   "clip_ratio/region_mean": ((((r < 1 - epsilon) & (a < 0)) | ((r > 1 + epsilon_high) & (a > 0)))
                                              .double() * m).sum() / n}
    return loss, metrics


def grad(fn, x: torch.Tensor):
    """(value, d value / d x) of a scalar function by fp64 autograd."""
    leaf = x.detach().double().clone().requires_grad_(True)
    value = fn(leaf)
    if not value.requires_grad:  # e.g. every token masked: a constant
        return value.detach(), torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(value, leaf, allow_unused=True)
    return value.detach(), torch.zeros_like(leaf) if g is None else g


def group_advantages(rewards: Sequence[float], groups: Sequence[int], mode: str = "grpo", eps: float = 1e-4,
                     unbiased: bool = True) -> list:
    """Scalar rewards per sample (NaN = missing) and a group label per sample -> advantages, with Python's
    statistics module (grpo, dr_grpo, rloo, batch)."""
    labels = list(groups)
    out = [0.0] * len(labels)
    valid = [i for i, r in enumerate(rewards) if not math.isnan(r)]
    sd = statistics.stdev if unbiased else statistics.pstdev
    batch_std = sd([rewards[i] for i in valid]) if len(valid) > (1 if unbiased else 0) else 0.0
    for g in set(labels):
        idx = [i for i in valid if labels[i] == g]
        if not idx:
            continue
        vals = [rewards[i] for i in idx]
        mean = statistics.fmean(vals)
        std = sd(vals) if len(vals) > 1 else 0.0
        for i in idx:
            d = rewards[i] - mean
            if mode == "grpo":
                out[i] = 0.0 if d == 0 else d / (std + eps)
            elif mode == "dr_grpo":
                out[i] = d
            elif mode == "batch":
                out[i] = 0.0 if d == 0 else d / (batch_std + eps)
            elif mode == "rloo":
                out[i] = rewards[i] - statistics.fmean([rewards[j] for j in idx if j != i]) if len(idx) > 1 else 0.0
            else:
                raise ValueError(mode)
    return out


def metrics_close(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], atol: float) -> None:
    for k, v in want.items():
        torch.testing.assert_close(torch.as_tensor(got[k]).double(), v.double(), atol=atol, rtol=0, msg=k)


def decode_attention(q, k, v, lengths, prefix=None, scale=None):
    """Attention of each query over its context, written per query from docs/kernel-semantics.md section 5, in fp64.

    q [R, W, H, D]; k, v [R, S, Hkv, D]; lengths [R]; prefix: None or (prefix_k, prefix_v, prefix_lengths,
    prefix_of_row). Query (r, w, h) sees its prompt's first prefix_lengths[p] prefix keys (p = prefix_of_row[r] >= 0)
    and its own slots j < lengths[r] + w + 1 (at most S); kv head h // (H / Hkv). Returns (out [R, W, H, D],
    lse [R, W, H], and per query the statistics the tolerance needs: ``mag`` = scale * max_j sum_d |q_d k_jd|,
    ``vabs`` [R, W, H, D] = sum_j p_j |v_jd|, ``n`` the number of keys seen)."""
    R, W, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(R, W, H, D, dtype=torch.float64)
    vabs = torch.zeros(R, W, H, D, dtype=torch.float64)
    lse = torch.full((R, W, H), float("-inf"), dtype=torch.float64)
    mag = torch.zeros(R, W, H, dtype=torch.float64)
    n = torch.zeros(R, W, H, dtype=torch.float64)
    for r in range(R):
        for w in range(W):
            for h in range(H):
                g = h // (H // Hkv)
                keys, vals = [], []
                if prefix is not None:
                    pk, pv, plen, of_row = prefix
                    p = int(of_row[r])
                    if p >= 0:
                        keys.append(pk[p, : int(plen[p]), g].double())
                        vals.append(pv[p, : int(plen[p]), g].double())
                own = min(int(lengths[r]) + w + 1, S)
                keys.append(k[r, :own, g].double())
                vals.append(v[r, :own, g].double())
                kk, vv = torch.cat(keys), torch.cat(vals)
                n[r, w, h] = kk.shape[0]
                if kk.shape[0] == 0:
                    continue
                qq = q[r, w, h].double()
                s = (kk @ qq) * scale
                lse[r, w, h] = torch.logsumexp(s, 0)
                p_ = torch.softmax(s, 0)
                out[r, w, h] = p_ @ vv
                vabs[r, w, h] = p_ @ vv.abs()
                mag[r, w, h] = scale * float((kk.abs() @ qq.abs()).max())
    return out, lse, {"mag": mag, "vabs": vabs, "n": n}
