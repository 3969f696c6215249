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


class RewardError(ValueError):
    """A reward function failed or returned what is not one finite-or-NaN score per sample."""


def _prompt_ids(batch: Sequence[dict]) -> str:
    """The batch's prompts as the error names them: their "id" fields, else their positions in the batch."""
    ids = [b.get("id", i) if isinstance(b, dict) else i for i, b in enumerate(batch)]
    distinct = list(dict.fromkeys(ids))
    return ", ".join(map(str, distinct[:8])) + (f", ... ({len(distinct)} in all)" if len(distinct) > 8 else "")


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
        """Every reward on the rollout, before any weight changes. A reward that raises, returns something that is
        not a numeric tensor of one value per sample, or returns +-inf stops the step with a RewardError naming the
        reward and the batch's prompts; NaN means "could not score" (left out of every statistic, counted)."""
        cols, metrics = [], {}
        for name, fn in self.rewards.items():
            try:
                values, m = fn(rollout, batch)
            except Exception as err:
                raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err} (prompts "
                                  f"{_prompt_ids(batch)})") from err
            if not isinstance(values, torch.Tensor) or not (values.dtype.is_floating_point or values.dtype in (
                    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)):
                raise RewardError(f"reward {name!r} returned {type(values).__name__}"
                                  f"{'' if not isinstance(values, torch.Tensor) else ' of ' + str(values.dtype)}, "
                                  f"expected a numeric tensor of {rollout.num_samples} scores (prompts "
                                  f"{_prompt_ids(batch)})")
            values = values.float().reshape(-1)
            if values.numel() != rollout.num_samples:
                raise RewardError(f"reward {name!r} returned {values.numel()} values for {rollout.num_samples} samples "
                                  f"(prompts {_prompt_ids(batch)})")
            if bool(torch.isinf(values).any()):
                raise RewardError(f"reward {name!r} returned +-inf (use NaN for 'could not score'; prompts "
                                  f"{_prompt_ids(batch)})")
            cols.append(values)
            nan = torch.isnan(values)
            finite = values[~nan]
            metrics[f"reward/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
            metrics[f"reward/{name}_nan_frac"] = float(nan.float().mean())
            metrics[f"reward/{name}_nan_count"] = float(nan.sum())
            metrics.update(m)
        weights = torch.tensor([float(self.weights.get(n, 1.0)) for n in self.names])
        return torch.stack(cols, 1), weights, metrics


__all__ = ["RewardFn", "RewardSet", "RewardError", "format_reward"]
