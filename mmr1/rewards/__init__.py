"""Rewards for X-CoT rollouts. Every reward returns a [N] float tensor (NaN = unscored) and metrics.

- format:        the X-CoT output is well formed (reasoning closed, exactly the two expected image blocks)
- vision:        text alignment (CLIP-T), subject similarity (DINO / CLIP-I), PSR pairwise subject consistency,
                 through transformers models loaded from local directories
- self_reward:   the dual self-rewards (the policy's own likelihoods; no external model)

``RewardSet`` evaluates named rewards and returns the [N, R] matrix that
``mmr1_kernels.group_advantages`` combines with per-reward weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..rollout import Rollout, XCoTFormat
from ..tokens import ImageVocab

RewardFn = Callable[[Rollout, Sequence[dict]], Tuple[torch.Tensor, Dict[str, float]]]


def format_reward(rollout: Rollout, vocab: ImageVocab, fmt: XCoTFormat) -> Tuple[torch.Tensor, Dict[str, float]]:
    """1.0 when the completion is think... think_close, a subject block and a final block of the expected
    sizes, then end-of-turn, with no other image structure (the parts ``fmt`` leaves out absent); else 0.0."""
    out = torch.zeros(rollout.num_samples)
    for r in range(rollout.num_samples):
        seq = rollout.tokens[r, rollout.prompt_lengths[r]: rollout.lengths[r]].tolist()
        out[r] = float(_well_formed(seq, vocab, fmt))
    return out, {"format/valid_frac": float(out.mean())}


def _well_formed(seq: List[int], vocab: ImageVocab, fmt: XCoTFormat) -> bool:
    if not seq or seq[-1] != fmt.end_of_turn:
        return False
    rest = seq[:-1]
    if fmt.reasoning:
        if fmt.think_close not in seq:
            return False
        close = seq.index(fmt.think_close)
        text, rest = seq[:close], seq[close + 1: -1]
        structure = {vocab.boi, vocab.eoi} | ({vocab.newline} if vocab.newline is not None else set())
        if any(t in structure or vocab.token_to_code[t] >= 0 for t in text if 0 <= t < vocab.vocab_size):
            return False
    shapes = ([fmt.subject_hw] if fmt.subject_image else []) + [fmt.final_hw]
    spans = vocab.find_blocks(rest)
    if len(spans) != len(shapes) or not spans or spans[0][0] != 0 or spans[-1][1] != len(rest):
        return False
    if any(spans[i + 1][0] != spans[i][1] for i in range(len(spans) - 1)):
        return False
    try:
        blocks = [vocab.decode_block(rest[a:b]) for a, b in spans]
    except ValueError:
        return False
    return all(tuple(b.shape) == tuple(hw) for b, hw in zip(blocks, shapes))


@dataclass
class RewardSet:
    """Named rewards with weights; ``__call__`` -> (rewards [N, R], weights [R], metrics)."""

    rewards: Dict[str, RewardFn]
    weights: Dict[str, float]

    def __post_init__(self):
        missing = set(self.weights) - set(self.rewards)
        if missing:
            raise ValueError(f"weights given for unknown rewards: {sorted(missing)}")

    @property
    def names(self) -> List[str]:
        return list(self.rewards)

    def __call__(self, rollout: Rollout, batch: Sequence[dict]):
        cols, metrics = [], {}
        for name, fn in self.rewards.items():
            values, m = fn(rollout, batch)
            values = values.float().reshape(-1)
            if values.numel() != rollout.num_samples:
                raise ValueError(f"reward {name!r} returned {values.numel()} values for {rollout.num_samples} samples")
            if bool(torch.isinf(values).any()):
                raise ValueError(f"reward {name!r} returned +-inf (use NaN for 'could not score')")
            cols.append(values)
            finite = values[~torch.isnan(values)]
            metrics[f"reward/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
            metrics[f"reward/{name}_nan_frac"] = float(torch.isnan(values).float().mean())
            metrics.update(m)
        weights = torch.tensor([float(self.weights.get(n, 1.0)) for n in self.names])
        return torch.stack(cols, 1), weights, metrics


__all__ = ["RewardFn", "RewardSet", "format_reward"]
