"""Token-level formats: image blocks, VQ code <-> token ids, the text tokenizer.

A Lumina-mGPT image block is ``boi, H, W, (w codes, newline) x h, eoi`` where H/W
are resolution tokens ``size_base + rows // size_unit`` (Lumina: one size unit is a
32-px grid cell = 2 code rows, so size_unit = 2 and 512 px -> 8804 + 16). In
Chameleon's vocabulary the 8192 codes are BPE tokens named ``IMGIMG<digits as
letters A-J>Z`` at ids 4..8195; their mapping is read from tokenizer.json or,
for vocabularies made here, given as a contiguous range. A Janus-Pro block has no
structure inside: ``boi, h x w codes, eoi``; its 16,384 codes have their own
embedding and head, so they get ids of their own after the text vocabulary
(``ImageVocab.janus``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

IMG_PREFIX = "IMGIMG"


def code_to_bpe_name(code: int) -> str:
    return IMG_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def bpe_name_to_code(name: str) -> int:
    if not name.startswith(IMG_PREFIX) or len(name) < len(IMG_PREFIX) + 2:
        raise ValueError(f"not an image-code token name: {name!r}")
    digits = name[len(IMG_PREFIX):-1]
    if not all("A" <= c <= "J" for c in digits):
        raise ValueError(f"not an image-code token name: {name!r}")
    return int("".join(chr(ord(c) - ord("A") + ord("0")) for c in digits))


@dataclass
class ImageVocab:
    """Where image codes and image-structure tokens live in the model vocabulary."""

    code_to_token: torch.Tensor  # [num_codes] int64
    boi: int
    eoi: int
    newline: Optional[int]  # the token ending each code row (None: rows are not marked)
    size_base: Optional[int]  # resolution tokens after boi (None: the block has none)
    size_unit: int = 2
    vocab_size: int = 65536

    def __post_init__(self):
        self.code_to_token = self.code_to_token.long()
        t2c = torch.full((self.vocab_size,), -1, dtype=torch.long)
        t2c[self.code_to_token] = torch.arange(self.code_to_token.numel())
        self.token_to_code = t2c

    @property
    def num_codes(self) -> int:
        return self.code_to_token.numel()

    @property
    def window(self) -> Tuple[int, int]:
        """(lo, hi) with every code token in [lo, hi): the sampler's vocab_range for image positions."""
        return int(self.code_to_token.min()), int(self.code_to_token.max()) + 1

    @classmethod
    def lumina(cls, vocab_size: int = 65536) -> "ImageVocab":
        """Lumina-mGPT / Chameleon ids: codes 4..8195 in order, eoi 8196, boi 8197, newline 8803, sizes 8804+n."""
        return cls(torch.arange(4, 4 + 8192), boi=8197, eoi=8196, newline=8803, size_base=8804, size_unit=2,
                   vocab_size=vocab_size)

    @classmethod
    def janus(cls, text_vocab_size: int, boi: int, eoi: int, num_codes: int = 16384) -> "ImageVocab":
        """Janus-Pro: ``boi, codes, eoi`` with no structure inside; code c is id text_vocab_size + c (a window after
        the text vocabulary: the model embeds and predicts those ids through its generation embedding and head)."""
        return cls(torch.arange(text_vocab_size, text_vocab_size + num_codes), boi=boi, eoi=eoi, newline=None,
                   size_base=None, vocab_size=text_vocab_size + num_codes)

    @classmethod
    def from_tokenizer_json(cls, path: Union[str, Path, Dict], boi: str = "<racm3:break>", eoi: str = "<eoss>",
                            newline: str = "<reserved08799>", size_base: str = "<reserved08800>",
                            size_unit: int = 2) -> "ImageVocab":
        """Read the IMGIMG code tokens and the structure tokens from a tokenizer.json (path or parsed dict)."""
        data = path if isinstance(path, dict) else json.loads(Path(path).read_text())
        vocab: Dict[str, int] = dict(data["model"]["vocab"])
        for tok in data.get("added_tokens", []):
            vocab[tok["content"]] = tok["id"]
        codes = {}
        for name, idx in vocab.items():
            if name.startswith(IMG_PREFIX):
                codes[bpe_name_to_code(name)] = idx
        if not codes:
            raise ValueError("tokenizer.json has no IMGIMG image-code tokens")
        n = max(codes) + 1
        if sorted(codes) != list(range(n)):
            raise ValueError(f"image codes in tokenizer.json are not 0..{n - 1}")
        for label, name in (("boi", boi), ("eoi", eoi), ("newline", newline), ("size_base", size_base)):
            if name not in vocab:
                raise ValueError(f"tokenizer.json has no {label} token {name!r}")
        size = max(vocab.values()) + 1
        return cls(torch.tensor([codes[c] for c in range(n)]), boi=vocab[boi], eoi=vocab[eoi],
                   newline=vocab[newline], size_base=vocab[size_base], size_unit=size_unit, vocab_size=size)

    # ------------------------------------------------------------------ blocks
    def block_length(self, h: int, w: int) -> int:
        return 1 + (2 if self.size_base is not None else 0) + h * self.row_stride(w) + 1

    def row_stride(self, w: int) -> int:
        """Tokens per code row of a block: w codes, and the newline where rows are marked."""
        return w + (1 if self.newline is not None else 0)

    def size_token(self, n_codes: int) -> int:
        if n_codes % self.size_unit:
            raise ValueError(f"image side of {n_codes} codes is not a multiple of size_unit={self.size_unit}")
        return self.size_base + n_codes // self.size_unit

    def forced_layout(self, h: int, w: int) -> torch.Tensor:
        """Tokens of a block with -1 at the code positions: [boi, H, W, -1 x w, newline, ..., eoi] (Lumina) or
        [boi, -1 x h w, eoi] (Janus)."""
        row = [-1] * w + ([] if self.newline is None else [self.newline])
        sizes = [] if self.size_base is None else [self.size_token(h), self.size_token(w)]
        return torch.tensor([self.boi] + sizes + row * h + [self.eoi])

    def encode_block(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [h, w] -> the block's token ids [3 + h (w + 1) + 1]."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be [h, w], got {tuple(codes.shape)}")
        h, w = codes.shape
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes})")
        layout = self.forced_layout(h, w)
        out = layout.clone()
        out[layout == -1] = self.code_to_token[codes.reshape(-1).long().cpu()]
        return out

    def decode_block(self, tokens: Sequence[int]) -> torch.Tensor:
        """Token ids of one block -> codes [h, w]; ValueError naming what is malformed."""
        t = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens).long().cpu()
        if t.numel() < 3 or int(t[0]) != self.boi or int(t[-1]) != self.eoi:
            raise ValueError("an image block must start with boi and end with eoi")
        if self.size_base is None:  # no resolution tokens: a square block
            h = w = math.isqrt(t.numel() - 2)
        else:
            if t.numel() < 4:
                raise ValueError("an image block must start with boi and end with eoi")
            h = (int(t[1]) - self.size_base) * self.size_unit
            w = (int(t[2]) - self.size_base) * self.size_unit
        if h <= 0 or w <= 0:
            raise ValueError(f"bad resolution tokens {int(t[1])}, {int(t[2])}")
        if t.numel() != self.block_length(h, w):
            raise ValueError(f"a {h}x{w} block has {self.block_length(h, w)} tokens, got {t.numel()}")
        layout = self.forced_layout(h, w)
        structure = layout != -1
        if not torch.equal(t[structure], layout[structure]):
            raise ValueError("newline / end tokens are not where a {h}x{w} block puts them".format(h=h, w=w))
        codes = self.token_to_code[t[~structure]]
        if bool((codes < 0).any()):
            raise ValueError("a code position holds a token that is not an image code")
        return codes.view(h, w)

    def find_blocks(self, tokens: Sequence[int]) -> List[Tuple[int, int]]:
        """(start, end) spans [boi .. eoi] of the image blocks in a token sequence."""
        t = list(int(x) for x in tokens)
        spans, start = [], None
        for i, x in enumerate(t):
            if x == self.boi and start is None:
                start = i
            elif x == self.eoi and start is not None:
                spans.append((start, i + 1))
                start = None
        return spans


class TextTokenizer:
    """A tokenizer.json (Hugging Face `tokenizers`) with the ids of the special tokens the X-CoT uses."""

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self.tok = Tokenizer.from_file(str(self.path))

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(int(i) for i in ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in {self.path}")
        return idx

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


def pad_sequences(seqs: Sequence[Sequence], pad=0, dtype: torch.dtype = torch.long) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists -> (values [B, T] of ``dtype``, lengths [B])."""
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max()) if len(seqs) else 0
    out = torch.full((len(seqs), T), pad, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=dtype)
    return out, lengths


__all__ = ["ImageVocab", "TextTokenizer", "code_to_bpe_name", "bpe_name_to_code", "pad_sequences"]
