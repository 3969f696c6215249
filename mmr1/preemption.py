"""Preemption: SLURM and Kubernetes send SIGTERM (SLURM: ``--signal``; Kubernetes: ``terminationGracePeriodSeconds``,
30 s by default) some time before they kill a job. A training loop that handles it finishes the step under way on
every rank, writes a checkpoint and exits with ``PREEMPTED_EXIT``; the same command run again resumes there.

The handler only records the signal: the loop reads it at its next step boundary, through one all-reduce, so every
rank stops after the same step even when only one rank was signalled. A second signal exits at once
(status 128 + signal number) -- unless it comes within ``REPEAT_WINDOW_S`` of the first: SLURM signals every process
of a job step and torchrun forwards the SIGTERM it received to its workers, so a worker gets two copies of one
request milliseconds apart. A step must fit inside the scheduler's grace period (torchrun waits 30 s for its
workers after forwarding a SIGTERM, then kills them).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional, Sequence

# EX_TEMPFAIL (sysexits.h): a temporary failure, the command may be retried -- here: preempted, checkpoint written,
# run the same command again to resume
PREEMPTED_EXIT = 75
# a repeat of the signal sooner than this after the first is the same request delivered twice (see above)
REPEAT_WINDOW_S = 1.0


class Preempted(Exception):
    """The run stopped at a step boundary after a SIGTERM / SIGINT; ``checkpoint`` holds that step."""

    def __init__(self, step: int, signum: int, checkpoint: Optional[str]):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint directory was given"
        super().__init__(f"preempted by {name} after step {step} ({where}); run the same command again to resume")


class SignalFlag:
    """Records SIGTERM / SIGINT while installed (a context manager); a second signal exits the process at once."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.signum = 0  # the first signal received, 0 while none
        self._first_at = 0.0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                return  # the launcher's forwarded copy of the first request
            os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()

    def __enter__(self) -> "SignalFlag":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def agreed_signal(signum: int) -> int:
    """The largest signal number any rank has recorded (0: none): one all-reduce at a step boundary, the same
    answer on every rank, so every rank stops after the same step."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return signum
    t = torch.tensor([float(signum)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


__all__ = ["PREEMPTED_EXIT", "REPEAT_WINDOW_S", "Preempted", "SignalFlag", "agreed_signal"]
