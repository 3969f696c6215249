"""A synthetic personalization world small enough to learn on a CPU: subjects, scenes, tokens, rewards.

Subjects are procedural: shape x color x pattern (x pattern color), 1056 of
them. A scene places "my subject" on a background color, at a position, at a
scale, in a 32 x 32 RGB image; a pair scene (PSR-style multi-subject
personalization) places "my first subject" and "my second subject", one
reference image each, at the left and the right. The world has everything
MM-R1 needs, with the same formats as Lumina-mGPT:

- a VQ image tokenizer: 4 x 4-pixel patches -> a k-means codebook (learned
  deterministically from rendered scenes in seconds), so an image is an 8 x 8
  code grid and an image block is ``boi, H, W, (8 codes + newline) x 8, eoi``;
- a word-level tokenizer.json whose ids follow Chameleon's layout (image codes
  named IMGIMG..., from id 4), with boi / eoi / newline / size / end-of-turn
  tokens and <think> </think> for the X-CoT;
- X-CoT examples: [reference image(s) + prompt] -> reasoning (the subjects'
  attributes and the plan) -> subject image -> final image; and understanding
  examples ([image] -> the prompt it answers) so the policy's own
  log p(prompt | image) can serve as the dual self-reward;
- exact procedural rewards: text alignment (background, position, scale as
  asked; for pairs, which subject is on which side) and subject similarity
  (the subject's pixels vs an ideal render; for pairs, PSR's pairwise subject
  consistency: each subject located, then compared).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .tokens import ImageVocab, TextTokenizer, code_to_bpe_name

WORLD_VERSION = 2  # bump when scenes, prompts, plans or the vocabulary change (invalidates shipped weights)
SIZE = 32
PATCH = 4
GRID = SIZE // PATCH  # 8 x 8 codes per image

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (235, 215, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (240, 120, 180), "brown": (130, 80, 40)}
PATTERNS = ("solid", "stripes", "dots", "checker")
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "sand": (220, 200, 150),
    "sky": (160, 210, 245)}
POSITIONS: Dict[str, int] = {"left": 9, "center": 16, "right": 23}
SCALES: Dict[str, int] = {"small": 5, "big": 8}  # half-size in pixels


@dataclass(frozen=True)
class Subject:
    shape: str
    color: str
    pattern: str = "solid"
    pattern_color: Optional[str] = None

    def words(self) -> str:
        p = self.pattern if self.pattern == "solid" else f"{self.pattern_color} {self.pattern}"
        return f"{self.color} {self.shape} with {p}"


@dataclass(frozen=True)
class Scene:
    """One subject: "my subject" on a background, at a position, at a scale."""

    subject: Subject
    background: str
    position: str
    scale: str

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

    @property
    def second_position(self) -> str:
        return "right" if self.first_position == "left" else "left"

    @property
    def subjects(self) -> Tuple[Subject, ...]:
        return (self.first, self.second)

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


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, h: float) -> torch.Tensor:
    if shape == "circle":
        return dx**2 + dy**2 <= h * h
    if shape == "square":
        return (dx.abs() <= 0.85 * h) & (dy.abs() <= 0.85 * h)
    if shape == "triangle":
        return (dy <= 0.8 * h) & (dy >= -h) & (dx.abs() <= (dy + h) * 0.55)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= h
    if shape == "cross":
        return ((dx.abs() <= h / 3) & (dy.abs() <= h)) | ((dy.abs() <= h / 3) & (dx.abs() <= h))
    if shape == "ring":
        r2 = dx**2 + dy**2
        return (r2 <= h * h) & (r2 >= (h / 2) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def subject_mask(scene: AnyScene) -> torch.Tensor:
    """bool [32, 32]: the pixels of the scene's subject(s)."""
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    for p in placements(scene):
        mask |= _shape_mask(p.subject.shape, x - POSITIONS[p.position], y - 16, SCALES[p.scale])
    return mask


