"""Group-relative advantages: registration and public API (docs/kernel-semantics.md, section 4)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _checks as C
from . import reference as ref
from ._library import HAS_TRITON, impl, op

MODES = {name: i for i, name in enumerate(ref.ADVANTAGE_MODES)}  # grpo=0 dr_grpo=1 rloo=2 batch=3 gdpo=4


@impl("group_advantages", "CompositeExplicitAutograd")
def _group_advantages_ref(rewards, group_index, num_groups, weights, mode, eps, unbiased):
    return ref.group_advantages(rewards, group_index, num_groups, weights, ref.ADVANTAGE_MODES[mode], eps, unbiased)


if HAS_TRITON:

    @impl("group_advantages", "CUDA")
    def _group_advantages_cuda(rewards, group_index, num_groups, weights, mode, eps, unbiased):
        from .gpu import advantages as K

        return K.group_advantages(rewards, group_index, num_groups, weights, mode, eps, unbiased)


@torch.library.register_fake("mmr1::group_advantages")
def _group_advantages_fake(rewards, group_index, num_groups, weights, mode, eps, unbiased):
    f = dict(dtype=torch.float32, device=rewards.device)
    return rewards.new_empty(rewards.shape[0], **f), rewards.new_empty(num_groups, **f), rewards.new_empty(num_groups, **f)


def group_advantages(rewards: torch.Tensor, group_ids: Optional[torch.Tensor] = None,
                     group_size: Optional[int] = None, *, weights: Optional[torch.Tensor] = None,
                     mode: str = "grpo", eps: float = 1e-4,
                     unbiased: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Advantages [N] fp32 from rewards [N] or [N, R], normalized within groups.

    Groups: ``group_ids`` [N] (any integer labels, any order, any sizes) or
    ``group_size`` (contiguous equal groups). ``mode``:
      grpo     (r - mean_g) / (std_g + eps)
      dr_grpo  r - mean_g
      rloo     r - mean of the other members of the group
      batch    (r - mean_g) / (std over the batch + eps)
      gdpo     z-score each reward column in its group, weighted sum, batch z-score
    With R > 1 columns the reward is sum_j weights[j] * r[:, j] (NaN columns
    skipped). NaN rewards are left out of every statistic and get advantage 0; a
    singleton or constant group gets exactly 0 (grpo/dr_grpo/rloo/batch).
    Returns (advantages, stats) with stats: group_mean [G], group_std [G],
    zero_std [G] bool, zero_std_frac (0-dim), group_index [N] (dense 0..G-1,
    groups in sorted label order), group_labels [G].
    """
    C.check_tensor("rewards", rewards, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                   ndim=(1, 2))
    r2 = rewards.reshape(rewards.shape[0], -1) if rewards.dim() == 2 else rewards[:, None]
    N, R = r2.shape
    if N == 0:
        raise ValueError("rewards must not be empty (got N=0)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    eps = C.check_scalar("eps", eps, low=0.0)
    if not C.tracing() and bool(torch.isinf(r2).any()):
        raise ValueError("rewards must be finite or NaN (NaN = unscored); got +-inf")
    dev = rewards.device
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids [N] or group_size")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if N % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide the number of rewards N={N}")
        index = torch.arange(N, device=dev) // group_size
        num_groups = N // group_size
        labels = torch.arange(num_groups, device=dev)
    else:
        C.check_tensor("group_ids", group_ids, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8),
                       ndim=1, device=dev)
        C.check_shape("group_ids", group_ids, (N,))
        labels, index = torch.unique(group_ids.long(), return_inverse=True)
        num_groups = labels.numel()
    if weights is not None:
        C.check_tensor("weights", weights, dtypes=(torch.float32, torch.float64), ndim=1, device=dev)
        C.check_shape("weights", weights, (R,))
        weights = weights.contiguous()
    rw = r2 if r2.dtype in (torch.float32, torch.float64) else r2.float()
    adv, mean, std = op("group_advantages")(rw.contiguous(), index.contiguous(), num_groups, weights, MODES[mode],
                                            eps, unbiased)
    zero_std = (std == 0) & ~torch.isnan(mean)
    stats = {
        "group_mean": mean,
        "group_std": std,
        "zero_std": zero_std,
        "zero_std_frac": zero_std.float().mean(),
        "group_index": index,
        "group_labels": labels,
    }
    return adv, stats
