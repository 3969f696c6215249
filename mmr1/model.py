"""Chameleon / Lumina-mGPT decoder in one file (gpt-fast style), loading real checkpoints.

One decoder-only transformer over text tokens and VQ image tokens:
token embedding -> N x [RMSNorm pre-norm attention with per-head qk LayerNorm
before RoPE, RMSNorm pre-norm SwiGLU MLP] -> RMSNorm -> untied lm_head
(swin_norm=True, the 34B layout, normalizes the sub-layer outputs instead).

Module paths equal the Hugging Face weight names (``model.layers.{i}.self_attn.q_proj.weight``,
``lm_head.weight``, ...), so a safetensors checkpoint loads with load_state_dict.
The qk-norm affine parameters are stored [heads, head_dim] (transformers'
layout); Lumina's [model_parallel_size, head_dim] layout is repeat-interleaved
to heads on load.

Decoding uses a static, preallocated KV cache (``setup_cache``) in one of three layouts:

- ``"decode"`` (default): each row's own slots, plus a store of shared prompt prefixes. A prompt is prefilled once
  (``forward(..., fill_prefix=True)``) and the rows that continue it -- a GRPO group's G samples -- point at it;
  row r's token at position p lives in own slot p - offset[r] (offset: its prefix's length, 0 without one).
  Attention is mmr1_kernels.decode_attention: each row reads its prefix and only its own live slots, so the
  unconditional CFG rows read only their image block and a prompt is read once per group per step.
- ``"sdpa"``: one slot per position per row (a prompt copied into each of its rows), and a masked
  scaled_dot_product_attention over the first kv_len slots (the previous path, kept for comparison).
- ``"flash_attn"``: the sdpa layout read by flash-attn's flash_attn_with_kvcache (CUDA, fp16/bf16).
Rows may be at different positions (prompts of different lengths, CFG rows with their own context), and a decode
step needs no host synchronization.

Training passes (no cache) take the same shape through ``forward(completions, shared_prefix=SharedPrefix(...))``:
each prompt runs once for its group of G completions, which attend to it through
mmr1_kernels.shared_prefix_attention; the backward sums the G completions' gradients into the one prompt pass.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from mmr1_kernels import decode_attention, shared_prefix_attention


@dataclass
class ModelConfig:
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    swin_norm: bool = False
    bos_id: int = 1
    eos_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf(cls, cfg: Dict) -> "ModelConfig":
        """From a Hugging Face Chameleon config.json (or Lumina-mGPT's, which extends it)."""
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
        eos = cfg.get("eos_token_id", 2)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta if theta is not None else 10000.0),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            swin_norm=bool(cfg.get("swin_norm", False)),
            bos_id=cfg.get("bos_token_id", 1) if cfg.get("bos_token_id") is not None else 1,
            eos_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2),
        )

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "ModelConfig":
        data = json.loads(Path(path).read_text())
        if "num_hidden_layers" in data:
            return cls.from_hf(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class QKNorm(nn.Module):
    """LayerNorm over head_dim only, with a per-head affine [heads, head_dim] (Chameleon's qk-norm)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D)
        return F.layer_norm(x, (x.shape[-1],), eps=1e-5) * self.weight + self.bias


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, T, D] for integer positions [B, T] (Llama rotate_half convention, fp32 math)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x (B, H, T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def flash_attn_kvcache():
    """flash-attn's flash_attn_with_kvcache (the "flash_attn" cache layout), or a clear error without it."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as err:
        raise RuntimeError("the 'flash_attn' attention layout needs flash-attn (pip install flash-attn, CUDA "
                           "fp16/bf16); use attention='decode' instead") from err
    return flash_attn_with_kvcache


ATTENTION_LAYOUTS = ("decode", "sdpa", "flash_attn")


class KVCache(nn.Module):
    """Static cache for one layer: each row's own slots k, v [rows, slots, kv_heads, head_dim] (flash-attn's layout)
    and, in the "decode" layout, the shared prompt store prefix_k, prefix_v [P, Sp, kv_heads, head_dim]."""

    def __init__(self, rows: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (rows, max_len, kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.prefix_k: Optional[torch.Tensor] = None
        self.prefix_v: Optional[torch.Tensor] = None

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice = slice(None)):
        """Write k, v (B, H, T, D) at own ``slots`` (B, T) of cache rows ``rows``; return the rows' (B, H, S, D)
        views."""
        B, T = slots.shape
        r = torch.arange(B, device=slots.device)[:, None].expand(B, T)
        ck, cv = self.k[rows], self.v[rows]
        ck.index_put_((r, slots), k.transpose(1, 2))
        cv.index_put_((r, slots), v.transpose(1, 2))
        return ck.transpose(1, 2), cv.transpose(1, 2)

    def add_prefixes(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append prompts' k, v (P, H, T, D) to the prefix store (padded to the longest prompt so far)."""
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        if self.prefix_k is None:
            self.prefix_k, self.prefix_v = k, v
            return
        Sp = max(self.prefix_k.shape[1], k.shape[1])
        pad = lambda t: F.pad(t, (0, 0, 0, 0, 0, Sp - t.shape[1]))  # noqa: E731
        self.prefix_k = torch.cat([pad(self.prefix_k), pad(k)])
        self.prefix_v = torch.cat([pad(self.prefix_v), pad(v)])


@dataclass
class CacheLayout:
    """What every layer's cache shares: the layout, and in the "decode" layout the prefix table -- each prompt's
    length [P], each row's prompt [rows] (-1: none) and each row's offset [rows] (position of its own slot 0)."""

    mode: str
    rows: int
    prefix_lengths: Optional[torch.Tensor] = None
    prefix_of_row: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    def add_prefixes(self, lengths: torch.Tensor, lo: int, hi: int, repeats: int) -> None:
        """Prompts of ``lengths`` [P] now head rows lo..hi-1, ``repeats`` consecutive rows each."""
        first = 0 if self.prefix_lengths is None else self.prefix_lengths.numel()
        self.prefix_lengths = lengths if self.prefix_lengths is None else torch.cat([self.prefix_lengths, lengths])
        ids = torch.arange(first, first + lengths.numel(), device=lengths.device).repeat_interleave(repeats)
        self.prefix_of_row[lo:hi] = ids
        self.offset[lo:hi] = lengths.repeat_interleave(repeats)


@dataclass
class CacheCall:
    """How one cached forward uses the cache (built by Transformer.forward)."""

    layout: CacheLayout
    rows: slice  # the cache rows of this batch
    fill_prefix: bool = False  # the batch is prompts: store their k, v as shared prefixes
    slots: Optional[torch.Tensor] = None  # [B, T] own slots written ("decode": position - offset)
    mask: Optional[torch.Tensor] = None  # "sdpa": [B, 1, T, S] visibility of the first S slots


@dataclass
class SharedPrefix:
    """Prompts shared by groups of rows in a training pass: ``tokens`` [P, Tp] right-padded, ``lengths`` [P]. The
    batch's N = P * G rows continue them, G consecutive rows per prompt (GRPO's groups)."""

    tokens: torch.Tensor
    lengths: torch.Tensor


@dataclass
class PrefixCall:
    """One training pass over prompts packed before their completions (built by Transformer.forward): the first
    P * Tp tokens are the prompts [P, Tp], the next N * T the completions [N, T]."""

    P: int
    Tp: int
    N: int
    T: int
    lengths: torch.Tensor  # [P]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.q_norm = QKNorm(cfg.num_heads, hd)
        self.k_norm = QKNorm(cfg.num_kv_heads, hd)
        self.cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, positions, mask, call: Optional[CacheCall] = None):
        if isinstance(call, PrefixCall):
            return self._shared_prefix(x, cos, sin, call)
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if call is not None and call.fill_prefix:  # prompts: keep their k, v once, attend causally among them
            self.cache.add_prefixes(k, v)
            return self.o_proj(self._sdpa(q, k, v, None, T).transpose(1, 2).reshape(B, T, -1))
        if call is not None and call.layout.mode == "decode":
            lay = call.layout
            ck, cv = self.cache.update(call.slots, k, v, call.rows)
            shared = dict(prefix_k=self.cache.prefix_k, prefix_v=self.cache.prefix_v,
                          prefix_lengths=lay.prefix_lengths, prefix_of_row=lay.prefix_of_row[call.rows]) \
                if self.cache.prefix_k is not None else {}
            y = decode_attention(q.transpose(1, 2), ck.transpose(1, 2), cv.transpose(1, 2), call.slots[:, 0],
                                 check=False, **shared)  # (B, T, H, D)
            return self.o_proj(y.reshape(B, T, -1))
        if call is not None and call.layout.mode == "flash_attn":
            # flash-attn appends k/v at cache_seqlens and attends causally over each row's prefix: this
            # matches slot = position because the decoder feeds every row contiguous positions.
            y = flash_attn_kvcache()(q.transpose(1, 2), self.cache.k[call.rows], self.cache.v[call.rows],
                                     k=k.transpose(1, 2), v=v.transpose(1, 2),
                                     cache_seqlens=positions[:, 0].to(torch.int32), causal=True)
            return self.o_proj(y.reshape(B, T, -1))
        if call is not None:  # "sdpa": slot = position, the live prefix of the cache the mask covers
            k, v = self.cache.update(positions, k, v, call.rows)
            mask = call.mask
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        return self.o_proj(self._sdpa(q, k, v, mask, T).transpose(1, 2).reshape(B, T, -1))

    def _shared_prefix(self, x, cos, sin, call: PrefixCall):
        """Prompts causal among themselves; completions causal among themselves and over their prompt's keys."""
        M, H, Hkv, D = x.shape[1], self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).view(1, M, H, D)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(1, M, Hkv, D)).transpose(1, 2)
        v = self.v_proj(x).view(1, M, Hkv, D)
        q, k = apply_rope(q, cos, sin)[0].transpose(0, 1), apply_rope(k, cos, sin)[0].transpose(0, 1)  # [M, H, D]
        v = v[0]
        n, (P, Tp, N, T) = call.P * call.Tp, (call.P, call.Tp, call.N, call.T)
        qp, kp, vp = q[:n].reshape(P, Tp, H, D), k[:n].reshape(P, Tp, Hkv, D), v[:n].reshape(P, Tp, Hkv, D)
        yp = self._sdpa(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), None, Tp).transpose(1, 2)
        yc = shared_prefix_attention(q[n:].reshape(N, T, H, D), k[n:].reshape(N, T, Hkv, D),
                                     v[n:].reshape(N, T, Hkv, D), kp, vp, call.lengths, check=False)
        return self.o_proj(torch.cat([yp.reshape(n, H * D), yc.reshape(N * T, H * D)])[None])

    def _sdpa(self, q, k, v, mask, T):
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swin_norm = cfg.swin_norm
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, mask, call: Optional[CacheCall] = None):
        if self.swin_norm:  # 34B: normalize the sub-layer outputs
            x = x + self.input_layernorm(self.self_attn(x, cos, sin, positions, mask, call))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, call)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # recompute each block in the backward instead of keeping its activations (a training option, not a
        # property of the weights: the trainers set it from their configs)
        self.activation_checkpointing = False
        self.cache_layout: Optional[CacheLayout] = None

    # ----------------------------------------------------------------- cache
    def setup_cache(self, rows: int, max_len: int, dtype=None, device=None, attention: str = "decode") -> None:
        """Allocate the static KV cache: ``rows`` rows of ``max_len`` own slots each, in the ``attention`` layout
        (see the module docstring; "decode" also keeps a store of shared prompt prefixes, filled by forward(...,
        fill_prefix=True))."""
        if attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {attention!r}")
        p = self.lm_head.weight
        dev = device or p.device
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(rows, max_len, self.config.num_kv_heads, self.config.head_dim,
                                            dtype or p.dtype, dev)
        self.cache_layout = CacheLayout(attention, rows)
        if attention == "decode":
            self.cache_layout.prefix_of_row = torch.full((rows,), -1, dtype=torch.long, device=dev)
            self.cache_layout.offset = torch.zeros(rows, dtype=torch.long, device=dev)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None
        self.cache_layout = None

    @property
    def cache_len(self) -> int:
        """Own slots per cache row (0 without a cache)."""
        c = self.model.layers[0].self_attn.cache
        return 0 if c is None else c.k.shape[1]

    def cache_bytes(self) -> int:
        """Bytes held by the KV cache: every layer's own slots and prefix store."""
        total = 0
        for layer in self.model.layers:
            c = layer.self_attn.cache
            if c is not None:
                for t in (c.k, c.v, c.prefix_k, c.prefix_v):
                    total += 0 if t is None else t.numel() * t.element_size()
        return total

    # ----------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, kv_len: Optional[int] = None,
                rows: Optional[Tuple[int, int]] = None, fill_prefix: bool = False,
                shared_prefix: Optional[SharedPrefix] = None):
        """Final hidden states [B, T, d] (after the last norm) for tokens [B, T].

        With a cache (setup_cache): ``positions`` [B, T] are the tokens' positions (per row, consecutive within
        a row), written to the cache and attended to causally together with everything the row cached before.
        ``rows=(lo, hi)``: the batch is cache rows lo..hi-1 (default: all rows). ``fill_prefix`` ("decode"
        layout): the batch is prompts from position 0, stored once as shared prefixes (the decoder then points
        rows at them: CacheLayout.add_prefixes). ``kv_len`` ("sdpa" layout): an upper bound on every position + 1;
        attention then reads only the first kv_len slots of the cache instead of all of them.
        Without a cache: a causal pass over the whole sequence; ``attention_mask`` [B, T] (1 = real token) masks
        padding keys. ``shared_prefix`` (no cache): ``tokens`` [N, T] are right-padded completions of the prompts
        shared_prefix [P, Tp], G = N / P consecutive rows per prompt; returns the hidden states of the prompts
        [P, Tp, d] and of the completions [N, T, d], each prompt run once (see SharedPrefix).
        """
        if shared_prefix is not None:
            return self._forward_shared_prefix(tokens, shared_prefix)
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        S = self.cache_len
        mask, call = None, None
        if S:
            lay = self.cache_layout
            sel = slice(None) if rows is None else slice(rows[0], rows[1])
            if fill_prefix:
                if lay.mode != "decode":
                    raise ValueError(f"fill_prefix needs the 'decode' cache layout, this cache is {lay.mode!r}")
                call = CacheCall(lay, sel, fill_prefix=True)
            elif lay.mode == "decode":
                call = CacheCall(lay, sel, slots=positions - lay.offset[sel][:, None])
            elif lay.mode == "sdpa":
                if kv_len is not None:
                    S = max(1, min(S, int(kv_len)))
                mask = torch.arange(S, device=tokens.device)[None, None, None, :] <= positions[:, None, :, None]
                call = CacheCall(lay, sel, mask=mask)
            else:
                call = CacheCall(lay, sel)
        elif attention_mask is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
            mask = mask | torch.eye(T, dtype=torch.bool, device=tokens.device)[None, None]  # no all-masked rows
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not S
        for layer in self.model.layers:
            if recompute:  # keeps only the block's input; the backward runs the block again
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, positions, mask, call, use_reentrant=False)
            else:
                x = layer(x, cos, sin, positions, mask, call)
        return self.model.norm(x)

    def _forward_shared_prefix(self, tokens: torch.Tensor, sp: SharedPrefix):
        if self.cache_len:
            raise ValueError("shared_prefix is a training pass: clear the KV cache first (clear_cache)")
        if sp.tokens.dim() != 2 or tokens.dim() != 2:
            raise ValueError(f"shared_prefix.tokens and tokens must be [P, Tp] and [N, T], got "
                             f"{tuple(sp.tokens.shape)} and {tuple(tokens.shape)}")
        (P, Tp), (N, T) = sp.tokens.shape, tokens.shape
        if P < 1 or N % P:
            raise ValueError(f"tokens' rows ({N}) must be a positive multiple of the shared prompts ({P})")
        if tuple(sp.lengths.shape) != (P,):
            raise ValueError(f"shared_prefix.lengths must have shape ({P},), got {tuple(sp.lengths.shape)}")
        dev = tokens.device
        plen = sp.lengths.to(dev)
        # completion position t of a row of prompt p sits at plen[p] + t: RoPE sees the positions of the full row
        positions = torch.cat([torch.arange(Tp, device=dev).repeat(P),
                               (plen.repeat_interleave(N // P)[:, None] + torch.arange(T, device=dev)).reshape(-1)])[None]
        x = self.model.embed_tokens(torch.cat([sp.tokens.to(dev).reshape(-1), tokens.reshape(-1)])[None])
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        call = PrefixCall(P, Tp, N, T, plen)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, positions, None, call, use_reentrant=False)
            else:
                x = layer(x, cos, sin, positions, None, call)
        x = self.model.norm(x)[0]
        return x[:P * Tp].view(P, Tp, -1), x[P * Tp:].view(N, T, -1)

    def logits(self, hidden: torch.Tensor, vocab_range: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """lm_head over hidden [..., d]; with vocab_range only the window's rows of the head are used."""
        w = self.lm_head.weight if vocab_range is None else self.lm_head.weight[vocab_range[0]:vocab_range[1]]
        return F.linear(hidden, w)


def teacher_forced_hidden(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, T-1, d] predicting tokens[:, 1:] for right-padded tokens [B, T] of the given lengths.

    ``model`` may be wrapped (DDP / FSDP): it is called, never inspected.
    """
    dev = next(model.parameters()).device
    tokens, lengths = tokens.to(dev), lengths.to(dev)
    attn = torch.arange(tokens.shape[1], device=dev)[None] < lengths[:, None]
    return model(tokens, attention_mask=attn)[:, :-1]


@dataclass
class PrefixSplit:
    """Right-padded rows [N, T] in groups of G consecutive rows that share a prompt, split into each prompt once and
    the completions, with the map between the two coordinates of a next-token target: target u of the rows
    (tokens[:, u + 1], predicted by hidden u) is completion target j of the row (completions[:, j]) for
    u = prompt_length - 1 + j. Made by split_shared_prefix."""

    prefix: SharedPrefix  # prompts [P, Tp], lengths [P]
    completions: torch.Tensor  # [N, Tc] right-padded
    index: torch.Tensor  # [N, Tc] long: u of each completion target (clamped into range where not valid)
    valid: torch.Tensor  # [N, Tc] bool: j < the row's completion length

    @property
    def group_size(self) -> int:
        return self.completions.shape[0] // self.prefix.tokens.shape[0]

    def _expand(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return idx.to(t.device).reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[N, T - 1, ...] per-target values -> [N, Tc, ...] (0 / False past a completion's end)."""
        out = t.gather(1, self._expand(t, self.index))
        valid = self._expand(t, self.valid)
        return torch.where(valid, out, torch.zeros((), dtype=t.dtype, device=t.device))

    def scatter(self, t: torch.Tensor, T: int) -> torch.Tensor:
        """[N, Tc, ...] -> [N, T - 1, ...] (0 at the prompt's targets and the padding)."""
        out = t.new_zeros(t.shape[0], T, *t.shape[2:])  # slot T - 1 takes what is not valid: no real target hit
        idx = torch.where(self.valid, self.index, T - 1)
        out.scatter_(1, self._expand(t, idx), t)
        return out[:, :T - 1]


def split_shared_prefix(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
                        min_group: int = 2) -> Optional[PrefixSplit]:
    """Split rows [N, T] (right-padded, of ``lengths``, each starting with a prompt of ``prompt_lengths``) into
    shared prompts and completions when they come in equal groups of >= ``min_group`` consecutive rows with
    identical prompts (a GRPO batch; the group size is the gcd of the runs of identical prompts, so a prompt drawn
    twice in a row still splits); None when they do not (the caller then runs every row whole)."""
    N, T = tokens.shape
    if N == 0 or T < 2:
        return None
    pl, ln = prompt_lengths.tolist(), lengths.tolist()
    if any(p < 1 or p > n for p, n in zip(pl, ln)):
        return None
    runs, start = [], 0
    for r in range(1, N + 1):
        if r == N or pl[r] != pl[start] or not torch.equal(tokens[r, :pl[r]], tokens[start, :pl[start]]):
            runs.append(r - start)
            start = r
    G = math.gcd(*runs)  # a prompt drawn twice in a row makes a run of 2G: it splits into two groups of G
    if G < min_group:
        return None
    plen_rows, len_rows = torch.tensor(pl), torch.tensor(ln)
    Tc = int((len_rows - plen_rows).max())
    if Tc < 1:
        return None
    plen = plen_rows[::G].clone()
    Tp = int(plen.max())
    firsts = torch.arange(0, N, G)
    prompts = tokens[firsts, :Tp] * (torch.arange(Tp)[None] < plen[:, None]).to(tokens.device)
    j = torch.arange(Tc)[None]
    index = (plen_rows[:, None] - 1 + j).clamp(max=T - 2)
    valid = j < (len_rows - plen_rows)[:, None]
    completions = tokens.gather(1, (index + 1).to(tokens.device)) * valid.to(tokens.device)
    return PrefixSplit(SharedPrefix(prompts, plen), completions, index, valid)


def shared_prefix_hidden(model: nn.Module, split: PrefixSplit) -> torch.Tensor:
    """Hidden states [N, Tc, d] predicting split.completions (teacher forcing), each prompt run once per group: the
    prompt's last hidden state predicts completion token 0 for all G rows, the completion's own hidden states the
    rest. ``model`` may be wrapped (DDP / FSDP): it is called, never inspected."""
    dev = next(model.parameters()).device
    prefix = SharedPrefix(split.prefix.tokens.to(dev), split.prefix.lengths.to(dev))
    hp, hc = model(split.completions[:, :-1].to(dev), shared_prefix=prefix)
    last = hp[torch.arange(hp.shape[0], device=dev), prefix.lengths - 1]  # [P, d]
    return torch.cat([last.repeat_interleave(split.group_size, 0)[:, None], hc], 1)


def target_span_mask(T: int, starts, ends, device) -> torch.Tensor:
    """[B, T-1] bool over the targets tokens[:, 1:]: position t (1..T-1) with starts[b] <= t < ends[b]."""
    pos = torch.arange(1, T, device=device)[None]
    lo = torch.as_tensor(list(starts) if not isinstance(starts, torch.Tensor) else starts, device=device)[:, None]
    hi = torch.as_tensor(list(ends) if not isinstance(ends, torch.Tensor) else ends, device=device)[:, None]
    return (pos >= lo) & (pos < hi)


# --------------------------------------------------------------------------- loading


def read_safetensors(path: Union[str, Path], prefix_filter: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a .safetensors file, or a directory with model.safetensors or a
    sharded model.safetensors.index.json."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / s for s in shards]
        elif (path / "model.safetensors").exists():
            files = [path / "model.safetensors"]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors checkpoint in {path}")
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if prefix_filter is None or k.startswith(prefix_filter):
                state[k] = v
    return state


def _adapt_qk_norm(state: Dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Lumina stores qk-norm affine params as [model_parallel_size, head_dim]: repeat-interleave to heads."""
    for key in list(state):
        if ".self_attn.q_norm." in key or ".self_attn.k_norm." in key:
            heads = cfg.num_heads if ".q_norm." in key else cfg.num_kv_heads
            t = state[key]
            if t.dim() == 1:
                t = t[None]
            if t.shape[0] != heads and heads % t.shape[0] == 0:
                t = t.repeat_interleave(heads // t.shape[0], dim=0)
            state[key] = t


def load_transformer(path: Union[str, Path], dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device] = "cpu", config: Optional[ModelConfig] = None) -> Transformer:
    """Load a Chameleon / Lumina-mGPT checkpoint directory (config.json + safetensors, HF weight names)."""
    path = Path(path)
    if config is None:
        cfg_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
        if not cfg_file.exists():
            raise FileNotFoundError(f"config.json not found next to the checkpoint ({cfg_file})")
        config = ModelConfig.from_json(cfg_file)
    state = {k: v for k, v in read_safetensors(path).items() if not k.startswith("model.vqmodel.")}
    _adapt_qk_norm(state, config)
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model config:\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    for k, v in state.items():
        want = model.state_dict()[k].shape
        if tuple(v.shape) != tuple(want):
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(v.shape)}, the config expects {tuple(want)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def save_transformer(model: Transformer, path: Union[str, Path]) -> None:
    """config.json (our fields) + model.safetensors with HF weight names."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(model.config.to_json())
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_weights(model: Transformer, std: float = 0.02, seed: Optional[int] = None) -> Transformer:
    """Small random init (for tiny models made in tests and the demo)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("norm.bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    p.mul_(1.0 / math.sqrt(2 * model.config.num_layers))
    return model


__all__ = ["ModelConfig", "Transformer", "KVCache", "CacheLayout", "ATTENTION_LAYOUTS", "load_transformer", "save_transformer", "read_safetensors",
           "init_weights", "num_params", "teacher_forced_hidden", "target_span_mask"]
