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


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
