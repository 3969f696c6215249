"""KV-cached generation with classifier-free guidance: image blocks and text, on the static cache.

Rows: the N conditional rows, then (with CFG) N unconditional rows in the same
static cache. Lumina-mGPT's unconditional branch sees only the image being
generated (its context starts at the image's boi), so at each image block the
unconditional rows restart at position 0 and are fed the same tokens as their
conditional row.

Per image token: one forward of the 2N rows (one new token each), then, only
where the layout has a code position (structure tokens -- H/W, newlines, eoi --
come from the precomputed layout table and are never sampled), the head and
the fused sampler. Because the head is linear, CFG is applied to the final
hidden states, h = h_u + s (h_c - h_u), and only the image window's rows of the
head are multiplied: one [N, d] x [d, 8192] product instead of two
[N, d] x [d, 65536] ones. ``head_mode="logits"`` is the straightforward path
(window logits of both branches, guidance inside the sampler); both give the
same tokens up to fp32 rounding.

``backend="reference"`` is the plain-PyTorch path the fused one is measured
against: full-vocab logits for every row of both branches, then the sampler's
specification (mmr1_kernels.reference_sampler, the same Philox streams), so it
draws the same tokens, slower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from mmr1_kernels import cfg_sample
from mmr1_kernels import reference_sampler

from .kv_cache import cache_layout_name
from .model import Transformer
from .tokens import ImageVocab, pad_sequences


# what a rollout's recorded image log-prob describes (c, u: the conditional and unconditional logits of the image
# window, g: cfg_scale, T: temperature): "sampler" the sampling distribution; "cond" log_softmax(c / T);
# "guided" log_softmax((u + g (c - u)) / T) without top-k / top-p; "guided_scaled" the guided logits divided by g,
# log_softmax((c - (g - 1) / g u) / T)
CFG_LOGPROBS = ("sampler", "cond", "guided", "guided_scaled")


def image_logprobs(cond: torch.Tensor, uncond: Optional[torch.Tensor], tokens: torch.Tensor, cfg_scale: float,
                   temperature: float, kind: str) -> torch.Tensor:
    """[m] fp32 log-probs of window-relative ``tokens`` [m] under ``kind`` (CFG_LOGPROBS, not "sampler") for the
    window's logits cond / uncond [m, W] (uncond None: no CFG, every kind is the conditional distribution)."""
    z = cond.float()
    if uncond is not None and kind != "cond":
        u = uncond.float()
        z = u + cfg_scale * (z - u)
        if kind == "guided_scaled":
            z = z / cfg_scale
    return torch.log_softmax(z / temperature, -1).gather(-1, tokens.long()[:, None])[:, 0]


