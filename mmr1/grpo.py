"""GRPO for X-CoT personalization: rollouts -> rewards -> group advantages -> fused loss -> AdamW.

Per step:
  1. ``prompts_per_step`` prompts (deterministic in (seed, step)), ``group_size``
     X-CoT rollouts each (mmr1.rollout; RNG rows = global sample ids, so a rank
     of a multi-process run draws exactly the samples a single process would)
  2. rewards [N, R] (mmr1.rewards.RewardSet) -> mmr1_kernels.group_advantages
  3. reference log-probs (frozen copy; mmr1_kernels.fused_linear_logprobs)
  4. ``mu`` policy updates: one forward, then fused_linear_grpo_loss twice --
     image codes over the image window, reasoning text over the text window --
     with weights normalized over the union of the policy-chosen tokens (prompt
     and forced structure tokens are masked), k3 KL to the reference
  5. grad clip, AdamW, LR schedule; metrics to JSONL + progress bar.
With mu > 1 the sampler's log-probs are the "old" log-probs of the ratio.
``backend="reference"`` runs the same step without the fused kernels -- full
[N, T, V] logits from the head, then mmr1_kernels.reference (the spec) for the
log-probs and the loss, and the sampler's spec in the rollouts -- the path the
fused one is measured against (same math; same tokens and losses up to fp32
rounding).
Multi-process: wrap nothing yourself -- pass ``parallel="ddp"`` (or "fsdp")
under torchrun. "ddp" wraps the policy in DistributedDataParallel (gloo on
CPU, NCCL on CUDA); "fsdp" shards every block and the root with FSDP2's
``fully_shard`` for models that do not fit one device. Each rank runs its
slice of the step's prompts; gradients are averaged across ranks, and the
logged metrics are the global batch's (token means weighted by each rank's
token count), so a 2-process run logs what one process would.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import mmr1_kernels as K

from .distributed import wait_for_all_ranks, wrap_parallel
from .generate import SamplingConfig
from .metrics_log import MetricsLog
from .preemption import Preempted, SignalFlag, agreed_signal
from .model import (PrefixSplit, Transformer, head_features, head_inputs, shared_prefix_hidden, split_shared_prefix,
                    teacher_forced_hidden)
from .rewards import RewardSet
from .rollout import Rollout, XCoTFormat, concat_groups, xcot_rollout
from .sharded_checkpoint import load_sharded, save_sharded
from .tokens import ImageVocab, pad_sequences


@dataclass
class GRPOConfig:
    group_size: int = 8
    prompts_per_step: int = 2
    steps: int = 100
    mu: int = 1
    lr: float = 1e-5
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_type: str = "grpo"
    adv_mode: str = "grpo"
    # how the rollouts sample -- CFG scale, temperatures (the loss uses the same ones), top-k / top-p, the decoding
    # loop ("sequential" or "jacobi": the same tokens in fewer forwards; measure with python -m bench.jacobi before
    # switching), the KV cache layout, and backend: "kernels" (the fused ops everywhere) or "reference" (full
    # logits + the PyTorch specs in the rollouts *and* the update, the path the fused one is measured against).
    # Its seed is replaced by one per step (derived from ``seed``).
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward_weights: Dict[str, float] = field(default_factory=dict)
    # a step whose every advantage is 0 (all groups constant) has no policy-gradient signal; AdamW would still
    # turn the tiny KL / rounding gradients into a full-size step (m / sqrt(v)): skip the update instead
    skip_zero_signal_steps: bool = False
    # a step whose loss or gradient norm is NaN / inf on any rank is applied on no rank (one decision, all-reduced;
    # logged as step/skipped_nonfinite); this many such steps in a row stop the run with an error, before a
    # checkpoint of them could be written
    max_nonfinite_steps: int = 3
    # DAPO's dynamic sampling: groups whose rewards have no spread (every sample scored alike: zero advantage, no
    # policy gradient) are dropped and more prompts are drawn -- up to dynamic_sampling_rounds rounds of
    # prompts_per_step prompts in all -- until the step holds prompts_per_step groups with signal; what stays
    # unfilled is padded with dropped groups and logged (dynamic/unfilled_groups)
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3
    # the teacher-forced passes of the update and the reference log-probs: "shared" runs each prompt once for its
    # group's G completions (mmr1_kernels.shared_prefix_attention; the same loss and gradients to rounding), "per_row"
    # runs every sequence whole (the prompt G times). "shared" needs groups of identical prompts in consecutive rows
    # (GRPO's batches; micro-batches of a multiple of G) and falls back to "per_row" where they are not. "auto":
    # "shared" on CPU, where it is measured faster (the demo's update 1.34-1.55x, its reference forward 1.44-1.55x:
    # `python -m bench.attention --update-only`), "per_row" elsewhere until a GPU run measures the "gather" path.
    update_prefix: str = "auto"
    # sequences per forward/backward of the policy update (0: the whole batch at once): activations of one
    # micro-batch at a time, the same gradient (the loss weights are the whole batch's)
    micro_batch_size: int = 0
    # recompute every transformer block in the backward of the update (activations: one block input per layer)
    activation_checkpointing: bool = False
    # with CFG (sampling.cfg_scale != 1), which distribution of the image codes the loss trains -- the public
    # recipes differ (docs/training.md has the table); the rollouts record the same log-probs, so the importance
    # ratio is 1 on the first iteration:
    #   "cond"            the conditional branch alone (T2I-R1); no unconditional forward in the update
    #   "guided"          the guided logits u + g (c - u), gradients through both branches (AR-GRPO)
    #   "guided_detached" the same with the unconditional branch detached (ReasonGen-R1)
    #   "guided_scaled"   the guided logits divided by g, c - (g - 1) / g u (Janus-Pro-R1)
    # the guided ones run the unconditional sequences (each image block after the family's unconditional context)
    # through the model once more per update
    cfg_loss: str = "cond"
    seed: int = 0
    log_path: Optional[str] = None

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (group-relative advantages), got {self.group_size}")
        if self.prompts_per_step < 1 or self.mu < 1 or self.steps < 0:
            raise ValueError("prompts_per_step and mu must be >= 1, steps >= 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int) \
                or self.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be an int >= 0 (0: the whole batch), got {self.micro_batch_size!r}")
        if self.update_prefix not in ("auto", "shared", "per_row"):
            raise ValueError(f"update_prefix must be 'auto', 'shared' or 'per_row', got {self.update_prefix!r}")
        if isinstance(self.sampling, dict):  # from a JSON config file
            self.sampling = SamplingConfig(**self.sampling)
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if isinstance(self.max_nonfinite_steps, bool) or not isinstance(self.max_nonfinite_steps, int) \
                or self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be an int >= 1, got {self.max_nonfinite_steps!r}")
        if self.cfg_loss not in CFG_LOSSES:
            raise ValueError(f"cfg_loss must be one of {sorted(CFG_LOSSES)}, got {self.cfg_loss!r}")
        if isinstance(self.dynamic_sampling_rounds, bool) or not isinstance(self.dynamic_sampling_rounds, int) \
                or self.dynamic_sampling_rounds < 1:
            raise ValueError(f"dynamic_sampling_rounds must be an int >= 1, got {self.dynamic_sampling_rounds!r}")

    @property
    def backend(self) -> str:
        """"kernels" or "reference": chosen once, in ``sampling``, for the rollouts and the update alike."""
        return self.sampling.backend

    def sampling_for(self, step: int) -> SamplingConfig:
        """The rollouts' sampling settings at ``step``: ``sampling`` with the step's seed; with mu > 1 (the only
        case that reads a rollout's log-probs as the old policy's) recording the image log-probs of the distribution
        ``cfg_loss`` trains. With mu = 1 the sampler's own are kept: recording another costs the conditional
        logits' product and a log-softmax per decode step (+11% rollout time for a 4-layer d 512 model, CPU)."""
        recorded = CFG_LOSSES[self.cfg_loss] if self.mu > 1 else "sampler"
        return replace(self.sampling, seed=(self.seed * 1_000_003 + step) % (2**63), cfg_logprobs=recorded)

    @property
    def unconditional_branch(self) -> bool:
        """Whether the update runs the unconditional sequences (a guided cfg_loss with CFG on)."""
        return self.cfg_loss != "cond" and self.sampling.cfg_scale != 1.0


