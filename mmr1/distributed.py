"""torch.distributed setup for torchrun: ``torchrun --nproc-per-node N -m your_entry``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; this
picks the backend (NCCL with CUDA, gloo on CPU), binds the rank's GPU, and
returns (rank, world_size). Pass ``parallel="ddp"`` or ``"fsdp"`` to
mmr1.grpo.GRPOTrainer afterwards.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist


def init_distributed() -> Tuple[int, int]:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("init_distributed() must run under torchrun (RANK / WORLD_SIZE are not set)")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap_parallel(model: torch.nn.Module, parallel: str) -> torch.nn.Module:
    """The module to call for forward/backward: ``model`` itself ("none"), a DDP wrapper ("ddp"), or ``model``
    with every transformer block and the root sharded in place by FSDP2's ``fully_shard`` ("fsdp"; the root
    stays unsharded between forward and backward, so lm_head is readable for the fused losses)."""
    if parallel not in ("none", "ddp", "fsdp"):
        raise ValueError(f"parallel must be 'none', 'ddp' or 'fsdp', got {parallel!r}")
    if parallel != "none" and not dist.is_initialized():
        raise RuntimeError(f"parallel={parallel!r} needs torch.distributed initialized (run under torchrun)")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def finish_distributed(exit_code: int = 0) -> None:
    """End a torchrun process whose work is done: a barrier (no rank leaves while another still writes), the process
    group destroyed, the output flushed, then an immediate exit. The exit skips interpreter finalization on purpose:
    gloo's worker threads and the objects that still reference the process group (a DDP reducer) are otherwise torn
    down in arbitrary order, and a rank sometimes aborted there ("terminate called without an active exception",
    SIGABRT: 2 of ~20 two-process launches on a loaded 2-core machine) after its run had finished -- torchrun then
    reports a finished run as failed. Without a process group this only returns."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
