"""X-CoT rollouts: [prompt + reference image(s)] -> reasoning text -> subject image -> final image.

One sequence per sample, generated on one static cache:

    prompt (user turn, ends with end-of-turn) | think_open | reasoning ... think_close |
    subject image block | final image block | end-of-turn

think_open, the image-structure tokens (boi, H, W, newlines, eoi) and the
final end-of-turn are forced; the reasoning text and the image codes are
sampled. ``XCoTFormat(reasoning=False, subject_image=False)`` is the "direct"
policy of the X-CoT ablation (prompt | final image block | end-of-turn); either
phase can be left out alone too. The rollout records which tokens the policy chose (the GRPO loss
mask), the sampler's log-prob of each, and which positions are image codes
(trained over the image vocab window) vs text (trained over the text window).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .generate import CachedDecoder, SamplingConfig, sample_image_blocks, sample_text
from .model import Transformer
from .tokens import ImageVocab, pad_sequences

# RNG offsets of the three sampled phases (Philox offset = phase base + step): disjoint streams
TEXT_OFFSET, SUBJECT_OFFSET, FINAL_OFFSET = 0, 1 << 20, 2 << 20


@dataclass
class XCoTFormat:
    think_open: int
    think_close: int
    end_of_turn: int = 8710
    subject_hw: Tuple[int, int] = (32, 32)
    final_hw: Tuple[int, int] = (32, 32)
    text_range: Tuple[int, int] = (8196, 65536)  # ids the reasoning text is sampled from
    max_text_tokens: int = 64
    reasoning: bool = True  # think_open ... think_close before the images
    subject_image: bool = True  # the intermediate subject image before the final one

    @property
    def direct(self) -> bool:
        return not self.reasoning and not self.subject_image


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, L] right-padded full sequences (prompt included)
    lengths: torch.Tensor  # [N]
    prompt_lengths: torch.Tensor  # [N]
    chosen: torch.Tensor  # [N, L] bool: tokens the policy sampled (the loss mask)
    logprobs: torch.Tensor  # [N, L] fp32: sampler log-prob of each chosen token (0 elsewhere)
    image_positions: torch.Tensor  # [N, L] bool: image-code positions (subject + final)
    subject_codes: Optional[torch.Tensor]  # [N, h, w]; None when the format has no subject image
    final_codes: torch.Tensor  # [N, h, w]
    reasoning: List[List[int]] = field(default_factory=list)  # reasoning tokens incl. think_close
    subject_images: Optional[torch.Tensor] = None  # [N, 3, H, W] in [-1, 1] when a VQ decoder was given
    final_images: Optional[torch.Tensor] = None
    image_forwards: int = 0  # model forwards the image blocks took (sequential: block length - 1 each)
    # [N, B, 2] long: (start, length) in ``tokens`` of each row's image blocks (subject, final), from the boi to
    # the eoi; what the unconditional branch of a CFG loss is rebuilt from (GRPOConfig.cfg_loss)
    image_blocks: Optional[torch.Tensor] = None

    @property
    def num_samples(self) -> int:
        return self.tokens.shape[0]


@torch.no_grad()
def xcot_rollout(model: Transformer, prompts: Sequence[Sequence[int]], vocab: ImageVocab, fmt: XCoTFormat,
                 scfg: Optional[SamplingConfig] = None, num_samples: int = 1, row_ids: Optional[torch.Tensor] = None,
                 vq_decode=None) -> Rollout:
    """Generate ``num_samples`` X-CoT completions per prompt (prompt-major order).

    ``row_ids`` [len(prompts) * num_samples] choose the RNG streams (default
    0..N-1); ``vq_decode`` (e.g. VQModel.decode) turns codes into images.
    """
    scfg = scfg or SamplingConfig()
    open_ = [fmt.think_open] if fmt.reasoning else []
    seqs = [list(p) + open_ for p in prompts for _ in range(num_samples)]
    n = len(seqs)
    if n == 0:
        raise ValueError("prompts must not be empty")
    use_cfg = scfg.cfg_scale != 1.0
    (sh, sw), (fh, fw) = fmt.subject_hw, fmt.final_hw
    max_len = (max(len(s) for s in seqs) + (fmt.max_text_tokens if fmt.reasoning else 0)
               + (vocab.block_length(sh, sw) if fmt.subject_image else 0) + vocab.block_length(fh, fw) + 2)
    dec = CachedDecoder(model, 2 * n if use_cfg else n, max_len, slack=scfg.cache_slack, attention=scfg.attention,
                        prompt_len=min(len(s) for s in seqs))
    dev = dec.device
    rows = torch.arange(n, device=dev)
    row_ids = rows if row_ids is None else row_ids.to(dev)
    subject = None
    try:
        first = dec.prefill(rows, [s for s in seqs[::num_samples]], repeats=num_samples)  # one per prompt
        if fmt.reasoning:
            text, text_lp, text_chosen = sample_text(dec, n, first, fmt.think_close, fmt.max_text_tokens,
                                                     fmt.text_range, scfg, TEXT_OFFSET, row_ids)
        else:
            text, text_lp, text_chosen = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        if fmt.subject_image:
            subject = sample_image_blocks(dec, n, sh, sw, vocab, scfg, SUBJECT_OFFSET, row_ids)
            dec.step(torch.full((n,), vocab.eoi, dtype=torch.long, device=dev), rows)  # feed the subject's eoi
        final = sample_image_blocks(dec, n, fh, fw, vocab, scfg, FINAL_OFFSET, row_ids)
    finally:
        dec.close()

    full, chosen, logps, is_img, blocks = [], [], [], [], []
    if subject is not None:
        sub_t, sub_l, sub_c = subject.tokens.tolist(), subject.logprobs.tolist(), subject.chosen.tolist()
    else:
        sub_t = sub_l = sub_c = [[] for _ in range(n)]
    fin_t, fin_l, fin_c = final.tokens.tolist(), final.logprobs.tolist(), final.chosen.tolist()
    for r in range(n):
        p = seqs[r]
        full.append(p + text[r] + sub_t[r] + fin_t[r] + [fmt.end_of_turn])
        chosen.append([False] * len(p) + text_chosen[r] + sub_c[r] + fin_c[r] + [False])
        logps.append([0.0] * len(p) + text_lp[r] + sub_l[r] + fin_l[r] + [0.0])
        is_img.append([False] * (len(p) + len(text[r])) + sub_c[r] + fin_c[r] + [False])
        start = len(p) + len(text[r])
        blocks.append(([(start, len(sub_t[r]))] if subject is not None else []) + [(start + len(sub_t[r]), len(fin_t[r]))])
    tokens, lengths = pad_sequences(full)
    L = tokens.shape[1]
    rollout = Rollout(
        tokens=tokens, lengths=lengths, prompt_lengths=torch.tensor([len(s) for s in seqs]),
        chosen=_padded(chosen, L, torch.bool), logprobs=_padded(logps, L, torch.float32),
        image_positions=_padded(is_img, L, torch.bool),
        subject_codes=None if subject is None else subject.codes.cpu(), final_codes=final.codes.cpu(),
        reasoning=text, image_forwards=final.forwards + (subject.forwards if subject is not None else 0),
        image_blocks=torch.tensor(blocks, dtype=torch.long))
    if vq_decode is not None:
        rollout.subject_images = None if subject is None else vq_decode(subject.codes).cpu()
        rollout.final_images = vq_decode(final.codes).cpu()
    return rollout


@torch.no_grad()
def caption_rollout(model: Transformer, prompts: Sequence[Sequence[int]], codes: torch.Tensor, vocab: ImageVocab,
                    end_of_caption: int, text_range: Tuple[int, int], max_tokens: int,
                    scfg: Optional[SamplingConfig] = None, num_samples: int = 1,
                    row_ids: Optional[torch.Tensor] = None) -> Rollout:
    """Understanding rollouts for the dual self-reward: sample captions of images.

    prompts[i] are the full conditioning tokens (e.g. bos, the image block, "describe"); codes [P, h, w]
    the images they show (carried in ``final_codes`` for the understanding reward). Captions are
    sampled until ``end_of_caption``; ``image_positions`` is all False (text window only).
    """
    scfg = scfg or SamplingConfig()
    seqs = [list(p) for p in prompts for _ in range(num_samples)]
    n = len(seqs)
    if n == 0:
        raise ValueError("prompts must not be empty")
    if codes.shape[0] != len(prompts):
        raise ValueError("codes must hold one image per prompt")
    dec = CachedDecoder(model, n, max(len(s) for s in seqs) + max_tokens + 1, attention=scfg.attention,
                        prompt_len=min(len(s) for s in seqs))
    rows = torch.arange(n, device=dec.device)
    try:
        first = dec.prefill(rows, seqs)
        text, lps, ch = sample_text(dec, n, first, end_of_caption, max_tokens, text_range, scfg, TEXT_OFFSET,
                                    rows if row_ids is None else row_ids.to(dec.device))
    finally:
        dec.close()
    tokens, lengths = pad_sequences([s + t for s, t in zip(seqs, text)])
    L = tokens.shape[1]
    img_codes = codes.repeat_interleave(num_samples, 0).cpu()
    return Rollout(tokens=tokens, lengths=lengths, prompt_lengths=torch.tensor([len(s) for s in seqs]),
                   chosen=_padded([[False] * len(s) + c for s, c in zip(seqs, ch)], L, torch.bool),
                   logprobs=_padded([[0.0] * len(s) + lp for s, lp in zip(seqs, lps)], L, torch.float32),
                   image_positions=torch.zeros(n, L, dtype=torch.bool), subject_codes=img_codes,
                   final_codes=img_codes, reasoning=text)


def concat_groups(parts: Sequence[Tuple[Rollout, int]], group_size: int) -> Rollout:
    """One Rollout of the groups ``parts`` = [(rollout, group index)], in that order: the rows
    group_index * G .. (group_index + 1) * G - 1 of each (re-padded to the longest), e.g. the groups dynamic sampling
    keeps out of several rounds."""
    if not parts:
        raise ValueError("parts must not be empty")
    G = group_size
    rows = [(ro, i) for ro, g in parts for i in range(g * G, (g + 1) * G)]
    L = max(int(ro.lengths[i]) for ro, i in rows)

    def stack(name, pad=0):
        out = []
        for ro, i in rows:
            t = getattr(ro, name)[i]
            out.append(torch.nn.functional.pad(t, (0, L - t.shape[0]), value=pad))
        return torch.stack(out)

    def cat(name):
        values = [getattr(ro, name) for ro, _ in rows]
        return None if any(v is None for v in values) else torch.stack([v[i] for v, (_, i) in zip(values, rows)])

    return Rollout(tokens=stack("tokens"), lengths=torch.stack([ro.lengths[i] for ro, i in rows]),
                   prompt_lengths=torch.stack([ro.prompt_lengths[i] for ro, i in rows]), chosen=stack("chosen", False),
                   logprobs=stack("logprobs", 0.0), image_positions=stack("image_positions", False),
                   subject_codes=cat("subject_codes"), final_codes=torch.stack([ro.final_codes[i] for ro, i in rows]),
                   reasoning=[ro.reasoning[i] if ro.reasoning else [] for ro, i in rows],
                   subject_images=cat("subject_images"), final_images=cat("final_images"), image_blocks=cat("image_blocks"),
                   image_forwards=sum(ro.image_forwards for ro in {id(r): r for r, _ in parts}.values()))


def _padded(rows: List[list], L: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([torch.tensor(r + [0] * (L - len(r)), dtype=dtype) for r in rows])


__all__ = ["XCoTFormat", "Rollout", "xcot_rollout", "caption_rollout", "concat_groups", "TEXT_OFFSET", "SUBJECT_OFFSET", "FINAL_OFFSET"]
