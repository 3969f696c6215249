"""Run by tests/test_trainer.py under `torchrun --nproc-per-node 2` (not collected by pytest).

    torchrun_worker.py PARALLEL OUT_DIR TESTS_DIR

Trains 2 GRPO steps with PARALLEL (ddp | fsdp), saves OUT_DIR/ckpt, then a fresh trainer (other init weights)
resumes from it for 2 more steps and saves OUT_DIR/final. Rank 0 writes the logged metrics of all 4 steps to
OUT_DIR/history.json.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmr1.distributed import finish_distributed, init_distributed
from mmr1.grpo import GRPOTrainer

sys.path.insert(0, sys.argv[3])
from test_trainer import FMT, PROMPTS, VOCAB, distributed_cfg, reward_set, tiny_model  # noqa: E402

torch.set_num_threads(1)
rank, _ = init_distributed()
parallel, out = sys.argv[1], Path(sys.argv[2])
tr = GRPOTrainer(tiny_model(11), VOCAB, FMT, reward_set(), PROMPTS, distributed_cfg(), parallel=parallel)
history = tr.train(2, progress=False)
tr.save(out / "ckpt")
dist.barrier()  # rank 0 has written before anyone reads
resumed = GRPOTrainer(tiny_model(123), VOCAB, FMT, reward_set(), PROMPTS, distributed_cfg(), parallel=parallel,
                      ref_model=tiny_model(11).requires_grad_(False))
resumed.load(out / "ckpt")
history += resumed.train(2, progress=False)
resumed.save(out / "final")
if rank == 0:
    (out / "history.json").write_text(json.dumps(history))
    # under FSDP2 the frozen reference model is sharded too: each rank holds half of every block's weights
    ref_weight = next(resumed.ref.model.layers[0].parameters())
    (out / "ref_sharded.json").write_text(json.dumps(hasattr(ref_weight, "to_local")
                                                     and ref_weight.to_local().numel() * 2 == ref_weight.numel()))
finish_distributed()  # barrier, destroy, exit
