"""Identity is the world's ground truth: locate and classify subjects, judge reasoning, images and layout.

Everything works on code grids [GRID, GRID] (what the model writes); a pixel
image is ``PatchVQ.encode``-d first. Because the VQ is exact, the L1 distance
between two code grids (a sum of the per-code patch distances) is the pixel L1
distance between the decoded images.

- ``locate``: background (the border's), the subject cells, scale (box width)
  and position (centroid column) -- what the image shows, not what was asked.
- ``classify``: the nearest ideal render among *all* 1056 subjects at the
  located placement (for a pair scene: in each half, among all subjects drawn
  small at that side). A right-coloured blob of the wrong shape, a right shape
  with the wrong pattern, or the other subject of a pair is classified as what
  it is, so it cannot pass for the right subject.
- ``judge_image``: per-attribute and whole-subject correctness of an image
  against a scene (for a pair: each side's subject vs the subject the prompt
  put there -- both right and on their sides), and its layout score.
- ``parse_subjects`` / ``judge_text``: the same for the reasoning text.
- ``identity_reward``: the world's analogue of DINO / PSR's pairwise subject
  consistency, built on the classification (see its docstring).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .scene import ATTRIBUTES, BACKGROUNDS, GRID, POSITIONS, AnyScene, PairScene, Scene, Subject, all_subjects
from .vq import PatchVQ

LEFT_COLUMNS = slice(0, GRID // 2 + 1)  # a pair's halves share the empty middle column
RIGHT_COLUMNS = slice(GRID // 2, GRID)


def _side_columns(side: str) -> slice:
    return LEFT_COLUMNS if side == "left" else RIGHT_COLUMNS


class IdentityJudge:
    """Locates and classifies the subjects of world images; caches the ideal code grids per placement."""

    def __init__(self, vq: PatchVQ, subjects: Optional[Sequence[Subject]] = None):
        self.vq = vq
        self.subjects = list(subjects) if subjects is not None else all_subjects()
        bg_names = list(BACKGROUNDS)
        self._is_subject = torch.tensor([k[1] is not None for k in vq.keys])
        # a full cell looks the same on any background: it says nothing about the background (-1)
        self._bg = torch.tensor([-1 if k[0] == "#" else bg_names.index(k[4]) for k in vq.keys])
        self._ideal: Dict[Tuple[str, str, str], torch.Tensor] = {}

    def ideal(self, background: str, position: str, scale: str) -> torch.Tensor:
        """[S, GRID, GRID]: every subject's ideal codes at one placement."""
        key = (background, position, scale)
        if key not in self._ideal:
            self._ideal[key] = torch.stack([self.vq.scene_codes(Scene(s, *key)) for s in self.subjects])
        return self._ideal[key]

    # ------------------------------------------------------------------ reading an image
    def locate(self, codes: torch.Tensor) -> Dict[str, Optional[str]]:
        """{"background", "position", "scale"} of what a code grid shows (position/scale None: no subject)."""
        codes = _grid(codes)
        border = torch.cat([codes[0], codes[-1], codes[1:-1, 0], codes[1:-1, -1]])
        bgs = self._bg[border]
        bgs = bgs[bgs >= 0]
        if bgs.numel() == 0:
            bgs = self._bg[codes.reshape(-1)]
            bgs = bgs[bgs >= 0]
        names = list(BACKGROUNDS)
        out: Dict[str, Optional[str]] = {
            "background": names[int(torch.bincount(bgs, minlength=len(names)).argmax())] if bgs.numel() else None,
            "position": None, "scale": None}
        cells = self._is_subject[codes]
        if not bool(cells.any()):
            return out
        rows, cols = cells.nonzero(as_tuple=True)
        extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
        scale = "big" if extent >= 4 else "small"
        cx = float(cols.float().mean())
        out["scale"] = scale
        out["position"] = min(POSITIONS[scale], key=lambda p: abs(POSITIONS[scale][p] - cx))
        return out

    def distances(self, codes: torch.Tensor, background: str, position: str, scale: str,
                  columns: slice = slice(None)) -> torch.Tensor:
        """[S]: L1 pixel distance of the image (within ``columns``) to every subject's ideal render there."""
        ideal = self.ideal(background, position, scale)[:, :, columns].reshape(len(self.subjects), -1)
        g = _grid(codes)[:, columns].reshape(1, -1).expand_as(ideal)
        return self.vq.distance[g, ideal].sum(-1)

    def classify(self, codes: torch.Tensor, background: str, position: str, scale: str,
                 columns: slice = slice(None)) -> Subject:
        """The subject whose ideal render at this placement is nearest (lowest index on ties)."""
        return self.subjects[int(self.distances(codes, background, position, scale, columns).argmin())]

    def read(self, codes: torch.Tensor, pair: bool) -> Dict[str, Optional[Subject]]:
        """What subject(s) an image shows: {"subject": ...} for one subject, {"left": ..., "right": ...} for a
        pair (None where no subject is drawn). Also the located background."""
        codes = _grid(codes)
        where = self.locate(codes)
        bg = where["background"] or "white"
        if not pair:
            s = None if where["position"] is None else self.classify(codes, bg, where["position"], where["scale"])
            return {"subject": s, "background": where["background"]}
        out: Dict[str, Optional[Subject]] = {"background": where["background"]}
        for side in ("left", "right"):
            cols = _side_columns(side)
            present = bool(self._is_subject[codes[:, cols]].any())
            out[side] = self.classify(codes, bg, side, "small", cols) if present else None
        return out

    # ------------------------------------------------------------------ judging against a scene
    def layout(self, codes: torch.Tensor, scene: AnyScene) -> float:
        """Fraction of the prompt's layout the image satisfies. One subject: {background, position, scale}.
        A pair: {background, the first subject at its side, the second at its side}; a side holds a subject
        when it has subject cells that are nearer to that subject than to the other one."""
        codes = _grid(codes)
        where = self.locate(codes)
        ok = [float(where["background"] == scene.background)]
        if isinstance(scene, PairScene):
            for mine, other, side in ((scene.first, scene.second, scene.first_position),
                                      (scene.second, scene.first, scene.second_position)):
                cols = _side_columns(side)
                present = bool(self._is_subject[codes[:, cols]].any())
                ok.append(float(present and self._nearer(codes, scene.background, side, cols, mine, other)))
        else:
            ok += [float(where["position"] == scene.position), float(where["scale"] == scene.scale)]
        return sum(ok) / len(ok)

    def _nearer(self, codes, bg, side, cols, mine: Subject, other: Subject) -> bool:
        d = self.distances(codes, bg, side, "small", cols)
        idx = {s: i for i, s in enumerate(self.subjects)}
        return bool(d[idx[mine]] < d[idx[other]])

    def judge_image(self, codes: torch.Tensor, scene: AnyScene) -> Dict[str, float]:
        """Per-attribute accuracy (mean over the scene's subjects), "whole" (every subject entirely right, and for
        a pair each on its side) and "layout" of an image against the scene it should show."""
        read = self.read(codes, isinstance(scene, PairScene))
        if isinstance(scene, PairScene):
            pairs = [(read[side], subj) for side, subj in scene.side_of().items()]
        else:
            pairs = [(read["subject"], scene.subject)]
        out = _attribute_scores(pairs)
        out["layout"] = self.layout(codes, scene)
        return out

    def identity_reward(self, codes: torch.Tensor, scene: AnyScene) -> float:
        """The identity-sensitive subject reward in [0, 1].

        One subject: score(classified subject, the reference subject), where score = 1/2 (fraction of the four
        attributes right) + 1/2 [the whole subject right]: the right subject 1, one attribute wrong 0.375, a
        right-coloured blob of another shape at most 0.375, nothing drawn 0. A pair (PSR's pairwise subject
        consistency): each reference subject is located -- the half whose subject scores best against it --
        and the scores are averaged; drawing one subject twice leaves the other unfound. Sides are the layout
        reward's business, as in PSR."""
        read = self.read(codes, isinstance(scene, PairScene))
        if isinstance(scene, PairScene):
            found = [read["left"], read["right"]]
            return sum(max(_score(f, s) for f in found) for s in scene.subjects) / 2.0
        return _score(read["subject"], scene.subject)


    def consistency(self, text: str, codes: torch.Tensor, scene: AnyScene) -> float:
        """Self-consistency of an X-CoT, with no ground truth: do the subjects the reasoning names (in order) match
        the subjects the image shows (for a pair, at the sides the prompt gave them)? The mean score (as in
        ``identity_reward``) over the prompt's subjects; a subject not named or not drawn scores 0."""
        named = parse_subjects(text)
        read = self.read(codes, isinstance(scene, PairScene))
        drawn = ([read[scene.first_position], read[scene.second_position]] if isinstance(scene, PairScene)
                 else [read["subject"]])
        named = (named + [None] * len(drawn))[: len(drawn)] if len(named) <= len(drawn) else [None] * len(drawn)
        return sum(0.0 if n is None else _score(d, n) for n, d in zip(named, drawn)) / len(drawn)


