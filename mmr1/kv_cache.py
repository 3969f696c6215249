"""Where attention's keys come from: one ``attend(layer, q, k, v)`` entry point per kind of pass.

``Attention.forward`` projects, normalizes and rotates, then hands q (B, H, T, D) and k, v (B, Hkv, T, D) to the
pass's context, which returns the attention output (B, T, H, D). Contexts:

- ``CausalPass``: a cache-free pass over whole sequences (causal, optionally with padding keys masked).
- ``SharedPrefixPass``: a training pass over prompts packed before their completions -- each prompt once for its
  group of G completions, which attend to it through mmr1_kernels.shared_prefix_attention.
- ``CacheStep``: one forward of a decoder over a static KV cache; the cache's *layout* decides how keys are stored
  and read. A layout is one class here (``CACHE_LAYOUTS``):

  - ``"shared_prefix"`` (``SharedPrefixCache``, the default): each distinct prompt stored once in a prefix store,
    each row's continuation in its own slots (row r's position p lives in own slot p - offset[r]); read by
    mmr1_kernels.decode_attention, so a GRPO group's G rows read their prompt once per step and the unconditional
    CFG rows read only their own block.
  - ``"sdpa"`` (``SDPACache``): one slot per position per row -- a prompt copied into each of its rows -- read by a
    masked scaled_dot_product_attention over the live prefix of the cache.
  - ``"flash_attn"`` (``FlashAttnCache``): the sdpa layout read by flash-attn's flash_attn_with_kvcache (CUDA,
    fp16/bf16).

A layout also owns how prompts enter it (``prefill``): stored once, or run once and copied into their rows.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Type

import torch
import torch.nn.functional as F

from mmr1_kernels import decode_attention, shared_prefix_attention


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Scaled dot-product attention, q (B, H, T, D), k, v (B, Hkv, S, D) -> (B, T, H, D); causal when ``mask`` is
    None and T > 1. Grouped-query heads are repeated to the query heads."""
    H, Hkv, T = q.shape[1], k.shape[1], q.shape[2]
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1).transpose(1, 2)


# --------------------------------------------------------------------------- cache-free passes


@dataclass
class CausalPass:
    """A cache-free causal pass; ``mask`` [B, 1, T, T] (bool, True = visible) when padding keys are masked."""

    mask: Optional[torch.Tensor] = None

    @classmethod
    def padded(cls, attention_mask: Optional[torch.Tensor], T: int) -> "CausalPass":
        """Causal over right-padded rows: ``attention_mask`` [B, T] (1 = real token) hides the padding keys; a
        query always sees itself, so no row is all-masked."""
        if attention_mask is None:
            return cls()
        dev = attention_mask.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        return cls(mask | torch.eye(T, dtype=torch.bool, device=dev)[None, None])

    def attend(self, layer: int, q, k, v):
        return sdpa(q, k, v, self.mask)


@dataclass
class SharedPrefix:
    """Prompts shared by groups of rows in a training pass: ``tokens`` [P, Tp] right-padded, ``lengths`` [P]. The
    batch's N = P * G rows continue them, G consecutive rows per prompt (GRPO's groups)."""

    tokens: torch.Tensor
    lengths: torch.Tensor


@dataclass
class SharedPrefixPass:
    """One training pass over prompts packed before their completions: of the pass's one row, the first P * Tp
    tokens are the prompts [P, Tp], the next N * T the completions [N, T]. Prompts attend causally among
    themselves; completions causally among themselves and over their prompt's first lengths[p] keys."""

    P: int
    Tp: int
    N: int
    T: int
    lengths: torch.Tensor  # [P]

    def attend(self, layer: int, q, k, v):
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[3]
        q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [M, H(kv), D]
        n, (P, Tp, N, T) = self.P * self.Tp, (self.P, self.Tp, self.N, self.T)
        qp, kp, vp = q[:n].reshape(P, Tp, H, D), k[:n].reshape(P, Tp, Hkv, D), v[:n].reshape(P, Tp, Hkv, D)
        yp = sdpa(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), None)
        yc = shared_prefix_attention(q[n:].reshape(N, T, H, D), k[n:].reshape(N, T, Hkv, D),
                                     v[n:].reshape(N, T, Hkv, D), kp, vp, self.lengths, check=False)
        return torch.cat([yp.reshape(n, H, D), yc.reshape(N * T, H, D)])[None]


# --------------------------------------------------------------------------- cache layouts


@dataclass
class CacheStep:
    """One cached forward: the rows ``rows`` of ``cache`` take tokens at ``positions`` [B, T]."""

    cache: "KVCacheLayout"
    rows: slice
    positions: torch.Tensor
    slots: torch.Tensor  # [B, T] own slots written
    mask: Optional[torch.Tensor] = None  # "sdpa": [B, 1, T, S] visibility of the first S slots
    fill_prefix: bool = False  # "shared_prefix": the batch is prompts, stored once as shared prefixes

    def attend(self, layer: int, q, k, v):
        return self.cache.attend(layer, q, k, v, self)


