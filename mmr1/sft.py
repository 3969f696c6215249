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
from typing import Dict, Optional, Sequence, Tuple

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


def sft_loss(model: Transformer, seqs: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
             token_weights: Optional[Sequence[Sequence[float]]] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(loss, metrics) for token sequences whose first prompt_lengths[i] tokens are the prompt.

    ``token_weights[i][t]`` (optional, one per token of seqs[i]) weighs the loss of predicting token t; the loss
    is then sum(w * nll) / sum(w) over the assistant tokens. Metrics report the unweighted mean NLL as "nll"."""
    if len(seqs) != len(prompt_lengths) or not seqs:
        raise ValueError("need one prompt length per (non-empty list of) sequence")
    tokens, lengths = pad_sequences(seqs)
    hidden = teacher_forced_hidden(model, tokens, lengths)
    mask = target_span_mask(tokens.shape[1], prompt_lengths, lengths, hidden.device)
    if not bool(mask.any()):
        raise ValueError("no assistant tokens to train on (every sequence is all prompt)")
    logp = K.fused_linear_logprobs(hidden, model.lm_head.weight, tokens[:, 1:].to(hidden.device), mask=mask)
    n = mask.sum()
    nll = -(logp * mask).sum() / n
    if token_weights is None:
        loss = nll
    else:
        if len(token_weights) != len(seqs) or any(len(w) != len(s) for w, s in zip(token_weights, seqs)):
            raise ValueError("token_weights must hold one weight per token of each sequence")
        w, _ = pad_sequences([[0.0] + list(map(float, tw[1:])) for tw in token_weights], dtype=torch.float32)
        w = w[:, 1:].to(hidden.device) * mask
        if bool((w < 0).any()) or not bool(w.sum() > 0):
            raise ValueError("token_weights must be >= 0 with a positive sum over the assistant tokens")
        loss = -(logp * w).sum() / w.sum()
    return loss, {"loss": float(loss.detach()), "nll": float(nll.detach()), "tokens": int(n),
                  "ppl": float(torch.exp(nll.detach()))}


class SFTTrainer:
    def __init__(self, model: Transformer, cfg: SFTConfig):
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step_idx = 0

    def step(self, seqs, prompt_lengths, token_weights=None) -> Dict[str, float]:
        self.model.train()
        loss, m = sft_loss(self.model, seqs, prompt_lengths, token_weights)
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
