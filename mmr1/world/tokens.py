"""The world's tokenizer (Chameleon's id layout) and its X-CoT / direct / understanding token sequences.

- a word-level tokenizer.json whose ids follow Chameleon's layout (image codes
  named IMGIMG..., from id 4), with boi / eoi / newline / size / end-of-turn
  tokens and <think> </think> for the X-CoT;
- X-CoT examples: [reference image(s) + prompt] -> reasoning (the subjects'
  attributes and the plan) -> subject image -> final image;
- direct examples (the ablation's policy): [reference image(s) + prompt] ->
  final image, nothing in between;
- understanding examples ([image] -> the prompt it answers) so the policy's own
  log p(prompt | image) can serve as the dual self-reward.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..tokens import ImageVocab, TextTokenizer, code_to_bpe_name
from .scene import BACKGROUNDS, COLORS, GRID, PATTERNS, POSITION_NAMES, SCALES, SHAPES, WORLD_VERSION, AnyScene, Scene, \
    subject_view
from .vq import PatchVQ

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def world_words() -> List[str]:
    words = {"my", "subject", "at", "the", "on", "is", "a", "with", "place", "it", ";", "reference",
             "first", "second", "and", "subjects", "are", "them", "describe"}
    words |= set(SHAPES) | set(COLORS) | set(PATTERNS) | set(BACKGROUNDS) | set(POSITION_NAMES) | set(SCALES)
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
    """Everything needed to turn scenes into token sequences."""

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
        """uint8 [SIZE, SIZE, 3] -> the image block's token ids."""
        return self.image.encode_block(self.vq.encode(img[None])[0]).tolist()

    def scene_block(self, scene: AnyScene) -> List[int]:
        """The block of a scene's ideal render (== image_block(render(scene)), without the pixels)."""
        return self.image.encode_block(self.vq.scene_codes(scene)).tolist()

    def prompt_ids(self, references: Union[torch.Tensor, Sequence[torch.Tensor]], scene: AnyScene) -> List[int]:
        """``<s> (reference [image])+ prompt <eot>``: one reference image per subject of the scene, in order."""
        refs = [references] if isinstance(references, torch.Tensor) else list(references)
        if len(refs) != len(scene.subjects):
            raise ValueError(f"references: the scene has {len(scene.subjects)} subject(s), got {len(refs)} image(s)")
        ids = [self.bos]
        for r in refs:
            ids += self.text.encode("reference") + self.image_block(r)
        return ids + self.text.encode(scene.prompt()) + [self.end_of_turn]

    def reference_prompt_ids(self, reference_scenes: Sequence[Scene], scene: AnyScene) -> List[int]:
        """prompt_ids of ideal reference renders (no pixels: straight from the cell grids)."""
        if len(reference_scenes) != len(scene.subjects):
            raise ValueError(f"reference_scenes: the scene has {len(scene.subjects)} subject(s), "
                             f"got {len(reference_scenes)}")
        ids = [self.bos]
        for r in reference_scenes:
            ids += self.text.encode("reference") + self.scene_block(r)
        return ids + self.text.encode(scene.prompt()) + [self.end_of_turn]

    def completion_ids(self, scene: AnyScene, direct: bool = False, drawn: Optional[AnyScene] = None,
                       captioned: Optional[AnyScene] = None) -> List[int]:
        """X-CoT: <think> plan </think> subject-image final-image <eot>; direct: final-image <eot>.

        A flawed pipeline (mmr1.world.pipeline) draws the images from ``drawn`` and writes the plan of
        ``captioned``; both default to ``scene`` (the perfect pipeline)."""
        drawn = scene if drawn is None else drawn
        captioned = scene if captioned is None else captioned
        final = self.scene_block(drawn) + [self.end_of_turn]
        if direct:
            return final
        return ([self.text.token_id("<think>")] + self.text.encode(captioned.plan()) + [self.text.token_id("</think>")]
                + self.scene_block(subject_view(drawn)) + final)

    def example(self, scene: AnyScene, reference_scenes: Union[Scene, Sequence[Scene]], direct: bool = False,
                drawn: Optional[AnyScene] = None, captioned: Optional[AnyScene] = None) -> Tuple[List[int], int]:
        """(full sequence, prompt length) for cold-start SFT; one reference scene per subject. The prompt is
        always ``scene``'s with its references; ``drawn`` / ``captioned``: see completion_ids."""
        refs = [reference_scenes] if isinstance(reference_scenes, Scene) else list(reference_scenes)
        p = self.reference_prompt_ids(refs, scene)
        return p + self.completion_ids(scene, direct, drawn, captioned), len(p)

    def describe_prefix(self, image_block: Sequence[int]) -> List[int]:
        return [self.bos, self.describe] + list(image_block) + [self.end_of_turn]

    def describe_example(self, scene: AnyScene) -> Tuple[List[int], int]:
        """(sequence, prompt length) of the understanding direction: image -> the prompt it answers. Trained in
        the cold start so that the policy's own log p(prompt | image) is a meaningful self-reward."""
        p = self.describe_prefix(self.scene_block(scene))
        return p + self.text.encode(scene.prompt()) + [self.end_of_turn], len(p)


def save_world(directory, vq: PatchVQ) -> WorldTokens:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vq.save(directory)
    text, image = build_tokenizer(directory / "tokenizer.json", vq.num_codes)
    (directory / "world.json").write_text(json.dumps({"world_version": WORLD_VERSION, "grid": GRID,
                                                      "codes": vq.num_codes}))
    return WorldTokens(vq, text, image)


def load_world(directory) -> WorldTokens:
    directory = Path(directory)
    for need in ("vq.safetensors", "vq_keys.json", "tokenizer.json", "world.json"):
        if not (directory / need).exists():
            raise FileNotFoundError(f"{directory / need} not found (a world directory is written by save_world)")
    made = json.loads((directory / "world.json").read_text())
    if made.get("world_version") != WORLD_VERSION:
        raise ValueError(f"{directory} holds world version {made.get('world_version')}, this code is version "
                         f"{WORLD_VERSION}: rebuild it (make cold-start)")
    vq = PatchVQ.load(directory)
    text = TextTokenizer(directory / "tokenizer.json")
    return WorldTokens(vq, text, ImageVocab.from_tokenizer_json(directory / "tokenizer.json", size_unit=1))


__all__ = ["SPECIALS", "world_words", "build_tokenizer", "WorldTokens", "save_world", "load_world"]
