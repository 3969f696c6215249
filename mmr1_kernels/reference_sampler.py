"""Reference (the spec) of the fused CFG sampler: docs/kernel-semantics.md, section 1.

Per row, in fp32 (or fp64 for the oracle):
  1. z = u + s (c - u) over the vocab window [lo, hi) (z = c without uncond)
  2. forced >= 0: that token, log-prob 0
  3. temperature 0: argmax of z (lowest id wins ties), log-prob 0; else z <- z / T
  4. top-k: keep z >= the k-th largest z (ties at the threshold kept);
     top-p after top-k: keep the smallest high-z set whose renormalized mass >= p
     (ties kept)
  5. sample from softmax(z) over the kept set by an exponential race, which is
     Gumbel-max: argmax_j q_j / E_j with q_j = exp(z_j - max z), E_j = -log U_j
     (= argmax z_j - log(-log U_j)); U_j from Philox4x32-10 keyed by
     (seed, row_id, offset, j): batch-invariant and identical in every backend
     (offset: one for the batch, or one per row -- a Jacobi window's positions)
  6. log-prob of the token under the distribution sampled from; optionally
     log_softmax(c / T over the window)[token] (T = 1 for greedy rows).

The RNG mapping (shared with csrc/sampler.cpp and mmr1_kernels/gpu/sampler.py):
  key     = (seed & 0xffffffff, seed >> 32)
  counter = (j >> 2, row_id & 0xffffffff, offset & 0xffffffff, offset >> 32)
  U_j     = ((lane j & 3 of Philox4x32-10(counter, key)) >> 8) + 0.5) * 2^-24, in (0, 1)
where j is the absolute token id.
"""
from __future__ import annotations


import torch

M32 = 0xFFFFFFFF
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
STATUS_OK, STATUS_NAN, STATUS_EMPTY = 0, 1, 2


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable)."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_ROUND_B, c2)
        hi1, lo1 = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi0 ^ c1 ^ k0, lo0, hi1 ^ c3 ^ k1, lo1
        k0 = (k0 + PHILOX_KEY_A) & M32
        k1 = (k1 + PHILOX_KEY_B) & M32
    return c0, c1, c2, c3


def _mulhilo(a: int, b: torch.Tensor):
    """(a * b) >> 32 and (a * b) & M32 for a uint32 constant and an int64 tensor of uint32 values.

    a * b can reach 2^64 and overflow int64, so it is assembled from a * (b & 0xFFFF)
    and a * (b >> 16), each < 2^48.
    """
    x = a * (b & 0xFFFF)
    y = a * (b >> 16)  # weight 2^16
    t = (x & M32) + ((y & 0xFFFF) << 16)
    return ((x >> 32) + (y >> 16) + (t >> 32)) & M32, t & M32


def uniforms(seed: int, offset, row_ids: torch.Tensor, ids: torch.Tensor, dtype=torch.float32):
    """U [B, W] in (0, 1) for rows ``row_ids`` [B] and absolute token ids ``ids`` [W]; ``offset`` is an int (every
    row) or a [B] int64 tensor (one per row, its 64-bit pattern)."""
    seed = int(seed) & (2**64 - 1)
    k0, k1 = seed & M32, (seed >> 32) & M32
    c0 = (ids.long() >> 2)[None, :]
    c1 = (row_ids.long() & M32)[:, None]
    if isinstance(offset, torch.Tensor) and offset.numel() != 1:
        off = offset.long().reshape(-1, 1).to(c1.device)
        c2, c3 = off & M32, (off >> 32) & M32  # arithmetic shift, then the mask: the high word of the bit pattern
    else:
        offset = int(offset) & (2**64 - 1)
        c2 = torch.full_like(c1, offset & M32)
        c3 = torch.full_like(c1, (offset >> 32) & M32)
    out = philox4x32(c0, c1, c2, c3, k0, k1)
    lane = (ids.long() & 3)[None, :]
    x = torch.where(lane == 0, out[0], torch.where(lane == 1, out[1], torch.where(lane == 2, out[2], out[3])))
    return (((x >> 8).to(torch.float64) + 0.5) * 2.0**-24).to(dtype)


def _window_threshold_top_p(zt, keep, q, total, top_p):
    """Per row: the smallest kept value v such that mass(z >= v) >= p * total (ties kept)."""
    B, W = zt.shape
    vals = torch.where(keep, zt, torch.full_like(zt, float("-inf")))
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    v_sorted = vals.gather(1, order)
    q_sorted = q.gather(1, order)
    csum = q_sorted.cumsum(1)
    # mass(z >= v_i) includes every tie of v_i: take the cumsum at the last index of each tie run
    idx = torch.arange(W, device=zt.device).expand(B, W)
    same_next = torch.zeros_like(keep)
    same_next[:, :-1] = v_sorted[:, :-1] == v_sorted[:, 1:]
    last_of_run = torch.where(same_next, torch.full_like(idx, W), idx)
    last_of_run = torch.flip(torch.cummin(torch.flip(last_of_run, [1]), 1).values, [1])
    mass_ge = csum.gather(1, last_of_run.clamp(max=W - 1))
    enough = (mass_ge >= top_p[:, None] * total[:, None]) & (v_sorted > float("-inf"))
    first = torch.where(enough.any(1), enough.float().argmax(1), torch.zeros(B, dtype=torch.long))
    return v_sorted.gather(1, first[:, None]).squeeze(1)


