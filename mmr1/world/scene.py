"""Subjects and scenes of the synthetic personalization world, drawn from cell tiles.

A subject is shape x color x pattern (x pattern color): 6 x 8 x (1 + 3 x 7) =
1056 of them. An image is a GRID x GRID grid of CELL x CELL-pixel cells (7 x 7
cells of 8 px: 56 x 56 RGB). Every cell is one *tile*: a background color; a
subject color filling one of eight partial masks (a wedge or a diagonal half)
over a background color, for the edges of a shape; or a full cell, painted with
the subject's color and pattern (stripes, rows or a checker of 2-px bands in
the pattern color). A shape at a scale is a fixed map of tiles (below), so a
subject looks the same wherever it stands, and every shape has full cells that
show its pattern.

Why tiles: the world's tokenizer must carry a subject's identity. With free
pixel rendering and a 128-code k-means VQ over 4 x 4 patches, an encode ->
decode round trip kept the right subject only 30% of the time (patterns and
pattern colors blurred). Here the distinct cell patches are finite (501), so
the VQ (mmr1.world.vq) holds every one of them exactly. (A first version
painted patterns at cell granularity -- whole cells in the pattern color --
which a tiny model reads poorly: after 1500 SFT steps its reasoning named the
pattern 30% of the time, chance 25%; a pattern inside a cell is one code.)

A scene places "my subject" on a background, at a position, at a scale; a pair
scene (PSR-style multi-subject personalization) places "my first subject" and
"my second subject", both small, one at the left and one at the right.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

WORLD_VERSION = 4  # bump when subjects, tiles, scenes, prompts, plans or the vocabulary change (invalidates weights)
CELL = 8  # pixels per cell side = per VQ patch side
GRID = 7  # cells per image side: an image is a GRID x GRID code grid
SIZE = CELL * GRID

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (235, 215, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (240, 120, 180), "brown": (130, 80, 40)}
PATTERNS = ("solid", "stripes", "rows", "checker")
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "sand": (220, 200, 150),
    "sky": (160, 210, 245)}
SCALES: Dict[str, int] = {"small": 3, "big": 5}  # side of the shape's box, in cells
# centre column of the shape's box, per scale (the row centre is GRID // 2 for every scene)
POSITIONS: Dict[str, Dict[str, int]] = {"small": {"left": 1, "center": 3, "right": 5},
                                        "big": {"left": 2, "center": 3, "right": 4}}
POSITION_NAMES = ("left", "center", "right")

# Tile masks of one cell, by name. "#" full; "^ v < >" wedges pointing up/down/left/right; "a b c d" diagonal
# halves with the bottom-right / bottom-left / top-left / top-right corner filled.
TILE_NAMES = "#^v<>abcd"


def _tile_masks() -> Dict[str, torch.Tensor]:
    c = torch.arange(CELL, dtype=torch.float32) + 0.5
    i, j = torch.meshgrid(c, c, indexing="ij")  # pixel centres in (0, CELL)
    h, eps = float(CELL), 1e-4
    return {
        "#": torch.ones(CELL, CELL, dtype=torch.bool),
        "^": (j - h / 2).abs() <= i / 2 + eps, "v": (j - h / 2).abs() <= (h - i) / 2 + eps,
        "<": (i - h / 2).abs() <= j / 2 + eps, ">": (i - h / 2).abs() <= (h - j) / 2 + eps,
        "a": i + j >= h, "b": i >= j, "c": i + j <= h, "d": j >= i,
    }


TILES = _tile_masks()


def _pattern_masks() -> Dict[str, torch.Tensor]:
    """Pixels of a full cell painted in the pattern color: 2-px bands (a period of 4 divides the cell, so
    neighbouring cells continue the pattern)."""
    i, j = torch.meshgrid(torch.arange(CELL), torch.arange(CELL), indexing="ij")
    return {"solid": torch.zeros(CELL, CELL, dtype=torch.bool), "stripes": (j // 2) % 2 == 1,
            "rows": (i // 2) % 2 == 1, "checker": (i // 2 + j // 2) % 2 == 1}


PATTERN_MASKS = _pattern_masks()

# Shape maps: one row of tiles per string, "." = background.
SHAPE_MAPS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "small": {
        "circle": ("a#b", "###", "d#c"),
        "square": ("###", "###", "###"),
        "triangle": (".^.", "a#b", "###"),
        "star": (".^.", "<#>", ".v."),
        "cross": (".#.", "###", ".#."),
        "ring": ("a#b", "#.#", "d#c"),
    },
    "big": {
        "circle": (".a#b.", "a###b", "#####", "d###c", ".d#c."),
        "square": ("#####", "#####", "#####", "#####", "#####"),
        "triangle": (".....", "..^..", ".a#b.", "a###b", "#####"),
        "star": ("..^..", ".a#b.", "<###>", ".d#c.", "..v.."),
        "cross": ("..#..", "..#..", "#####", "..#..", "..#.."),
        "ring": (".a#b.", "ac.db", "#...#", "db.ac", ".d#c."),
    },
}


@dataclass(frozen=True)
class Subject:
    shape: str
    color: str
    pattern: str = "solid"
    pattern_color: Optional[str] = None

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, COLORS),
                                     ("pattern", self.pattern, PATTERNS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
        if (self.pattern == "solid") != (self.pattern_color is None):
            raise ValueError("pattern_color is given exactly when the pattern is not 'solid'")
        if self.pattern_color is not None and (self.pattern_color not in COLORS or self.pattern_color == self.color):
            raise ValueError(f"pattern_color must be a color other than {self.color!r}, got {self.pattern_color!r}")

    def words(self) -> str:
        p = self.pattern if self.pattern == "solid" else f"{self.pattern_color} {self.pattern}"
        return f"{self.color} {self.shape} with {p}"

    def attributes(self) -> Dict[str, Optional[str]]:
        return {"shape": self.shape, "color": self.color, "pattern": self.pattern,
                "pattern_color": self.pattern_color}


ATTRIBUTES = ("shape", "color", "pattern", "pattern_color")


@dataclass(frozen=True)
class Scene:
    """One subject: "my subject" on a background, at a position, at a scale."""

    subject: Subject
    background: str
    position: str
    scale: str

    def __post_init__(self):
        if self.background not in BACKGROUNDS or self.position not in POSITION_NAMES or self.scale not in SCALES:
            raise ValueError(f"bad scene: background {self.background!r}, position {self.position!r}, "
                             f"scale {self.scale!r}")

    @property
    def subjects(self) -> Tuple[Subject, ...]:
        return (self.subject,)

    def prompt(self) -> str:
        return f"my subject {self.scale} at the {self.position} on {self.background}"

    def plan(self) -> str:
        return f"subject is a {self.subject.words()} ; place it {self.scale} at the {self.position} on {self.background}"


@dataclass(frozen=True)
class PairScene:
    """Two subjects (PSR-style multi-subject personalization), both small, one at the left, one at the right.
    The prompt carries one reference image per subject, in the order "first", "second"."""

    first: Subject
    second: Subject
    background: str
    first_position: str  # "left" | "right"

    def __post_init__(self):
        if self.first_position not in ("left", "right"):
            raise ValueError(f"first_position must be 'left' or 'right', got {self.first_position!r}")
        if self.first == self.second:
            raise ValueError("a pair scene needs two different subjects")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")

    @property
    def second_position(self) -> str:
        return "right" if self.first_position == "left" else "left"

    @property
    def subjects(self) -> Tuple[Subject, ...]:
        return (self.first, self.second)

    def side_of(self) -> Dict[str, Subject]:
        """{"left": subject, "right": subject}."""
        return {self.first_position: self.first, self.second_position: self.second}

    def placements(self) -> List[Scene]:
        return [Scene(self.first, self.background, self.first_position, "small"),
                Scene(self.second, self.background, self.second_position, "small")]

    def prompt(self) -> str:
        return (f"my first subject at the {self.first_position} and my second subject at the {self.second_position}"
                f" on {self.background}")

    def plan(self) -> str:
        return (f"subjects are a {self.first.words()} and a {self.second.words()} ; place them small with the first"
                f" at the {self.first_position} on {self.background}")


AnyScene = Union[Scene, PairScene]


def placements(scene: AnyScene) -> List[Scene]:
    """The single-subject placements a scene is drawn from."""
    return scene.placements() if isinstance(scene, PairScene) else [scene]


def all_subjects() -> List[Subject]:
    out = []
    for shape, color in itertools.product(SHAPES, COLORS):
        out.append(Subject(shape, color))
        for pattern, pc in itertools.product(PATTERNS[1:], COLORS):
            if pc != color:
                out.append(Subject(shape, color, pattern, pc))
    return out


def box(scale: str, position: str) -> Tuple[int, int]:
    """(top row, left column) of a placement's shape box."""
    n = SCALES[scale]
    return GRID // 2 - n // 2, POSITIONS[scale][position] - n // 2