# GRPOConfig.cfg_loss -> the log-probs its rollouts record (SamplingConfig.cfg_logprobs)
CFG_LOSSES = {"cond": "cond", "guided": "guided", "guided_detached": "guided", "guided_scaled": "guided_scaled"}


def lr_lambda(cfg: GRPOConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return 1.0

    return f


def _peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


WINDOW_METRICS = ("ratio_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl",
                  "logp_mean")


@dataclass
class RolloutRound:
    """One rollout round: this rank's prompts, G scored samples each."""

    batch: List[dict]
    rollout: Rollout
    rewards: torch.Tensor  # [N, R], NaN where a reward does not apply
    weights: torch.Tensor  # [R]
    reward_metrics: Dict[str, float]
    seconds: float  # the rollout's wall-clock


@dataclass
class GRPOStep:
    """What one GRPOTrainer.step produced: the batch it trained on (this rank's), its advantages and the step's
    metrics (the global batch's under torchrun) -- what a step callback receives."""

    step: int  # the step's index (updates done before it)
    batch: List[dict]
    rollout: Rollout
    rewards: torch.Tensor  # [N, R]
    advantages: torch.Tensor  # [N]
    metrics: Dict[str, float]


StepCallback = Callable[["GRPOTrainer", GRPOStep], None]


class GRPOTrainer:
    def __init__(self, policy: Transformer, vocab: ImageVocab, fmt: XCoTFormat, rewards: RewardSet,
                 prompts: Sequence[dict], cfg: GRPOConfig, ref_model: Optional[Transformer] = None,
                 parallel: str = "none", rollout_fn=None):
        if not prompts:
            raise ValueError("prompts must not be empty")
        for i, p in enumerate(prompts):
            if "prompt_ids" not in p or not p["prompt_ids"]:
                raise ValueError(f"prompts[{i}] needs a non-empty 'prompt_ids' token list")
        self.policy, self.vocab, self.fmt, self.rewards, self.prompts, self.cfg = policy, vocab, fmt, rewards, \
            list(prompts), cfg
        if parallel not in ("none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be 'none', 'ddp' or 'fsdp', got {parallel!r}")
        if parallel != "none" and not dist.is_initialized():  # before the world size is read
            raise RuntimeError(f"parallel={parallel!r} needs torch.distributed initialized (run under torchrun)")
        self.parallel = parallel
        # rollout_fn(policy, batch, num_samples, sampling_config, row_ids) -> Rollout; default: X-CoT
        self.rollout_fn = rollout_fn or self._xcot
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if parallel != "none" else (0, 1)
        if cfg.prompts_per_step % self.world:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the world size {self.world}")
        self.ref = None
        if cfg.beta != 0.0:  # the frozen reference: a full copy, made before any sharding
            self.ref = ref_model if ref_model is not None else copy.deepcopy(policy)
            self.ref.eval().requires_grad_(False)
            if parallel == "fsdp":  # sharded like the policy (its blocks gathered one at a time in its forward): a
                wrap_parallel(self.ref, "fsdp")  # 1 / world of a bf16 copy per GPU instead of all of it (14 GB at 7B)
        # a family whose image codes have a head of their own (Janus) trains its text head only through reasoning
        # text: without any, no loss term reaches it -- frozen, so DDP does not wait for its gradient (its bucket
        # would never be reduced) and AdamW leaves it alone
        if not fmt.reasoning and policy.image_window is not None:
            policy.lm_head.weight.requires_grad_(False)
        self.model = wrap_parallel(policy, parallel)  # after the reference copy: that one stays whole
        policy.activation_checkpointing = cfg.activation_checkpointing
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step_idx = 0
        self.history: List[Dict[str, float]] = []  # every step's metrics
        self.evals: List[Dict[str, float]] = []  # the eval records train(eval_fn=...) wrote
        self.log = MetricsLog(cfg.log_path, self.rank)
        self._passes = [0, 0]  # teacher-forced passes of the step: [per row, shared prefix]
        self.nonfinite_run = 0  # steps in a row skipped for a non-finite loss or gradient norm

    # ------------------------------------------------------------------ batch
    def batch_for(self, step: int, round_: int = 0) -> List[dict]:
        """This rank's prompts of ``step`` (the global batch is deterministic in (seed, step)); ``round_`` > 0: the
        extra prompts dynamic sampling draws (another deterministic stream per round)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + step + round_ * 1_000_003)
        idx = torch.randint(len(self.prompts), (self.cfg.prompts_per_step,), generator=g).tolist()
        per = self.cfg.prompts_per_step // self.world
        return [self.prompts[i] for i in idx[self.rank * per:(self.rank + 1) * per]]

    def _xcot(self, policy, batch, num_samples, scfg, row_ids) -> Rollout:
        return xcot_rollout(policy, [b["prompt_ids"] for b in batch], self.vocab, self.fmt, scfg,
                            num_samples=num_samples, row_ids=row_ids, vq_decode=getattr(self.rewards, "vq_decode", None))

    # ------------------------------------------------------------------ losses
    def _split(self, ro: Rollout, rows: slice, loss_mask: torch.Tensor) -> Optional[PrefixSplit]:
        """The rows' shared prompts and completions (cfg.update_prefix "shared", or "auto" on CPU), or None: per-row
        passes. None too where a loss position lies inside a prompt (a custom rollout_fn's): the split only predicts
        completions."""
        mode = self.cfg.update_prefix
        if mode == "auto":
            mode = "shared" if self.policy.lm_head.weight.device.type == "cpu" else "per_row"
        if mode != "shared":
            return None
        split = split_shared_prefix(ro.tokens[rows], ro.lengths[rows], ro.prompt_lengths[rows])
        if split is None:
            return None
        covered = split.scatter(split.valid, ro.tokens.shape[1]).to(loss_mask.device)
        return None if bool((loss_mask & ~covered).any()) else split

    def _hidden(self, model, ro: Rollout, rows: slice, loss_mask: torch.Tensor):
        """(hidden states, split): [n, Tc, d] over the completions when the rows split into shared prompts
        (split not None: per-target tensors must go through split.gather), else [n, T-1, d] per row."""
        split = self._split(ro, rows, loss_mask)
        self._passes[split is not None] += 1
        if split is not None:
            return shared_prefix_hidden(model, split), split
        return teacher_forced_hidden(model, ro.tokens[rows], ro.lengths[rows]), None

    def _uncond_hidden(self, model: Transformer, ro: Rollout, rows: slice) -> torch.Tensor:
        """[n, T-1, d]: the unconditional CFG branch's hidden states at the rows' targets -- each image block (from
        ro.image_blocks) run after the family's unconditional context (Transformer.unconditional_context: none for
        Lumina-mGPT, whose unconditional rows restart at the block; BOS + pads for Janus), as the rollout's
        unconditional rows saw it; zeros at the other targets. ``model``: the unwrapped module (a DDP wrapper is not
        called twice per backward; its gradient hooks still see both branches' gradients)."""
        if ro.image_blocks is None:
            raise ValueError(f"cfg_loss={self.cfg.cfg_loss!r} needs rollouts that record their image blocks "
                             "(Rollout.image_blocks, as xcot_rollout writes them)")
        tokens, blocks = ro.tokens[rows], ro.image_blocks[rows]
        seqs, dst_row, dst_pos, src_seq, src_pos = [], [], [], [], []
        for r in range(tokens.shape[0]):
            for start, length in blocks[r].tolist():
                ctx = model.unconditional_context([start])
                ctx = [] if ctx is None else list(ctx[0])
                seqs.append(ctx + tokens[r, start:start + length - 1].tolist())  # the eoi predicts nothing here
                j = torch.arange(length - 1)
                dst_row.append(torch.full((length - 1,), r))
                dst_pos.append(start + j)  # target start + j + 1 is predicted by hidden start + j
                src_seq.append(torch.full((length - 1,), len(seqs) - 1))
                src_pos.append(len(ctx) + j)
        dev = model.lm_head.weight.device
        padded, lengths = pad_sequences(seqs)
        attn = torch.arange(padded.shape[1])[None] < lengths[:, None]
        hu = model(padded.to(dev), attention_mask=attn.to(dev))
        out = hu.new_zeros(tokens.shape[0], tokens.shape[1] - 1, hu.shape[-1])
        out[torch.cat(dst_row).to(dev), torch.cat(dst_pos).to(dev)] = hu[torch.cat(src_seq).to(dev),
                                                                         torch.cat(src_pos).to(dev)]
        return out

    def _head_inputs(self, model: Transformer, h, hu, targets, mask, window):
        """head_inputs, with the unconditional branch's features (hu: its hidden states, or None) mixed in."""
        x, w, t, rng = head_inputs(model, h, targets, mask, window)
        return (x if hu is None else self._guided(x, head_features(model, hu, window))), w, t, rng

    def _guided(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """cfg_loss's mix of the two branches' head features (or logits): u + g (c - u) = g c - (g - 1) u, / g
        for "guided_scaled". The head's output layer is linear, so mixing its inputs mixes its logits (a bias
        column of ones mixes to 1, or 1 / g)."""
        g = self.cfg.sampling.cfg_scale
        mix = uncond + g * (cond - uncond)
        return mix / g if self.cfg.cfg_loss == "guided_scaled" else mix

    def _masks(self, ro: Rollout):
        dev = self.policy.lm_head.weight.device
        chosen, img = ro.chosen[:, 1:].to(dev), ro.image_positions[:, 1:].to(dev)
        return ro.tokens[:, 1:].to(dev), chosen & img, chosen & ~img

    def _windows(self, m_img, m_txt):
        scfg = self.cfg.sampling  # the temperatures the rollouts sampled at
        return (("image", m_img, self.vocab.window, scfg.temperature),
                ("text", m_txt, self.fmt.text_range, scfg.text_temperature))

    @torch.no_grad()
    def ref_logprobs(self, ro: Rollout) -> torch.Tensor:
        targets, m_img, m_txt = self._masks(ro)
        h, split = self._hidden(self.ref, ro, slice(None), m_img | m_txt)
        hu = self._uncond_hidden(self.ref, ro, slice(None)) if self.cfg.unconditional_branch else None
        if split is not None:
            targets, m_img, m_txt = split.gather(targets), split.gather(m_img), split.gather(m_txt)
            hu = None if hu is None else split.gather(hu)
        logits = self.ref.logits(h) if self.cfg.backend == "reference" else None  # once, for both windows
        out = []
        for name, mask, window, temp in self._windows(m_img, m_txt):
            guided = hu if name == "image" else None
            if logits is not None:
                z = logits if guided is None else self._guided(logits, self.ref.logits(guided))
                lp, _ = K.reference.token_logprobs(z, targets, temp, *window, mask=mask)
            else:
                x, w, t, rng = self._head_inputs(self.ref, h, guided, targets, mask, window)
                lp = K.fused_linear_logprobs(x, w, t, temp, rng, mask=mask)
            out.append(lp)
        lp = torch.where(m_img, out[0], out[1])
        return lp if split is None else split.scatter(lp, ro.tokens.shape[1])

    def loss(self, ro: Rollout, advantages: torch.Tensor, old: Optional[torch.Tensor],
             ref: Optional[torch.Tensor], rows: Optional[slice] = None, w_all: Optional[torch.Tensor] = None):
        """(loss, metrics): image codes over the image window + reasoning text over the text window.

        ``rows``: only these sequences (a micro-batch; default all), with ``w_all`` the loss weights of the whole
        batch [N, T-1], so that the micro-batches' losses sum to the whole batch's loss. Metrics are token means
        over the rows, plus "<window>/tokens" (their counts, to combine micro-batches)."""
        targets, m_img, m_txt = self._masks(ro)
        if w_all is None:
            w_all = K.reference.loss_weights(m_img | m_txt, self.cfg.loss_type)
        rows = slice(None) if rows is None else rows
        targets, m_img, m_txt, w_all = targets[rows], m_img[rows], m_txt[rows], w_all[rows]
        old = None if old is None else old[rows]
        ref = None if ref is None else ref[rows]
        h, split = self._hidden(self.model, ro, rows, m_img | m_txt)
        hu = None
        if self.cfg.unconditional_branch:
            with torch.no_grad() if self.cfg.cfg_loss == "guided_detached" else contextlib.nullcontext():
                hu = self._uncond_hidden(self.policy, ro, rows)
        if split is not None:  # per-target tensors in the completions' coordinates
            targets, m_img, m_txt, w_all = (split.gather(t) for t in (targets, m_img, m_txt, w_all))
            old = None if old is None else split.gather(old)
            ref = None if ref is None else split.gather(ref)
            hu = None if hu is None else split.gather(hu)
        kw = dict(epsilon=self.cfg.eps_low, epsilon_high=self.cfg.eps_high, beta=self.cfg.beta, loss_weights=w_all)
        adv = advantages.to(h.device)[rows]
        logits = self.policy.logits(h) if self.cfg.backend == "reference" else None  # [N, T, V]: the cost avoided
        loss = h.new_zeros((), dtype=torch.float32)
        metrics: Dict[str, float] = {}
        for name, mask, window, temp in self._windows(m_img, m_txt):
            metrics[f"{name}/tokens"] = float(mask.sum())
            if not bool(mask.any()):
                continue
            guided = hu if name == "image" else None
            if logits is not None:
                z = logits if guided is None else self._guided(logits, self.policy.logits(guided))
                part, m = K.reference.grpo_loss(z, targets, adv, mask, old, ref, temperature=temp,
                                                vocab_range=window, **kw)
            else:
                x, w, t, rng = self._head_inputs(self.policy, h, guided, targets, mask, window)
                part, m = K.fused_linear_grpo_loss(x, w, t, adv, mask, old, ref, temperature=temp, vocab_range=rng,
                                                   **kw)
            loss = loss + part
            for k, v in m.items():
                metrics[f"{name}/{k}"] = float(v)
        return loss, metrics

    def _loss_and_backward(self, ro: Rollout, advantages, old, ref, backward: bool):
        """The whole batch's loss, over micro-batches of ``cfg.micro_batch_size`` sequences (0: one pass), each
        backward right after its forward so only one micro-batch's activations live at a time; the loss weights
        are the whole batch's, so the summed gradient is the one-pass gradient. DDP syncs on the last only."""
        N = ro.num_samples
        size = self.cfg.micro_batch_size or N
        targets, m_img, m_txt = self._masks(ro)
        w_all = K.reference.loss_weights(m_img | m_txt, self.cfg.loss_type)
        starts = list(range(0, N, size))
        total = torch.zeros((), dtype=torch.float32)
        sums: Dict[str, float] = {}
        counts: Dict[str, float] = {}
        for i, s in enumerate(starts):
            last = i == len(starts) - 1
            sync = contextlib.nullcontext() if last or self.parallel != "ddp" else self.model.no_sync()
            with sync:
                loss, m = self.loss(ro, advantages, old, ref, slice(s, min(s + size, N)), w_all)
                if backward:
                    loss.backward()
            total = total + loss.detach().float().cpu()
            for k, v in m.items():  # token means of the micro-batch -> of the batch
                window = k.split("/")[0]
                if k.endswith("/tokens"):
                    counts[k] = counts.get(k, 0.0) + v
                else:
                    sums[k] = sums.get(k, 0.0) + v * m[f"{window}/tokens"]
        metrics = {k: v / counts[f"{k.split('/')[0]}/tokens"] for k, v in sums.items()}
        return total, metrics

    @contextlib.contextmanager
    def _whole_policy_for_rollouts(self):
        """FSDP2: every block stays unsharded from its first forward of the rollout to the rollout's end -- one
        all-gather per block per rollout instead of one per block per decode step (thousands per image); the
        whole policy is resident meanwhile (its parameters in their own dtype). The root is never resharded
        after forward anyway. Other modes: nothing to do."""
        if self.parallel != "fsdp":
            yield
            return
        layers = list(self.policy.model.layers)
        for layer in layers:
            layer.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for layer in layers:
                layer.reshard()
                layer.set_reshard_after_forward(True, recurse=False)

    # ------------------------------------------------------------------ step
    def _round(self, step: int, round_: int) -> RolloutRound:
        """One rollout round: this rank's prompts of (step, round), G samples each, scored."""
        cfg, G = self.cfg, self.cfg.group_size
        batch = self.batch_for(step, round_)
        # RNG rows: global sample ids of the step; round r continues after the rounds before it
        base = (step * cfg.prompts_per_step + round_ * cfg.prompts_per_step + self.rank * len(batch)) * G
        t0 = time.perf_counter()
        self.policy.eval()
        with self._whole_policy_for_rollouts():
            ro = self.rollout_fn(self.policy, batch, G, cfg.sampling_for(step), torch.arange(base, base + len(batch) * G))
        t_roll = time.perf_counter() - t0
        rewards, weights, rmetrics = self.rewards(ro, [b for b in batch for _ in range(G)])
        for name, wgt in cfg.reward_weights.items():
            if name not in self.rewards.names:
                raise ValueError(f"reward_weights names unknown reward {name!r}")
            weights[self.rewards.names.index(name)] = wgt
        if self.world > 1:  # each rank's work so far was its own: a rank stuck in it is named here, not waited for
            wait_for_all_ranks(f"step {step}'s rollouts and rewards (round {round_})")
        return RolloutRound(batch, ro, rewards, weights, rmetrics, t_roll)

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _dynamic_batch(self, step: int):
        """DAPO's dynamic sampling: rounds of prompts until this rank holds its share of groups with reward spread
        (every rank runs the same number of rounds -- FSDP rollouts gather parameters in lockstep -- so the ranks
        agree on the step). Returns the selected groups as one round (with round 0's reward metrics: the policy's
        unfiltered draw) and the dynamic-sampling metrics."""
        cfg, G = self.cfg, self.cfg.group_size
        kept, spare, rounds, drawn, zero_before = [], [], 0, 0, []
        weights = rmetrics = None
        t_roll = 0.0
        need = cfg.prompts_per_step // self.world
        while True:
            rnd = self._round(step, rounds)
            t_roll += rnd.seconds
            if rounds == 0:
                weights, rmetrics = rnd.weights, rnd.reward_metrics
                total0 = float((rnd.rewards.nan_to_num() * weights).sum(1).mean())
            _, st = K.group_advantages(rnd.rewards, group_size=G, weights=weights, mode=cfg.adv_mode)
            zero = st["zero_std"].tolist()
            zero_before += zero
            for gi, z in enumerate(zero):
                (spare if z else kept).append((rnd.rollout, gi, rnd.batch[gi], rnd.rewards[gi * G:(gi + 1) * G]))
            rounds += 1
            drawn += len(rnd.batch)
            if not self._any_rank(len(kept) < need) or rounds >= cfg.dynamic_sampling_rounds:
                break
        chosen = kept[:need]
        unfilled = need - len(chosen)
        chosen += spare[:unfilled]
        ro = concat_groups([(r, gi) for r, gi, _, _ in chosen], G)
        batch = [b for _, _, b, _ in chosen]
        rewards = torch.cat([r for _, _, _, r in chosen])
        dyn = {"dynamic/rounds": float(rounds), "dynamic/prompts_drawn": float(drawn * self.world),
               "reward/total_mean": total0, "reward/total_mean_trained": float((rewards.nan_to_num() * weights)
                                                                              .sum(1).mean()),
               "dynamic/zero_std_frac_before": sum(zero_before) / len(zero_before),
               "dynamic/unfilled_groups": float(unfilled)}
        if self.world > 1:  # global figures: every rank drew as many prompts; average the fractions, sum the gaps
            t = torch.tensor([dyn["dynamic/zero_std_frac_before"], dyn["dynamic/unfilled_groups"]],
                             dtype=torch.float64)
            dist.all_reduce(t)
            dyn["dynamic/zero_std_frac_before"], dyn["dynamic/unfilled_groups"] = float(t[0]) / self.world, float(t[1])
        return RolloutRound(batch, ro, rewards, weights, rmetrics, t_roll), dyn

    # ------------------------------------------------------------------ step
    def step(self) -> GRPOStep:
        cfg, step = self.cfg, self.step_idx
        G = cfg.group_size
        dyn: Dict[str, float] = {}
        if cfg.dynamic_sampling:
            rnd, dyn = self._dynamic_batch(step)
        else:
            rnd = self._round(step, 0)
        ro, rewards, weights = rnd.rollout, rnd.rewards, rnd.weights
        adv, st = K.group_advantages(rewards, group_size=G, weights=weights, mode=cfg.adv_mode)
        self._passes = [0, 0]
        ref = self.ref_logprobs(ro) if self.ref is not None else None
        old = ro.logprobs[:, 1:].to(self.policy.lm_head.weight.device) if cfg.mu > 1 else None
        t1 = time.perf_counter()
        self.policy.train()
        metrics: Dict[str, float] = {}
        signal = torch.tensor([float(bool((adv != 0).any()))])
        if self.world > 1:  # every rank must take (or skip) the same step
            dist.all_reduce(signal)
        skip = cfg.skip_zero_signal_steps and float(signal) == 0.0
        for _ in range(cfg.mu):
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self._loss_and_backward(ro, adv, old, ref, backward=not skip)
            if skip:
                gnorm = torch.zeros(())
                continue
            gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            nonfinite = self._nonfinite(loss, gnorm)
            if nonfinite:  # no rank applies it: AdamW's state and the weights stay as they were
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
        else:
            nonfinite = {}
        self.nonfinite_run = self.nonfinite_run + 1 if nonfinite else 0
        with warnings.catch_warnings():  # a skipped first step: the schedule still advances, on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        t_train = time.perf_counter() - t1
        gen_tokens = int((ro.lengths - ro.prompt_lengths).sum())
        chosen = ro.chosen[:, 1:]
        sampler_lp = float(ro.logprobs[:, 1:][chosen].mean()) if bool(chosen.any()) else 0.0
        trainer_lp = sum(metrics.get(f"{n}/logp_mean", 0.0) * float(m.sum()) for n, m in
                         (("image", ro.image_positions[:, 1:] & chosen), ("text", ~ro.image_positions[:, 1:] & chosen)))
        trainer_lp /= max(float(chosen.sum()), 1.0)
        out = {
            "step": step, "loss": float(loss.detach()), "grad_norm": float(gnorm), "lr": self.scheduler.get_last_lr()[0],
            "skipped": float(skip), "step/skipped_nonfinite": float(bool(nonfinite)), **nonfinite,
            **rnd.reward_metrics, **metrics,
            "adv/mean_abs": float(adv.abs().mean()), "adv/zero_std_frac": float(st["zero_std_frac"]),
            "reward/total_mean": float((rewards.nan_to_num() * weights).sum(1).mean()),
            "logp/sampler_minus_trainer": sampler_lp - trainer_lp,
            "throughput/rollout_tok_s": gen_tokens / max(rnd.seconds, 1e-9),
            "throughput/train_tok_s": float(ro.lengths.sum()) * cfg.mu / max(t_train, 1e-9),
            "time/rollout_s": rnd.seconds, "time/train_s": t_train, "memory/peak_mib": _peak_mib(),
            # the share of the step's teacher-forced passes (reference, update) that ran each prompt once per group
            "update/shared_prefix_frac": self._passes[1] / max(sum(self._passes), 1),
            **dyn,  # dynamic sampling: reward/total_mean is round 0's (the policy's unfiltered draw)
        }
        if self.world > 1:
            out = self._global_metrics(out, {"image": int((chosen & ro.image_positions[:, 1:]).sum()),
                                             "text": int((chosen & ~ro.image_positions[:, 1:]).sum())})
        self.step_idx += 1
        self.history.append(out)
        self.log.write(out)
        if nonfinite:
            where = (f"the loss on rank {int(nonfinite['step/nonfinite_loss_rank'])}"
                     if nonfinite["step/nonfinite_loss_rank"] >= 0 else "the gradient norm")
            message = (f"step {step}: {where} is not finite; the update was applied on no rank "
                       f"({self.nonfinite_run} such step(s) in a row; the run stops at {cfg.max_nonfinite_steps})")
            if self.nonfinite_run >= cfg.max_nonfinite_steps:
                raise FloatingPointError(message + ": stopping; the last checkpoint written holds finite weights")
            warnings.warn(message, RuntimeWarning)
        return GRPOStep(step, rnd.batch, ro, rewards, adv, out)

    def _nonfinite(self, loss: torch.Tensor, gnorm: torch.Tensor) -> Dict[str, float]:
        """{} when every rank's loss and the gradient norm are finite; otherwise the metrics of the skip -- the lowest
        rank whose loss was not finite (-1: none; its gradient then was) and whether the gradient norm was not
        finite. One all-reduced decision, so every rank skips or applies the same update."""
        bad_loss = not bool(torch.isfinite(loss.detach()).all())
        rank = torch.tensor([float(self.rank if bad_loss else self.world)])
        grad = torch.tensor([0.0 if bool(torch.isfinite(gnorm.detach()).all()) else 1.0])
        if self.world > 1:
            dist.all_reduce(rank, op=dist.ReduceOp.MIN)
            dist.all_reduce(grad, op=dist.ReduceOp.MAX)
        r, g = int(rank.item()), float(grad.item())
        if r >= self.world and g == 0.0:
            return {}
        return {"step/nonfinite_loss_rank": float(r if r < self.world else -1), "step/nonfinite_grad": g}

    def _global_metrics(self, out: Dict[str, float], tokens: Dict[str, int]) -> Dict[str, float]:
        """This rank's metrics -> the global batch's: window metrics are token means (weighted by each rank's token
        count; a window a rank did not train contributes weight 0), sample means are averaged (every rank has the
        same number of samples), throughputs summed, times and memory maxed; grad_norm, lr and step are global."""
        keys = sorted(set(out) | {f"{w}/{m}" for w in tokens for m in WINDOW_METRICS})
        weighted, maxed = [], []
        for k in keys:
            window = k.split("/")[0]
            if k in ("step", "lr", "grad_norm", "skipped"):
                continue
            if k.startswith(("time/", "memory/")):
                maxed.append(k)
            elif window in tokens:
                present = k in out
                weighted.append((k, out.get(k, 0.0) * tokens[window] if present else 0.0,
                                 float(tokens[window]) if present else 0.0))
            elif k.startswith("throughput/"):
                weighted.append((k, out[k] * self.world, 1.0))  # sum over ranks = world x the mean
            else:
                weighted.append((k, out[k], 1.0))
        t = torch.tensor([[v, w] for _, v, w in weighted], dtype=torch.float64)
        dist.all_reduce(t)
        m = torch.tensor([out[k] for k in maxed], dtype=torch.float64)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        result = {k: out[k] for k in ("step", "lr", "grad_norm", "skipped")}
        for (k, _, _), (v, w) in zip(weighted, t.tolist()):
            if w > 0:
                result[k] = v / w
        result.update({k: v for k, v in zip(maxed, m.tolist())})
        return result

    def train(self, steps: Optional[int] = None, progress: bool = True, checkpoint_dir: Optional[str] = None,
              checkpoint_every: int = 0, keep_last: int = 3,
              eval_fn: Optional[Callable[["GRPOTrainer"], Dict[str, float]]] = None, eval_every: int = 0,
              callbacks: Sequence[StepCallback] = (), handle_signals: bool = False) -> List[Dict[str, float]]:
        """Run ``steps`` steps (default: to cfg.steps). After each step, every ``callbacks`` entry is called with
        (trainer, GRPOStep) -- e.g. to save the step's images -- then the checkpoint is written every
        ``checkpoint_every`` steps into ``checkpoint_dir``. ``eval_fn(trainer) -> metrics`` (e.g. identity on
        held-out prompts) runs before the first step and after every ``eval_every`` steps and the last: its metrics
        are added to that step's history entry and logged as a {"phase": "eval", "step": ...} record (step =
        updates done so far). ``handle_signals``: a SIGTERM / SIGINT to any rank ends the run after the step under
        way -- every rank finishes it, the checkpoint of that step is written (when ``checkpoint_dir`` is given) and
        Preempted is raised (mmr1.preemption; the CLI exits with PREEMPTED_EXIT); a second signal exits at once."""
        from tqdm import tqdm

        n = self.cfg.steps - self.step_idx if steps is None else steps
        evaluating = eval_fn is not None and eval_every > 0
        if evaluating and self.step_idx == 0 and not self.evals:
            self._evaluate(eval_fn)
        bar = tqdm(range(n), desc="grpo", disable=not progress or self.rank != 0)
        with SignalFlag() if handle_signals else contextlib.nullcontext() as flag:
            for i in bar:
                result = self.step()
                m = result.metrics
                bar.set_postfix(reward=f"{m['reward/total_mean']:.3f}", kl=f"{m.get('image/kl', 0.0):.4f}")
                if evaluating and (self.step_idx % eval_every == 0 or i == n - 1):
                    self.history[-1].update(self._evaluate(eval_fn))
                for callback in callbacks:
                    callback(self, result)
                saved = bool(checkpoint_dir and checkpoint_every and self.step_idx % checkpoint_every == 0)
                if saved:
                    self.save(checkpoint_dir, keep_last)  # every rank writes its shards
                signum = agreed_signal(flag.signum) if flag is not None else 0
                if signum:  # every rank stops after this same step
                    if checkpoint_dir and not saved:
                        self.save(checkpoint_dir, keep_last)
                    raise Preempted(self.step_idx, signum, str(checkpoint_dir) if checkpoint_dir else None)
        return self.history

    def _evaluate(self, eval_fn) -> Dict[str, float]:
        was_training = self.policy.training
        res = {k: float(v) for k, v in eval_fn(self).items()}
        self.policy.train(was_training)
        rec = {"phase": "eval", "step": self.step_idx, **res}
        self.evals.append(rec)
        self.log.write(rec)
        return res

    # ------------------------------------------------------------------ checkpoints
    def config_dict(self) -> Dict:
        """The run's config as checkpoints record it: GRPOConfig's fields with the sampling settings flat beside
        them (the step's seed is derived, so it is left out), and the model's."""
        cfg = asdict(self.cfg)
        sampling = cfg.pop("sampling")
        sampling.pop("seed")
        return {**cfg, **sampling, "model": self.policy.checkpoint_config()}

    def save(self, root, keep_last: int = 3) -> Path:
        """Write ``<root>/step-<step>`` through torch.distributed.checkpoint (mmr1.sharded_checkpoint): weights
        and AdamW state as every rank holds them (FSDP2 shards, DDP replicas), scheduler, every rank's RNG, the
        step (the data position: batches are a function of (seed, step)); atomic, keeping the last
        ``keep_last``. Call on every rank."""
        return save_sharded(root, self.step_idx, self.policy, self.optimizer, self.scheduler,
                            extra={"data_position": self.step_idx}, config=self.config_dict(), keep_last=keep_last)

    def load(self, path) -> None:
        """Resume from ``save``'s checkpoint: a step directory, or a root (its latest). Call on every rank; DCP
        reshards to this run's layout."""
        self.step_idx = load_sharded(path, self.policy, self.optimizer, self.scheduler, self.config_dict(),
                                     ignore=CONFIG_KEYS_NOT_CHECKED)["step"]


# settings a resume may change: they do not change what is trained (the KV cache layouts draw the same tokens,
# tested; the update's prefix sharing gives the same loss and gradients to rounding)
CONFIG_KEYS_NOT_CHECKED = frozenset({"attention", "update_prefix"})

__all__ = ["CFG_LOSSES", "GRPOConfig", "GRPOTrainer", "GRPOStep", "RolloutRound", "StepCallback", "lr_lambda"]
