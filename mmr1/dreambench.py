"""DreamBench evaluation: DINO, CLIP-I and CLIP-T of generated images against the real subject photos.

Layout of the benchmark (as in tests/data/dreambench, the downscaled copy this repository ships): one folder of real
photos per subject and prompts_and_classes.txt (subject classes, the object and
live-subject prompt lists with ``{0}`` = the identifier and ``{1}`` = the class).
Generated images: ``<generated>/<subject>/<prompt index>[_<anything>].<png|jpg>``.
Metrics (DreamBooth's): DINO = mean cosine of ViT CLS features between a
generated image and every real photo of its subject; CLIP-I the same with CLIP
image features; CLIP-T = cosine between the image and its prompt with the
identifier removed. Models come from local directories (mmr1.rewards.vision).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple, Union

import torch

LIVE_CLASSES = {"dog", "cat"}
IDENTIFIER = "sks"


def load_benchmark(root: Union[str, Path]) -> Tuple[Dict[str, dict], List[str], List[str]]:
    """(subjects {name: {"class", "live", "images"}}, object prompts, live prompts) with {0}/{1} left in."""
    root = Path(root)
    spec = root / "prompts_and_classes.txt"
    if not spec.exists():
        raise FileNotFoundError(f"{spec} not found: not a DreamBench directory")
    text = spec.read_text()
    classes = dict(re.findall(r"^([a-z0-9_]+),([a-z ]+)$", text.split("Prompts")[0], flags=re.M))
    classes.pop("subject_name", None)
    lists = re.findall(r"prompt_list = \[(.*?)\]", text, flags=re.S)
    if len(lists) != 2:
        raise ValueError(f"{spec}: expected the object and live prompt lists")
    obj, live = ([p for p in re.findall(r"'([^']*)'\.format", block)] for block in lists)
    subjects = {}
    for name, cls in classes.items():
        imgs = sorted(p for p in (root / name).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not imgs:
            raise FileNotFoundError(f"no photos for subject {name!r} in {root / name}")
        subjects[name] = {"class": cls, "live": cls in LIVE_CLASSES, "images": imgs}
    return subjects, obj, live


def prompt_for(subject: dict, prompts_obj: List[str], prompts_live: List[str], index: int) -> str:
    lst = prompts_live if subject["live"] else prompts_obj
    if not 0 <= index < len(lst):
        raise ValueError(f"prompt index {index} out of range (0..{len(lst) - 1})")
    return lst[index].format(IDENTIFIER, subject["class"])


def _load(paths) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    imgs = [torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((224, 224)))).permute(2, 0, 1)
            for p in paths]
    return torch.stack(imgs).float() / 127.5 - 1.0


@torch.no_grad()
def evaluate(root, generated, clip_dir, dino_dir, device="cpu") -> Dict[str, object]:
    from .rewards.vision import CLIPScorer, DINOScorer

    subjects, p_obj, p_live = load_benchmark(root)
    generated = Path(generated)
    if not generated.is_dir():
        raise FileNotFoundError(f"generated-images directory {generated} not found")
    clip, dino = CLIPScorer(clip_dir, device, identifier_tokens=(IDENTIFIER,)), DINOScorer(dino_dir, device)
    per_subject: Dict[str, Dict[str, float]] = {}
    totals = defaultdict(list)
    for sub_dir in sorted(p for p in generated.iterdir() if p.is_dir()):
        if sub_dir.name not in subjects:
            raise ValueError(f"{sub_dir} does not name a DreamBench subject")
        s = subjects[sub_dir.name]
        files = sorted(p for p in sub_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            continue
        gen, real = _load(files), _load(s["images"])
        prompts = [prompt_for(s, p_obj, p_live, int(re.match(r"(\d+)", f.stem).group(1))) for f in files]
        d = dino.embeds(gen) @ dino.embeds(real).T  # [G, R] cosines
        ci = clip.image_embeds(gen) @ clip.image_embeds(real).T
        ct = clip.text_alignment(gen, prompts)
        m = {"dino": float(d.mean()), "clip_i": float(ci.mean()), "clip_t": float(ct.mean()), "images": len(files)}
        per_subject[sub_dir.name] = m
        for k in ("dino", "clip_i", "clip_t"):
            totals[k].extend([float(x) for x in (d.mean(1) if k == "dino" else ci.mean(1) if k == "clip_i" else ct)])
    if not per_subject:
        raise ValueError(f"no generated images found under {generated}")
    summary = {k: sum(v) / len(v) for k, v in totals.items()}
    return {"summary": summary, "per_subject": per_subject, "images": len(totals["dino"])}
