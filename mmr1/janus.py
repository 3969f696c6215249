"""Janus-Pro on mmr1's engine: one module, the family's differences from Lumina-mGPT and nothing else.

Janus-Pro (DeepSeek) is a Llama language model with two image paths: SigLIP features in for understanding, and for
generation its own VQ codes (16,384 of them, a 16x-downsampling tokenizer: 384 px -> 24 x 24 = 576 codes per image)
with their own embedding and head:

    code -> gen_embed (16384 x 8) -> gen_aligner (Linear 8 -> d, GELU, Linear d -> d) -> the backbone
    backbone hidden -> gen_head (proj_out d -> e, GELU, vision_head e -> 16384) -> code logits

Here the codes are ids of their own after the text vocabulary (``ImageVocab.janus``: code c is id V_text + c), so
the decoder, the sampler, the rollouts and the trainer run unchanged; this module overrides the four methods that
say how tokens enter and leave (mmr1.model.Transformer): ``embed`` (text ids through the text table, code ids
through gen_embed + gen_aligner), ``output_head`` (the text window through lm_head; the code window through
proj_out + GELU as the features and vision_head as the linear layer, so CFG is mixed after the GELU, never in the
backbone's hidden state), ``logits`` and ``unconditional_context`` (Janus's
unconditional branch is the prompt with every token but BOS replaced by pad; prompts of one length share it, and
the shared-prefix cache stores it once).

Images in a prompt (a reference photo, MM-R1's X-CoT) go through Janus's understanding path: SigLIP + its aligner
(``JanusUnderstanding``, transformers' modules, frozen, run once per distinct image) give one feature vector per
patch; ``Janus.prompt_image_ids`` stores them once in the model's ``prompt_images`` bank and returns ids after the
code window that stand for them. A prompt stays a list of ids -- the rollouts, the shared-prefix cache (one copy per
prompt), the trainer and the checkpoints see nothing new -- and ``embed`` reads those ids from the bank, as
transformers scatters the features over its ``<image_placeholder>`` positions.

Loading (``load_janus``) reads either layout from a local directory, detected from config.json:
- transformers' (``model_type: "janus"``, as ``save_pretrained`` writes it, one or sharded safetensors);
- DeepSeek's original ``MultiModalityCausalLM`` (``model_type: "multi_modality"``; ``language_model.*``,
  ``gen_embed``, ``gen_aligner.layers.{0,2}``, ``gen_head.output_mlp_projector`` / ``vision_head``).
The VQ-16 image tokenizer (``load_janus_vq``) and the understanding tower (``load_janus_understanding``) load apart,
from either layout, into transformers' modules.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import ModelConfig, Transformer


@dataclass
class JanusConfig:
    """A Janus-Pro checkpoint's shape: the Llama backbone and the image-generation path."""

    text: ModelConfig  # the language model (qk_norm False: a Llama)
    num_codes: int = 16384  # VQ codebook size = the image head's outputs
    code_embed_dim: int = 8  # gen_embed's width
    aligner_depth: int = 2  # Linear layers of gen_aligner (GELU between them)
    head_dim: int = 2048  # gen_head's hidden width (image_token_embed)
    pad_id: int = 100002  # the unconditional branch's filler token
    boi_id: int = 100016  # <begin_of_image>
    eoi_id: int = 100593  # <end_of_image>
    image_size: int = 384  # pixels of a generated image
    patch: int = 16  # VQ downsampling: image_size // patch codes per side

    @property
    def image_hw(self) -> Tuple[int, int]:
        side = self.image_size // self.patch
        return side, side

    def to_json(self) -> str:
        return json.dumps({"model_type": "mmr1_janus", **asdict(self)}, indent=1)

    @classmethod
    def from_dict(cls, data: Dict) -> "JanusConfig":
        """From this class's own config.json, transformers' (model_type "janus") or DeepSeek's ("multi_modality")."""
        kind = data.get("model_type")
        if kind == "mmr1_janus":
            fields = {k: v for k, v in data.items() if k != "model_type"}
            return cls(**{**fields, "text": ModelConfig(**fields["text"])})
        if kind == "janus":
            text = dict(data["text_config"], model_type="llama")
            vq = data.get("vq_config", {})
            vision = data.get("vision_config", {})
            return cls(text=_llama_config(text), num_codes=vq.get("num_embeddings", 16384),
                       code_embed_dim=vq.get("embed_dim", 8), aligner_depth=vq.get("num_hidden_layers", 2),
                       head_dim=vq.get("projection_dim", 2048), pad_id=_id(text, "pad_token_id", 100002),
                       boi_id=_id(data, "boi_token_id", 100016), eoi_id=_id(data, "eoi_token_id", 100593),
                       image_size=vision.get("image_size", 384), patch=vision.get("patch_size", 16))
        if kind == "multi_modality":
            text = dict(data["language_config"], model_type="llama")
            gen = data["gen_vision_config"]["params"]
            aligner = data["gen_aligner_config"]["params"]
            head = data["gen_head_config"]["params"]
            return cls(text=_llama_config(text), num_codes=gen["image_token_size"], code_embed_dim=gen["n_embed"],
                       aligner_depth=aligner.get("depth", 2), head_dim=head["image_token_embed"],
                       pad_id=_id(text, "pad_token_id", 100002), boi_id=_id(data, "boi_token_id", 100016),
                       eoi_id=_id(data, "eoi_token_id", 100593),
                       image_size=data.get("vision_config", {}).get("params", {}).get("image_size", 384))
        raise ValueError(f"not a Janus config: model_type {kind!r} (expected 'janus', 'multi_modality' or "
                         f"'mmr1_janus')")


