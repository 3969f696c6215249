"""Dual self-rewards: the policy scores itself with its own likelihoods (no external model).

Generation direction (reward of a generated image): the length-normalized
log-likelihood of the prompt given the image,
    R_G = (1/|x|) sum_k log pi(x_k | [bos] understanding-prefix <image> sep, x_<k)
Understanding direction (reward of a sampled caption of an image): the
length-normalized log-likelihood of the image's code tokens given the caption,
over the image vocab window,
    R_U = (1/|v|) sum_k log pi(v_k | [bos] caption sep boi H W, v_<k).
Both are one teacher-forced forward plus mmr1_kernels.fused_linear_logprobs
(no [N, T, V] logits), under no_grad: rewards are constants for GRPO.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

import mmr1_kernels as K

from ..model import Transformer, target_span_mask, teacher_forced_hidden
from ..tokens import ImageVocab, pad_sequences


@torch.no_grad()
def _mean_logprob(model: Transformer, seqs: Sequence[Sequence[int]], score_from: Sequence[int],
                  score_to: Sequence[int], vocab_range=None, score_mask_fn=None) -> torch.Tensor:
    """Per sequence: mean log pi(token_t | tokens_<t) over positions score_from <= t < score_to."""
    tokens, lengths = pad_sequences(seqs)
    hidden = teacher_forced_hidden(model, tokens, lengths)
    targets = tokens[:, 1:].to(hidden.device)
    mask = target_span_mask(tokens.shape[1], score_from, score_to, hidden.device)
    if score_mask_fn is not None:
        mask &= score_mask_fn(targets)
    if vocab_range is not None:
        targets = torch.where(mask, targets, torch.full_like(targets, vocab_range[0]))
    lp = K.fused_linear_logprobs(hidden, model.lm_head.weight, targets, vocab_range=vocab_range, mask=mask)
    return (lp * mask).sum(1) / mask.sum(1).clamp(min=1)


def generation_self_reward(model: Transformer, image_blocks: Sequence[Sequence[int]],
                           prompts: Sequence[Sequence[int]], prefix: Sequence[int], sep: int,
                           bos: int = 1) -> Tuple[torch.Tensor, dict]:
    """R_G per sample: image_blocks[i] (boi..eoi tokens) and prompts[i] (text ids to score)."""
    if len(image_blocks) != len(prompts):
        raise ValueError("need one prompt per image block")
    seqs, starts, ends = [], [], []
    for blk, p in zip(image_blocks, prompts):
        head = [bos] + list(prefix) + list(blk) + [sep]
        seqs.append(head + list(p))
        starts.append(len(head))
        ends.append(len(head) + len(p))
    r = _mean_logprob(model, seqs, starts, ends)
    return r.cpu(), {"self_reward/generation": float(r.mean())}


def understanding_self_reward(model: Transformer, captions: Sequence[Sequence[int]], codes: torch.Tensor,
                              vocab: ImageVocab, sep: int, bos: int = 1) -> Tuple[torch.Tensor, dict]:
    """R_U per caption: the image's codes [N, h, w] given captions[i], scored over the image window."""
    if len(captions) != codes.shape[0]:
        raise ValueError("need one image (codes) per caption")
    seqs: List[List[int]] = []
    starts, ends = [], []
    for cap, c in zip(captions, codes):
        head = [bos] + list(cap) + [sep]
        blk = vocab.encode_block(c).tolist()
        seqs.append(head + blk)
        starts.append(len(head) + 3)  # codes start after boi, H, W
        ends.append(len(head) + len(blk) - 1)  # eoi excluded
    t2c = vocab.token_to_code.to(model.lm_head.weight.device)
    r = _mean_logprob(model, seqs, starts, ends, vocab_range=vocab.window, score_mask_fn=lambda t: t2c[t] >= 0)
    return r.cpu(), {"self_reward/understanding": float(r.mean())}
