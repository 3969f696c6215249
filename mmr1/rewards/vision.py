"""Model-based rewards: CLIP-T (text alignment), CLIP-I and DINO (subject similarity), PSR (multi-subject).

Models are transformers checkpoints in local directories (no hub access):
a CLIPModel + its tokenizer for CLIP-T / CLIP-I, a ViT-style AutoModel (DINO
ViT-S/16 in the papers) for DINO, and optionally a zero-shot detector
(Grounding DINO via AutoModelForZeroShotObjectDetection) for PSR crops.
Images are float tensors [N, 3, H, W] in [-1, 1]; preprocessing (resize to the
model's input size, mean/std normalization) is done here in torch, following
DreamBench's evaluators (resize + center crop + ImageNet / CLIP statistics).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _check_dir(path: Union[str, Path], what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{what}: no model directory at {p} (expected config.json + weights; no hub access)")
    return p


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> resized (shorter side), center-cropped, normalized [N, 3, size, size]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    x = (images.float().clamp(-1, 1) + 1) / 2
    H, W = x.shape[-2:]
    s = size / min(H, W)
    x = F.interpolate(x, size=(max(size, round(H * s)), max(size, round(W * s))), mode="bicubic", align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top: top + size, left: left + size]
    m = torch.tensor(mean, device=x.device)[:, None, None]
    sd = torch.tensor(std, device=x.device)[:, None, None]
    return (x - m) / sd


class CLIPScorer:
    """CLIP image/text embeddings from a local transformers CLIPModel directory."""

    def __init__(self, model_dir: Union[str, Path], device="cpu", identifier_tokens: Sequence[str] = ("sks",)):
        from transformers import AutoTokenizer, CLIPModel

        path = _check_dir(model_dir, "CLIP")
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.size = self.model.config.vision_config.image_size
        self.device = device
        self.identifier_tokens = tuple(identifier_tokens)

    def strip_identifier(self, prompt: str) -> str:
        """DreamBench prompts name the subject 'a sks dog': the identifier is not a word CLIP knows."""
        return " ".join(w for w in prompt.split() if w not in self.identifier_tokens)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images, self.size, CLIP_MEAN, CLIP_STD).to(self.device)
        out = self.model.get_image_features(pixel_values=x)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        texts = [self.strip_identifier(p) for p in prompts]
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(**tok)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return F.normalize(out.float(), dim=-1)

    def text_alignment(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-T: cosine(image, prompt without the identifier) per sample."""
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1).cpu()

    def preference_score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """PickScore-style: logit_scale.exp() * cosine(image, prompt) (PickScore is a fine-tuned CLIP; load it
        from its local directory with this class)."""
        return self.model.logit_scale.exp().detach().cpu() * self.text_alignment(images, prompts)

    def image_similarity(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """CLIP-I: cosine(generated, reference) per sample."""
        return (self.image_embeds(images) * self.image_embeds(references)).sum(-1).cpu()


class DINOScorer:
    """DINO ViT CLS-token cosine similarity from a local transformers AutoModel directory."""

    def __init__(self, model_dir: Union[str, Path], device="cpu"):
        from transformers import AutoModel

        path = _check_dir(model_dir, "DINO")
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.size = getattr(self.model.config, "image_size", 224)
        self.device = device

    @torch.no_grad()
    def embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images, self.size, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        cls = self.model(pixel_values=x).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1)

    def similarity(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return (self.embeds(images) * self.embeds(references)).sum(-1).cpu()


class SubjectLocator:
    """Crops the box of a named subject with a zero-shot detector (Grounding DINO); falls back to the
    whole image when no detector is configured or nothing is found (PSR's evaluator does the same)."""

    def __init__(self, model_dir: Optional[Union[str, Path]] = None, device="cpu", box_threshold: float = 0.35,
                 text_threshold: float = 0.25):
        self.detector = self.processor = None
        self.device, self.box_threshold, self.text_threshold = device, box_threshold, text_threshold
        if model_dir is not None:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

            path = _check_dir(model_dir, "detector")
            self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(path)

    @torch.no_grad()
    def boxes(self, image: torch.Tensor, names: Sequence[str]) -> List[Optional[Tuple[int, int, int, int]]]:
        """Top box (x0, y0, x1, y1) in pixels per name, or None."""
        if self.detector is None:
            return [None] * len(names)
        from PIL import Image

        from ..vqgan import pixels_to_uint8

        pil = Image.fromarray(pixels_to_uint8(image).cpu().numpy())
        found: List[Optional[Tuple[int, int, int, int]]] = []
        for name in names:
            inputs = self.processor(images=pil, text=f"{name}.", return_tensors="pt").to(self.device)
            out = self.detector(**inputs)
            res = self.processor.post_process_grounded_object_detection(
                out, inputs.input_ids, threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[pil.size[::-1]])[0]
            if len(res["boxes"]):
                b = res["boxes"][int(res["scores"].argmax())].round().int().tolist()
                found.append(tuple(b) if b[2] > b[0] + 1 and b[3] > b[1] + 1 else None)
            else:
                found.append(None)
        return found

    def crop(self, image: torch.Tensor, box) -> torch.Tensor:
        if box is None:
            return image
        x0, y0, x1, y1 = box
        H, W = image.shape[-2:]
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        return image[..., y0:y1, x0:x1] if x1 > x0 and y1 > y0 else image


def psr_subject_consistency(dino: DINOScorer, locator: SubjectLocator, images: torch.Tensor,
                            references: Sequence[Sequence[torch.Tensor]],
                            subject_names: Sequence[Sequence[str]]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """PSR pairwise subject consistency: for each sample, locate each subject k in the generated image,
    compare the crop with reference k (DINO cosine), and average over the subjects."""
    if len(references) != images.shape[0] or len(subject_names) != images.shape[0]:
        raise ValueError("references and subject_names need one entry per image")
    scores, crops_found = [], 0
    for img, refs, names in zip(images, references, subject_names):
        if len(refs) != len(names) or not refs:
            raise ValueError("each sample needs one reference image per subject name (at least one)")
        boxes = locator.boxes(img, names)
        crops_found += sum(b is not None for b in boxes)
        per = []
        for ref, box in zip(refs, boxes):
            crop = locator.crop(img, box)
            per.append(float(dino.similarity(crop[None], ref[None])[0]))
        scores.append(sum(per) / len(per))
    total = sum(len(n) for n in subject_names)
    return torch.tensor(scores), {"psr/detected_frac": crops_found / max(total, 1)}
