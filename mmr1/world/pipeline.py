"""The cold-start data pipeline, flawed the way real synthetic pipelines are.

Real cold-start sets are generated, not drawn by hand. MM-R1's X-CoT set has
its reasoning written by a captioner from the reference images; PSR builds its
multi-subject images by composing single-subject generators, whose known
failure is identity mixing: one subject takes an attribute of the other. A
world whose training data is perfect leaves RL nothing to fix, so the demo's
cold start is trained on data with these flaws, at the rates of
``DataFlaws`` (stated, measured by ``flaw_rates``):

- **identity mixing** (two-subject examples): the second subject is drawn with
  one attribute of the first -- its colour, its pattern, or its pattern colour
  -- in both generated images (the subject image and the final image);
- **wrong side** (two-subject examples): the generator puts the subjects on
  the opposite sides from the prompt;
- **dropped pattern** (two-subject examples): one patterned subject is drawn
  plain (solid);
- **caption errors** (any X-CoT example): the reasoning names one attribute of
  one subject wrongly (a colour, a shape, a pattern or a pattern colour
  replaced by another of its kind), the images stay as generated.

The prompt and its reference images are always right (they are the user's),
and so are the identity judge and the rewards: the flaws live in the training
targets only. Single-subject images are clean: a single-subject generator is
what the pipeline composes pairs from. ``DataFlaws.clean()`` is the perfect
pipeline (the previous cold start's data).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .scene import COLORS, PATTERNS, SHAPES, AnyScene, PairScene, Scene, Subject, pick

FLAW_KINDS = ("identity_mixing", "wrong_side", "dropped_pattern", "caption_error")


@dataclass(frozen=True)
class DataFlaws:
    """Per-example rates of the pipeline's errors (each drawn independently)."""

    identity_mixing: float = 0.3  # of two-subject examples: the second subject takes an attribute of the first
    wrong_side: float = 0.1  # of two-subject examples: subjects drawn on the sides opposite to the prompt
    dropped_pattern: float = 0.1  # of two-subject examples: one patterned subject drawn solid
    caption_error: float = 0.1  # of X-CoT examples: one attribute word of the reasoning wrong

    def __post_init__(self):
        for name, rate in asdict(self).items():
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
                raise ValueError(f"DataFlaws.{name} must be a rate in [0, 1], got {rate!r}")

    @classmethod
    def clean(cls) -> "DataFlaws":
        """The perfect pipeline: every target drawn and captioned right."""
        return cls(0.0, 0.0, 0.0, 0.0)

    @property
    def is_clean(self) -> bool:
        return all(v == 0.0 for v in asdict(self).values())


