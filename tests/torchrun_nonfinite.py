"""Run by tests/test_trainer.py under `torchrun --nproc-per-node 2` (not collected by pytest).

    torchrun_nonfinite.py OUT_DIR TESTS_DIR

Three DDP GRPO steps; rank 1's loss at step 1 is made NaN. Every rank writes its logged metrics and, after each step,
a sum of its weights to OUT_DIR/rank<r>.json.
"""
import json
import sys
import warnings
from pathlib import Path

import torch

from mmr1.distributed import finish_distributed, init_distributed
from mmr1.grpo import GRPOTrainer

sys.path.insert(0, sys.argv[2])
from test_trainer import FMT, PROMPTS, VOCAB, grpo_cfg, reward_set, tiny_model  # noqa: E402

torch.set_num_threads(1)
rank, _ = init_distributed()
tr = GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(prompts_per_step=2), parallel="ddp")
real = tr.loss


def loss(*a, **k):
    value, m = real(*a, **k)
    return (value * float("nan"), m) if rank == 1 and tr.step_idx == 1 else (value, m)


tr.loss = loss
out = {"metrics": [], "weights": []}
for _ in range(3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["metrics"].append(tr.step().metrics)
    out["weights"].append(sum(float(p.detach().double().sum()) for p in tr.policy.parameters()))
# a write error on rank 1 during the next checkpoint (disk full): raised on both ranks, no partial directory, the
# previous checkpoint still the latest
import errno  # noqa: E402

import mmr1.sharded_checkpoint as sc  # noqa: E402

root = Path(sys.argv[1], "ckpt")
tr.save(root)
real_rng = sc._rng_state
if rank == 1:
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")
    sc._rng_state = full_disk
tr.step_idx += 1  # another step's checkpoint
try:
    tr.save(root)
    out["write_error"] = None
except sc.CheckpointWriteError as err:
    out["write_error"] = str(err)
sc._rng_state = real_rng
out["latest"] = sc.latest_checkpoint(root).name
out["partial_dirs"] = sorted(p.name for p in root.glob(".step-*"))
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(out))
finish_distributed()
