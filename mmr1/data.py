"""Datasets for training on real checkpoints: JSONL files of X-CoT examples and GRPO prompts, with the images
tokenized by the model's own VQGAN (cached on disk) into Lumina's block layout.

Cold-start X-CoT examples, one JSON object per line (image paths relative to the JSONL file)::

    {"references": ["dog/00.jpg"], "prompt": "a sks dog on the beach",
     "reasoning": "The subject is a small corgi with ...", "subject_image": "dog/02.jpg",
     "final_image": "beach/dog.png"}

GRPO prompts::

    {"references": ["dog/00.jpg"], "prompt": "a sks dog on the beach", "classes": ["dog"], "id": "dog-03"}

(two references and two class words make a multi-subject prompt, scored by PSR; "references" may be left out for a
text-only prompt, as in T2I-R1). Sequences, as the rollouts generate them (mmr1.rollout)::

    prompt      <bos> [reference image block]... prompt text <end-of-turn>
    completion  <think> reasoning </think> [subject image block] [final image block] <end-of-turn>

Every problem is an error naming the file, the line and the field: a missing file, an unreadable image, an
image whose size is not the checkpoint's resolution (``resize=True`` center-crops and resizes instead), a
sequence longer than the model's context.

A reference image's block is the model family's way of reading an image: Lumina-mGPT's VQ tokens (the default),
Janus-Pro's understanding features (``mmr1.janus.JanusReferenceImages``, passed as ``XCoTData(references=...)``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from .rollout import XCoTFormat
from .tokens import ImageVocab, TextTokenizer


@dataclass(frozen=True)
class TurnTokens:
    """The special tokens of a turn (names in the text tokenizer; Lumina-mGPT's defaults)."""

    bos: str = "<s>"
    end_of_turn: str = "<reserved08706>"
    think_open: str = "<reserved08707>"
    think_close: str = "<reserved08708>"

    def ids(self, text: TextTokenizer) -> Dict[str, int]:
        out = {}
        for field_name in ("bos", "end_of_turn", "think_open", "think_close"):
            name = getattr(self, field_name)
            try:
                out[field_name] = text.token_id(name)
            except KeyError:
                raise ValueError(f"the text tokenizer has no {field_name} token {name!r}") from None
        return out


class ImageTokenizer:
    """Image file -> the token ids of its image block, through the VQGAN; cached on disk by (file bytes,
    tokenizer), so a second epoch or a second run does not run the encoder again."""

    def __init__(self, vq, vocab: ImageVocab, resolution: int, cache_dir: Optional[Union[str, Path]] = None,
                 resize: bool = False, device="cpu"):
        self.vq, self.vocab, self.resolution, self.resize, self.device = vq, vocab, int(resolution), resize, device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.hits = self.misses = 0
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """The tokenizer's identity: the encoder + codebook weights, the code -> token map and the resolution."""
        h = hashlib.sha256()
        for k, v in sorted(self.vq.state_dict().items()):
            if k.startswith("decoder."):
                continue
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(self.vocab.code_to_token.numpy().tobytes())
        h.update(f"{self.resolution}|{self.resize}".encode())
        return h.hexdigest()[:24]

    def pixels(self, path: Union[str, Path], where: str = "") -> torch.Tensor:
        """[3, R, R] in [-1, 1] (the checkpoint's resolution R)."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{where}image {path} not found")
        try:
            img = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{where}image {path} is not a readable image ({err})") from None
        R = self.resolution
        if img.size != (R, R):
            if not self.resize:
                raise ValueError(f"{where}image {path} is {img.size[0]}x{img.size[1]}; the checkpoint's resolution "
                                 f"is {R}x{R} (resize it, or pass resize=True / --resize to center-crop and resize)")
            s = min(img.size)
            left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
            img = img.crop((left, top, left + s, top + s)).resize((R, R), Image.BICUBIC)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0

    def block(self, path: Union[str, Path], where: str = "") -> List[int]:
        path = Path(path)
        cache = None
        if self.cache_dir is not None and path.exists():
            key = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
            cache = self.cache_dir / self.fingerprint / f"{key}.json"
            if cache.exists():
                self.hits += 1
                return json.loads(cache.read_text())
        pix = self.pixels(path, where)
        with torch.no_grad():
            codes = self.vq.encode(pix[None].to(self.device))[0]
        ids = self.vocab.encode_block(codes.cpu()).tolist()
        self.misses += 1
        if cache is not None:  # atomic: a crash never leaves a truncated entry
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(ids))
            os.replace(tmp, cache)
        return ids


def _records(path: Union[str, Path]):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON object ({err})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        yield n, rec


def _field(rec: dict, key: str, kind, where: str):
    if key not in rec:
        raise ValueError(f"{where}missing field {key!r}")
    value = rec[key]
    if kind is list:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}field {key!r} must be a non-empty list of strings, got {value!r}")
    elif not isinstance(value, kind):
        raise ValueError(f"{where}field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _references(rec: dict, where: str) -> List[str]:
    refs = rec.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"{where}field 'references' must be a list of image paths, got {refs!r}")
    return refs


class XCoTData:
    """Turns records into token sequences (shared by the SFT and GRPO loaders). ``references``: what turns a
    reference image into prompt ids (its ``block(path, where)``; default ``images``, the generation tokenizer)."""

    def __init__(self, text: TextTokenizer, images: ImageTokenizer, turn: TurnTokens = TurnTokens(),
                 max_seq_len: Optional[int] = None, references=None):
        self.text, self.images, self.max_seq_len = text, images, max_seq_len
        self.references = images if references is None else references
        self.ids = turn.ids(text)

    def prompt_ids(self, rec: dict, base: Path, where: str) -> List[int]:
        ids = [self.ids["bos"]]
        for r in _references(rec, where):
            ids += self.references.block(base / r, where)
        return ids + self.text.encode(_field(rec, "prompt", str, where)) + [self.ids["end_of_turn"]]

    def completion_ids(self, rec: dict, base: Path, where: str, reasoning: bool = True,
                       subject_image: bool = True) -> List[int]:
        """The completion in the rollouts' format: <think> reasoning </think> (``reasoning``), the subject image
        (``subject_image``), the final image, <end-of-turn>."""
        ids = []
        if reasoning:
            ids += ([self.ids["think_open"]] + self.text.encode(_field(rec, "reasoning", str, where))
                    + [self.ids["think_close"]])
        if subject_image:
            ids += self.images.block(base / _field(rec, "subject_image", str, where), where)
        return ids + self.images.block(base / _field(rec, "final_image", str, where), where) + \
            [self.ids["end_of_turn"]]

    def check_length(self, n: int, where: str, what: str) -> None:
        if self.max_seq_len is not None and n > self.max_seq_len:
            raise ValueError(f"{where}{what} is {n} tokens, over the model's context of {self.max_seq_len}")

    def xcot_format(self, image_hw: Tuple[int, int], text_range: Tuple[int, int], max_text_tokens: int = 256,
                    reasoning: bool = True, subject_image: bool = True):
        return XCoTFormat(think_open=self.ids["think_open"], think_close=self.ids["think_close"],
                          end_of_turn=self.ids["end_of_turn"], subject_hw=image_hw, final_hw=image_hw,
                          text_range=text_range, max_text_tokens=max_text_tokens, reasoning=reasoning,
                          subject_image=subject_image)


def load_sft_examples(path: Union[str, Path], data: XCoTData, reasoning_weight: float = 1.0, reasoning: bool = True,
                      subject_image: bool = True) -> Tuple[List[List[int]], List[int], List[List[float]]]:
    """(sequences, prompt lengths, token weights) of a cold-start JSONL file; the reasoning text (after <think>,
    through </think>) weighs ``reasoning_weight``, every other completion token 1. ``reasoning`` /
    ``subject_image``: the completion's format (XCoTData.completion_ids; X-CoT by default)."""
    path = Path(path)
    seqs, plens, weights = [], [], []
    for n, rec in _records(path):
        where = f"{path}:{n}: "
        p = data.prompt_ids(rec, path.parent, where)
        c = data.completion_ids(rec, path.parent, where, reasoning, subject_image)
        data.check_length(len(p) + len(c), where, "the example")
        w = [1.0] * (len(p) + len(c))
        if reasoning:
            end = len(p) + c.index(data.ids["think_close"])
            w[len(p) + 1:end + 1] = [float(reasoning_weight)] * (end - len(p))
        seqs.append(p + c)
        plens.append(len(p))
        weights.append(w)
    if not seqs:
        raise ValueError(f"dataset {path} has no examples")
    return seqs, plens, weights


def load_grpo_prompts(path: Union[str, Path], data: XCoTData, completion_budget: int = 0) -> List[dict]:
    """GRPO prompts of a JSONL file: {"prompt_ids", "prompt", "classes", "references" ([k, 3, R, R] pixels for
    the image rewards), "id"}; ``completion_budget``: the tokens a rollout adds (checked against the context)."""
    path = Path(path)
    out = []
    for n, rec in _records(path):
        where = f"{path}:{n}: "
        ids = data.prompt_ids(rec, path.parent, where)
        data.check_length(len(ids) + completion_budget, where, "the prompt plus its completion")
        refs = _references(rec, where)
        classes = rec.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{where}field 'classes' must be a list of strings, got {classes!r}")
        if classes and len(classes) != len(refs):
            raise ValueError(f"{where}'classes' names {len(classes)} subject(s) for {len(refs)} reference(s)")
        R = data.images.resolution
        pixels = torch.stack([data.images.pixels(path.parent / r, where) for r in refs]) if refs else \
            torch.zeros(0, 3, R, R)
        out.append({"prompt_ids": ids, "prompt": rec["prompt"], "classes": classes, "references": pixels,
                    "id": str(rec.get("id", f"{path.name}:{n}"))})
    if not out:
        raise ValueError(f"dataset {path} has no prompts")
    return out


def dreambench_to_jsonl(root: Union[str, Path], out: Union[str, Path], references: int = 1,
                        prompts_per_subject: Optional[int] = None, identifier: str = "sks") -> int:
    """GRPO prompts from a DreamBench-layout directory (subject folders + prompts_and_classes.txt): every
    subject x its prompt list ({0} = the identifier, {1} = the class word), the first ``references`` photos as
    references (paths relative to ``out``). Returns the number of prompts written."""
    from .dreambench import load_benchmark

    root, out = Path(root), Path(out)
    subjects, prompts_obj, prompts_live = load_benchmark(root)
    if references < 1:
        raise ValueError(f"references must be >= 1, got {references}")
    lines = []
    for name, subj in sorted(subjects.items()):
        if len(subj["images"]) < references:
            raise ValueError(f"subject {name!r} has {len(subj['images'])} photo(s), fewer than references={references}")
        refs = [os.path.relpath(p, out.parent.resolve()) for p in
                (Path(i).resolve() for i in subj["images"][:references])]
        plist = prompts_live if subj["live"] else prompts_obj
        for i, template in enumerate(plist[:prompts_per_subject]):
            lines.append(json.dumps({"references": refs, "prompt": template.format(identifier, subj["class"]),
                                     "classes": [subj["class"]], "id": f"{name}-{i:02d}"}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


__all__ = ["TurnTokens", "ImageTokenizer", "XCoTData", "load_sft_examples", "load_grpo_prompts",
           "dreambench_to_jsonl"]
