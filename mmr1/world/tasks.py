"""The world's personalization tasks: subject splits, prompts, cold-start batches, rewards and evaluation.

A task is a scene plus one reference scene per subject (the same subject,
elsewhere: another background, position and scale). Held-out subjects are
whole subjects (shape x color x pattern x pattern color) never seen in
training, so evaluation on them is zero-shot personalization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..generate import SamplingConfig
from ..model import Transformer
from ..rewards import RewardSet, format_reward
from ..rewards.self_reward import generation_self_reward
from ..rollout import Rollout, XCoTFormat, xcot_rollout
from .identity import IdentityJudge, judge_text
from .pipeline import DataFlaws, failure_modes, flawed_targets
from .scene import GRID, PairScene, all_subjects, pick, random_pair_scene, random_scene, subject_view
from .tokens import WorldTokens


def split_subjects(seed: int, held_out_frac: float):
    """(training subjects, held-out subjects): a seeded permutation of all subjects."""
    if not 0.0 < held_out_frac < 1.0:
        raise ValueError(f"held_out_frac must lie in (0, 1), got {held_out_frac}")
    subjects = all_subjects()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(subjects), generator=g).tolist()
    k = int(len(subjects) * held_out_frac)
    return [subjects[i] for i in perm[k:]], [subjects[i] for i in perm[:k]]


def xcot_format(world: WorldTokens, direct: bool = False) -> XCoTFormat:
    """The X-CoT format of the world (or the direct one: references + prompt -> final image)."""
    t = world.text
    return XCoTFormat(think_open=t.token_id("<think>"), think_close=t.token_id("</think>"),
                      end_of_turn=world.end_of_turn, subject_hw=(GRID, GRID), final_hw=(GRID, GRID),
                      text_range=(t.token_id("<reserved08706>") + 1, t.vocab_size), max_text_tokens=40,
                      reasoning=not direct, subject_image=not direct)


def random_task(subjects: Sequence, g: torch.Generator, pair: bool):
    """(scene, reference scenes): one subject, or two different subjects (one reference scene each)."""
    first = pick(subjects, g)
    if not pair:
        return random_scene(first, g), [random_scene(first, g)]
    second = pick(subjects, g)
    while second == first:
        second = pick(subjects, g)
    return random_pair_scene(first, second, g), [random_scene(first, g), random_scene(second, g)]


def make_prompts(world: WorldTokens, subjects: Sequence, n: int, seed: int, pair_frac: float = 0.0) -> List[dict]:
    """n prompts: {"prompt_ids", "scene", "reference_scenes"} (seeded; pair_frac of them two-subject)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        scene, refs = random_task(subjects, g, pair=float(torch.rand((), generator=g)) < pair_frac)
        out.append({"prompt_ids": world.reference_prompt_ids(refs, scene), "scene": scene, "reference_scenes": refs})
    return out


@dataclass
class TaskMix:
    """What a cold-start batch is made of."""

    batch_size: int = 16
    pair_frac: float = 0.25  # two-subject (PSR-style) examples among X-CoT / direct examples
    describe_frac: float = 0.15  # understanding examples (image -> prompt), for the dual self-reward
    direct: bool = False  # the ablation's direct policy: references + prompt -> final image
    reasoning_weight: float = 1.0  # SFT loss weight of the reasoning text tokens (image codes and the rest: 1)
    flaws: DataFlaws = field(default_factory=DataFlaws.clean)  # the data pipeline's errors (mmr1.world.pipeline)


def sft_batch(world: WorldTokens, subjects: Sequence, g: torch.Generator, mix: TaskMix,
              flaw_g: Optional[torch.Generator] = None):
    """(sequences, prompt lengths, token weights): X-CoT (or direct) examples, one- and two-subject, and describe
    examples; the reasoning text (after <think>, up to and including </think>) weighs ``mix.reasoning_weight``.
    The targets come from the pipeline ``mix.flaws`` describes (the prompts and references are always right); its
    errors are drawn from ``flaw_g`` (default ``g``): with a generator of their own, the tasks -- scenes,
    references, prompts -- are the same whatever the flaw rates."""
    seqs, plens, weights = [], [], []
    close = world.text.token_id("</think>")
    for _ in range(mix.batch_size):
        u = float(torch.rand((), generator=g))
        scene, refs = random_task(subjects, g, pair=float(torch.rand((), generator=g)) < mix.pair_frac)
        drawn, captioned, _ = flawed_targets(scene, mix.flaws, g if flaw_g is None else flaw_g, xcot=not mix.direct)
        if u < mix.describe_frac:
            s, p = world.describe_example(scene)
        else:
            s, p = world.example(scene, refs, mix.direct, drawn=drawn, captioned=captioned)
        w = [1.0] * len(s)
        if close in s[p:]:
            end = s.index(close, p)
            w[p + 1:end + 1] = [mix.reasoning_weight] * (end - p)
        seqs.append(s)
        plens.append(p)
        weights.append(w)
    return seqs, plens, weights