class KVCacheLayout:
    """The static cache of every layer: each row's own slots k, v [rows, slots, Hkv, D] (flash-attn's layout).
    Subclasses decide how a step reads it (``attend``) and how prompts enter it (``prefill``)."""

    name = ""

    def __init__(self, num_layers: int, rows: int, slots: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (rows, slots, kv_heads, head_dim)
        self.rows = rows
        self.device = torch.device(device)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def slots(self) -> int:
        """Own slots per row."""
        return self.k[0].shape[1]

    def tensors(self) -> List[torch.Tensor]:
        return self.k + self.v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write(self, layer: int, rows: slice, slots: torch.Tensor, k, v):
        """Write k, v (B, Hkv, T, D) at own ``slots`` (B, T) of cache rows ``rows``; return the rows' caches
        (B, S, Hkv, D)."""
        B, T = slots.shape
        r = torch.arange(B, device=slots.device)[:, None].expand(B, T)
        ck, cv = self.k[layer][rows], self.v[layer][rows]
        ck.index_put_((r, slots), k.transpose(1, 2))
        cv.index_put_((r, slots), v.transpose(1, 2))
        return ck, cv

    def step(self, positions: torch.Tensor, rows: slice, kv_len: Optional[int] = None,
             fill_prefix: bool = False) -> CacheStep:
        if fill_prefix:
            raise ValueError(f"fill_prefix needs the 'shared_prefix' cache layout, this cache is {self.name!r}")
        return CacheStep(self, rows, positions, positions)

    def attend(self, layer: int, q, k, v, step: CacheStep) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, model, tokens: torch.Tensor, lengths: torch.Tensor, lo: int, hi: int,
                of_row: torch.Tensor) -> torch.Tensor:
        """Run prompts ``tokens`` [P, T] (right-padded, of ``lengths``) into rows lo..hi-1, row lo + i holding prompt
        of_row[i], through ``model``'s forward (this cache is the model's: setup_cache); returns their hidden
        states [P, T, d]."""
        raise NotImplementedError


class SDPACache(KVCacheLayout):
    """Slot = position: a prompt is copied into each of its rows; a masked SDPA reads the live prefix of the
    cache (``kv_len`` slots, an upper bound on every position + 1 that the decoder keeps on the host)."""

    name = "sdpa"

    def step(self, positions, rows, kv_len=None, fill_prefix=False):
        if fill_prefix:
            raise ValueError(f"fill_prefix needs the 'shared_prefix' cache layout, this cache is {self.name!r}")
        S = self.slots if kv_len is None else max(1, min(self.slots, int(kv_len)))
        mask = torch.arange(S, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]
        return CacheStep(self, rows, positions, positions, mask=mask)

    def attend(self, layer, q, k, v, step):
        ck, cv = self.write(layer, step.rows, step.slots, k, v)
        S = step.mask.shape[-1]
        return sdpa(q, ck[:, :S].transpose(1, 2), cv[:, :S].transpose(1, 2), step.mask)

    def prefill(self, model, tokens, lengths, lo, hi, of_row):
        P, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(P, T)
        if P == hi - lo and torch.equal(of_row, torch.arange(P, device=of_row.device)):  # one row per prompt:
            return model(tokens, positions, kv_len=T, rows=(lo, hi))  # run only those rows, the others keep theirs
        # each prompt through the model once, in a P-row scratch cache of T slots, then copied to its rows
        scratch = SDPACache(len(self.k), P, T, self.k[0].shape[2], self.k[0].shape[3], self.k[0].dtype, self.device)
        hidden = model(tokens, positions, kv_len=T, cache=scratch)
        for own, copy in ((self.k, scratch.k), (self.v, scratch.v)):
            for c, s in zip(own, copy):
                c[lo:hi, :T] = s[of_row]
        return hidden


