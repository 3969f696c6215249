"""Every GRPO-family policy loss of TRL's GRPOTrainer, over per-token [B, T] scalars.

The expensive part of a GRPO loss is the log-softmax over the vocabulary; it is
done once by ``token_logprobs`` / ``fused_linear_logprobs`` (``return_entropy=True``
for the entropy in the same pass, a recompute backward that stores only the fp32
logsumexp per token). What remains -- ratios, clipping, KL, masks, aggregation --
is O(B x T) elementwise math that autograd differentiates into the log-probs and
entropies; at Lumina's image window it is ~1e-4 of the log-prob pass's work
(8192 vocab entries per token vs a few dozen scalar ops), so it is left to
PyTorch (and to torch.compile, which fuses it). Every TRL variant composes on
top of the same kernels, sequence-level ratios included:

    logp, ent = fused_linear_logprobs(hidden, lm_head.weight, targets, return_entropy=True)
    loss, metrics = policy_loss(logp, advantages, mask, old_logprobs=old, entropies=ent, config=cfg)

The semantics are TRL 1.16's (trl/trainer/grpo_trainer.py ``_compute_loss``;
parity is tested against TRL's own method in tests/test_trl_parity.py): names and
defaults of ``PolicyLossConfig`` are those of ``trl.GRPOConfig`` where they
overlap. Two differences of scope: the entropy-quantile threshold is taken over
this call's tokens (TRL gathers it across processes), and the adaptive entropy
controller (``use_adaptive_entropy``) is a trainer-side schedule -- pass the
coefficient it gives you as ``entropy_coef``.

``fused_linear_grpo_loss`` / ``grpo_loss`` remain for the four classic loss types
with token-level ratios: they compute the gradient during the forward (3 head
GEMMs per chunk instead of 4), which is what they win by.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# loss types whose aggregation divides by the caller's token count (TRL: num_items_in_batch)
_TOKEN_COUNT_NORMALISED = ("dapo", "cispo", "vespo")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss options of ``trl.GRPOConfig`` (same names and defaults)."""

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2  # epsilon_low
    epsilon_high: Optional[float] = None  # None: = epsilon
    delta: Optional[float] = None  # two-sided clipping: the unclipped ratio is capped at delta
    beta: float = 0.0
    use_bias_correction_kl: bool = True  # KL x the importance ratio (DeepSeek-V3.2); changes the gradient if beta != 0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0  # entropy bonus: loss - entropy_coef * mean entropy
    max_completion_length: Optional[int] = None  # dr_grpo's constant; None: the batch's T

    def __post_init__(self):
        if self.loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {POLICY_LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        for name in ("epsilon", "beta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                     "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        for name in ("epsilon", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epsilon_high is not None and not (math.isfinite(self.epsilon_high) and self.epsilon_high >= 0):
            raise ValueError(f"epsilon_high must be None or a finite float >= 0, got {self.epsilon_high!r}")
        if self.delta is not None and not (math.isfinite(self.delta) and self.delta > 1.0):
            raise ValueError(f"delta must be None or a finite float > 1 (it caps the ratio), got {self.delta!r}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.off_policy_mask_threshold is not None and not (math.isfinite(self.off_policy_mask_threshold)
                                                               and self.off_policy_mask_threshold >= 0):
            raise ValueError(f"off_policy_mask_threshold must be None or a finite float >= 0, "
                             f"got {self.off_policy_mask_threshold!r}")
        if not (0.0 < self.top_entropy_quantile <= 1.0):
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile!r}")
        if self.max_completion_length is not None and (isinstance(self.max_completion_length, bool)
                                                       or not isinstance(self.max_completion_length, int)
                                                       or self.max_completion_length < 1):
            raise ValueError(f"max_completion_length must be None or a positive int, "
                             f"got {self.max_completion_length!r}")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# --------------------------------------------------------------------------- helpers (TRL's, restated)


def importance_sampling_ratio(old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor,
                              mode: str = "sequence_mask", clip_min: Optional[float] = None,
                              clip_max: Optional[float] = 3.0) -> torch.Tensor:
    """Rollout/trainer mismatch correction: pi_old / pi_sampler per token ([B, T], ``token_*`` modes) or per
    sequence ([B, 1], ``sequence_*``: the product over the completion). ``*_truncate`` clamps it to
    [clip_min, clip_max]; ``*_mask`` zeroes it outside. Tokens without a sampler log-prob (NaN) count as ratio 1.
    (TRL: GRPOConfig.vllm_importance_sampling_mode / _clip_min / _clip_max.)"""
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    _check_pair("sampling_logprobs", sampling_logprobs, "old_logprobs", old_logprobs)
    diff = torch.nan_to_num((old_logprobs - sampling_logprobs) * mask.to(old_logprobs.dtype), nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio if clip_min is None and clip_max is None else torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def off_policy_mask(advantages: torch.Tensor, logprobs: torch.Tensor, sampling_logprobs: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, [B, 1]: keep a sequence if its advantage is >= 0 or its mean
    per-token KL(sampler || current) estimate is <= threshold. Unscored (NaN) tokens give no evidence."""
    m = mask.to(logprobs.dtype)
    kl = torch.nan_to_num(sampling_logprobs - logprobs.detach(), nan=0.0)
    mean_kl = (kl * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(m.dtype)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """Bool [B, T]: the tokens whose entropy is at or above the (1 - top_quantile) quantile of the unmasked
    tokens' entropies (e.g. 0.2 keeps the top 20%, the "80/20" rule); padding is never kept."""
    keep = mask.bool()
    # nanquantile over the padded tensor = quantile over the unmasked values, without a data-dependent shape
    # (torch.compile fullgraph); no unmasked token: NaN threshold, nothing kept
    values = torch.where(keep, entropies.detach().float(), float("nan")).reshape(-1)
    threshold = torch.nanquantile(values, 1.0 - top_quantile)
    return ((entropies.detach() * mask.to(entropies.dtype)) >= threshold) & keep


@torch.no_grad()
def vespo_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                  importance_sampling_ratio: Optional[torch.Tensor], k_pos: float, lambda_pos: float, k_neg: float,
                  lambda_neg: float) -> torch.Tensor:
    """VESPO's detached sequence weight phi(w) = exp(lambda + k log w - lambda w), [B, 1], w the sequence ratio
    (sum of per-token log-ratios, times the optional token-level correction), (k, lambda) by the advantage's sign."""
    floor = math.log(1e-8)
    seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        seq = seq + torch.clamp(torch.log(importance_sampling_ratio), floor, 20.0).sum(dim=-1, keepdim=True)
    log_w = torch.clamp(seq, floor, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------- the loss


def _check_pair(name, t, like_name, like):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1.0)


def policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                old_logprobs: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None,
                entropies: Optional[torch.Tensor] = None, importance_sampling_ratio: Optional[torch.Tensor] = None,
                sampling_logprobs: Optional[torch.Tensor] = None, num_items_in_batch=None,
                gradient_accumulation_steps: int = 1, entropy_mask: Optional[torch.Tensor] = None,
                config: PolicyLossConfig = PolicyLossConfig(),
                return_terms: bool = False) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """TRL's GRPO-family loss from per-token log-probs [B, T] (differentiable). Returns ``(loss, metrics)``.

    - ``advantages`` [B] or [B, T]; ``mask`` [B, T] (completion x tool mask);
    - ``old_logprobs`` [B, T]: the policy that generated the batch (None: on-policy, the detached ``logprobs``);
    - ``ref_logprobs`` [B, T]: the reference model (needed when ``config.beta != 0``);
    - ``entropies`` [B, T]: needed for ``top_entropy_quantile < 1`` and ``entropy_coef != 0`` (differentiable);
    - ``importance_sampling_ratio`` [B, T] or [B, 1]: rollout/trainer mismatch correction (see
      ``importance_sampling_ratio()``), multiplied into the per-token loss (for vespo: into its weight);
    - ``sampling_logprobs`` [B, T]: the sampler's log-probs for the off-policy mask (default: ``old_logprobs``);
    - ``num_items_in_batch``: dapo / cispo / vespo divide the masked token sum by it (TRL passes
      ``num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation``); default: this
      call's unmasked token count;
    - ``gradient_accumulation_steps``: grpo / bnpo / dr_grpo / sapo / luspo and the entropy bonus are divided by it.
    - ``entropy_mask`` [B, T] bool: a high-entropy token mask computed elsewhere (e.g. with the quantile taken over
      every process's tokens, as TRL does), used instead of this call's ``top_entropy_quantile`` threshold.

    Metrics (0-dim, detached): policy_loss, entropy (if given), kl (beta != 0), clip_ratio/{low,high,region}_mean
    (clipped loss types), cispo_clip_ratio, vespo/phi_seq_mean, ratio_mean. With ``return_terms=True`` the metrics
    also hold the per-token tensors they reduce (detached): "terms/ratio" ([B, T] or [B, 1]), "terms/kl",
    "terms/clip_low", "terms/clip_high" (float), "terms/cispo_clip", "terms/phi" -- for callers that reduce them
    across processes themselves.
    """
    cfg = config
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating [B, T] tensor, got "
                         f"{tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__}")
    B, T = logprobs.shape
    _check_pair("mask", mask, "logprobs", logprobs)
    if not isinstance(advantages, torch.Tensor) or advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got "
                         f"{tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else advantages!r}")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("entropies", entropies),
                    ("sampling_logprobs", sampling_logprobs)):
        if t is not None:
            _check_pair(name, t, "logprobs", logprobs)
    if importance_sampling_ratio is not None and importance_sampling_ratio.shape not in ((B, T), (B, 1)):
        raise ValueError(f"importance_sampling_ratio must have shape ({B}, {T}) or ({B}, 1), "
                         f"got {tuple(importance_sampling_ratio.shape)}")
    if cfg.beta != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when config.beta != 0")
    if entropies is None and ((cfg.top_entropy_quantile < 1.0 and entropy_mask is None) or cfg.entropy_coef != 0.0):
        raise ValueError("entropies is required when config.top_entropy_quantile < 1 or config.entropy_coef != 0 "
                         "(token_logprobs / fused_linear_logprobs with return_entropy=True give them)")
    if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
            or gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be a positive int, got {gradient_accumulation_steps!r}")

    m = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    eps_low, eps_high = cfg.epsilon_low, cfg.epsilon_high_value

    if entropy_mask is not None:
        _check_pair("entropy_mask", entropy_mask, "logprobs", logprobs)
        ent_mask = entropy_mask.bool() & mask.bool()
    else:
        ent_mask = high_entropy_mask(entropies, mask, cfg.top_entropy_quantile) if cfg.top_entropy_quantile < 1.0 \
            else None
    opm = None
    if cfg.off_policy_mask_threshold is not None:
        samp = old if sampling_logprobs is None else sampling_logprobs.to(logprobs.dtype)
        opm = off_policy_mask(adv, logprobs, samp, mask, cfg.off_policy_mask_threshold)

    log_ratio = logprobs - old
    if cfg.importance_sampling_level == "token":
        log_w = log_ratio
    else:  # GSPO: the length-normalised sequence log-ratio, one per sequence
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_w)

    kl = None
    if cfg.beta != 0.0:
        d = ref_logprobs.to(logprobs.dtype) - logprobs
        kl = torch.exp(d) - d - 1.0
        if cfg.use_bias_correction_kl:
            kl = kl * ratio

    phi = None
    if cfg.loss_type == "cispo":
        token_loss = -torch.clamp(ratio, max=eps_high).detach() * adv * logprobs
    elif cfg.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        token_loss = -torch.minimum(unclipped * adv, clipped * adv)
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        token_loss = -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * adv
    else:  # vespo
        phi = vespo_weights(adv, log_ratio, m, importance_sampling_ratio, cfg.vespo_k_pos, cfg.vespo_lambda_pos,
                            cfg.vespo_k_neg, cfg.vespo_lambda_neg)
        token_loss = -phi * adv * logprobs

    if opm is not None:
        token_loss = token_loss * opm
    if ent_mask is not None:
        token_loss = token_loss * ent_mask
    if importance_sampling_ratio is not None and cfg.loss_type != "vespo":
        token_loss = token_loss * importance_sampling_ratio.to(logprobs.dtype)
    if kl is not None:
        token_loss = token_loss + cfg.beta * kl

    gas = float(gradient_accumulation_steps)
    if cfg.loss_type in ("grpo", "sapo"):
        loss = ((token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        policy = loss.detach()
        loss = loss / gas
    elif cfg.loss_type == "bnpo":
        loss = (token_loss * m).sum() / m.sum().clamp(min=1.0)
        policy = loss.detach()
        loss = loss / gas
    elif cfg.loss_type == "dr_grpo":
        length = T if cfg.max_completion_length is None else cfg.max_completion_length
        loss = (token_loss * m).sum() / (B * length)
        policy = loss.detach()
        loss = loss / gas
    elif cfg.loss_type == "luspo":  # sequence sums (token_loss broadcasts to [B, T] here when it is [B, 1])
        loss = (token_loss * m).sum(-1).mean()
        policy = loss.detach()
        loss = loss / gas
    else:  # dapo, cispo, vespo
        # this call's token count (at least 1), or the caller's normaliser as given (TRL clamps its raw count
        # before scaling it by processes / accumulation, so the scaled value may be below 1)
        n = m.sum().clamp(min=1.0) if num_items_in_batch is None else torch.as_tensor(
            num_items_in_batch, dtype=m.dtype, device=m.device)
        loss = (token_loss * m).sum() / n
        policy = loss.detach()

    metrics: Dict[str, torch.Tensor] = {"policy_loss": policy}
    if cfg.entropy_coef != 0.0:
        em = m if ent_mask is None else m * ent_mask
        loss = loss - cfg.entropy_coef * ((entropies * em).sum() / em.sum().clamp(min=1.0) / gas)

    with torch.no_grad():
        def token_mean(x):  # masked token mean of a [B, T] or per-sequence [B, 1] quantity
            if x.shape[1] == 1:
                return x.mean()
            return _masked_mean(x, m)

        metrics["ratio_mean"] = token_mean(ratio.detach())
        if entropies is not None:
            metrics["entropy"] = _masked_mean(entropies.detach(), m)
        if kl is not None:
            metrics["kl"] = token_mean(kl.detach())
        terms = {"terms/ratio": ratio.detach()}
        if kl is not None:
            terms["terms/kl"] = kl.detach()
        if cfg.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low = ((ratio < 1 - eps_low) & (adv < 0)).to(m.dtype)
            high = ((ratio > 1 + eps_high) & (adv > 0)).to(m.dtype)
            metrics["clip_ratio/low_mean"] = token_mean(low)
            metrics["clip_ratio/high_mean"] = token_mean(high)
            metrics["clip_ratio/region_mean"] = token_mean(torch.maximum(low, high))
            terms["terms/clip_low"], terms["terms/clip_high"] = low, high
        elif cfg.loss_type == "cispo":
            clipped = ((ratio > eps_high) & (adv > 0)).to(m.dtype)
            metrics["cispo_clip_ratio"] = token_mean(clipped)
            terms["terms/cispo_clip"] = clipped
        elif cfg.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = token_mean(phi)
            terms["terms/phi"] = phi
        if return_terms:
            metrics.update(terms)
    return loss, metrics
