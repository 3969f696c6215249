"""Run by tests/test_janus.py under `torchrun --nproc-per-node 2` (not collected by pytest).

    torchrun_janus.py OUT_DIR TESTS_DIR

Janus under DDP and then FSDP2 in one launch: 2 GRPO steps each (mu 2, micro-batches of one group, activation
checkpointing, the guided CFG loss), from the same initial weights; rank 0 writes each mode's logged metrics and
full final weights to OUT_DIR/<mode>.pt.
"""
import sys
from pathlib import Path

import torch

from mmr1.distributed import finish_distributed, init_distributed

sys.path.insert(0, sys.argv[2])
from test_janus import janus_distributed_trainer  # noqa: E402

torch.set_num_threads(1)
rank, _ = init_distributed()
out = Path(sys.argv[1])
for parallel in ("ddp", "fsdp"):
    tr = janus_distributed_trainer(parallel)
    history = tr.train(2, progress=False)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in tr.policy.named_parameters()}
    if rank == 0:
        torch.save({"history": history, "weights": full}, out / f"{parallel}.pt")
finish_distributed()
