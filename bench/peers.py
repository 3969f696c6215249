"""What users would pick instead of mmr1_kernels, written the way those projects do it.

Every peer is imported from its own package when that package is installed
(TRL's selective_log_softmax, Liger-Kernel's LigerFusedLinearGRPOLoss); only
the few lines of loss math that TRL keeps inside its trainer method are
restated here, following trl/trainer/grpo_trainer.py `_compute_loss`.
"""
from __future__ import annotations

from typing import Optional

import torch


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def trl_grpo_loss(logits, targets, advantages, mask, old_logprobs, ref_logprobs, *, temperature, vocab_range,
                  epsilon, epsilon_high, beta, loss_type="grpo"):
    """TRL: selective_log_softmax on the (window of the) logits + the GRPO loss math of GRPOTrainer."""
    from trl.trainer.utils import selective_log_softmax

    lo, hi = vocab_range
    # TRL has no vocab window: a user restricts the logits and shifts the ids themselves.
    per_token_logps = selective_log_softmax(logits[..., lo:hi], targets - lo, temperature=temperature)
    mask = mask.float()
    old = per_token_logps.detach() if old_logprobs is None else old_logprobs
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logprobs - per_token_logps) - (ref_logprobs - per_token_logps) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (mask.shape[0] * mask.shape[1])


def trl_token_logprobs(logits, targets, *, temperature, vocab_range):
    from trl.trainer.utils import selective_log_softmax

    lo, hi = vocab_range
    return selective_log_softmax(logits[..., lo:hi], targets - lo, temperature=temperature)


def liger_triton_grpo_loss(logits, targets, advantages, mask, old_logprobs, ref_logprobs, *, temperature,
                           vocab_range, epsilon, epsilon_high, beta, loss_type="grpo"):
    """Liger-Kernel's Triton GRPO kernel (CUDA only). It has no vocab window: the window is sliced first,
    and it expects one extra position at the end of the logits (it drops the last one)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    lo, hi = vocab_range
    z = logits[..., lo:hi]
    z = torch.cat([z, z[:, -1:]], dim=1)
    out = triton_grpo_loss(z, old_logprobs, ref_logprobs, targets - lo, advantages, mask.long(),
                           temperature=temperature, beta=beta, eps_low=epsilon, eps_high=epsilon_high, inplace=False,
                           loss_type=loss_type, reduce=True)
    return out[0] if isinstance(out, tuple) else out


def flashinfer_topk_sample(cond, uncond, scale, top_k, lo, hi):
    """FlashInfer's fused top-k sampling from logits (CUDA only); CFG and the window applied first in torch."""
    from flashinfer.sampling import top_k_sampling_from_logits

    u = uncond[:, lo:hi].float()
    z = u + scale * (cond[:, lo:hi].float() - u)
    return top_k_sampling_from_logits(z, top_k) + lo


class LigerGrpo:
    """Liger-Kernel's chunked fused-linear GRPO loss (its torch path; runs on CPU)."""

    def __init__(self, beta, epsilon, epsilon_high, temperature, loss_type="grpo", compiled=True):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        self.loss = LigerFusedLinearGRPOLoss(beta=beta, compiled=compiled, use_ref_model=beta != 0.0,
                                             epsilon_low=epsilon, epsilon_high=epsilon_high, loss_type=loss_type,
                                             temperature=temperature)

    def __call__(self, hidden, weight, targets, mask, advantages, ref_logprobs: Optional[torch.Tensor],
                 old_logprobs: Optional[torch.Tensor]):
        out = self.loss(hidden, weight, targets, mask.long(), advantages, ref_per_token_logps=ref_logprobs,
                        old_per_token_logps=old_logprobs)
        return out[0] if isinstance(out, tuple) else out


def trl_group_advantages(rewards, group_size, eps=1e-4):
    """TRL GRPOTrainer: view(-1, G), nanmean / nanstd per group, (r - mean) / (std + 1e-4)."""
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    return torch.nan_to_num((rewards - mean) / (std + eps))