def _grid(codes: torch.Tensor) -> torch.Tensor:
    codes = torch.as_tensor(codes).long().cpu()
    if tuple(codes.shape) != (GRID, GRID):
        raise ValueError(f"codes must be a [{GRID}, {GRID}] code grid, got {tuple(codes.shape)}")
    return codes


def _score(pred: Optional[Subject], true: Subject) -> float:
    if pred is None:
        return 0.0
    right = [getattr(pred, a) == getattr(true, a) for a in ATTRIBUTES]
    return 0.5 * sum(right) / len(right) + 0.5 * float(all(right))


def _attribute_scores(pairs: Sequence[Tuple[Optional[Subject], Subject]]) -> Dict[str, float]:
    out = {}
    for a in ATTRIBUTES:
        out[a] = sum(float(p is not None and getattr(p, a) == getattr(t, a)) for p, t in pairs) / len(pairs)
    out["whole"] = float(all(p == t for p, t in pairs))
    return out


# --------------------------------------------------------------------------- reasoning text

_PHRASE = re.compile(r"\ba (\w+) (\w+) with (?:(solid)|(\w+) (\w+))")


def parse_subjects(text: str) -> List[Optional[Subject]]:
    """The subjects a reasoning text names, in order ("a red cross with blue stripes" -> Subject); a phrase
    with an unknown word or an impossible combination gives None. Only the part before ";" (the analysis;
    the rest is the layout plan) is read."""
    head = text.split(";")[0]
    out: List[Optional[Subject]] = []
    for color, shape, solid, pc, pattern in _PHRASE.findall(head):
        try:
            if solid:
                out.append(Subject(shape, color))
            else:
                out.append(Subject(shape, color, pattern, pc))
        except ValueError:
            out.append(None)
    return out


def judge_text(text: str, scene: AnyScene) -> Dict[str, float]:
    """Per-attribute accuracy and "whole" of the subjects a reasoning text names, in the scene's order. A text
    naming the wrong number of subjects gets the missing ones wrong."""
    named = parse_subjects(text)
    truth = list(scene.subjects)
    if len(named) != len(truth):
        named = (named + [None] * len(truth))[: len(truth)] if len(named) < len(truth) else [None] * len(truth)
    return _attribute_scores(list(zip(named, truth)))


__all__ = ["IdentityJudge", "parse_subjects", "judge_text", "LEFT_COLUMNS", "RIGHT_COLUMNS"]