Paint = Tuple[str, str, Optional[str]]  # (color, pattern, pattern color): how a cell of a subject is colored


def subject_cells(subject: Subject, scale: str) -> List[Tuple[int, int, str, Paint]]:
    """(row, column, tile, paint) of each drawn cell of the subject's box, box-relative. Full cells carry the
    subject's pattern; edge tiles are plain color."""
    out = []
    for r, line in enumerate(SHAPE_MAPS[scale][subject.shape]):
        for c, tile in enumerate(line):
            if tile == "#":
                out.append((r, c, tile, (subject.color, subject.pattern, subject.pattern_color)))
            elif tile != ".":
                out.append((r, c, tile, (subject.color, "solid", None)))
    return out


Cell = Tuple[str, Optional[str], str, Optional[str], str]  # (tile, color, pattern, pattern color, background)


def cell_grid(scene: AnyScene) -> List[List[Cell]]:
    """The scene as a GRID x GRID grid of (tile, color, pattern, pattern color, background) cells -- what the image
    is drawn from ("." tiles: background only, color None)."""
    empty: Cell = (".", None, "solid", None, scene.background)
    grid: List[List[Cell]] = [[empty] * GRID for _ in range(GRID)]
    for p in placements(scene):
        top, left = box(p.scale, p.position)
        for r, c, tile, (color, pattern, pc) in subject_cells(p.subject, p.scale):
            grid[top + r][left + c] = (tile, color, pattern, pc, scene.background)
    return grid


