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

Every attention call goes through a context (mmr1.kv_cache) with one ``attend`` entry point: a causal pass, a
shared-prefix training pass, or a step of a static KV cache (``setup_cache``) whose layout -- "shared_prefix" (the
default: each prompt stored once for its rows), "sdpa" (a prompt copied into each row) or "flash_attn" -- decides
how keys are stored and read. Rows may be at different positions (prompts of different lengths, CFG rows with
their own context), and a decode step needs no host synchronization.

Training passes (no cache) take the same shape through ``forward(completions, shared_prefix=SharedPrefix(...))``:
each prompt runs once for its group of G completions, which attend to it through
mmr1_kernels.shared_prefix_attention; the backward sums the G completions' gradients into the one prompt pass.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .kv_cache import (ATTENTION_LAYOUTS, CACHE_LAYOUTS, CacheStep, CausalPass, KVCacheLayout, SharedPrefix,
                       SharedPrefixPass, cache_layout_name)


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
    qk_norm: bool = True  # Chameleon's per-head LayerNorm on q and k before RoPE (a Llama backbone has none)

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
            qk_norm=cfg.get("model_type", "chameleon") != "llama",
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.layer = layer  # this layer's index into a KV cache layout's per-layer storage
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.q_norm = QKNorm(cfg.num_heads, hd) if cfg.qk_norm else nn.Identity()
        self.k_norm = QKNorm(cfg.num_kv_heads, hd) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, ctx):
        """x (B, T, d); ``ctx`` says where the keys come from (mmr1.kv_cache: a causal pass, a shared-prefix
        training pass, or a step of a KV cache layout)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(ctx.attend(self.layer, q, k, v).reshape(B, T, -1))  # attend: (B, T, H, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.swin_norm = cfg.swin_norm
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx):
        if self.swin_norm:  # 34B: normalize the sub-layer outputs
            x = x + self.input_layernorm(self.self_attn(x, cos, sin, ctx))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # recompute each block in the backward instead of keeping its activations (a training option, not a
        # property of the weights: the trainers set it from their configs)
        self.activation_checkpointing = False
        self.kv_cache: Optional[KVCacheLayout] = None  # setup_cache / clear_cache (mmr1.kv_cache)

    # ----------------------------------------------------------------- cache
    def setup_cache(self, rows: int, max_len: int, dtype=None, device=None,
                    attention: str = "shared_prefix") -> KVCacheLayout:
        """Allocate the static KV cache: ``rows`` rows of ``max_len`` own slots each, in the ``attention`` layout
        (mmr1.kv_cache.CACHE_LAYOUTS; "shared_prefix" also keeps a store of prompts, filled by forward(...,
        fill_prefix=True))."""
        p = self.lm_head.weight
        layout = CACHE_LAYOUTS[cache_layout_name(attention)]
        self.kv_cache = layout(self.config.num_layers, rows, max_len, self.config.num_kv_heads, self.config.head_dim,
                               dtype or p.dtype, device or p.device)
        return self.kv_cache

    def clear_cache(self) -> None:
        self.kv_cache = None

    @property
    def cache_len(self) -> int:
        """Own slots per cache row (0 without a cache)."""
        return 0 if self.kv_cache is None else self.kv_cache.slots

    def cache_bytes(self) -> int:
        """Bytes held by the KV cache: every layer's own slots and prefix store."""
        return 0 if self.kv_cache is None else self.kv_cache.nbytes()

    # ----------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, kv_len: Optional[int] = None,
                rows: Optional[Tuple[int, int]] = None, fill_prefix: bool = False,
                shared_prefix: Optional[SharedPrefix] = None, cache: Optional[KVCacheLayout] = None):
        """Final hidden states [B, T, d] (after the last norm) for tokens [B, T].

        With a cache (setup_cache): ``positions`` [B, T] are the tokens' positions (per row, consecutive within
        a row), written to the cache and attended to causally together with everything the row cached before.
        ``rows=(lo, hi)``: the batch is cache rows lo..hi-1 (default: all rows). ``fill_prefix`` ("shared_prefix"
        layout): the batch is prompts from position 0, stored once as shared prefixes (the layout's prefill then
        points rows at them). ``kv_len`` ("sdpa" layout): an upper bound on every position + 1; attention then reads
        only the first kv_len slots of the cache instead of all of them.
        Without a cache: a causal pass over the whole sequence; ``attention_mask`` [B, T] (1 = real token) masks
        padding keys. ``shared_prefix`` (no cache): ``tokens`` [N, T] are right-padded completions of the prompts
        shared_prefix [P, Tp], G = N / P consecutive rows per prompt; returns the hidden states of the prompts
        [P, Tp, d] and of the completions [N, T, d], each prompt run once (see SharedPrefix).
        ``cache``: use this KV cache instead of the one setup_cache made (a layout's scratch cache).
        """
        if shared_prefix is not None:
            return self._forward_shared_prefix(tokens, shared_prefix)
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cache = self.kv_cache if cache is None else cache
        if cache is not None:
            sel = slice(None) if rows is None else slice(rows[0], rows[1])
            ctx = cache.step(positions, sel, kv_len=kv_len, fill_prefix=fill_prefix)
        else:
            ctx = CausalPass.padded(attention_mask, T)
        return self.run(tokens, positions, ctx)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """Embed -> blocks -> final norm, every attention through ``ctx`` (mmr1.kv_cache). Called from forward only:
        FSDP gathers the root's parameters in forward's hooks."""
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and not isinstance(ctx, CacheStep)
        for layer in self.model.layers:
            if recompute:  # keeps only the block's input; the backward runs the block again
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
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
        packed = torch.cat([sp.tokens.to(dev).reshape(-1), tokens.reshape(-1)])[None]
        x = self.run(packed, positions, SharedPrefixPass(P, Tp, N, T, plen))[0]
        return x[:P * Tp].view(P, Tp, -1), x[P * Tp:].view(N, T, -1)

    # ----------------------------------------------------------------- how tokens enter and leave
    # A model family is these four methods (mmr1.janus overrides them): the engine -- decoder, sampler calls,
    # rollouts, trainer -- never asks what produced the hidden states.
    # The ids of image codes when they have a head (and a softmax) of their own, apart from the text's (Janus);
    # None: one head scores every id (here)
    image_window: Optional[Tuple[int, int]] = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings [..., d] of token ids (here: one table for text and image tokens)."""
        return self.model.embed_tokens(tokens)

    def output_head(self, hidden: torch.Tensor, window: Tuple[int, int]):
        """The head that scores ids ``window`` = (lo, hi), as (features [..., f], weight [n, f], bias [n] or None,
        first): the logit of id i is features @ weight[i - first] + bias[i - first]. The head's last layer is linear
        in the features, so guidance may be mixed there, and the fused losses take (features, weight) with the
        window and targets shifted by -first. Here one linear layer scores every id: the features are the hidden
        states, the weight lm_head's, no bias."""
        return hidden, self.lm_head.weight, None, 0

    def logits(self, hidden: torch.Tensor, vocab_range: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Logits over the whole vocabulary (or the ids ``vocab_range``) for hidden [..., d]."""
        w = self.lm_head.weight if vocab_range is None else self.lm_head.weight[vocab_range[0]:vocab_range[1]]
        return F.linear(hidden, w)

    def unconditional_context(self, lengths: List[int]) -> Optional[List[List[int]]]:
        """The unconditional CFG rows' context before an image block whose conditional rows hold ``lengths``
        tokens: None here (Lumina-mGPT: the unconditional branch sees only the image being drawn, its rows restart
        at the block), or one token list per row."""
        return None

    def checkpoint_config(self) -> Dict:
        """The model's shape as training checkpoints record it (meta.json's "model"; mmr1 export rebuilds the model
        from it): ModelConfig's fields here."""
        return asdict(self.config)


