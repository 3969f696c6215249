"""Run by tests/test_trainer.py under `torchrun --nproc-per-node 2` with MMR1_COLLECTIVE_TIMEOUT_S=3 (not collected
by pytest).

    torchrun_hang.py TESTS_DIR

Rank 1's reward model hangs (sleeps 120 s) in the first step; rank 0 must end the job with a CollectiveTimeout
naming rank 1 instead of waiting."""
import sys
import time

import torch

from mmr1.distributed import init_distributed
from mmr1.grpo import GRPOTrainer
from mmr1.rewards import RewardSet, format_reward

sys.path.insert(0, sys.argv[1])
from test_trainer import FMT, PROMPTS, VOCAB, grpo_cfg, tiny_model  # noqa: E402

torch.set_num_threads(1)
rank, _ = init_distributed()


def judge(ro, batch):
    if rank == 1:
        time.sleep(120)
    return format_reward(ro, VOCAB, FMT)


trainer = GRPOTrainer(tiny_model(5), VOCAB, FMT, RewardSet({"judge": judge}, {}), PROMPTS, grpo_cfg(steps=1),
                      parallel="ddp")
trainer.step()
print("not reached: the step finished", flush=True)
