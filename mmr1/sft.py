"""Cold-start SFT: next-token loss on the assistant part of X-CoT sequences, through the fused kernels.

Labels are the sequence shifted by one, masked on the prompt (and padding);
the loss is the mean negative log-likelihood over the assistant tokens,
computed by mmr1_kernels.fused_linear_logprobs over the full vocabulary from
the final hidden states, so [B, T, V] logits are never materialized.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence, Tuple

import torch

import mmr1_kernels as K

from .checkpoint import load_checkpoint, save_checkpoint
from .model import Transformer, target_span_mask, teacher_forced_hidden
from .tokens import pad_sequences


@dataclass
class SFTConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    steps: int = 200
    seed: int = 0


def sft_loss(model: Transformer, seqs: Sequence[Sequence[int]],
             prompt_lengths: Sequence[int]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(loss, metrics) for token sequences whose first prompt_lengths[i] tokens are the prompt."""
    if len(seqs) != len(prompt_lengths) or not seqs:
        raise ValueError("need one prompt length per (non-empty list of) sequence")
    tokens, lengths = pad_sequences(seqs)
    hidden = teacher_forced_hidden(model, tokens, lengths)
    mask = target_span_mask(tokens.shape[1], prompt_lengths, lengths, hidden.device)
    if not bool(mask.any()):
        raise ValueError("no assistant tokens to train on (every sequence is all prompt)")
    logp = K.fused_linear_logprobs(hidden, model.lm_head.weight, tokens[:, 1:].to(hidden.device), mask=mask)
    n = mask.sum()
    loss = -(logp * mask).sum() / n
    return loss, {"loss": float(loss.detach()), "tokens": int(n), "ppl": float(torch.exp(loss.detach()))}


class SFTTrainer:
    def __init__(self, model: Transformer, cfg: SFTConfig):
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step_idx = 0

    def step(self, seqs, prompt_lengths) -> Dict[str, float]:
        self.model.train()
        loss, m = sft_loss(self.model, seqs, prompt_lengths)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        self.step_idx += 1
        return m

    def config_dict(self) -> Dict:
        return {**asdict(self.cfg), "model": asdict(self.model.config)}

    def save(self, path):
        return save_checkpoint(path, self.model, self.config_dict(), self.optimizer, None, self.step_idx)

    def load(self, path):
        self.step_idx = load_checkpoint(path, self.model, self.config_dict(), self.optimizer)["step"]