@dataclass
class SamplingConfig:
    """How image blocks and text are sampled -- declared once for generation, rollouts and the trainer (GRPOConfig
    holds one). The defaults draw from the policy's own (guided) distribution, which is what GRPO's log-probs
    describe; Lumina-mGPT's published inference settings are cfg_scale 3-4 with image top_k 2000."""

    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    text_temperature: float = 1.0
    text_top_k: int = 0
    text_top_p: float = 1.0
    head_mode: str = "hidden_cfg"  # or "logits"
    backend: str = "kernels"  # or "reference": full-vocab logits + the sampler's PyTorch specification
    seed: int = 0
    # image blocks: "sequential" (one token per forward) or "jacobi" (a window of draft tokens per forward, the
    # same tokens -- see sample_image_blocks_jacobi); jacobi_draft: the guess for a position never drawn yet
    decode: str = "sequential"
    jacobi_window: int = 8
    jacobi_draft: str = "above"  # the token one image row up ("above") or the left neighbour ("left")
    # size each forward's window from the acceptance of the last one (doubled when rows accept half of it on
    # average, halved below a quarter; 2..jacobi_window): where a W-token forward costs ~W one-token forwards
    # (small models on CPU) a window no one accepts is wasted work
    jacobi_adaptive: bool = False
    # the KV cache's layout (mmr1.kv_cache): "shared_prefix" (each prompt stored once for its rows, per-row
    # lengths: mmr1_kernels.decode_attention), "sdpa" (a prompt copied into each row, masked SDPA) or "flash_attn"
    # (the sdpa layout through flash-attn; CUDA, fp16/bf16) -- the same tokens
    attention: str = "shared_prefix"
    # the log-prob a rollout records for each image code: "sampler" (the distribution it was drawn from: guided,
    # top-k / top-p applied) or the distribution a GRPO loss trains (GRPOConfig.cfg_loss sets it; see
    # CFG_LOGPROBS): then the recorded log-probs equal the trainer's teacher-forced ones and the first ratio is 1
    cfg_logprobs: str = "sampler"

    def __post_init__(self):
        if self.head_mode not in ("hidden_cfg", "logits"):
            raise ValueError(f"head_mode must be 'hidden_cfg' or 'logits', got {self.head_mode!r}")
        if self.backend not in ("kernels", "reference"):
            raise ValueError(f"backend must be 'kernels' or 'reference', got {self.backend!r}")
        if self.decode not in ("sequential", "jacobi"):
            raise ValueError(f"decode must be 'sequential' or 'jacobi', got {self.decode!r}")
        if isinstance(self.jacobi_window, bool) or not isinstance(self.jacobi_window, int) or self.jacobi_window < 1:
            raise ValueError(f"jacobi_window must be an int >= 1, got {self.jacobi_window!r}")
        if self.jacobi_draft not in ("above", "left"):
            raise ValueError(f"jacobi_draft must be 'above' or 'left', got {self.jacobi_draft!r}")
        self.attention = cache_layout_name(self.attention)
        if self.cfg_logprobs not in CFG_LOGPROBS:
            raise ValueError(f"cfg_logprobs must be one of {sorted(CFG_LOGPROBS)}, got {self.cfg_logprobs!r}")

    @property
    def cache_slack(self) -> int:
        """Extra cache slots a block needs past its end: a Jacobi window may run W - 1 positions beyond it."""
        return self.jacobi_window if self.decode == "jacobi" else 0