def verl_group_advantages(scores, uids, eps=1e-6):
    """verl compute_grpo_outcome_advantage: a Python dict over the uid array, torch.std per group."""
    from collections import defaultdict

    id2score, id2mean, id2std = defaultdict(list), {}, {}
    bsz = scores.shape[0]
    uid_list = uids.tolist()
    for i in range(bsz):
        id2score[uid_list[i]].append(scores[i])
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(vals)
            id2mean[idx], id2std[idx] = torch.mean(t), torch.std(t)
    out = scores.clone()
    for i in range(bsz):
        out[i] = (scores[i] - id2mean[uid_list[i]]) / (id2std[uid_list[i]] + eps)
    return out


# --------------------------------------------------------------------------- TRL's own GRPOTrainer._compute_loss
class _OneProcessAccelerator:
    """What _compute_loss asks of accelerate, for a single process (gathers and reductions are the identity)."""

    num_processes = 1
    sync_gradients = True

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def trl_loss_fn(config, gradient_accumulation_steps=1, training=True):
    """TRL's GRPOTrainer._compute_loss, run as-is on a bare trainer object carrying the attributes it reads, with the
    model's log-prob function stubbed to return the caller's per-token log-probs and entropies.

    ``config``: an mmr1_kernels PolicyLossConfig (same field names as trl.GRPOConfig). Returns
    ``call(logprobs, entropies, advantages, mask, old=None, ref=None, sampling=None, is_ratio=None,
    num_items_in_batch=None) -> (loss, trl_metrics)``.
    """
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    args = SimpleNamespace(
        use_bias_correction_kl=config.use_bias_correction_kl, delta=config.delta,
        sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
        vespo_k_pos=config.vespo_k_pos, vespo_lambda_pos=config.vespo_lambda_pos, vespo_k_neg=config.vespo_k_neg,
        vespo_lambda_neg=config.vespo_lambda_neg, steps_per_generation=gradient_accumulation_steps,
        entropy_target=0.0)
    state = dict(
        args=args, loss_type=config.loss_type, importance_sampling_level=config.importance_sampling_level,
        beta=config.beta, epsilon_low=config.epsilon, epsilon_high=config.epsilon_high_value,
        top_entropy_quantile=config.top_entropy_quantile, off_policy_mask_threshold=config.off_policy_mask_threshold,
        use_vllm=False, vllm_importance_sampling_correction=True, aux_loss_enabled=False,
        entropy_coef=config.entropy_coef, use_adaptive_entropy=False,
        _entropy_bonus_enabled=config.entropy_coef != 0.0,
        current_gradient_accumulation_steps=gradient_accumulation_steps,
        accelerator=_OneProcessAccelerator(), model=SimpleNamespace(training=training),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    for k, v in state.items():
        object.__setattr__(trainer, k, v)

    def call(logprobs, entropies, advantages, mask, old=None, ref=None, sampling=None, is_ratio=None,
             num_items_in_batch=None):
        B, T = logprobs.shape
        object.__setattr__(trainer, "max_completion_length", config.max_completion_length or T)
        object.__setattr__(trainer, "use_vllm", is_ratio is not None)
        object.__setattr__(trainer, "_get_per_token_logps_and_entropies",
                           lambda *a, **k: (logprobs, entropies, None))
        for v in trainer._metrics.values():
            v.clear()
        inputs = {
            "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
            "advantages": advantages,
            "num_items_in_batch": torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch,
                                                  dtype=logprobs.dtype),
        }
        for key, value in (("old_per_token_logps", old), ("ref_per_token_logps", ref),
                           ("sampling_per_token_logps", sampling), ("importance_sampling_ratio", is_ratio)):
            if value is not None:
                inputs[key] = value
        loss = trainer._compute_loss(None, inputs)
        return loss, {k: v[-1] for k, v in trainer._metrics["train" if training else "eval"].items()}

    return call