def _id(cfg: Dict, key: str, default: int) -> int:
    v = cfg.get(key)
    return default if v is None else int(v[0] if isinstance(v, list) else v)


def _llama_config(text: Dict) -> ModelConfig:
    text.setdefault("intermediate_size", 4 * text.get("hidden_size", 2048))
    text.setdefault("num_hidden_layers", 24)
    text.setdefault("num_attention_heads", 16)
    text.setdefault("max_position_embeddings", 16384)
    text.setdefault("rms_norm_eps", 1e-6)
    return ModelConfig.from_hf(text)


class GenAligner(nn.Module):
    """Code embedding -> the backbone's width: Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, code_dim: int, d: int, depth: int):
        super().__init__()
        self.fc1 = nn.Linear(code_dim, d)
        self.hidden_layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(F.gelu(x))
        return x


class GenHead(nn.Module):
    """The image head: proj_out (d -> e), GELU, vision_head (e -> codes)."""

    def __init__(self, d: int, e: int, codes: int):
        super().__init__()
        self.proj_out = nn.Linear(d, e)
        self.vision_head = nn.Linear(e, codes)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj_out(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.features(hidden))


class PromptImages:
    """The understanding features of the images in prompts: [rows, d], each distinct image's T rows stored once
    (keyed by the features' bytes), read by ``Janus.embed`` through the ids ``Janus.prompt_image_ids`` hands out.

    Input data, not weights: outside the state dict and the optimizer (the understanding tower is frozen), and one
    bank per process, shared -- not copied -- by the policy and the reference model ``copy.deepcopy`` makes of it,
    so an image added after that copy is seen by both. Cost: T x d values per distinct image (576 x 2048 x 4 B =
    4.7 MB for Janus-Pro-1B in fp32)."""

    def __init__(self):
        self._rows: List[torch.Tensor] = []
        self._start: Dict[str, int] = {}
        self._count = 0
        self._tables: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __len__(self) -> int:
        return self._count

    def __deepcopy__(self, memo):
        return self

    def add(self, features: torch.Tensor) -> int:
        """[T, d] features -> the first row they occupy (the same row for the same features)."""
        import hashlib

        f = features.detach().float().cpu().contiguous()
        key = hashlib.sha256(f.numpy().tobytes()).hexdigest() + str(tuple(f.shape))
        if key not in self._start:
            self._start[key] = self._count
            self._rows.append(f)
            self._count += f.shape[0]
            self._tables.clear()
        return self._start[key]

    def table(self, device, dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self._tables:  # built once per device after each addition, not per decode step
            self._tables[key] = torch.cat(self._rows).to(device=device, dtype=dtype)
        return self._tables[key]


class Janus(Transformer):
    """Janus-Pro's language model with its image-generation path, on mmr1's transformer and engine."""

    def __init__(self, cfg: JanusConfig):
        if cfg.text.qk_norm:
            raise ValueError("Janus-Pro's backbone is a Llama: its ModelConfig must have qk_norm=False")
        super().__init__(cfg.text)
        self.janus = cfg
        self.gen_embed = nn.Embedding(cfg.num_codes, cfg.code_embed_dim)
        self.gen_aligner = GenAligner(cfg.code_embed_dim, cfg.text.hidden_size, cfg.aligner_depth)
        self.gen_head = GenHead(cfg.text.hidden_size, cfg.head_dim, cfg.num_codes)
        self.prompt_images = PromptImages()

    @property
    def text_vocab(self) -> int:
        return self.config.vocab_size

    @property
    def image_window(self) -> Tuple[int, int]:
        return self.text_vocab, self.text_vocab + self.janus.num_codes

    def image_vocab(self):
        """The ImageVocab of this model's generated images (codes after the text vocabulary)."""
        from .tokens import ImageVocab

        return ImageVocab.janus(self.text_vocab, self.janus.boi_id, self.janus.eoi_id, self.janus.num_codes)

    @property
    def prompt_image_base(self) -> int:
        """The first id standing for a prompt image's features (after the text vocabulary and the codes)."""
        return self.text_vocab + self.janus.num_codes

    def prompt_image_ids(self, features: torch.Tensor) -> List[int]:
        """One image's understanding features [T, d] (``JanusUnderstanding.features``) -> the T ids that stand for
        them in a prompt, in place of transformers' T ``<image_placeholder>`` tokens (wrap them in boi / eoi as
        its processor does)."""
        if features.dim() != 2 or features.shape[1] != self.config.hidden_size:
            raise ValueError(f"features must be [T, {self.config.hidden_size}] (one image's understanding features, "
                             f"the backbone's width), got {tuple(features.shape)}")
        start = self.prompt_images.add(features)
        return list(range(self.prompt_image_base + start, self.prompt_image_base + start + features.shape[0]))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # every position through both tables and a select: no host sync in a decode step; the aligner's cost is
        # ~2 d^2 FLOPs per token against ~2 x 1.5e9 for the 1B backbone
        tv, base = self.text_vocab, self.prompt_image_base
        is_code = (tokens >= tv) & (tokens < base)
        text = self.model.embed_tokens(torch.where(tokens >= tv, 0, tokens))
        codes = self.gen_aligner(self.gen_embed(torch.where(is_code, tokens - tv, 0)))
        out = torch.where(is_code[..., None], codes.to(text.dtype), text)
        if len(self.prompt_images):  # prompt images: a gather from the bank (an id past it raises IndexError)
            is_image = tokens >= base
            feats = F.embedding(torch.where(is_image, tokens - base, 0), self.prompt_images.table(out.device, out.dtype))
            out = torch.where(is_image[..., None], feats, out)
        return out

    def output_head(self, hidden, window):
        lo, hi = window
        if self.image_window[0] <= lo and hi <= self.image_window[1]:
            head = self.gen_head.vision_head
            return self.gen_head.features(hidden), head.weight, head.bias, self.text_vocab
        if hi > self.text_vocab:
            raise ValueError(f"window {window} mixes text ids and image codes (text: [0, {self.text_vocab}), "
                             f"codes: {self.image_window})")
        return super().output_head(hidden, window)

    def logits(self, hidden, vocab_range=None):
        full = torch.cat([F.linear(hidden, self.lm_head.weight), self.gen_head(hidden).to(hidden.dtype)], -1)
        return full if vocab_range is None else full[..., vocab_range[0]:vocab_range[1]]

    def checkpoint_config(self) -> Dict:
        return json.loads(self.janus.to_json())

    def unconditional_context(self, lengths: List[int]) -> Optional[List[List[int]]]:
        bos, pad = self.config.bos_id, self.janus.pad_id
        return [[bos] + [pad] * (n - 1) for n in lengths]


# --------------------------------------------------------------------------- loading

# checkpoint name -> this module's, per layout (first match wins; None: not part of this module)
_TRANSFORMERS = [
    (r"^model\.language_model\.(.*)$", r"model.\1"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.generation_embeddings\.(.*)$", r"gen_embed.\1"),
    (r"^model\.generation_aligner\.(.*)$", r"gen_aligner.\1"),
    (r"^model\.generation_head\.(.*)$", r"gen_head.\1"),
    (r"^model\.(vision_model|aligner|vqmodel)\..*$", None),
]
_DEEPSEEK = [
    (r"^language_model\.model\.(.*)$", r"model.\1"),
    (r"^language_model\.lm_head\.weight$", "lm_head.weight"),
    (r"^gen_embed\.(.*)$", r"gen_embed.\1"),
    (r"^gen_aligner\.layers\.0\.(.*)$", r"gen_aligner.fc1.\1"),
    (r"^gen_aligner\.layers\.(\d+)\.(.*)$", lambda m: f"gen_aligner.hidden_layers.{int(m[1]) // 2 - 1}.{m[2]}"),
    (r"^gen_head\.output_mlp_projector\.(.*)$", r"gen_head.proj_out.\1"),
    (r"^gen_head\.vision_head\.(.*)$", r"gen_head.vision_head.\1"),
    (r"^(vision_model|aligner|gen_vision_model)\..*$", None),
]


def _our_name(key: str, rules) -> Optional[str]:
    """A checkpoint name -> this module's (None: a part loaded elsewhere, e.g. the VQ; unknown names unchanged, to be
    reported as unexpected)."""
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return None if repl is None else m.expand(repl) if isinstance(repl, str) else repl(m)
    return key


def _rename(state: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    return {name: v for k, v in state.items() if (name := _our_name(k, rules)) is not None}


def _read_config(path: Path) -> Tuple[Dict, Optional[str]]:
    """(config.json, its model_type) of a checkpoint directory."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"config.json not found in {path}")
    data = json.loads(cfg_file.read_text())
    return data, data.get("model_type")


def _read_weights(path: Path, keep=None) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory whose names pass ``keep`` (default: all); safetensors are opened lazily,
    so the VQ or the understanding tower is read without the language model's 14 GB (Janus-Pro-7B, bf16)."""
    files = sorted(path.glob("*.safetensors"))
    state: Dict[str, torch.Tensor] = {}
    if files:
        import safetensors

        for f in files:
            with safetensors.safe_open(str(f), framework="pt") as handle:
                state.update({k: handle.get_tensor(k) for k in handle.keys() if keep is None or keep(k)})
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no .safetensors or pytorch_model*.bin weights in {path}")
    for f in bins:  # memory-mapped: the tensors not kept are never read
        part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        state.update({k: v for k, v in part.items() if keep is None or keep(k)})
    return state


def load_janus(path: Union[str, Path], dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu") -> Janus:
    """A Janus-Pro checkpoint directory (transformers' or DeepSeek's layout, detected from config.json) -> Janus."""
    path = Path(path)
    data, kind = _read_config(path)
    cfg = JanusConfig.from_dict(data)
    rules = {"janus": _TRANSFORMERS, "multi_modality": _DEEPSEEK, "mmr1_janus": []}[kind]
    state = _rename(_read_weights(path, keep=lambda k: _our_name(k, rules) is not None), rules)
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:  # tied embeddings, saved once
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Janus(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if any(k.startswith("gen_head.") for k in missing):
        raise ValueError(f"checkpoint {path} has no image-generation head ({[k for k in missing if 'gen_head' in k]}):"
                         f" it cannot generate images")
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config.json:\n  missing ({len(missing)}): "
                         f"{missing[:20]}\n  unexpected ({len(unexpected)}): {unexpected[:20]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(v.shape)}, the config expects "
                             f"{tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def from_transformers(hf_model, boi_id: int, eoi_id: int) -> Janus:
    """A Janus with the weights of an in-memory transformers ``JanusForConditionalGeneration`` (shared storage, no
    copy); ``boi_id`` / ``eoi_id``: its tokenizer's <begin_of_image> / <end_of_image> ids."""
    data = {**hf_model.config.to_dict(), "boi_token_id": boi_id, "eoi_token_id": eoi_id}
    cfg = JanusConfig.from_dict(data)
    state = _rename(hf_model.state_dict(), _TRANSFORMERS)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = Janus(cfg)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def save_janus(model: Janus, path: Union[str, Path]) -> None:
    """config.json (JanusConfig) + model.safetensors in this module's names (load_janus reads it back)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(model.janus.to_json())
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))


def save_janus_into(model: Janus, base: Union[str, Path], out: Union[str, Path]) -> Path:
    """``base`` (the Janus-Pro directory a run started from, transformers' or DeepSeek's layout) with ``model``'s
    weights in its names: every file of ``base`` but the weights copied (config, tokenizer, processor), and one
    model.safetensors holding the trained tensors where ``base`` has them and ``base``'s own elsewhere (the frozen
    understanding tower, its aligner, the VQ). What ``mmr1 export --base`` writes; load_janus reads it, and for
    transformers' layout so does ``JanusForConditionalGeneration.from_pretrained``."""
    import shutil

    from safetensors.torch import save_file

    base, out = Path(base), Path(out)
    _, kind = _read_config(base)
    if kind not in ("janus", "multi_modality"):
        raise ValueError(f"base {base}: model_type {kind!r} is not a Janus-Pro layout (expected 'janus' or "
                         f"'multi_modality')")
    rules = _TRANSFORMERS if kind == "janus" else _DEEPSEEK
    trained = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state, used = {}, set()
    for key, value in _read_weights(base).items():
        ours = _our_name(key, rules)
        if ours in trained:
            if tuple(trained[ours].shape) != tuple(value.shape):
                raise ValueError(f"base {base}: {key} has shape {tuple(value.shape)}, the trained model's {ours} "
                                 f"{tuple(trained[ours].shape)}: not the checkpoint this run started from")
            state[key] = trained[ours]
            used.add(ours)
        else:
            state[key] = value.contiguous()
    unwritten = sorted(set(trained) - used)
    if unwritten == ["lm_head.weight"] and torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"]):
        unwritten = []  # tied embeddings, saved once
    if unwritten:
        raise ValueError(f"base {base} has no place for trained weights {unwritten[:10]} (not the checkpoint this run "
                         f"started from?)")
    out.mkdir(parents=True, exist_ok=True)
    weights = re.compile(r".*\.(safetensors|bin)$|.*\.index\.json$")
    for f in base.iterdir():
        if f.is_file() and not weights.match(f.name):
            shutil.copy2(f, out / f.name)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    return out


# --------------------------------------------------------------------------- the VQ-16 image tokenizer

# DeepSeek's VQ-16 (LlamaGen's names, under gen_vision_model.) -> transformers' JanusVQVAE names
_VQ_DEEPSEEK = [(r"\.conv_blocks\.", ".up.", "decoder."), (r"\.conv_blocks\.", ".down.", "encoder."),
                (r"\.res\.", ".block.", ""), (r"\.mid\.0\.", ".mid.block_1.", ""), (r"\.mid\.1\.", ".mid.attn_1.", ""),
                (r"\.mid\.2\.", ".mid.block_2.", "")]


class JanusImageTokenizer:
    """Janus's VQ-16, frozen: images [B, 3, H, W] in [-1, 1] <-> codes [B, h, w] (0..num_codes-1; the generation
    ids are V_text + code, ImageVocab.janus). The module is transformers' ``JanusVQVAE`` (prefill-side work, not the
    decode hot path): encode / decode are exactly its ``encode(...).image_tokens`` / ``decode``."""

    def __init__(self, vq):
        self.vq = vq.eval().requires_grad_(False)
        self.side = int(vq.quantize.quant_state_dims[0])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vq.parameters()).dtype

    def state_dict(self) -> Dict[str, torch.Tensor]:  # the identity mmr1.data.ImageTokenizer's cache keys on
        return self.vq.state_dict()

    def to(self, device) -> "JanusImageTokenizer":
        self.vq.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        size = self.side * 2 ** (len(self.vq.config.channel_multiplier) - 1)  # one halving per level after the first
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}] in [-1, 1] for this VQ, got {tuple(images.shape)}")
        device = next(self.vq.parameters()).device
        codes = self.vq.encode(images.to(device=device, dtype=self.dtype)).image_tokens
        return codes.view(images.shape[0], self.side, self.side)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (self.side, self.side):
            raise ValueError(f"codes must be [B, {self.side}, {self.side}], got {tuple(codes.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.vq.config.num_embeddings:
            raise ValueError(f"codes must lie in 0..{self.vq.config.num_embeddings - 1}")
        device = next(self.vq.parameters()).device
        return self.vq.decode(codes.reshape(codes.shape[0], -1).to(device)).float().clamp(-1, 1)


def load_janus_vq(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> JanusImageTokenizer:
    """The VQ-16 of a Janus-Pro checkpoint directory: transformers' layout (``vq_config``, ``model.vqmodel.*``) or
    DeepSeek's (``gen_vision_config``, ``gen_vision_model.*`` in LlamaGen's names), detected from config.json."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    path = Path(path)
    data, kind = _read_config(path)
    if kind not in ("janus", "multi_modality"):
        raise ValueError(f"{path}/config.json: model_type {kind!r} has no Janus VQ (expected 'janus' or "
                         f"'multi_modality')")
    state = _read_weights(path, keep=lambda k: k.startswith(("model.vqmodel.", "gen_vision_model.")))
    if kind == "janus":
        cfg = JanusVQVAEConfig(**data.get("vq_config", {}))
        prefix = "model.vqmodel."
        vq_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:  # multi_modality
        params = data.get("gen_vision_config", {}).get("params", {})
        # DeepSeek's config names the codebook only (the VQ-16 architecture is fixed); the other keys, when present,
        # describe another architecture in JanusVQVAEConfig's names (small test checkpoints)
        arch = {k: params[k] for k in ("base_channels", "channel_multiplier", "latent_channels", "num_res_blocks",
                                       "num_patches") if k in params}
        # codes per side: the understanding tower's image size / 16 (transformers' converter does the same), 384 px
        # -> 24 for Janus-Pro
        arch.setdefault("num_patches", data.get("vision_config", {}).get("params", {}).get("image_size", 384) // 16)
        cfg = JanusVQVAEConfig(embed_dim=params.get("n_embed", 8), num_embeddings=params.get("image_token_size", 16384),
                               **arch)
        prefix = "gen_vision_model."
        vq_state = {}
        for k, v in state.items():
            if not k.startswith(prefix) or k.endswith("quantize.codebook_used"):
                continue
            k = "." + k[len(prefix):]
            for pattern, repl, scope in _VQ_DEEPSEEK:
                if k.startswith("." + scope):
                    k = re.sub(pattern, repl, k)
            vq_state[k[1:]] = v
    if not vq_state:
        raise ValueError(f"checkpoint {path} holds no VQ weights (expected {prefix}*)")
    vq = JanusVQVAE(cfg)
    missing, unexpected = vq.load_state_dict(vq_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: the VQ does not match its config.json:\n  missing ({len(missing)}): "
                         f"{list(missing)[:20]}\n  unexpected ({len(unexpected)}): {list(unexpected)[:20]}")
    return JanusImageTokenizer(vq.to(dtype))


# --------------------------------------------------------------------------- the understanding path (SigLIP + aligner)


class JanusUnderstanding:
    """Janus's understanding path, frozen: images [B, 3, S, S] in [-1, 1] (its processor's normalization: mean 0.5,
    std 0.5) -> features [B, T, d] for ``Janus.prompt_image_ids``. The modules are transformers' ``JanusVisionModel``
    and ``JanusVisionAlignerMLP`` (prefill-side work, once per distinct image): the features are exactly its
    ``get_image_features(pixel_values).pooler_output``."""

    def __init__(self, vision, aligner):
        self.vision = vision.eval().requires_grad_(False)
        self.aligner = aligner.eval().requires_grad_(False)
        self.image_size = int(vision.config.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def to(self, device) -> "JanusUnderstanding":
        self.vision.to(device)
        self.aligner.to(device)
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        S = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (S, S):
            raise ValueError(f"images must be [B, 3, {S}, {S}] in [-1, 1] for this understanding tower, got "
                             f"{tuple(images.shape)}")
        device = next(self.vision.parameters()).device
        hidden = self.vision(images.to(device=device, dtype=self.dtype)).last_hidden_state
        return self.aligner(hidden)


class JanusReferenceImages:
    """Reference images in prompts read through the understanding path: ``block(path, where)`` -> boi, the image's
    T prompt-image ids (``Janus.prompt_image_ids``), eoi -- what ``mmr1.data.XCoTData(references=...)`` calls.
    ``pixels(path, where)``: the image as [3, S, S] in [-1, 1] (mmr1.data.ImageTokenizer.pixels: size check or
    --resize); ``understanding``: a JanusUnderstanding or a function loading one (at the first image, so that
    text-only prompts never load SigLIP). Each distinct file runs through the tower once."""

    def __init__(self, model: "Janus", understanding, pixels):
        self.model, self._understanding, self.pixels = model, understanding, pixels
        self._ids: Dict[str, List[int]] = {}

    @property
    def understanding(self) -> JanusUnderstanding:
        if not isinstance(self._understanding, JanusUnderstanding):
            self._understanding = self._understanding()
        return self._understanding

    def block(self, path: Union[str, Path], where: str = "") -> List[int]:
        import hashlib

        path = Path(path)
        key = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else str(path)
        if key not in self._ids:
            pix = self.pixels(path, where)
            S = self.understanding.image_size
            if tuple(pix.shape[1:]) != (S, S):
                raise ValueError(f"{where}image {path}: the understanding tower reads {S}x{S} images, the data "
                                 f"pipeline gives {pix.shape[2]}x{pix.shape[1]} (the generation resolution)")
            feats = self.understanding.features(pix[None])[0]
            self._ids[key] = self.model.prompt_image_ids(feats.to(next(self.model.parameters()).device))
        return [self.model.janus.boi_id] + self._ids[key] + [self.model.janus.eoi_id]


def _siglip_from_timm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """DeepSeek's SigLIP (timm's VisionTransformer names) -> transformers' JanusVisionModel names: the fused qkv
    split in three, pos_embed [1, N, C] -> [N, C], the attention-pooling head (unused by Janus) dropped."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if k.startswith("attn_pool."):
            continue
        if m:
            layer, rest = f"encoder.layers.{m[1]}.", m[2]
            if rest.startswith("attn.qkv."):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, 0)):
                    out[f"{layer}self_attn.{name}.{rest.rsplit('.', 1)[1]}"] = part
                continue
            for a, b in (("attn.proj.", "self_attn.projection_layer."), ("norm1.", "layer_norm1."),
                         ("norm2.", "layer_norm2.")):
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            out[layer + rest] = v
        elif k == "pos_embed":
            out["embeddings.position_embedding.weight"] = v.reshape(v.shape[-2], v.shape[-1])
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embedding." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out["post_layernorm." + k.rsplit(".", 1)[1]] = v
        else:
            out[k] = v  # unknown: reported as unexpected
    return out


