"""Run by tests/test_trainer.py under `torchrun --nproc-per-node 2` (not collected by pytest).

    torchrun_gather_count.py OUT_JSON TESTS_DIR

Counts FSDP2's all-gathers during one GRPO step (rollout + update) of an FSDP trainer, with the policy kept whole for
the rollout (the trainer's default) and without (every block re-gathered at every decode step), and checks that both
steps log the same loss, gradient norm and reward. Rank 0 writes {"whole": n, "per_step": m, "same_step": bool}.
"""
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as PG

from mmr1.distributed import finish_distributed, init_distributed
from mmr1.grpo import GRPOTrainer

sys.path.insert(0, sys.argv[2])
from test_trainer import FMT, PROMPTS, VOCAB, grpo_cfg, reward_set, tiny_model  # noqa: E402

torch.set_num_threads(1)
rank, _ = init_distributed()
calls = {"n": 0}
original = PG.foreach_all_gather


def counting(*args, **kwargs):
    calls["n"] += 1
    return original(*args, **kwargs)


PG.foreach_all_gather = counting
cfg = grpo_cfg(prompts_per_step=2, beta=0.0)
out, history = {}, {}
for mode in ("whole", "per_step"):
    tr = GRPOTrainer(tiny_model(11), VOCAB, FMT, reward_set(), PROMPTS, cfg, parallel="fsdp")
    if mode == "per_step":  # the policy re-sharded after every forward, as FSDP2 does by default
        tr._whole_policy_for_rollouts = contextlib.nullcontext
    calls["n"] = 0
    history[mode] = tr.step().metrics
    out[mode] = calls["n"]
out["same_step"] = all(history["whole"][k] == history["per_step"][k] for k in ("loss", "grad_norm", "reward/codes"))
if rank == 0:
    Path(sys.argv[1]).write_text(json.dumps(out))
finish_distributed()