def subject_view(scene_or_subject: Union[Subject, AnyScene]) -> AnyScene:
    """The X-CoT's intermediate subject image: the subject alone, big, centered, on white (for a pair: both
    subjects on white, in the order they will be placed)."""
    if isinstance(scene_or_subject, PairScene):
        return PairScene(scene_or_subject.first, scene_or_subject.second, "white", scene_or_subject.first_position)
    subject = scene_or_subject.subject if isinstance(scene_or_subject, Scene) else scene_or_subject
    return Scene(subject, "white", "center", "big")


def pick(seq: Sequence, g: torch.Generator):
    """One element of ``seq``, drawn from ``g``."""
    return seq[int(torch.randint(len(seq), (1,), generator=g))]


def random_scene(subject: Subject, g: torch.Generator) -> Scene:
    return Scene(subject, pick(list(BACKGROUNDS), g), pick(POSITION_NAMES, g), pick(list(SCALES), g))


def random_pair_scene(first: Subject, second: Subject, g: torch.Generator) -> PairScene:
    return PairScene(first, second, pick(list(BACKGROUNDS), g), pick(["left", "right"], g))


__all__ = ["WORLD_VERSION", "CELL", "GRID", "SIZE", "SHAPES", "COLORS", "PATTERNS", "BACKGROUNDS", "SCALES",
           "POSITIONS", "POSITION_NAMES", "ATTRIBUTES", "TILES", "SHAPE_MAPS", "Subject", "Scene", "PairScene",
           "AnyScene", "placements", "all_subjects", "box", "subject_cells", "cell_grid", "subject_view", "pick",
           "random_scene", "random_pair_scene", "Paint", "Cell", "PATTERN_MASKS"]
