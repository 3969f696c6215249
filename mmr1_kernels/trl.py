"""TRL's GRPOTrainer on mmr1's kernels, in one call: ``use_mmr1_kernels(trainer)``.

    from trl import GRPOConfig, GRPOTrainer
    from mmr1_kernels.trl import use_mmr1_kernels

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    use_mmr1_kernels(trainer)          # after construction, before train()
    trainer.train()

What it changes (TRL 1.16; TRL is imported lazily, mmr1_kernels does not need it):

1. **Log-probs and entropies.** TRL patches ``model.forward`` (and the reference model's) with a fused LM head,
   ``_ChunkedLogProbFunction``, that TRL's ``_get_per_token_logps_and_entropies`` calls with
   ``fused_lm_head=True``. This replaces that path: the backbone runs as before, and the completion tokens' hidden
   states go through ``fused_linear_logprobs(hidden, lm_head.weight, labels, return_entropy=True)`` -- one pass over
   the vocabulary in chunks, the entropy from the same pass, a recompute backward that keeps only the fp32
   log-sum-exp per token (no [B, T, V] logits at any point). Generation (``fused_lm_head=False``) is untouched.
2. **The loss.** ``trainer._compute_loss`` becomes ``policy_loss`` (mmr1_kernels.policy) with the options of the
   trainer's GRPOConfig, and logs TRL's metrics the way TRL does (global token means across processes, the
   per-sequence clip ratio min / max, the entropy bonus and its adaptive controller).

Every loss option of TRL 1.16's GRPOConfig is honoured: the 8 loss types, token / sequence importance sampling,
epsilon / epsilon_high, delta, beta with and without use_bias_correction_kl, off_policy_mask_threshold,
top_entropy_quantile (the quantile over every process's tokens, TRL's own helper), entropy_coef and
use_adaptive_entropy, gradient accumulation, num_iterations > 1, and the vLLM importance-sampling correction.
What cannot be honoured is refused here, by name, never silently computed another way: a bias on the LM head,
final_logit_softcapping, a non-positive logit scale, MoE router auxiliary losses, DeepSpeed ZeRO-3 (the kernel
recomputes the head in its backward), an LM head tied to a PEFT adapter.
"""
from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import Optional

import torch

from .fused_linear import fused_linear_logprobs
from .policy import PolicyLossConfig, policy_loss

TRL_VERSIONS = ("1.16",)  # the release whose trainer internals this module reads (tests/test_trl_trainer_run.py)


def _require_trl():
    try:
        import trl
    except ImportError as err:
        raise ImportError("mmr1_kernels.trl needs TRL (pip install 'trl>=1.16,<1.17')") from err
    if not any(trl.__version__.startswith(v) for v in TRL_VERSIONS):
        raise RuntimeError(f"mmr1_kernels.trl supports TRL {', '.join(TRL_VERSIONS)}; this is TRL {trl.__version__} "
                           "(its GRPOTrainer internals may differ)")
    return trl


