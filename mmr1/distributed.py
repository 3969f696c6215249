"""torch.distributed setup for torchrun: ``torchrun --nproc-per-node N -m your_entry``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; this
picks the backend (NCCL with CUDA, gloo on CPU), binds the rank's GPU, and
returns (rank, world_size). Pass ``parallel="ddp"`` or ``"fsdp"`` to
mmr1.grpo.GRPOTrainer afterwards.

No rank waits forever on another. A rank that dies ends the job: torchrun sees the exit, stops the other workers
and names the failed rank in its summary. A rank that hangs (a stuck reward model, a stalled file system) is caught
where the ranks' work diverges -- after each step's rollouts and rewards (``wait_for_all_ranks``), where every rank
has done only local work: the first rank to wait more than ``COLLECTIVE_TIMEOUT_S`` raises CollectiveTimeout naming
the ranks that did not arrive, and the job ends. Every other collective runs with the same timeout (the process
group's), so a hang there ends the job too, with the backend's error.
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist

# seconds a rank waits for the others at a collective: the skew a step may have between ranks (rollouts, rewards)
# must fit in it. torch's defaults are 30 min (gloo) and 10 min (NCCL); one value for both, set at launch.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("MMR1_COLLECTIVE_TIMEOUT_S", "1800"))


class CollectiveTimeout(RuntimeError):
    """Some rank did not reach a synchronization point within COLLECTIVE_TIMEOUT_S (its message names which)."""


def _stop_with_the_launcher() -> None:
    """Linux: SIGTERM this worker when its launcher dies. torchrun starts each worker in a session of its own, so a
    SIGKILL to torchrun (``kill -9``, an OOM kill) leaves the workers training on, orphaned -- beside the rerun,
    writing into the same checkpoint directory (seen in tests/soak.py). With this they stop at the next step
    boundary with a checkpoint, as after a preemption notice."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher was gone before the request took effect
        raise RuntimeError("the launcher of this worker has exited; not starting")


def init_distributed() -> Tuple[int, int]:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("init_distributed() must run under torchrun (RANK / WORLD_SIZE are not set)")
    if not dist.is_initialized():
        _stop_with_the_launcher()
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


_MONITOR_GROUP: Optional[object] = None


def wait_for_all_ranks(what: str, timeout_s: Optional[float] = None) -> None:
    """A barrier that names the late ranks: every rank calls it at the same point; when some rank has not arrived
    within ``timeout_s`` (default COLLECTIVE_TIMEOUT_S), rank 0 raises CollectiveTimeout naming them and ``what``
    was under way (the others fail when rank 0 leaves, and torchrun stops the job). torch's monitored_barrier needs
    gloo: under NCCL it runs on a gloo group made for it. A no-op without a process group or with one rank."""
    global _MONITOR_GROUP
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if _MONITOR_GROUP is None:
        _MONITOR_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s)
    try:
        dist.monitored_barrier(_MONITOR_GROUP, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as err:
        raise CollectiveTimeout(f"rank {dist.get_rank()} waited {timeout.total_seconds():.0f} s for the others after "
                                f"{what}: {err} (MMR1_COLLECTIVE_TIMEOUT_S sets the limit)") from err


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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