def load_janus_understanding(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> JanusUnderstanding:
    """The understanding tower + aligner of a Janus-Pro checkpoint directory: transformers' layout
    (``vision_config``, ``model.vision_model.*``, ``model.aligner.*``) or DeepSeek's (``vision_config`` /
    ``aligner_config`` params, ``vision_model.vision_tower.*`` in timm's names, ``aligner.layers.{0,2}``)."""
    from transformers.models.janus.configuration_janus import JanusVisionConfig
    from transformers.models.janus.modeling_janus import JanusVisionAlignerMLP, JanusVisionModel

    path = Path(path)
    data, kind = _read_config(path)
    if kind not in ("janus", "multi_modality"):
        raise ValueError(f"{path}/config.json: model_type {kind!r} has no Janus understanding tower (expected "
                         f"'janus' or 'multi_modality')")
    state = _read_weights(path, keep=lambda k: k.startswith(("model.vision_model.", "model.aligner.", "vision_model.",
                                                             "aligner.")))
    if kind == "janus":
        cfg = JanusVisionConfig(**data.get("vision_config", {}))
        vision = {k[len("model.vision_model."):]: v for k, v in state.items() if k.startswith("model.vision_model.")}
        aligner = {k[len("model.aligner."):]: v for k, v in state.items() if k.startswith("model.aligner.")}
    else:  # multi_modality
        params = data.get("vision_config", {}).get("params", {})
        align = data.get("aligner_config", {}).get("params", {})
        # DeepSeek's config names SigLIP-L/16 at 384 px by its timm name (JanusVisionConfig's defaults); the other
        # keys, when present, describe another size in JanusVisionConfig's names (small test checkpoints)
        arch = {k: params[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio",
                                       "patch_size") if k in params}
        image_size = params.get("image_size", 384)
        patch = arch.get("patch_size", 16)
        cfg = JanusVisionConfig(image_size=image_size, num_image_tokens=(image_size // patch) ** 2,
                                projection_dim=align.get("n_embed", 2048), depth=align.get("depth", 2), **arch)
        vision = _siglip_from_timm({k[len("vision_model.vision_tower."):]: v for k, v in state.items()
                                    if k.startswith("vision_model.vision_tower.")})
        aligner = {}
        for k, v in state.items():
            m = re.match(r"^aligner\.layers\.(\d+)\.(.*)$", k)
            if m:  # Linear, GELU, Linear, ...: layer 0 -> fc1, layer 2j -> hidden_layers.(j - 1)
                i = int(m[1])
                aligner[("fc1." if i == 0 else f"hidden_layers.{i // 2 - 1}.") + m[2]] = v
    if not vision or not aligner:
        raise ValueError(f"checkpoint {path} holds no understanding tower / aligner weights (a generation-only "
                         f"checkpoint cannot read images in prompts)")
    tower, mlp = JanusVisionModel(cfg), JanusVisionAlignerMLP(cfg)
    for module, part, what in ((tower, vision, "tower"), (mlp, aligner, "aligner")):
        missing, unexpected = module.load_state_dict(part, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path}: the understanding {what} does not match its config.json:\n  "
                             f"missing ({len(missing)}): {list(missing)[:20]}\n  unexpected ({len(unexpected)}): "
                             f"{list(unexpected)[:20]}")
    return JanusUnderstanding(tower.to(dtype), mlp.to(dtype))


__all__ = ["JanusConfig", "Janus", "GenAligner", "GenHead", "PromptImages", "JanusImageTokenizer",
           "JanusUnderstanding", "JanusReferenceImages", "load_janus", "load_janus_vq", "load_janus_understanding", "save_janus",
           "save_janus_into", "from_transformers"]