def _logit_scale(text_config) -> float:
    """The factor TRL's fused head multiplies the logits by (its own lookup, restated)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        s = text_config.logits_scaling
        scale = s if text_config.model_type == "hyperclovax" else 1 / s
    return 1.0 if scale is None else float(scale)


def _check_model(model, name: str) -> None:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{name} has no output embeddings (lm_head): mmr1's fused log-probs need one")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{name}.lm_head has a bias: mmr1's fused head computes hidden @ weight.T without one")
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"{name}: final_logit_softcapping={text_config.final_logit_softcapping} is not supported by "
                         "mmr1's fused log-probs (tanh soft-capping of the logits)")
    scale = _logit_scale(text_config)
    if not scale > 0:
        raise ValueError(f"{name}: a logit scale of {scale} is not supported (mmr1 folds a positive scale into the "
                         "temperature)")


def _patch_forward(model, temperature: float, cast_lm_head_to_fp32: bool, entropy: bool,
                   chunk_size: Optional[int]) -> None:
    """Replace the fused-head branch of TRL's patched ``model.forward`` with mmr1's kernel."""
    import transformers
    from packaging.version import Version
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

    trl_forward = model.forward  # TRL's _fused_forward (bound); its fused_lm_head=False branch is the original forward
    text_config = model.config.get_text_config()
    temperature = temperature / _logit_scale(text_config)  # softmax(s z / T) = softmax(z / (T / s))
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"  # TRL's rule: older vision-language models expose the language model as `model`

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, fused_lm_head=False, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        out = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = out.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = out.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        weight = head.weight
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        ctx = nullcontext()
        if cast_lm_head_to_fp32:  # TRL cast the head to fp32 at construction; it runs outside autocast
            hidden = hidden.float()
            ctx = torch.autocast(hidden.device.type, enabled=False)
        if isinstance(weight, torch.distributed.tensor.DTensor):  # FSDP2: the head gathered once per call
            weight = weight.full_tensor()
        with ctx, maybe_gather_lm_head_ctx(weight):
            # only the scored positions: their hidden states gathered ([n, d], not [B, T, V] logits)
            h = hidden[mask]
            if h.dtype != weight.dtype:  # autocast gave the backbone's output another dtype than the head's
                h = h.to(weight.dtype)
            res = fused_linear_logprobs(h, weight, labels[mask], temperature, chunk_size=chunk_size,
                                        return_entropy=entropy)
        lp, ent = res if entropy else (res, None)
        # masked_scatter keeps an all-masked micro-batch differentiable (a zero connected to the model), as in TRL
        log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        ent = None if ent is None else ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=ent, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._mmr1_kernels = True


def _loss_config(tr, entropy_coef: float) -> PolicyLossConfig:
    a = tr.args
    return PolicyLossConfig(
        loss_type=tr.loss_type, importance_sampling_level=tr.importance_sampling_level, epsilon=tr.epsilon_low,
        epsilon_high=tr.epsilon_high, delta=a.delta, beta=tr.beta, use_bias_correction_kl=a.use_bias_correction_kl,
        sapo_temperature_pos=a.sapo_temperature_pos, sapo_temperature_neg=a.sapo_temperature_neg,
        vespo_k_pos=a.vespo_k_pos, vespo_lambda_pos=a.vespo_lambda_pos, vespo_k_neg=a.vespo_k_neg,
        vespo_lambda_neg=a.vespo_lambda_neg, off_policy_mask_threshold=tr.off_policy_mask_threshold,
        top_entropy_quantile=1.0,  # the mask comes from the trainer (its quantile spans every process)
        entropy_coef=entropy_coef, max_completion_length=tr.max_completion_length)


def _compute_loss(self, model, inputs):
    """TRL's GRPOTrainer._compute_loss on mmr1's kernels: the same inputs, loss and logged metrics."""
    from trl.trainer.utils import nanmax, nanmin

    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    extra = {k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                        "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                        "mm_token_type_ids", "image_position_ids")}
    logps, entropies, _ = self._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True, compute_aux_loss=False,
        **extra)
    entropy_mask = None
    if self.top_entropy_quantile < 1.0:
        entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
    mode = "train" if self.model.training else "eval"
    gas = self.current_gradient_accumulation_steps if mode == "train" else 1
    apply_coef = 0.0
    if self._entropy_bonus_enabled:  # the coefficient fixed at the end of the previous optimizer step
        if self.use_adaptive_entropy:
            apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            apply_coef = self.entropy_coef
    num_items = None
    if self.loss_type in ("dapo", "cispo", "vespo"):  # num_items_in_batch spans the generation batch
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
    if self.loss_type == "vespo":
        isr = inputs.get("importance_sampling_ratio")
    elif self.use_vllm and self.vllm_importance_sampling_correction:
        isr = inputs["importance_sampling_ratio"]
    else:
        isr = None
    loss, m = policy_loss(
        logps, inputs["advantages"], mask, old_logprobs=inputs.get("old_per_token_logps"),
        ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None, entropies=entropies,
        importance_sampling_ratio=isr, sampling_logprobs=inputs.get("sampling_per_token_logps"),
        num_items_in_batch=num_items, gradient_accumulation_steps=gas, entropy_mask=entropy_mask,
        config=_loss_config(self, apply_coef), return_terms=True)

    metrics = self._metrics[mode]
    if self._entropy_bonus_enabled:
        metrics["policy_loss"].append(self.accelerator.gather(m["policy_loss"]).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":  # TRL's controller: window-global token-weighted entropy
            em = mask if entropy_mask is None else mask * entropy_mask
            stats = torch.stack([(entropies * em).sum(), em.sum()]).detach()
            self._entropy_window_stats = stats if self._entropy_window_stats is None \
                else self._entropy_window_stats + stats
            if self.accelerator.sync_gradients:
                window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                a = self.args
                self.entropy_coef = (min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                                     if world_entropy <= a.entropy_target
                                     else max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min))
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)

    def seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_mean(x):
        if x.shape[1] == 1:
            s, n = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            s, n = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([s, n]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if self.beta != 0.0:
        metrics["kl"].append(global_mean(m["terms/kl"]))
    metrics["entropy"].append(global_mean(entropies.detach()))
    if "terms/clip_low" in m:
        low, high = m["terms/clip_low"], m["terms/clip_high"]
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())
    elif "terms/cispo_clip" in m:
        metrics["cispo_clip_ratio"].append(global_mean(m["terms/cispo_clip"]))
    elif "terms/phi" in m:
        metrics["vespo/phi_seq_mean"].append(global_mean(m["terms/phi"]))
    return loss


def use_mmr1_kernels(trainer, *, loss: bool = True, chunk_size: Optional[int] = None):
    """Make a constructed ``trl.GRPOTrainer`` compute its policy's and reference model's per-token log-probs and
    entropies with mmr1's ``fused_linear_logprobs`` and (``loss=True``) its loss with ``policy_loss``. Call after
    construction, before ``train()``; returns the trainer. ``chunk_size``: tokens per head GEMM chunk (default:
    sized to keep one chunk's logits ~64 MiB). Raises naming the option for anything it cannot honour."""
    trl = _require_trl()
    if not isinstance(trainer, trl.GRPOTrainer):
        raise TypeError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError("DeepSpeed ZeRO-3 is not supported: mmr1's fused head recomputes the logits in its backward "
                         "outside the LM head's gather hooks (use FSDP2 or DDP)")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("MoE router auxiliary losses (config.output_router_logits with router_aux_loss_coef != 0) "
                         "are not supported by mmr1's fused head")
    from accelerate.utils import is_peft_model

    # the modules TRL patched: the policy (its base model under PEFT) and the reference model when there is one
    policy = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    targets = [("policy", policy, True)]
    if trainer.ref_model is not None:
        targets.append(("reference model", trainer.ref_model, False))
    for name, model, _ in targets:
        if getattr(model, "_mmr1_kernels", False):
            raise RuntimeError(f"use_mmr1_kernels was already applied to this trainer's {name}")
        _check_model(model, name)
    cast = bool(trainer.args.cast_lm_head_to_fp32)
    for _, model, entropy in targets:
        _patch_forward(model, float(trainer.temperature), cast, entropy, chunk_size)
    if loss:
        trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    trainer._mmr1_kernels = {"loss": loss, "chunk_size": chunk_size}
    return trainer


__all__ = ["use_mmr1_kernels", "TRL_VERSIONS"]
