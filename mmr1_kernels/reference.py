"""Pure-PyTorch reference implementations: the executable spec of every op.

These follow docs/kernel-semantics.md literally and favour clarity over
speed (they materialize [N, V] log-softmax, loop over groups in Python where it
is clearer, ...). They serve three purposes:

1. the oracle for tests (run in float64),
2. the baseline ("eager reference") in benchmarks,
3. the fallback implementation for devices without a dedicated kernel
   (registered under CompositeExplicitAutograd in mmr1_kernels._library).

All functions take a ``dtype`` for the math (float32 by default, float64 for the
oracle). Nothing here validates arguments: the public wrappers do that.
"""
from __future__ import annotations

import warnings

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo", "batch", "gdpo")
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------- log-probs
def token_logprobs(logits, targets, temperature=1.0, vocab_lo=0, vocab_hi=None, mask=None, dtype=torch.float32):
    """log softmax(logits[..., lo:hi] / T)[target] and the logsumexp, per token.

    logits [..., V], targets [...] (absolute vocab ids). Returns (logp, lse) with
    the shape of ``targets``. A target outside the window gives NaN; a masked
    token gives (0, 0).
    """
    hi = logits.shape[-1] if vocab_hi is None else vocab_hi
    z = logits[..., vocab_lo:hi].to(dtype) / temperature
    lse = torch.logsumexp(z, dim=-1)
    local = targets.long() - vocab_lo
    inside = (local >= 0) & (local < hi - vocab_lo)
    z_t = z.gather(-1, local.clamp(0, hi - vocab_lo - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(inside, z_t - lse, torch.full_like(lse, float("nan")))
    if mask is not None:
        keep = mask.bool()
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        lse = torch.where(keep, lse, torch.zeros_like(lse))
    return logp, lse


def token_entropy(logits, temperature=1.0, vocab_lo=0, vocab_hi=None, mask=None, dtype=torch.float32):
    """Shannon entropy -sum_j p_j log p_j of softmax(logits[..., lo:hi] / T), per token (0 for a masked token).

    Terms with p_j = 0 (a -inf logit) contribute 0, not 0 * -inf.
    """
    hi = logits.shape[-1] if vocab_hi is None else vocab_hi
    logq = torch.log_softmax(logits[..., vocab_lo:hi].to(dtype) / temperature, dim=-1)
    q = torch.exp(logq)
    ent = -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)
    # an all -inf window has no distribution: NaN, like its log-prob
    ent = torch.where(torch.isnan(logq).all(-1), torch.full_like(ent, float("nan")), ent)
    if mask is not None:
        ent = torch.where(mask.bool(), ent, torch.zeros_like(ent))
    return ent


def grpo_token_terms(logp, advantages, old_logprobs=None, ref_logprobs=None, eps_low=0.2, eps_high=0.2, beta=0.0):
    """Per-token clipped surrogate + beta * k3 KL, differentiable in ``logp``.

    Returns (token_loss, ratio, kl). ``old_logprobs=None`` means on-policy
    (old = logp.detach(): ratio 1, gradient -A).
    """
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    ratio = torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages.to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        delta = (ref_logprobs.to(logp.dtype) - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + beta * kl
    return loss, ratio, kl


def grpo_token_coef(logp, advantages, old_logprobs=None, ref_logprobs=None, eps_low=0.2, eps_high=0.2, beta=0.0):
    """d token_loss / d logp in closed form (what the kernels compute; equals autograd of grpo_token_terms).

    Surrogate: -A r where the unclipped term is the min and the log-ratio is inside the clamp, else 0;
    KL: beta (1 - exp(delta)) where delta = ref - logp is inside the clamp, else 0.
    """
    old = logp if old_logprobs is None else old_logprobs.to(logp.dtype)
    log_ratio = logp - old
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages.to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    free = (unclipped <= clipped) & (log_ratio.abs() <= LOG_RATIO_CLAMP)
    coef = torch.where(free, -adv * ratio, torch.zeros_like(ratio))
    if beta != 0.0:
        delta = ref_logprobs.to(logp.dtype) - logp
        e = torch.exp(delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        coef = coef + torch.where(delta.abs() <= LOG_RATIO_CLAMP, beta * (1.0 - e), torch.zeros_like(e))
    return coef


def loss_weights(mask, loss_type, dtype=torch.float32):
    """Per-token weights w with loss = sum(w * token_loss), for mask [B, T], in ``dtype``."""
    mask = mask.to(dtype)
    B, T = mask.shape
    if loss_type == "grpo":  # mean over sequences of the masked token mean
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / B
    if loss_type in ("bnpo", "dapo"):  # masked token sum / mask sum
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":  # masked sum / (B * T)
        return mask / float(B * T)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


_aggregation_weights = loss_weights  # grpo_loss's ``loss_weights`` argument shadows the name


class LossMetrics(dict):
    """The loss ops' metrics dict, with TRL's names (those of ``policy_loss``). The names of the previous release
    still resolve on lookup -- with a FutureWarning -- for one release; iteration shows only the current names."""

    RENAMED = {"clip_low_frac": "clip_ratio/low_mean", "clip_high_frac": "clip_ratio/high_mean", "kl_mean": "kl"}

    def _current(self, key):
        if key in self.RENAMED and not dict.__contains__(self, key):
            warnings.warn(f"metric {key!r} is now called {self.RENAMED[key]!r}; the old name goes in the next release",
                          FutureWarning, stacklevel=3)
            return self.RENAMED[key]
        return key

    def __missing__(self, key):
        if key in self.RENAMED:
            return dict.__getitem__(self, self._current(key))
        raise KeyError(key)

    def get(self, key, default=None):
        return dict.get(self, self._current(key), default)

    def __contains__(self, key):
        return dict.__contains__(self, key) or (key in self.RENAMED and dict.__contains__(self, self.RENAMED[key]))


def grpo_metrics(logp, ratio, kl, advantages, mask, eps_low, eps_high):
    """Masked token means of the quantities a GRPO trainer logs (all detached), named as ``policy_loss`` (TRL) names
    them: ratio_mean, clip_ratio/{low,high,region}_mean, kl, and logp_mean."""
    with torch.no_grad():
        m = mask.to(logp.dtype)
        count = m.sum().clamp(min=1.0)
        adv = advantages.to(logp.dtype)
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logp.dtype)
        return LossMetrics({
            "ratio_mean": (ratio * m).sum() / count,
            "clip_ratio/low_mean": (low * m).sum() / count,
            "clip_ratio/high_mean": (high * m).sum() / count,
            "clip_ratio/region_mean": (torch.maximum(low, high) * m).sum() / count,
            "kl": (kl * m).sum() / count,
            "logp_mean": (logp * m).sum() / count,
        })


def clip_epsilons(epsilon, epsilon_high, eps_low=None, eps_high=None):
    """(lower, upper) clip widths from TRL's names -- ``epsilon``, ``epsilon_high`` (None: = epsilon) -- or from the
    previous release's ``eps_low`` / ``eps_high`` (a FutureWarning; not both spellings of one bound)."""
    for old, new, value in (("eps_low", "epsilon", eps_low), ("eps_high", "epsilon_high", eps_high)):
        if value is not None:
            warnings.warn(f"{old}= is now called {new}= (TRL's name); the old name goes in the next release",
                          FutureWarning, stacklevel=3)
    if eps_low is not None:
        if epsilon is not None:
            raise TypeError("give epsilon or eps_low (its old name), not both")
        epsilon = eps_low
    if eps_high is not None:
        if epsilon_high is not None:
            raise TypeError("give epsilon_high or eps_high (its old name), not both")
        epsilon_high = eps_high
    epsilon = 0.2 if epsilon is None else epsilon
    return epsilon, epsilon if epsilon_high is None else epsilon_high


def grpo_loss(logits, targets, advantages, mask=None, old_logprobs=None, ref_logprobs=None, *, temperature=1.0,
              vocab_range=None, epsilon=None, epsilon_high=None, beta=0.0, loss_type="grpo", loss_weights=None,
              dtype=torch.float32, eps_low=None, eps_high=None):
    """GRPO loss from logits [B, T, V]; differentiable w.r.t. ``logits``. Returns (loss, metrics).
    Clip widths: ``epsilon`` (default 0.2) and ``epsilon_high`` (default: epsilon), TRL's names.
    ``loss_weights`` [B, T] replaces the loss_type aggregation: loss = sum(w * token_loss)."""
    eps_low, eps_high = clip_epsilons(epsilon, epsilon_high, eps_low, eps_high)
    B, T = targets.shape
    lo, hi = vocab_range if vocab_range is not None else (0, logits.shape[-1])
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=targets.device)
    adv = advantages.to(dtype)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    logp, _ = token_logprobs(logits, targets, temperature, lo, hi, mask=mask, dtype=dtype)
    token_loss, ratio, kl = grpo_token_terms(logp, adv, old_logprobs, ref_logprobs, eps_low, eps_high, beta)
    # masked tokens contribute nothing, even if their old/ref log-probs are padding (NaN/inf)
    keep = mask.bool()
    token_loss = torch.where(keep, token_loss, torch.zeros_like(token_loss))
    ratio = torch.where(keep, ratio, torch.ones_like(ratio))
    kl = torch.where(keep, kl, torch.zeros_like(kl))
    w = (_aggregation_weights(mask, loss_type, dtype) if loss_weights is None else loss_weights).to(dtype)
    loss = (token_loss * w).sum()
    return loss, grpo_metrics(logp, ratio, kl, adv, mask, eps_low, eps_high)


def fused_linear_grpo_loss(hidden, weight, targets, advantages, mask=None, old_logprobs=None, ref_logprobs=None,
                           **kwargs):
    """The same as ``grpo_loss`` with logits = hidden @ weight.T (materialized)."""
    return grpo_loss(hidden @ weight.T, targets, advantages, mask, old_logprobs, ref_logprobs, **kwargs)


def logprob_backward(logits, targets, lse, grad_logprobs, temperature, vocab_lo, vocab_hi, entropy=None,
                     grad_entropy=None):
    """dz = g/T * (onehot(y) - p) - gH/T * p * (log p + H) on the window (p = softmax(z/T), H its entropy),
    0 outside; in the logits dtype. The entropy term is there when ``grad_entropy`` is given."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits[..., vocab_lo:vocab_hi].to(acc) / temperature
    g = grad_logprobs.reshape(z.shape[:-1]).to(acc)
    logq = z - lse.reshape(z.shape[:-1]).unsqueeze(-1)
    p = torch.exp(logq)
    dz = -(g / temperature).unsqueeze(-1) * p
    skip = g == 0
    if grad_entropy is not None:
        gh = grad_entropy.reshape(z.shape[:-1]).to(acc)
        h = entropy.reshape(z.shape[:-1]).to(acc)
        # dH/dz_j = -p_j (log p_j + H) / T; p_j = 0 (a -inf logit) contributes 0
        term = torch.where(p > 0, p * (logq + h.unsqueeze(-1)), torch.zeros_like(p))
        dz = dz - (gh / temperature).unsqueeze(-1) * term
        skip = skip & (gh == 0)
    local = (targets.reshape(z.shape[:-1]) - vocab_lo).long()
    inside = (local >= 0) & (local < vocab_hi - vocab_lo)
    dz.scatter_add_(-1, local.clamp(0, vocab_hi - vocab_lo - 1).unsqueeze(-1),
                    torch.where(inside, g / temperature, torch.zeros_like(g)).unsqueeze(-1))
    dz = torch.where(skip.unsqueeze(-1), torch.zeros_like(dz), dz)
    out = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    out[..., vocab_lo:vocab_hi] = dz.to(logits.dtype)
    return out


# --------------------------------------------------------------------------- advantages
def _scaled(d, denom):
    """d / denom, with exactly 0 where d == 0 (constant groups stay 0 even with eps = 0)."""
    return torch.where(d == 0, torch.zeros_like(d), d / denom)


def _group_stats(values, index, num_groups, unbiased):
    """Per-group (count, mean, std) of ``values`` (float64, NaN = missing), shifted two-pass."""
    valid = ~torch.isnan(values)
    v = torch.where(valid, values, torch.zeros_like(values))
    count = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, valid.to(values.dtype))
    # shift: the first valid value of each group (exact zero deviations for constant groups)
    order = torch.arange(values.numel(), device=values.device)
    first = torch.full((num_groups,), values.numel(), dtype=torch.long, device=values.device)
    first = first.scatter_reduce(0, index[valid], order[valid], reduce="amin")
    shift = torch.where(count > 0, v[first.clamp(max=max(values.numel() - 1, 0))] if values.numel() else count, 0.0)
    dev = torch.where(valid, v - shift[index], torch.zeros_like(v))
    mean = shift + torch.zeros_like(count).index_add_(0, index, dev) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
    d2 = torch.where(valid, (v - mean[index]) ** 2, torch.zeros_like(v))
    m2 = torch.zeros_like(count).index_add_(0, index, d2)
    dof = count - 1 if unbiased else count
    std = torch.where((count > 1) & (dof > 0), torch.sqrt(m2 / dof.clamp(min=1)), torch.zeros_like(m2))
    return count, mean, std, shift


def group_advantages(rewards, group_index, num_groups, weights=None, mode="grpo", eps=1e-4, unbiased=True,
                     dtype=torch.float64):
    """rewards [N, R], group_index [N] dense in [0, G). Returns (adv fp32 [N], group_mean [G], group_std [G])."""
    r = rewards.to(dtype)
    N, R = r.shape
    w = torch.ones(R, dtype=dtype, device=r.device) if weights is None else weights.to(dtype)
    nan = torch.isnan(r)
    any_valid = (~nan).any(dim=1)
    combined = torch.where(nan, torch.zeros_like(r), r * w).sum(dim=1)
    combined = torch.where(any_valid, combined, torch.full_like(combined, float("nan")))
    count, mean, std, shift = _group_stats(combined, group_index, num_groups, unbiased)
    valid = ~torch.isnan(combined)
    if mode == "gdpo":
        summed = torch.zeros(N, dtype=dtype, device=r.device)
        for j in range(R):
            _, m_j, s_j, _ = _group_stats(r[:, j], group_index, num_groups, unbiased)
            z = _scaled(r[:, j] - m_j[group_index], s_j[group_index] + eps)
            summed = summed + w[j] * torch.where(nan[:, j], torch.zeros_like(z), z)
        summed = torch.where(any_valid, summed, torch.full_like(summed, float("nan")))
        zero = torch.zeros(N, dtype=torch.long, device=r.device)
        _, bm, bs, _ = _group_stats(summed, zero, 1, unbiased)
        adv = _scaled(summed - bm[0], bs[0] + eps)
    elif mode == "grpo":
        adv = _scaled(combined - mean[group_index], std[group_index] + eps)
    elif mode == "dr_grpo":
        adv = combined - mean[group_index]
    elif mode == "batch":
        zero = torch.zeros(N, dtype=torch.long, device=r.device)
        _, _, bs, _ = _group_stats(combined, zero, 1, unbiased)
        adv = _scaled(combined - mean[group_index], bs[0] + eps)
    elif mode == "rloo":
        n = count[group_index]
        xs = combined - shift[group_index]
        total = torch.zeros_like(count).index_add_(0, group_index, torch.where(valid, xs, torch.zeros_like(xs)))
        adv = torch.where(n > 1, xs - (total[group_index] - xs) / (n - 1).clamp(min=1), torch.zeros_like(xs))
    else:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return adv.float(), mean.float(), std.float()


# --------------------------------------------------------------------------- decode attention
def decode_attention(q, k, v, lengths, prefix_k=None, prefix_v=None, prefix_lengths=None, prefix_of_row=None,
                     scale=None, dtype=torch.float32):
    """Attention of a decode window over each row's context: its shared prefix (if any), then its own cache.

    q [R, W, H, D]; k, v [R, S, Hkv, D] (H a multiple of Hkv; head h reads kv head h // (H / Hkv)); lengths [R].
    Query w of row r sees its prefix's first prefix_lengths[p] keys (p = prefix_of_row[r] >= 0; -1: no prefix)
    and its own slots j < min(lengths[r] + w + 1, S) -- the window's own keys sit at slots lengths[r] + w, so
    the window is causal. Scores scale * q.k (default 1/sqrt(D)), softmax over the concatenation. Returns out
    [R, W, H, D] (q's dtype) and lse [R, W, H] (``dtype``, natural log); a query with no key gets 0 and -inf.
    Written as the concatenation itself (the prefix copied to each row): the spec, not a fast path.
    """
    R, W, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    rep = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    keys, vals, visible = [], [], []
    if prefix_k is not None:
        has = prefix_of_row >= 0
        p = prefix_of_row.clamp(min=0).long()
        keys.append(prefix_k[p])  # [R, Sp, Hkv, D]
        vals.append(prefix_v[p])
        Sp = prefix_k.shape[1]
        seen = (torch.arange(Sp, device=dev)[None] < prefix_lengths.long()[p][:, None]) & has[:, None]  # [R, Sp]
        visible.append(seen[:, None, :].expand(R, W, Sp))
    keys.append(k)
    vals.append(v)
    limit = lengths.long()[:, None] + torch.arange(W, device=dev)[None] + 1  # [R, W]
    visible.append(torch.arange(S, device=dev)[None, None] < limit[:, :, None])
    kk = torch.cat(keys, 1).to(dtype).repeat_interleave(rep, dim=2)  # [R, L, H, D]
    vv = torch.cat(vals, 1).to(dtype).repeat_interleave(rep, dim=2)
    seen = torch.cat(visible, 2)  # [R, W, L]
    scores = torch.einsum("rwhd,rlhd->rhwl", q.to(dtype), kk) * scale
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [R, H, W]; -inf for a query with no key
    # unseen keys (and every key of an empty query, where lse = -inf) weigh 0; NaN inputs stay NaN
    probs = torch.where(seen[:, None], torch.exp(scores - lse[..., None]), 0.0)
    out = torch.einsum("rhwl,rlhd->rwhd", probs, vv)
    return out.to(q.dtype), lse.transpose(1, 2).contiguous()