def reference_draw(cond: torch.Tensor, uncond: Optional[torch.Tensor], window: Tuple[int, int], cfg_scale: float,
                   temperature: float, top_k: int, top_p: float, seed: int, offset,
                   row_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cfg_sample's specification on full-vocab logits: (token ids, log-probs). The window is sliced out first,
    as the fused path's head does, so the Philox streams (keyed by the id within the sampled tensor) and hence
    the draws are the kernel's."""
    lo, hi = window
    B, dev = cond.shape[0], cond.device
    per_row = lambda v, dt: torch.full((B,), v, dtype=dt, device=dev)  # noqa: E731
    tokens, logp, _, _ = reference_sampler.cfg_sample(
        cond[:, lo:hi].float(), None if uncond is None else uncond[:, lo:hi].float(),
        per_row(cfg_scale, torch.float32), per_row(temperature, torch.float32), per_row(top_k, torch.int64),
        per_row(top_p, torch.float32), None, seed, offset, row_ids, 0, hi - lo)
    return tokens + lo, logp


@dataclass
class ImageBlocks:
    tokens: torch.Tensor  # [N, L] the block's tokens (boi .. eoi)
    logprobs: torch.Tensor  # [N, L] sampler log-probs (0 at forced positions)
    chosen: torch.Tensor  # [N, L] bool: positions the policy sampled
    codes: torch.Tensor  # [N, h, w]
    forwards: int = 0  # model forwards the block took (sequential: L - 1)
    row_forwards: Optional[torch.Tensor] = None  # [N] the forward after which each row's block was final


class CachedDecoder:
    """Per-row decoding state on a model's static cache: next position and last token of every row; positions move
    only through this class's methods (prefill, restart, step, seek).

    ``attention`` picks the cache layout (mmr1.kv_cache): "shared_prefix" (default) keeps one copy of each distinct
    prompt in a prefix store and each row's continuation in its own slots, read by mmr1_kernels.decode_attention;
    "sdpa" copies each prompt into its rows and reads them with a masked SDPA; "flash_attn" is the sdpa layout read
    by flash-attn (CUDA, fp16/bf16)."""

    def __init__(self, model: Transformer, rows: int, max_len: int, slack: int = 0,
                 attention: str = "shared_prefix", prompt_len: int = 0):
        """``max_len``: positions per row; ``slack``: cache slots past ``max_len`` that only Jacobi windows write
        (never a real position). ``prompt_len`` ("shared_prefix"): the shortest prompt that will be prefilled --
        its positions live in the prefix store, so each row's own slots are max_len - prompt_len + slack."""
        if max_len > model.config.max_seq_len:
            raise ValueError(f"sequences of {max_len} tokens exceed the model's max_seq_len={model.config.max_seq_len}")
        if not 0 <= prompt_len <= max_len:
            raise ValueError(f"prompt_len must lie in [0, max_len={max_len}], got {prompt_len}")
        self.model = model
        self.rows = rows
        self.attention = cache_layout_name(attention)
        self.device = model.lm_head.weight.device
        self.shares_prompts = self.attention == "shared_prefix"
        self.prompt_len = prompt_len if self.shares_prompts else 0
        self.capacity = max_len + slack - self.prompt_len  # own slots per row
        self.cache = model.setup_cache(rows, self.capacity, attention=self.attention)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        # host-side upper bounds on each row's next position (no device sync): a "sdpa" step attends to the first
        # kv_len slots only, and no write may pass a row's own slots; offset: the row's prefix length
        self.high = [0] * rows
        self.offset = [0] * rows

    @staticmethod
    def kv_len(high: int) -> int:
        """Cache slots a "sdpa" step must attend to, rounded up to 64 so the shapes change every 64 steps only."""
        return -(-(high + 1) // 64) * 64

    def cache_bytes(self) -> int:
        return self.model.cache_bytes()

    @torch.no_grad()
    def prefill(self, row_ids: torch.Tensor, seqs: Sequence[Sequence[int]], repeats: int = 1,
                prompt_of_row: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Write the prompts of ``row_ids`` (a contiguous range) into the cache; returns their last hidden states
        [n, d]. ``repeats`` > 1: ``seqs`` are the distinct prompts and row i holds seqs[i // repeats] (a prompt's G
        samples); ``prompt_of_row`` (instead): row i holds seqs[prompt_of_row[i]]. Each distinct prompt runs
        through the model once, and the cache layout stores it once ("shared_prefix") or copies it into its rows
        ("sdpa" / "flash_attn")."""
        lo, hi = self._range(row_ids)
        if prompt_of_row is None:
            if hi - lo != len(seqs) * repeats:
                raise ValueError(f"{hi - lo} rows cannot hold {len(seqs)} prompts x {repeats} samples")
            prompt_of_row = torch.arange(len(seqs)).repeat_interleave(repeats).tolist()
        elif len(prompt_of_row) != hi - lo or not all(0 <= p < len(seqs) for p in prompt_of_row):
            raise ValueError(f"prompt_of_row must give each of the {hi - lo} rows one of the {len(seqs)} prompts")
        tokens, lengths = pad_sequences(seqs)
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        of_row = torch.tensor(prompt_of_row, dtype=torch.long, device=self.device)
        P, T = tokens.shape
        if self.shares_prompts:
            shortest = min(len(s) for s in seqs)
            if shortest < self.prompt_len:
                raise ValueError(f"a prompt of {shortest} tokens is shorter than the decoder's prompt_len="
                                 f"{self.prompt_len} (its rows would need more own slots than allocated)")
            per_row = [len(seqs[p]) for p in prompt_of_row]
            self.offset[lo:hi] = per_row
            self.high[lo:hi] = per_row
        else:
            self.high[lo:hi] = [T] * (hi - lo)
        hidden = self.cache.prefill(self.model, tokens, lengths, lo, hi, of_row)
        self.pos[lo:hi] = lengths[of_row]
        return hidden[torch.arange(P, device=self.device), lengths - 1][of_row]

    def start_unconditional(self, n: int) -> None:
        """Give the unconditional CFG rows n..2n-1 their context before an image block: the model family's
        (Transformer.unconditional_context) for conditional rows 0..n-1 at their positions -- none (Lumina-mGPT:
        the rows restart at position 0) or token lists, prefilled with each distinct list stored once."""
        contexts = self.model.unconditional_context(self.pos[:n].tolist())
        if contexts is None:
            self.restart(n, 2 * n)
            return
        distinct = sorted(set(map(tuple, contexts)), key=lambda c: (len(c), c))
        index = {c: i for i, c in enumerate(distinct)}
        self.prefill(torch.arange(n, 2 * n), [list(c) for c in distinct],
                     prompt_of_row=[index[tuple(c)] for c in contexts])

    def restart(self, lo: int, hi: int) -> None:
        """Rows lo..hi-1 start over at position 0 (the unconditional CFG rows at each image block)."""
        self.pos[lo:hi] = 0
        self.high[lo:hi] = [0] * (hi - lo)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, row_ids: Optional[torch.Tensor] = None,
             hold: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed one token per row (all rows, or ``row_ids``) at its next position; returns hidden [n, d].
        ``hold`` [n] bool: those rows re-feed their last position instead (an idempotent write when the token is
        the one fed there before) and do not move -- rows that are done while the batch runs in lockstep."""
        lo, hi = (0, self.rows) if row_ids is None else self._range(row_ids)
        if hold is not None:
            self.pos[lo:hi] -= hold.long()
        self._reserve(lo, hi, [h + 1 for h in self.high[lo:hi]])
        kv = self.kv_len(max(self.high[lo:hi]) - 1)
        h = self._forward_rows(lo, hi, tokens[:, None], self.pos[lo:hi][:, None], kv)[:, 0]
        self.pos[lo:hi] += 1
        return h

    def positions(self, lo: int, hi: int) -> torch.Tensor:
        """The next positions of rows lo..hi-1 (a copy)."""
        return self.pos[lo:hi].clone()

    def seek(self, lo: int, hi: int, positions: torch.Tensor) -> None:
        """Rows lo..hi-1 continue at ``positions`` (after a window whose accepted tokens end there)."""
        self.pos[lo:hi] = positions

    @torch.no_grad()
    def window(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed W tokens per row (all rows) at ``positions`` [rows, W] (consecutive per row); returns hidden
        [rows, W, d]. Slots past a row's position stay as they are until written again; positions do not move."""
        last = positions[:, -1].tolist()  # one host sync per window: each row's bound
        self._reserve(0, self.rows, [max(h, p + 1) for h, p in zip(self.high, last)])
        return self._forward_rows(0, self.rows, tokens, positions, self.kv_len(max(last)))

    def _reserve(self, lo: int, hi: int, high: List[int]) -> None:
        """Rows lo..hi-1 will write up to (exclusive) positions ``high``: refuse a write past a row's own slots."""
        for r, h in zip(range(lo, hi), high):
            if h - self.offset[r] > self.capacity:
                raise ValueError(f"row {r}: position {h - 1} is past its cache ({self.capacity} own slots after "
                                 f"a {self.offset[r]}-token prefix)")
        self.high[lo:hi] = high

    def _range(self, row_ids: torch.Tensor) -> Tuple[int, int]:
        lo, hi = int(row_ids[0]), int(row_ids[-1]) + 1
        if hi - lo != row_ids.numel() or not 0 <= lo < hi <= self.rows:
            raise ValueError(f"row_ids must be a contiguous range of the decoder's {self.rows} rows")
        return lo, hi

    def _forward_rows(self, lo: int, hi: int, tokens, positions, kv_len: int):
        rows = None if (lo, hi) == (0, self.rows) else (lo, hi)  # a contiguous range: views of the cache
        return self.model(tokens, positions, kv_len=kv_len, rows=rows)

    def close(self) -> None:
        self.model.clear_cache()


@torch.no_grad()
def sample_image_blocks(dec: CachedDecoder, n: int, h: int, w: int, vocab: ImageVocab, scfg: SamplingConfig,
                        step_offset: int = 0, row_ids: Optional[torch.Tensor] = None) -> ImageBlocks:
    """Generate one h x w image block for the n conditional rows 0..n-1 (continuing their cache).

    With cfg_scale != 1 the decoder must hold 2n rows; rows n..2n-1 are the
    unconditional branch, given the context the model family defines
    (CachedDecoder.start_unconditional). Returns tokens, sampler
    log-probs and the policy mask of the block. RNG: Philox keyed by
    (scfg.seed, row_ids[r], step_offset + t) for the block's t-th token.
    """
    model, dev = dec.model, dec.device
    use_cfg = scfg.cfg_scale != 1.0
    if dec.rows != (2 * n if use_cfg else n):
        raise ValueError(f"decoder has {dec.rows} rows; image generation for {n} samples needs "
                         f"{2 * n if use_cfg else n}")
    if scfg.decode == "jacobi":
        return sample_image_blocks_jacobi(dec, n, h, w, vocab, scfg, step_offset, row_ids)
    layout = vocab.forced_layout(h, w)
    L = layout.numel()
    row_ids = torch.arange(n, device=dev) if row_ids is None else row_ids.to(dev)
    if use_cfg:
        dec.start_unconditional(n)
    tokens = torch.empty(n, L, dtype=torch.long, device=dev)
    logprobs = torch.zeros(n, L, dtype=torch.float32, device=dev)
    chosen = layout == -1
    hidden = None
    for t in range(L):
        if layout[t] >= 0:
            tokens[:, t] = int(layout[t])
        else:
            tokens[:, t], logprobs[:, t] = _draw(model, hidden, use_cfg, vocab, scfg, step_offset + t, row_ids)
        x = tokens[:, t]
        if t + 1 < L:  # the last token (eoi) is fed by the caller's next phase
            hidden = dec.step(torch.cat([x, x]) if use_cfg else x)
    if bool(torch.isnan(logprobs).any()):
        raise FloatingPointError("NaN logits while sampling an image block (model weights or inputs are not finite)")
    codes = vocab.token_to_code.to(dev)[tokens[:, chosen.to(dev)]].view(n, h, w)
    return ImageBlocks(tokens, logprobs, chosen.to(dev).expand(n, L).clone(), codes, forwards=L - 1)


def _draw(model: Transformer, hidden: torch.Tensor, use_cfg: bool, vocab: ImageVocab, scfg: SamplingConfig,
          offsets, row_ids: torch.Tensor, free: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One draw per row of hidden [(2)m, d] (cond rows, then uncond rows) at ``offsets`` (an int, or per row
    [m]): image ids and sampler log-probs -- the one sampling step of both the sequential and the Jacobi loop.
    Rows where ``free`` is False are not sampled (their logits are not read; id lo, log-prob 0)."""
    m = hidden.shape[0] // 2 if use_cfg else hidden.shape[0]
    lo, hi = vocab.window
    forced = None if free is None else torch.where(free, -1, 0)
    # a loss's log-prob instead of the sampler's (scfg.cfg_logprobs): one more log-softmax over the window per draw
    recorded = scfg.cfg_logprobs if scfg.cfg_logprobs != "sampler" and scfg.temperature > 0 else None
    if recorded == "guided" and scfg.top_k == 0 and scfg.top_p >= 1.0:
        recorded = None  # unfiltered, the guided distribution is the one the sampler drew from: its log-probs are it
    if scfg.backend == "reference":
        lc = model.logits(hidden[:m])
        lu = model.logits(hidden[m:]) if use_cfg else None
        tok, lp = reference_draw(lc, lu, vocab.window, scfg.cfg_scale if use_cfg else 1.0, scfg.temperature,
                                 scfg.top_k, scfg.top_p, scfg.seed, offsets, row_ids)
        if recorded:
            lp = image_logprobs(lc[:, lo:hi], None if lu is None else lu[:, lo:hi], (tok - lo).clamp(0, hi - lo - 1),
                                scfg.cfg_scale, scfg.temperature, recorded)
        return (tok, lp) if free is None else (torch.where(free, tok, lo), torch.where(free, lp, 0.0))
    feats, w_head, b_head, first = model.output_head(hidden, vocab.window)  # the image head: features, then linear
    w_img = w_head[lo - first:hi - first]
    b_img = None if b_head is None else b_head[lo - first:hi - first]
    lc = lu = None
    if scfg.head_mode == "hidden_cfg":  # guidance mixed in the features: one product with the window's weight
        hc = feats[:m]
        hg = feats[m:] + scfg.cfg_scale * (hc - feats[m:]) if use_cfg else hc
        tok, lp = cfg_sample(torch.nn.functional.linear(hg, w_img, b_img), temperature=scfg.temperature,
                             top_k=scfg.top_k, top_p=scfg.top_p, seed=scfg.seed, offset=offsets, row_ids=row_ids,
                             forced=forced, check=False)
    else:
        lc = torch.nn.functional.linear(feats[:m], w_img, b_img)
        lu = torch.nn.functional.linear(feats[m:], w_img, b_img) if use_cfg else None
        tok, lp = cfg_sample(lc, lu, cfg_scale=scfg.cfg_scale, temperature=scfg.temperature, top_k=scfg.top_k,
                             top_p=scfg.top_p, seed=scfg.seed, offset=offsets, row_ids=row_ids, forced=forced,
                             check=False)
    if recorded:
        if lc is None:  # "cond" reads the conditional logits only
            lc = torch.nn.functional.linear(feats[:m], w_img, b_img)
            lu = torch.nn.functional.linear(feats[m:], w_img, b_img) if use_cfg and recorded != "cond" else None
        lp = image_logprobs(lc, lu, tok, scfg.cfg_scale, scfg.temperature, recorded)
        if free is not None:
            lp = torch.where(free, lp, 0.0)
    return tok + lo, lp


@torch.no_grad()
def sample_image_blocks_jacobi(dec: CachedDecoder, n: int, h: int, w: int, vocab: ImageVocab, scfg: SamplingConfig,
                               step_offset: int = 0, row_ids: Optional[torch.Tensor] = None) -> ImageBlocks:
    """``sample_image_blocks`` by Jacobi iteration: the same tokens in fewer forwards.

    Every draw is a pure function of (logits, seed, row id, offset), and each block position keeps the offset
    the sequential loop gives it (step_offset + t). Each row holds a prefix of final tokens and drafts for the
    W - 1 positions after it; one forward feeds [last final token, drafts] at their positions and draws all W
    positions in one sampler launch (per-row offsets). The draw right after the final prefix is final; the
    draw after a draft is final if every draft before it equalled its draw. A row accepts up to and including
    its first mismatch -- at least one token per forward, so never more forwards than the sequential loop --
    and rows advance independently. Accepted draws come from a forward whose whole prefix was final: the
    sequential tokens and log-probs, up to fp rounding between a W-token and a 1-token forward. Drafts: the
    previous forward's draws; a position never drawn gets the token one image row up (or the left neighbour).
    Layout tokens are forced, so never wrong. Cache slots past a row's final prefix are rewritten by the next
    window; queries read only slots <= their position.
    """
    model, dev = dec.model, dec.device
    use_cfg = scfg.cfg_scale != 1.0
    W = scfg.jacobi_window
    layout = vocab.forced_layout(h, w).to(dev)
    L = layout.numel()
    row_ids = torch.arange(n, device=dev) if row_ids is None else row_ids.to(dev)
    # cur[r, t]: final token for t < final[r], the draft after; W - 1 columns of room past the block's end
    cur = torch.full((n, L + W), vocab.eoi, dtype=torch.long, device=dev)
    forced_at = torch.cat([layout, torch.full((W,), vocab.eoi, device=dev)])
    is_free = forced_at == -1
    cur[:, :L] = torch.where(is_free[:L], vocab.window[0], layout)
    logprobs = torch.zeros(n, L, dtype=torch.float32, device=dev)
    final = torch.ones(n, dtype=torch.long, device=dev)  # boi is forced: one final token
    done_at = torch.zeros(n, dtype=torch.long, device=dev)
    start = dec.positions(0, n)  # position of each conditional row's boi
    if use_cfg:
        dec.start_unconditional(n)
        start_u = dec.positions(n, 2 * n)  # position of each unconditional row's boi
    above = vocab.row_stride(w)  # one image row up: w codes (+ the row's newline)
    forwards = 0
    Wt = W  # this forward's window: W, or with jacobi_adaptive sized from the last acceptance (2 <= Wt <= W)
    while True:
        active = final < L
        if not bool(active.any()):
            break
        j = torch.arange(Wt, device=dev)
        base = torch.where(active, final, L) - 1  # block index of each row's last final token (eoi when done)
        idx = base[:, None] + j  # [n, Wt] block indices fed
        feed = cur.gather(1, idx)
        pos = start[:, None] + idx
        if use_cfg:  # the unconditional rows see the same tokens after their own context
            feed, pos = torch.cat([feed, feed]), torch.cat([pos, start_u[:, None] + idx])
        hidden = dec.window(feed, pos)  # [rows, Wt, d]
        forwards += 1
        # the draw at window slot i is for block index base + 1 + i
        tgt = idx + 1
        free = is_free[tgt] & active[:, None]
        hid = hidden[:n].reshape(n * Wt, -1)
        if use_cfg:
            hid = torch.cat([hid, hidden[n:].reshape(n * Wt, -1)])
        tok, lp = _draw(model, hid, use_cfg, vocab, scfg, (step_offset + tgt).reshape(-1),
                        row_ids.repeat_interleave(Wt), free.reshape(-1))
        tok = torch.where(free, tok.view(n, Wt), forced_at[tgt])
        lp = lp.view(n, Wt)
        # accept through the first slot whose draw differs from the draft it was fed after (slot i + 1 was fed
        # the draft for tgt[i]); at most to the block's end
        match = tok[:, : Wt - 1] == feed[:n, 1:]
        run = torch.cumprod(match.long(), 1).sum(1)  # leading matches
        k = torch.minimum(run + 1, L - final) * active
        take = j[None, :] < k[:, None]
        rows_t = torch.arange(n, device=dev)[:, None].expand(n, Wt)
        in_block = tgt < L
        logprobs[rows_t[take & in_block], tgt[take & in_block]] = lp[take & in_block]
        # every draw becomes the next draft (the accepted ones are final); the layout stays forced
        keep_cols = active[:, None].expand(n, Wt)
        cur[rows_t[keep_cols], tgt[keep_cols]] = tok[keep_cols]
        old_final = final.clone()
        final = final + k
        done_at = torch.where(active & (final == L), forwards, done_at)
        if scfg.jacobi_adaptive:  # double when half the window is accepted on average, halve below a quarter
            mean_k = float(k[active].float().mean())
            Wt = min(W, 2 * Wt) if mean_k >= Wt / 2 else max(2, Wt // 2) if mean_k < Wt / 4 else Wt
        # positions never drawn that the next window feeds: old_final + Wt_drawn .. final + Wt_next - 2
        first_fresh = old_final + tok.shape[1]
        for c in range(W + W):  # vectorized over rows; each column depends on the ones before it
            t = first_fresh + c
            need = active & (t <= final + Wt - 2) & (t < L + W)
            if not bool(need.any()):
                break
            t = t.clamp(max=L + W - 1)
            src = t - above if scfg.jacobi_draft == "above" else t - 1
            src = torch.where(src >= 1, src, t - 1)
            guess = cur.gather(1, src[:, None]).squeeze(1)
            guess = torch.where(is_free[t], guess, forced_at[t])
            cur[need, t[need]] = guess[need]
    tokens = cur[:, :L].clone()
    dec.seek(0, n, start + L - 1)  # as the sequential loop leaves it: eoi is fed by the caller's next phase
    if use_cfg:
        dec.seek(n, 2 * n, start_u + L - 1)
    if bool(torch.isnan(logprobs).any()):
        raise FloatingPointError("NaN logits while sampling an image block (model weights or inputs are not finite)")
    chosen = (layout == -1)
    codes = vocab.token_to_code.to(dev)[tokens[:, chosen]].view(n, h, w)
    return ImageBlocks(tokens, logprobs, chosen.expand(n, L).clone(), codes, forwards=forwards, row_forwards=done_at)


@torch.no_grad()
def generate_images(model: Transformer, prompts: Sequence[Sequence[int]], vocab: ImageVocab, image_hw: Tuple[int, int],
                    num_samples: int = 1, scfg: Optional[SamplingConfig] = None) -> ImageBlocks:
    """Text-to-image: each prompt (token ids, ending where the image starts) x num_samples -> image blocks.

    Samples of one prompt differ through their RNG rows (row_id = prompt * num_samples + sample).
    """
    scfg = scfg or SamplingConfig()
    h, w = image_hw
    distinct = [list(p) for p in prompts]
    n = len(distinct) * num_samples
    if n == 0:
        raise ValueError("prompts must not be empty")
    use_cfg = scfg.cfg_scale != 1.0
    max_len = max(len(s) for s in distinct) + vocab.block_length(h, w) + 1
    dec = CachedDecoder(model, 2 * n if use_cfg else n, max_len, slack=scfg.cache_slack, attention=scfg.attention,
                        prompt_len=min(len(s) for s in distinct))
    try:
        dec.prefill(torch.arange(n, device=dec.device), distinct, repeats=num_samples)
        # the block starts with boi: the caller's prompt ends right before it
        return sample_image_blocks(dec, n, h, w, vocab, scfg)
    finally:
        dec.close()


@torch.no_grad()
def sample_text(dec: CachedDecoder, n: int, first_hidden: torch.Tensor, stop_id: int, max_tokens: int,
                text_range: Tuple[int, int], scfg: SamplingConfig, step_offset: int = 0,
                row_ids: Optional[torch.Tensor] = None,
                check_every: int = 8) -> Tuple[List[List[int]], List[List[float]], List[List[bool]]]:
    """Sample text for rows 0..n-1 until each emits ``stop_id`` (included) or ``max_tokens``.

    Rows that are done keep re-feeding their last token at the same position
    (an idempotent cache write) so the batch stays in lockstep without host
    logic per token; all-done is checked every ``check_every`` steps. Returns
    per row: tokens, sampler log-probs, and whether the policy chose each token
    (False for a stop token forced by the length cap).
    """
    dev = dec.device
    model = dec.model
    row_ids = torch.arange(n, device=dev) if row_ids is None else row_ids.to(dev)
    lo, hi = text_range
    if not lo <= stop_id < hi:
        raise ValueError(f"stop_id {stop_id} must lie in text_range {text_range}")
    toks = torch.zeros(n, max_tokens, dtype=torch.long, device=dev)
    lps = torch.zeros(n, max_tokens, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    lengths = torch.zeros(n, dtype=torch.long, device=dev)
    hidden = first_hidden
    last = torch.zeros(n, dtype=torch.long, device=dev)
    rows = torch.arange(n, device=dev)
    for t in range(max_tokens):
        if scfg.backend == "reference":
            x, lp = reference_draw(model.logits(hidden), None, text_range, 1.0, scfg.text_temperature,
                                   scfg.text_top_k, scfg.text_top_p, scfg.seed, step_offset + t, row_ids)
        else:
            feats, w_head, b_head, first = model.output_head(hidden, text_range)
            b_text = None if b_head is None else b_head[lo - first:hi - first]
            x, lp = cfg_sample(torch.nn.functional.linear(feats, w_head[lo - first:hi - first], b_text), temperature=scfg.text_temperature, top_k=scfg.text_top_k,
                               top_p=scfg.text_top_p, seed=scfg.seed, offset=step_offset + t, row_ids=row_ids,
                               check=False)
            x = x + lo
        if t == max_tokens - 1:
            x = torch.full_like(x, stop_id)  # length cap: close the reasoning
            lp = torch.zeros_like(lp)
        active = ~done
        toks[:, t] = torch.where(active, x, toks[:, t])
        lps[:, t] = torch.where(active, lp, lps[:, t])
        lengths += active.long()
        feed = torch.where(active, x, last)
        last = feed
        hidden = dec.step(feed, rows, hold=done)  # done rows: same position again (idempotent write)
        done = done | (x == stop_id)
        if (t + 1) % check_every == 0 and bool(done.all()):
            break
    # the position of a done row was re-fed; it now points one past its stop token, as it should
    out_t, out_l, out_c = [], [], []
    for r in range(n):
        k = int(lengths[r])
        out_t.append(toks[r, :k].tolist())
        out_l.append(lps[r, :k].tolist())
        out_c.append([True] * (k - 1) + [k < max_tokens])  # a token written at the cap step was forced
    return out_t, out_l, out_c


__all__ = ["CFG_LOGPROBS", "image_logprobs", "SamplingConfig", "ImageBlocks", "CachedDecoder", "sample_image_blocks", "sample_image_blocks_jacobi",
           "generate_images", "sample_text"]