def head_features(model: "Transformer", hidden: torch.Tensor, window) -> torch.Tensor:
    """The features the fused ops multiply with the head of ids ``window`` (Transformer.output_head), a bias
    becoming one more column of ones (see head_inputs)."""
    x, _, b, _ = model.output_head(hidden, window)
    return x if b is None else torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1)


def head_inputs(model: "Transformer", hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, window):
    """What the fused ops take for the ids ``window`` of ``model``'s head (Transformer.output_head): (features,
    weight, targets, vocab range) with targets and window in the weight's rows (masked targets set to its first
    row, never read). A bias becomes one more weight column against a column of ones: the fused ops take a weight
    only, and [f, 1] @ [W, b]^T = f W^T + b."""
    x, w, b, first = model.output_head(hidden, window)
    if b is not None:
        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1)
        w = torch.cat([w, b[:, None].to(w.dtype)], 1)
    if first:
        targets = torch.where(mask, targets - first, 0)
    return x, w, targets, (window[0] - first, window[1] - first)


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


JANUS_MODEL_TYPES = ("janus", "multi_modality", "mmr1_janus")  # transformers', DeepSeek's, mmr1.janus's config.json


def load_model(path: Union[str, Path], dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu") -> Transformer:
    """A checkpoint directory of either family, told apart by config.json's model_type: Janus-Pro
    (mmr1.janus.load_janus) or Chameleon / Lumina-mGPT (load_transformer)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"config.json not found in {path}")
    if json.loads(cfg_file.read_text()).get("model_type") in JANUS_MODEL_TYPES:
        from .janus import load_janus

        return load_janus(path, dtype=dtype, device=device)
    return load_transformer(path, dtype=dtype, device=device)


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


__all__ = ["ModelConfig", "Transformer", "KVCacheLayout", "SharedPrefix", "ATTENTION_LAYOUTS", "load_transformer", "save_transformer", "read_safetensors",
           "init_weights", "num_params", "teacher_forced_hidden", "target_span_mask", "head_inputs", "head_features"]
