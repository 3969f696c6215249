"""Run by tests/test_trainer.py under `torchrun --nproc-per-node 2` (not collected by pytest)."""
import sys

import torch
import torch.distributed as dist

from mmr1.distributed import init_distributed
from mmr1.grpo import GRPOTrainer

sys.path.insert(0, sys.argv[3])
from test_trainer import FMT, PROMPTS, VOCAB, grpo_cfg, reward_set, tiny_model  # noqa: E402

torch.set_num_threads(1)
init_distributed()
tr = GRPOTrainer(tiny_model(11), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(), parallel=sys.argv[1])
tr.train(2, progress=False)
tr.save(sys.argv[2])
dist.barrier()  # all ranks done (rank 0 has written) before tearing down gloo
dist.destroy_process_group()