def _coin(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def mixing_options(first: Subject, second: Subject) -> List[Subject]:
    """Every way the second subject can take one attribute of the first (colour, pattern or pattern colour) and
    stay a drawable subject different from both."""
    options: List[Subject] = []
    # colour: keep the pattern; a pattern colour equal to the new body colour is not drawable
    if first.color != second.color and second.pattern_color != first.color:
        options.append(Subject(second.shape, first.color, second.pattern, second.pattern_color))
    # pattern: the first's pattern kind (solid drops the pattern colour; a solid second takes the first's colour)
    if first.pattern != second.pattern:
        if first.pattern == "solid":
            options.append(Subject(second.shape, second.color))
        else:
            pc = second.pattern_color if second.pattern_color is not None else first.pattern_color
            if pc != second.color:
                options.append(Subject(second.shape, second.color, first.pattern, pc))
    # pattern colour: both patterned with different pattern colours
    if (first.pattern_color is not None and second.pattern_color is not None
            and first.pattern_color != second.pattern_color and first.pattern_color != second.color):
        options.append(Subject(second.shape, second.color, second.pattern, first.pattern_color))
    return [s for s in options if s != first and s != second]


def mixed_subject(first: Subject, second: Subject, g: torch.Generator) -> Optional[Subject]:
    """One of ``mixing_options``, drawn uniformly; None when there is none."""
    options = mixing_options(first, second)
    if not options:
        return None
    return options[int(torch.randint(len(options), (1,), generator=g))]


def _bleeds(drawn: Optional[Subject], mine: Subject, other: Subject) -> bool:
    """A subject drawn with at least one wrong attribute that is the other subject's."""
    if drawn is None or drawn == mine:
        return False
    return any(getattr(drawn, a) != getattr(mine, a) and getattr(drawn, a) == getattr(other, a)
               for a in ("shape", "color", "pattern", "pattern_color"))


def failure_modes(read: Dict[str, Optional[Subject]], scene: PairScene) -> Dict[str, float]:
    """Which of the pipeline's failure kinds a generated pair image shows, from the subjects the judge read on each
    side (IdentityJudge.read): "mixing" (a subject drawn with an attribute of the other one -- the pipeline's
    single-attribute mixing, or any bleeding of attributes between the two, in either direction), "swapped" (the
    two subjects on each other's sides), "dropped_pattern" (a patterned subject drawn plain)."""
    first, second = scene.first, scene.second
    at_first, at_second = read[scene.first_position], read[scene.second_position]
    plain = [Subject(s.shape, s.color) for s in (first, second) if s.pattern != "solid"]
    swapped = at_first == second and at_second == first
    return {"mixing": float(not swapped and (_bleeds(at_first, first, second) or _bleeds(at_second, second, first))),
            "swapped": float(swapped),
            "dropped_pattern": float(any(x is not None and x in plain for x in (at_first, at_second)))}


def drawn_scene(scene: AnyScene, flaws: DataFlaws, g: torch.Generator) -> Tuple[AnyScene, List[str]]:
    """(the scene the flawed generator draws for ``scene``, the flaws applied). One-subject scenes are drawn right."""
    mix, side, drop = _coin(g, flaws.identity_mixing), _coin(g, flaws.wrong_side), _coin(g, flaws.dropped_pattern)
    which = int(torch.randint(2, (1,), generator=g))
    if not isinstance(scene, PairScene):
        return scene, []
    first, second, position, applied = scene.first, scene.second, scene.first_position, []
    if mix:
        m = mixed_subject(first, second, g)
        if m is not None:
            second, applied = m, applied + ["identity_mixing"]
    if drop:  # the chosen subject, or the other one if the chosen one has no pattern
        pair = [first, second]
        k = next((k for k in (which, 1 - which) if pair[k].pattern != "solid"), None)
        if k is not None:
            pair[k] = Subject(pair[k].shape, pair[k].color)
            if pair[0] != pair[1]:
                first, second = pair
                applied.append("dropped_pattern")
    if side:
        position = "right" if position == "left" else "left"
        applied.append("wrong_side")
    return PairScene(first, second, scene.background, position), applied


# one attribute word replaced by another of its kind (what a captioner confuses)
_KINDS = (("color", tuple(COLORS)), ("shape", SHAPES), ("pattern", PATTERNS[1:]), ("pattern_color", tuple(COLORS)))


def miscaptioned(scene: AnyScene, g: torch.Generator) -> AnyScene:
    """A scene whose plan names one attribute of one subject wrongly (the reasoning a captioner would write);
    only the subjects change, so the placement words of the plan stay right."""
    subjects = list(scene.subjects)
    k = int(torch.randint(len(subjects), (1,), generator=g))
    s = subjects[k]
    kinds = [(n, vals) for n, vals in _KINDS if n != "pattern_color" or s.pattern_color is not None]
    kinds = [(n, vals) for n, vals in kinds if n != "pattern" or s.pattern != "solid"]
    name, values = kinds[int(torch.randint(len(kinds), (1,), generator=g))]
    for _ in range(16):
        v = pick(values, g)
        attrs = s.attributes()
        attrs[name] = v
        try:
            wrong = Subject(**attrs)
        except ValueError:  # e.g. a pattern colour equal to the body colour
            continue
        if wrong != s and wrong not in subjects:
            subjects[k] = wrong
            break
    else:
        return scene
    if isinstance(scene, PairScene):
        return PairScene(subjects[0], subjects[1], scene.background, scene.first_position)
    return Scene(subjects[0], scene.background, scene.position, scene.scale)


def flawed_targets(scene: AnyScene, flaws: DataFlaws, g: torch.Generator,
                   xcot: bool = True) -> Tuple[AnyScene, AnyScene, List[str]]:
    """(scene the images are drawn from, scene the reasoning describes, flaws applied) for one example."""
    drawn, applied = drawn_scene(scene, flaws, g)
    wrong_caption = _coin(g, flaws.caption_error)
    captioned = miscaptioned(scene, g) if wrong_caption and xcot else scene
    if captioned != scene:
        applied.append("caption_error")
    return drawn, captioned, applied


def flaw_rates(subjects: Sequence[Subject], flaws: DataFlaws, n: int = 4000, seed: int = 0) -> Dict[str, float]:
    """The realized rates over ``n`` drawn tasks (two-subject rates per pair example, caption errors per
    example, "any_pair_flaw": a pair example with at least one image flaw)."""
    from .tasks import random_task

    g = torch.Generator().manual_seed(seed)
    counts = {k: 0 for k in FLAW_KINDS}
    pairs = any_pair = 0
    for i in range(n):
        scene, _ = random_task(subjects, g, pair=i % 2 == 1)
        _, _, applied = flawed_targets(scene, flaws, g)
        for a in applied:
            counts[a] += 1
        if isinstance(scene, PairScene):
            pairs += 1
            any_pair += any(a != "caption_error" for a in applied)
    out = {k: counts[k] / max(pairs, 1) for k in FLAW_KINDS if k != "caption_error"}
    out["caption_error"] = counts["caption_error"] / n
    out["any_pair_flaw"] = any_pair / max(pairs, 1)
    return out


__all__ = ["DataFlaws", "FLAW_KINDS", "mixing_options", "mixed_subject", "failure_modes", "drawn_scene", "miscaptioned", "flawed_targets", "flaw_rates"]
