"""Cold-start SFT: next-token loss on the assistant part of X-CoT sequences, through the fused kernels.

Labels are the sequence shifted by one, masked on the prompt (and padding);
the loss is the mean negative log-likelihood over the assistant tokens (or a
weighted mean, with per-token weights: e.g. more weight on the few reasoning
tokens of an X-CoT than on its image codes),
computed by mmr1_kernels.fused_linear_logprobs over the full vocabulary from
the final hidden states, so [B, T, V] logits are never materialized.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import mmr1_kernels as K

from .distributed import wrap_parallel
from .model import Transformer, head_inputs, target_span_mask, teacher_forced_hidden
from .sharded_checkpoint import load_sharded, save_sharded
from .tokens import pad_sequences


@dataclass
class SFTConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    steps: int = 200
    seed: int = 0
    activation_checkpointing: bool = False  # recompute every block in the backward


def sft_loss(model: Transformer, seqs: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
             token_weights: Optional[Sequence[Sequence[float]]] = None, head: Optional[Transformer] = None,
             global_sum: Optional[Callable[[float], float]] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(loss, metrics) for token sequences whose first prompt_lengths[i] tokens are the prompt.

    ``token_weights[i][t]`` (optional, one per token of seqs[i]) weighs the loss of predicting token t; the loss
    is then sum(w * nll) / sum(w) over the assistant tokens. Metrics report the unweighted mean NLL as "nll".
    ``model`` may be a DDP / FSDP wrapper (``head``: the module holding lm_head, default ``model``);
    ``global_sum`` maps this call's sum(w) to the divisor (a multi-process step divides by the global sum)."""
    if len(seqs) != len(prompt_lengths) or not seqs:
        raise ValueError("need one prompt length per (non-empty list of) sequence")
    head = model if head is None else head
    tokens, lengths = pad_sequences(seqs)
    hidden = teacher_forced_hidden(model, tokens, lengths)
    mask = target_span_mask(tokens.shape[1], prompt_lengths, lengths, hidden.device)
    targets = tokens[:, 1:].to(hidden.device)
    logp = _family_logprobs(head, hidden, targets, mask)
    n = mask.sum()
    nll = -(logp * mask).sum() / n.clamp(min=1)
    if token_weights is None:
        w = mask.to(logp.dtype)
    else:
        if len(token_weights) != len(seqs) or any(len(tw) != len(sq) for tw, sq in zip(token_weights, seqs)):
            raise ValueError("token_weights must hold one weight per token of each sequence")
        w, _ = pad_sequences([[0.0] + list(map(float, tw[1:])) for tw in token_weights], dtype=torch.float32)
        w = w[:, 1:].to(hidden.device) * mask
        if bool((w < 0).any()):
            raise ValueError("token_weights must be >= 0")
    total = float(w.sum())
    divisor = total if global_sum is None else global_sum(total)
    if not divisor > 0:
        raise ValueError("no assistant tokens to train on (every sequence is all prompt, or every token weight "
                         "is 0)")
    loss = -(logp * w).sum() / divisor
    return loss, {"loss": float(loss.detach()), "nll": float(nll.detach()), "tokens": int(n),
                  "ppl": float(torch.exp(nll.detach()))}


def _family_logprobs(head: Transformer, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """Log-probs of the targets under the model's own softmax(es): one over the whole vocabulary through lm_head
    (Lumina-mGPT / Chameleon: text and image codes share it); for a family whose image codes have a head of their
    own (Janus: Transformer.image_window and output_head), text targets over the text head and code targets over
    the code head -- the two distributions it generates from."""
    window = head.image_window
    if window is None:
        return K.fused_linear_logprobs(hidden, head.lm_head.weight, targets, mask=mask)
    lo, hi = window
    is_code = (targets >= lo) & (targets < hi)
    text = K.fused_linear_logprobs(hidden, head.lm_head.weight, torch.where(is_code, 0, targets), mask=mask & ~is_code)
    x, w, t, rng = head_inputs(head, hidden, targets, mask & is_code, window)
    codes = K.fused_linear_logprobs(x, w, t, 1.0, rng, mask=mask & is_code)
    return torch.where(is_code, codes, text)


class SFTTrainer:
    """AdamW on ``sft_loss``. ``parallel="ddp"`` / ``"fsdp"`` under torchrun: each rank passes its share of the
    global batch to ``step``; the loss is normalized by the global token weight, so N processes compute the
    step one process would on the whole batch."""

    def __init__(self, model: Transformer, cfg: SFTConfig, parallel: str = "none"):
        self.model, self.cfg, self.parallel = model, cfg, parallel
        self.wrapped = wrap_parallel(model, parallel)
        model.activation_checkpointing = cfg.activation_checkpointing
        self.world = dist.get_world_size() if parallel != "none" else 1
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step_idx = 0

    def step(self, seqs, prompt_lengths, token_weights=None) -> Dict[str, float]:
        self.model.train()
        loss, m = sft_loss(self.wrapped, seqs, prompt_lengths, token_weights, head=self.model,
                           global_sum=self._global_sum if self.world > 1 else None)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        self.step_idx += 1
        if self.world > 1:
            t = torch.tensor([m["loss"]], dtype=torch.float64)
            dist.all_reduce(t)
            m["loss"] = float(t) / self.world  # each rank's loss is world x its share of the global mean
        return m

    def _global_sum(self, local: float) -> float:
        """The global weight sum / world: DDP's gradient average of the ranks' losses is then the global
        weighted mean."""
        total = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.world

    def config_dict(self) -> Dict:
        return {**asdict(self.cfg), "model": self.model.checkpoint_config()}

    def save(self, root, keep_last: int = 3, extra=None):
        """``<root>/step-<step>``: sharded, atomic, keep-last-K (mmr1.sharded_checkpoint); call on every rank."""
        return save_sharded(root, self.step_idx, self.model, self.optimizer, None, extra=extra,
                            config=self.config_dict(), keep_last=keep_last)

    def load(self, path):
        """Resume from a step directory or a root (its latest); returns the saved ``extra``."""
        info = load_sharded(path, self.model, self.optimizer, None, self.config_dict())
        self.step_idx = info["step"]
        return info["extra"]
