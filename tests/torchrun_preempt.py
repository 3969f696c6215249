"""Run by tests/test_trainer.py under `torchrun --nproc-per-node 2` (not collected by pytest).

    torchrun_preempt.py OUT_DIR PARALLEL TESTS_DIR

In one launch: a reference run of 4 GRPO steps; then, for each phase (the rollout or the update of the second step,
the checkpoint save after the first), a run in which rank 0 alone receives a real SIGTERM there -- both ranks must
stop at the next step boundary with that step's checkpoint written -- and a fresh trainer that resumes from it to
step 4. Rank 0 writes
what it saw to OUT_DIR/result.json; every rank compares its final weights and AdamW state with the reference run's.
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import mmr1.grpo as grpo_module
from mmr1.distributed import finish_distributed, init_distributed
from mmr1.grpo import GRPOTrainer
from mmr1.preemption import Preempted

sys.path.insert(0, sys.argv[3])
from test_trainer import FMT, PROMPTS, VOCAB, grpo_cfg, reward_set, tiny_model  # noqa: E402

torch.set_num_threads(1)
rank, _ = init_distributed()
out, parallel = Path(sys.argv[1]), sys.argv[2]


def trainer():
    return GRPOTrainer(tiny_model(5), VOCAB, FMT, reward_set(), PROMPTS, grpo_cfg(steps=4), parallel=parallel)


def state(tr):
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731  (FSDP2 shards)
    params = {n: full(p.detach()).clone() for n, p in tr.policy.named_parameters()}
    adam = {n: full(tr.optimizer.state[p]["exp_avg"]).clone() for n, p in tr.policy.named_parameters()}
    return params, adam


ref = trainer()
ref.train(progress=False)
want = state(ref)
result = {}
for phase in ("rollout", "update", "save"):
    ckpt = out / f"ckpt-{phase}"
    tr = trainer()
    fired = []

    def kill_once():
        if rank == 0 and tr.step_idx == 1 and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    if phase == "rollout":
        real_rollout = tr.rollout_fn

        def rollout(*a, real=real_rollout):
            kill_once()
            return real(*a)
        tr.rollout_fn = rollout
    elif phase == "update":
        real_loss = tr.loss

        def loss(*a, real=real_loss, **k):
            kill_once()
            return real(*a, **k)
        tr.loss = loss
    else:  # during the checkpoint written after step 1 (checkpoint_every=1): tr.step_idx is 1 then
        real_save = grpo_module.save_sharded

        def save(*a, real=real_save, **k):
            kill_once()
            return real(*a, **k)
        grpo_module.save_sharded = save
    try:
        tr.train(progress=False, checkpoint_dir=str(ckpt), checkpoint_every=1 if phase == "save" else 0,
                 handle_signals=True)
        stopped = None
    except Preempted as p:
        stopped = (p.step, p.signum, p.checkpoint)
    finally:
        if phase == "save":
            grpo_module.save_sharded = real_save
    resumed = trainer()
    resumed.load(ckpt)
    at = resumed.step_idx
    resumed.train(progress=False)
    got = state(resumed)
    same = all(torch.equal(got[0][n], want[0][n]) and torch.equal(got[1][n], want[1][n]) for n in want[0])
    result[phase] = {"stopped": stopped, "resumed_at": at, "same_as_uninterrupted": same}
    dist.barrier()
if rank == 0:
    (out / "result.json").write_text(json.dumps(result))
finish_distributed()