def guided_logits(cond, uncond, cfg_scale, vocab_lo, vocab_hi, dtype=torch.float32):
    """z = u + s (c - u) over the window (c without uncond), in ``dtype``."""
    c = cond[:, vocab_lo:vocab_hi].to(dtype)
    if uncond is None:
        return c
    u = uncond[:, vocab_lo:vocab_hi].to(dtype)
    return u + cfg_scale.to(dtype)[:, None] * (c - u)


def filtered_weights(z, temperature, top_k, top_p):
    """Steps 3-4 for non-greedy rows: (zt = z / T, q = exp(zt - max) on the kept set else 0, max).

    The distribution sampled from is q / q.sum(1).
    """
    W = z.shape[1]
    T = temperature.to(z.dtype)
    zt = z / torch.where(T == 0, torch.ones_like(T), T)[:, None]
    m = zt.max(1).values
    k = top_k.long()
    k = torch.where((k <= 0) | (k >= W), torch.full_like(k, W), k)
    kth = zt.sort(1, descending=True).values.gather(1, (k - 1)[:, None]).squeeze(1)
    keep = (zt >= kth[:, None]) & (zt > float("-inf"))
    q = torch.where(keep, torch.exp(zt - m[:, None]), torch.zeros_like(zt))
    p = top_p.to(z.dtype)
    use_p = p < 1
    if bool(use_p.any()):
        thr = _window_threshold_top_p(zt, keep, q, q.sum(1), p)
        keep = keep & (~use_p[:, None] | (zt >= thr[:, None]))
        q = torch.where(keep, q, torch.zeros_like(q))
    return zt, q, m


def sampling_distribution(cond, uncond, cfg_scale, temperature, top_k, top_p, vocab_lo, vocab_hi,
                          dtype=torch.float64):
    """The exact distribution [B, W] over the window that a free, non-greedy row samples from."""
    z = guided_logits(cond, uncond, cfg_scale, vocab_lo, vocab_hi, dtype)
    _, q, _ = filtered_weights(z, temperature, top_k, top_p)
    return q / q.sum(1, keepdim=True)


def cfg_sample(cond, uncond, cfg_scale, temperature, top_k, top_p, forced, seed, offset, row_ids, vocab_lo, vocab_hi,
               return_cond_logprobs=False, dtype=torch.float32):
    """Returns (tokens int64 [B], logprobs [B], cond_logprobs [B] (empty if not asked), status int32 [B])."""
    B = cond.shape[0]
    W = vocab_hi - vocab_lo
    z = guided_logits(cond, uncond, cfg_scale, vocab_lo, vocab_hi, dtype)
    c = cond[:, vocab_lo:vocab_hi].to(dtype)
    T = temperature.to(dtype)
    greedy = T == 0
    nan_row = torch.isnan(z).any(1)
    z = torch.where(nan_row[:, None], torch.zeros_like(z), z)
    zt, q, m = filtered_weights(z, temperature, top_k, top_p)
    total = q.sum(1)
    ids = torch.arange(vocab_lo, vocab_hi, device=cond.device)
    offset = offset.cpu() if isinstance(offset, torch.Tensor) and offset.numel() != 1 else int(offset)
    U = uniforms(int(seed), offset, row_ids.cpu(), ids.cpu(), dtype).to(cond.device)
    race = torch.where(q > 0, q / -torch.log(U), torch.full_like(q, -1.0))
    tok = race.argmax(1)  # first index of the max: the lowest id wins exact ties
    logp = zt.gather(1, tok[:, None]).squeeze(1) - m - torch.log(total)
    g_tok = z.argmax(1)
    tok = torch.where(greedy, g_tok, tok)
    logp = torch.where(greedy, torch.zeros_like(logp), logp)
    status = torch.where(nan_row, STATUS_NAN, torch.where(~greedy & (total <= 0), STATUS_EMPTY, STATUS_OK))
    tokens = tok + vocab_lo
    if forced is not None:
        is_forced = forced >= 0
        tokens = torch.where(is_forced, forced, tokens)
        logp = torch.where(is_forced, torch.zeros_like(logp), logp)
        status = torch.where(is_forced, STATUS_OK, status)
    else:
        is_forced = torch.zeros(B, dtype=torch.bool, device=cond.device)
    tokens = torch.where(status == STATUS_OK, tokens, torch.full_like(tokens, vocab_lo))
    logp = torch.where(status == STATUS_OK, logp, torch.full_like(logp, float("nan")))
    if return_cond_logprobs:
        Tc = torch.where(greedy, torch.ones_like(T), T)[:, None]
        lsm = torch.log_softmax(c / Tc, dim=1)
        inside = (tokens >= vocab_lo) & (tokens < vocab_hi)
        lc = lsm.gather(1, (tokens - vocab_lo).clamp(0, W - 1)[:, None]).squeeze(1)
        cond_lp = torch.where(is_forced | ~inside, torch.zeros_like(lc), lc)
        cond_lp = torch.where(status == STATUS_OK, cond_lp, torch.full_like(cond_lp, float("nan")))
    else:
        cond_lp = torch.empty(0, dtype=dtype, device=cond.device)
    return tokens, logp.to(dtype), cond_lp.to(dtype), status.to(torch.int32)