def flash_attn_kvcache():
    """flash-attn's flash_attn_with_kvcache (the "flash_attn" cache layout), or a clear error without it."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as err:
        raise RuntimeError("the 'flash_attn' attention layout needs flash-attn (pip install flash-attn, CUDA "
                           "fp16/bf16); use attention='shared_prefix' instead") from err
    return flash_attn_with_kvcache


class FlashAttnCache(SDPACache):
    """The sdpa layout read by flash-attn: it appends k, v at cache_seqlens and attends causally over each row's
    prefix, which matches slot = position because the decoder feeds every row contiguous positions."""

    name = "flash_attn"

    def attend(self, layer, q, k, v, step):
        return flash_attn_kvcache()(q.transpose(1, 2), self.k[layer][step.rows], self.v[layer][step.rows],
                                    k=k.transpose(1, 2), v=v.transpose(1, 2),
                                    cache_seqlens=step.positions[:, 0].to(torch.int32), causal=True)


class SharedPrefixCache(KVCacheLayout):
    """Each distinct prompt once in a prefix store prefix_k, prefix_v [P, Sp, Hkv, D] per layer; the prefix table
    says each prompt's length [P], each row's prompt [rows] (-1: none) and each row's offset [rows] (the position of
    its own slot 0). Steps read a row's prefix and only its own live slots (mmr1_kernels.decode_attention)."""

    name = "shared_prefix"

    def __init__(self, num_layers, rows, slots, kv_heads, head_dim, dtype, device):
        super().__init__(num_layers, rows, slots, kv_heads, head_dim, dtype, device)
        self.prefix_k: List[Optional[torch.Tensor]] = [None] * num_layers
        self.prefix_v: List[Optional[torch.Tensor]] = [None] * num_layers
        self.prefix_lengths: Optional[torch.Tensor] = None
        self.prefix_of_row = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.offset = torch.zeros(rows, dtype=torch.long, device=device)

    def tensors(self):
        return super().tensors() + [t for t in self.prefix_k + self.prefix_v if t is not None]

    def step(self, positions, rows, kv_len=None, fill_prefix=False):
        if fill_prefix:
            return CacheStep(self, rows, positions, positions, fill_prefix=True)
        return CacheStep(self, rows, positions, positions - self.offset[rows][:, None])

    def attend(self, layer, q, k, v, step):
        if step.fill_prefix:  # prompts: keep their k, v once, attend causally among them
            self._store(layer, k, v)
            return sdpa(q, k, v, None)
        ck, cv = self.write(layer, step.rows, step.slots, k, v)
        shared = dict(prefix_k=self.prefix_k[layer], prefix_v=self.prefix_v[layer],
                      prefix_lengths=self.prefix_lengths, prefix_of_row=self.prefix_of_row[step.rows]) \
            if self.prefix_k[layer] is not None else {}
        return decode_attention(q.transpose(1, 2), ck, cv, step.slots[:, 0], check=False, **shared)

    def _store(self, layer: int, k, v) -> None:
        """Append prompts' k, v (P, Hkv, T, D) to the layer's prefix store (padded to the longest prompt so far)."""
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        if self.prefix_k[layer] is None:
            self.prefix_k[layer], self.prefix_v[layer] = k, v
            return
        Sp = max(self.prefix_k[layer].shape[1], k.shape[1])
        pad = lambda t: F.pad(t, (0, 0, 0, 0, 0, Sp - t.shape[1]))  # noqa: E731
        self.prefix_k[layer] = torch.cat([pad(self.prefix_k[layer]), pad(k)])
        self.prefix_v[layer] = torch.cat([pad(self.prefix_v[layer]), pad(v)])

    def add_prefixes(self, lengths: torch.Tensor, lo: int, hi: int, of_row: torch.Tensor) -> None:
        """Prompts of ``lengths`` [P] now head rows lo..hi-1: row lo + i continues prompt of_row[i]."""
        first = 0 if self.prefix_lengths is None else self.prefix_lengths.numel()
        self.prefix_lengths = lengths if self.prefix_lengths is None else torch.cat([self.prefix_lengths, lengths])
        self.prefix_of_row[lo:hi] = first + of_row
        self.offset[lo:hi] = lengths[of_row]

    def prefill(self, model, tokens, lengths, lo, hi, of_row):
        P, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(P, T)
        hidden = model(tokens, positions, rows=(lo, hi), fill_prefix=True)
        self.add_prefixes(lengths, lo, hi, of_row)
        return hidden


CACHE_LAYOUTS: Dict[str, Type[KVCacheLayout]] = {c.name: c for c in (SharedPrefixCache, SDPACache, FlashAttnCache)}
ATTENTION_LAYOUTS = tuple(CACHE_LAYOUTS)
# earlier name of "shared_prefix" ("decode" also names the decoding loop: SamplingConfig.decode)
_RENAMED = {"decode": "shared_prefix"}


def cache_layout_name(name: str) -> str:
    """A layout's name, checked; the earlier name "decode" is accepted with a FutureWarning for one release."""
    if name in _RENAMED:
        warnings.warn(f"attention={name!r} is now called {_RENAMED[name]!r}; the old name goes in the next release",
                      FutureWarning, stacklevel=3)
        return _RENAMED[name]
    if name not in CACHE_LAYOUTS:
        raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {name!r}")
    return name


__all__ = ["CausalPass", "SharedPrefix", "SharedPrefixPass", "CacheStep", "KVCacheLayout", "SDPACache",
           "FlashAttnCache", "SharedPrefixCache", "CACHE_LAYOUTS", "ATTENTION_LAYOUTS", "cache_layout_name", "sdpa"]
