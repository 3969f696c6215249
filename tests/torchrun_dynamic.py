"""Run by tests/test_trainer.py under `torchrun --nproc-per-node 2` (not collected by pytest).

    torchrun_dynamic.py OUT_DIR TESTS_DIR

Two DDP GRPO steps with dynamic sampling over prompts of which half never have reward spread; every rank writes the
metrics it logged to OUT_DIR/rank<r>.json.
"""
import json
import sys
from pathlib import Path

import torch

from mmr1.distributed import finish_distributed, init_distributed
from mmr1.grpo import GRPOTrainer

sys.path.insert(0, sys.argv[2])
from test_trainer import FMT, PROMPTS, VOCAB, grpo_cfg, half_constant_rewards, tiny_model  # noqa: E402

torch.set_num_threads(1)
rank, _ = init_distributed()
out = Path(sys.argv[1])
tr = GRPOTrainer(tiny_model(7), VOCAB, FMT, half_constant_rewards(), PROMPTS,
                 grpo_cfg(dynamic_sampling=True, dynamic_sampling_rounds=8, prompts_per_step=4), parallel="ddp")
history = tr.train(2, progress=False)
(out / f"rank{rank}.json").write_text(json.dumps(history))
finish_distributed()