def render(scene: AnyScene) -> torch.Tensor:
    """uint8 [32, 32, 3]."""
    img = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.uint8).expand(SIZE, SIZE, 3).clone()
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for p in placements(scene):
        s = p.subject
        mask = subject_mask(p)
        pat = {"solid": torch.zeros_like(mask), "stripes": (x // 2) % 2 == 0,
               "dots": (x % 3 == 0) & (y % 3 == 0), "checker": (x // 2 + y // 2) % 2 == 0}[s.pattern]
        img[mask] = torch.tensor(COLORS[s.color], dtype=torch.uint8)
        if s.pattern_color is not None:
            img[mask & pat] = torch.tensor(COLORS[s.pattern_color], dtype=torch.uint8)
    return img


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
    return Scene(subject, pick(list(BACKGROUNDS), g), pick(list(POSITIONS), g), pick(list(SCALES), g))


def random_pair_scene(first: Subject, second: Subject, g: torch.Generator) -> PairScene:
    return PairScene(first, second, pick(list(BACKGROUNDS), g), pick(["left", "right"], g))


# --------------------------------------------------------------------------- VQ tokenizer


class PatchVQ:
    """4 x 4 patches -> nearest of K codebook patches (a k-means codebook of the world's images)."""

    def __init__(self, codebook: torch.Tensor):
        self.codebook = codebook.float()  # [K, 48] in [0, 255]

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @staticmethod
    def patches(images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 32, 32, 3] -> [N, 64, 48]."""
        n = images.shape[0]
        p = images.float().reshape(n, GRID, PATCH, GRID, PATCH, 3).permute(0, 1, 3, 2, 4, 5)
        return p.reshape(n, GRID * GRID, PATCH * PATCH * 3)

    @classmethod
    def fit(cls, num_codes: int = 128, num_images: int = 1000, iters: int = 10, seed: int = 0) -> "PatchVQ":
        """Deterministic k-means (k-means++ seeding) on all patches of random scenes (frequency-weighted:
        measured mean reconstruction error 5.3/255 with 128 codes, vs 14.4 for k-means on distinct patches)."""
        g = torch.Generator().manual_seed(seed)
        subjects = all_subjects()
        scenes = [random_scene(pick(subjects, g), g) for _ in range(num_images)]
        imgs = torch.stack([render(s) for s in scenes[: num_images // 2]] +
                           [render(subject_view(s.subject)) for s in scenes[num_images // 2:]])
        x = cls.patches(imgs).reshape(-1, PATCH * PATCH * 3)  # every patch: frequent ones weigh more
        centers = x[int(torch.randint(len(x), (1,), generator=g))][None]
        for _ in range(1, num_codes):
            d = torch.cdist(x, centers).min(1).values ** 2
            centers = torch.cat([centers, x[torch.multinomial(d / d.sum(), 1, generator=g)]])
        for _ in range(iters):
            assign = torch.cdist(x, centers).argmin(1)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=num_codes).float()[:, None]
            centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
        return cls(centers)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 32, 32, 3] -> codes [N, 8, 8]."""
        p = self.patches(images)
        return torch.cdist(p, self.codebook[None].expand(p.shape[0], -1, -1)).argmin(-1).view(-1, GRID, GRID)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, 8, 8] -> uint8 [N, 32, 32, 3]."""
        n = codes.shape[0]
        p = self.codebook[codes.reshape(n, -1)].reshape(n, GRID, GRID, PATCH, PATCH, 3).permute(0, 1, 3, 2, 4, 5)
        return p.reshape(n, SIZE, SIZE, 3).round().clamp(0, 255).to(torch.uint8)

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({"codebook": self.codebook.contiguous()}, str(path))

    @classmethod
    def load(cls, path) -> "PatchVQ":
        from safetensors.torch import load_file

        return cls(load_file(str(path))["codebook"])


# --------------------------------------------------------------------------- tokens

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def world_words() -> List[str]:
    words = {"my", "subject", "at", "the", "on", "is", "a", "with", "place", "it", ";", "reference",
             "first", "second", "and", "subjects", "are", "them", "describe"}
    words |= set(SHAPES) | set(COLORS) | set(PATTERNS) | set(BACKGROUNDS) | set(POSITIONS) | set(SCALES)
    return sorted(words)


def build_tokenizer(path, num_codes: int) -> Tuple[TextTokenizer, ImageVocab]:
    """Write a tokenizer.json with Chameleon's id layout (codes from id 4) and return (text, image) vocabs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: Dict[str, int] = {t: i for i, t in enumerate(SPECIALS)}
    for c in range(num_codes):
        vocab[code_to_bpe_name(c)] = len(vocab)
    structure = ["<eoss>", "<racm3:break>", "<reserved08799>"] + [f"<reserved{8800 + n:05d}>" for n in range(GRID + 1)]
    for name in structure + ["<reserved08706>", "<think>", "</think>"] + world_words():
        vocab[name] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(path)
    tok.save(str(path))
    return TextTokenizer(path), ImageVocab.from_tokenizer_json(path, size_unit=1)


@dataclass
class WorldTokens:
    """Everything needed to turn scenes into X-CoT token sequences."""

    vq: PatchVQ
    text: TextTokenizer
    image: ImageVocab

    @property
    def bos(self) -> int:
        return self.text.token_id("<s>")

    @property
    def end_of_turn(self) -> int:
        return self.text.token_id("<reserved08706>")

    @property
    def describe(self) -> int:
        """The understanding-direction instruction: ``<s> describe [image] <eot>`` -> the prompt that made it."""
        return self.text.token_id("describe")

    def image_block(self, img: torch.Tensor) -> List[int]:
        return self.image.encode_block(self.vq.encode(img[None])[0]).tolist()

    def prompt_ids(self, references: Union[torch.Tensor, Sequence[torch.Tensor]], scene: AnyScene) -> List[int]:
        """``<s> (reference [image])+ prompt <eot>``: one reference image per subject of the scene, in order."""
        refs = [references] if isinstance(references, torch.Tensor) else list(references)
        if len(refs) != len(scene.subjects):
            raise ValueError(f"references: the scene has {len(scene.subjects)} subject(s), got {len(refs)} image(s)")
        ids = [self.bos]
        for r in refs:
            ids += self.text.encode("reference") + self.image_block(r)
        return ids + self.text.encode(scene.prompt()) + [self.end_of_turn]

    def completion_ids(self, scene: AnyScene) -> List[int]:
        return ([self.text.token_id("<think>")] + self.text.encode(scene.plan()) + [self.text.token_id("</think>")]
                + self.image_block(render(subject_view(scene))) + self.image_block(render(scene))
                + [self.end_of_turn])

    def example(self, scene: AnyScene, reference_scenes: Union[Scene, Sequence[Scene]]) -> Tuple[List[int], int]:
        """(full X-CoT sequence, prompt length) for cold-start SFT; one reference scene per subject."""
        refs = [reference_scenes] if isinstance(reference_scenes, Scene) else list(reference_scenes)
        p = self.prompt_ids([render(r) for r in refs], scene)
        return p + self.completion_ids(scene), len(p)

    def describe_prefix(self, image_block: Sequence[int]) -> List[int]:
        return [self.bos, self.describe] + list(image_block) + [self.end_of_turn]

    def describe_example(self, scene: AnyScene) -> Tuple[List[int], int]:
        """(sequence, prompt length) of the understanding direction: image -> the prompt it answers. Trained in
        the cold start so that the policy's own log p(prompt | image) is a meaningful self-reward."""
        p = self.describe_prefix(self.image_block(render(scene)))
        return p + self.text.encode(scene.prompt()) + [self.end_of_turn], len(p)


# --------------------------------------------------------------------------- rewards


def _nearest(color: torch.Tensor, table: Dict[str, Tuple[int, int, int]]) -> str:
    names = list(table)
    d = torch.cdist(color.float()[None], torch.tensor([table[n] for n in names], dtype=torch.float32))
    return names[int(d.argmin())]


def analyze(img: torch.Tensor) -> Dict[str, object]:
    """Background, subject mask, position and scale read off a uint8 [32, 32, 3] image."""
    border = torch.cat([img[0], img[-1], img[:, 0], img[:, -1]]).float()
    bg_color = border.median(0).values
    mask = (img.float() - bg_color).norm(dim=-1) > 60
    out: Dict[str, object] = {"background": _nearest(bg_color, BACKGROUNDS), "mask": mask}
    if int(mask.sum()) < 4:
        out.update(position=None, scale=None)
        return out
    ys, xs = mask.nonzero(as_tuple=True)
    cx = float(xs.float().mean())
    out["position"] = min(POSITIONS, key=lambda p: abs(POSITIONS[p] - cx))
    width = int(xs.max() - xs.min() + 1)
    out["scale"] = "big" if width > (2 * SCALES["small"] + 2 * SCALES["big"]) / 2 + 1 else "small"
    return out


def _half(side: str) -> torch.Tensor:
    """bool [32, 32]: the half of the image a pair scene's subject at ``side`` occupies."""
    cols = torch.arange(SIZE) < SIZE // 2
    return (cols if side == "left" else ~cols).expand(SIZE, SIZE)


def _match(img: torch.Tensor, found: torch.Tensor, placement: Scene, region: Optional[torch.Tensor] = None) -> float:
    """1 - mean |img - ideal| / 255 over the pixels of either subject (``found`` in the image, or the ideal
    placement's), inside ``region``; 0 when there are none."""
    union = found | subject_mask(placement)
    if region is not None:
        union &= region
    if not bool(union.any()):
        return 0.0
    diff = (img.float() - render(placement).float()).abs().mean(-1)
    return float(1.0 - diff[union].mean() / 255.0)


def _pair_match(img: torch.Tensor, found: torch.Tensor, scene: PairScene, subject: Subject, side: str) -> float:
    return _match(img, found, Scene(subject, scene.background, side, "small"), _half(side))


def text_alignment(img: torch.Tensor, scene: AnyScene) -> float:
    """Fraction of the prompt's layout the image satisfies. One subject: {background, position, scale}. A pair:
    {background, the first subject at its side, the second at its side} -- a side holds a subject when its half
    has content that matches that subject better than the other one."""
    a = analyze(img)
    if isinstance(scene, PairScene):
        found = a["mask"]
        ok = [float(a["background"] == scene.background)]
        for mine, other, side in ((scene.first, scene.second, scene.first_position),
                                  (scene.second, scene.first, scene.second_position)):
            present = int((found & _half(side)).sum()) >= 4
            ok.append(float(present and _pair_match(img, found, scene, mine, side)
                            > _pair_match(img, found, scene, other, side)))
        return sum(ok) / 3.0
    return (float(a["background"] == scene.background) + float(a["position"] == scene.position)
            + float(a["scale"] == scene.scale)) / 3.0


def subject_similarity(img: torch.Tensor, scene: AnyScene) -> float:
    """One subject: 1 - mean |img - ideal| / 255 over the pixels of either subject (generated or ideal).

    A pair: PSR's pairwise subject consistency -- each reference subject is located in the image (the half where
    it matches best, as PSR locates it with a detector wherever it is) and compared with its ideal render there;
    the mean over the subjects. Drawing one subject twice scores the missing one low."""
    found = analyze(img)["mask"]
    if isinstance(scene, PairScene):
        return sum(max(_pair_match(img, found, scene, s, side) for side in ("left", "right"))
                   for s in scene.subjects) / 2.0
    return _match(img, found, scene)


def save_world(directory, vq: PatchVQ) -> WorldTokens:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vq.save(directory / "vq.safetensors")
    text, image = build_tokenizer(directory / "tokenizer.json", vq.num_codes)
    (directory / "world.json").write_text(json.dumps({"size": SIZE, "patch": PATCH, "codes": vq.num_codes}))
    return WorldTokens(vq, text, image)


def load_world(directory) -> WorldTokens:
    directory = Path(directory)
    vq = PatchVQ.load(directory / "vq.safetensors")
    text = TextTokenizer(directory / "tokenizer.json")
    return WorldTokens(vq, text, ImageVocab.from_tokenizer_json(directory / "tokenizer.json", size_unit=1))


__all__ = ["Subject", "Scene", "PairScene", "placements", "pick", "all_subjects", "render", "subject_view", "random_scene",
           "random_pair_scene", "PatchVQ",
           "build_tokenizer", "WorldTokens", "analyze", "text_alignment", "subject_similarity", "save_world",
           "load_world"]