def world_rewards(world: WorldTokens, fmt: XCoTFormat, judge: IdentityJudge, policy: Optional[Transformer] = None,
                  self_weight: float = 0.0, consistency_weight: float = 0.0) -> RewardSet:
    """format; identity (the classification-based subject reward, PSR-style for pairs); layout (background,
    position and scale -- or which subject on which side -- as asked); with a policy and self_weight > 0 the
    dual self-reward: the policy's own mean log p(prompt | image); with consistency_weight > 0 (X-CoT only) the
    reasoning-image consistency (do the subjects the reasoning names match the final image's?)."""
    def identity(ro, batch):
        r = torch.tensor([judge.identity_reward(ro.final_codes[i], b["scene"]) for i, b in enumerate(batch)])
        whole = [judge.judge_image(ro.final_codes[i], b["scene"])["whole"] for i, b in enumerate(batch)]
        return r, {"identity/whole_frac": sum(whole) / len(whole)}  # a running estimate of final-image identity

    def layout(ro, batch):
        return torch.tensor([judge.layout(ro.final_codes[i], b["scene"]) for i, b in enumerate(batch)]), {}

    def self_reward(ro, batch):
        blocks = [world.image.encode_block(c).tolist() for c in ro.final_codes]
        prompts = [world.text.encode(b["scene"].prompt()) for b in batch]
        return generation_self_reward(policy, blocks, prompts, prefix=[world.describe], sep=world.end_of_turn,
                                      bos=world.bos)

    def consistency(ro, batch):
        return torch.tensor([judge.consistency(world.text.decode(ro.reasoning[i]), ro.final_codes[i], b["scene"])
                             for i, b in enumerate(batch)]), {}

    rewards = {"format": lambda ro, b: format_reward(ro, world.image, fmt), "identity": identity, "layout": layout}
    weights = {"format": 0.5, "identity": 1.0, "layout": 1.0}
    if fmt.reasoning and consistency_weight > 0:
        rewards["consistency"], weights["consistency"] = consistency, consistency_weight
    if policy is not None and self_weight > 0:
        rewards["self"], weights["self"] = self_reward, self_weight
    return RewardSet(rewards, weights)


# --------------------------------------------------------------------------- evaluation

def mean_ci(x: torch.Tensor) -> Tuple[float, float]:
    """(mean, half-width of the normal 95% CI of the mean)."""
    x = x.double()
    n = x.numel()
    half = 1.96 * float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(x.mean()), half


def identity_rows(world: WorldTokens, judge: IdentityJudge, fmt: XCoTFormat, ro: Rollout,
                  prompts: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """Per prompt (one sample each): identity of the reasoning text, the subject image and the final image
    ("<part>/<attribute>" and "<part>/whole"), the final image's layout, and format validity."""
    rows: Dict[str, List[float]] = {}

    def add(prefix, scores):
        for k, v in scores.items():
            rows.setdefault(f"{prefix}/{k}", []).append(v)

    fmt_ok, _ = format_reward(ro, world.image, fmt)
    for i, p in enumerate(prompts):
        scene = p["scene"]
        if fmt.reasoning:
            add("text", judge_text(world.text.decode(ro.reasoning[i]), scene))
        if fmt.subject_image:
            add("subject_image", {k: v for k, v in judge.judge_image(ro.subject_codes[i], subject_view(scene)).items()
                                  if k != "layout"})
        final = judge.judge_image(ro.final_codes[i], scene)
        rows.setdefault("layout", []).append(final.pop("layout"))
        add("final", final)
        rows.setdefault("format", []).append(float(fmt_ok[i]))
        # the data pipeline's failure modes in the final image (pairs; NaN for one subject: not applicable)
        modes = failure_modes(judge.read(ro.final_codes[i], True), scene) if isinstance(scene, PairScene) \
            else dict.fromkeys(("mixing", "swapped", "dropped_pattern"), float("nan"))
        add("flaw", modes)
    return {k: torch.tensor(v) for k, v in rows.items()}


@torch.no_grad()
def evaluate(model: Transformer, world: WorldTokens, judge: IdentityJudge, fmt: XCoTFormat, prompts: List[dict],
             seed: int, sampling: SamplingConfig, batch: int = 64):
    """Sample one completion per prompt with ``sampling`` (the demo's: DemoConfig.sampling, the policy GRPO
    trains), its seed replaced by ``seed``, and score it. Returns ({split: {metric: (mean, 95% CI)}}, {split:
    {metric: per-prompt values}}, rollouts)."""
    model.eval()
    ros = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        ros.append((chunk, xcot_rollout(model, [p["prompt_ids"] for p in chunk], world.image, fmt,
                                        replace(sampling, seed=seed),
                                        row_ids=torch.arange(i, i + len(chunk)))))
    per: Dict[str, List[torch.Tensor]] = {}
    for chunk, ro in ros:
        for k, v in identity_rows(world, judge, fmt, ro, chunk).items():
            per.setdefault(k, []).append(v)
    values = {k: torch.cat(v) for k, v in per.items()}
    pair = torch.tensor([isinstance(p["scene"], PairScene) for p in prompts])
    table, raw = {}, {}
    for split, sel in (("one subject", ~pair), ("two subjects", pair)):
        if bool(sel.any()):  # a metric that does not apply to the split (NaN throughout) is left out of it
            raw[split] = {k: v[sel] for k, v in values.items() if not bool(torch.isnan(v[sel]).all())}
            table[split] = {k: mean_ci(v) for k, v in raw[split].items()}
    return table, raw, [ro for _, ro in ros]


__all__ = ["split_subjects", "xcot_format", "random_task", "make_prompts", "TaskMix", "sft_batch", "world_rewards",
           "mean_ci", "identity_rows", "evaluate"]
