"""Chameleon's VQGAN image tokenizer (taming-transformers layout): Encoder, VectorQuantizer, Decoder.

Chameleon / Lumina-mGPT: 8192 x 256 codebook, 16x downsampling (channel
multipliers [1, 1, 2, 2, 4], 2 res blocks per level, attention only in the
middle block), images in [-1, 1]. Module names follow the original checkpoint
(``encoder.down.{i}.block.{j}.norm1.weight``, ``quantize.embedding.weight``,
``quant_conv``, ``post_quant_conv``, ``decoder.up.{i}...``), which transformers
also uses for the encoder under ``model.vqmodel.*`` (its conversion drops the
decoder, so decoding needs the original ``vqgan.ckpt``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    embed_dim: int = 256
    num_embeddings: int = 8192
    latent_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multiplier: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: List[int] = field(default_factory=list)
    resolution: int = 512
    num_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @classmethod
    def from_dict(cls, d: Dict) -> "VQConfig":
        """From transformers' ChameleonVQVAEConfig dict or a taming ``ddconfig`` (+ embed_dim / n_embed)."""
        dd = d.get("ddconfig", d)
        return cls(
            embed_dim=d.get("embed_dim", 256),
            num_embeddings=d.get("num_embeddings", d.get("n_embed", 8192)),
            latent_channels=dd.get("latent_channels", dd.get("z_channels", 256)),
            in_channels=dd.get("in_channels", 3),
            out_channels=dd.get("out_ch", dd.get("out_channels", 3)),
            base_channels=dd.get("base_channels", dd.get("ch", 128)),
            channel_multiplier=list(dd.get("channel_multiplier", dd.get("ch_mult", [1, 1, 2, 2, 4]))),
            num_res_blocks=dd.get("num_res_blocks", 2),
            attn_resolutions=list(dd.get("attn_resolutions") or []),
            resolution=dd.get("resolution", 512),
            num_groups=dd.get("num_groups", 32),
        )

    def to_dict(self) -> Dict:
        return asdict(self)


def _norm(cfg: VQConfig, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(cfg.num_groups, ch), num_channels=ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VQConfig, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cfg, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, cfg: VQConfig, ch: int):
        super().__init__()
        self.norm = _norm(cfg, ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(B, C, H * W).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = (1,) + tuple(cfg.channel_multiplier)
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        block_in = ch
        for i, m in enumerate(cfg.channel_multiplier):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, block_in, ch * m))
                block_in = ch * m
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cfg, block_in))
            if i != len(cfg.channel_multiplier) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = AttnBlock(cfg, block_in)
        self.mid.block_2 = ResnetBlock(cfg, block_in, block_in)
        self.norm_out = _norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.latent_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mults = cfg.base_channels, cfg.channel_multiplier
        block_in = ch * mults[-1]
        res = cfg.resolution // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = AttnBlock(cfg, block_in)
        self.mid.block_2 = ResnetBlock(cfg, block_in, block_in)
        up: List[nn.Module] = []
        for i in reversed(range(len(mults))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cfg, block_in, ch * mults[i]))
                block_in = ch * mults[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cfg, block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry per position: z [B, D, h, w] -> codes [B, h, w]."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        e = self.embedding.weight.float()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 (the ||z||^2 term does not change the argmin)
        dist = e.pow(2).sum(1)[None, :] - 2 * flat @ e.T
        return dist.argmin(1).view(B, h, w)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embedding(codes).permute(0, 3, 1, 2)  # [B, D, h, w]


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig, with_decoder: bool = True):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg) if with_decoder else None

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of the downsampling) -> codes [B, H/16, W/16]."""
        if pixels.dim() != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"pixels must be [B, {self.config.in_channels}, H, W], got {tuple(pixels.shape)}")
        f = self.config.downsample
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(pixels.shape[2:])}")
        return self.quantize.codes(self.quant_conv(self.encoder(pixels)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> images [B, 3, 16h, 16w] in [-1, 1] (clamped)."""
        if self.decoder is None:
            raise RuntimeError("this VQModel was loaded without a decoder (HF checkpoints drop it; load vqgan.ckpt)")
        n = self.config.num_embeddings
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
            raise ValueError(f"codes must lie in [0, {n})")
        z = self.post_quant_conv(self.quantize.embed(codes))
        return self.decoder(z).clamp(-1, 1)


def load_vqgan(path: Union[str, Path], config: Optional[VQConfig] = None, device="cpu",
               dtype=torch.float32) -> VQModel:
    """Load the VQGAN from the original checkpoint (torch.load(weights_only=True) of a taming state dict,
    e.g. Chameleon's tokenizer/vqgan.ckpt) or from a safetensors checkpoint with ``model.vqmodel.*`` keys."""
    path = Path(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        state = obj.get("state_dict", obj)
    else:
        from .model import read_safetensors

        state = {k[len("model.vqmodel."):]: v for k, v in read_safetensors(path, "model.vqmodel.").items()}
        if not state:
            raise ValueError(f"{path} has no model.vqmodel.* tensors")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # taming's discriminator
    has_decoder = any(k.startswith("decoder.") for k in state)
    cfg = config or VQConfig()
    model = VQModel(cfg, with_decoder=has_decoder)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"VQGAN checkpoint {path} does not match the config: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"VQGAN checkpoint {path} does not match the config (checkpoint vs config shapes): {wrong[:5]}")
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def image_to_pixels(img, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """A PIL image or uint8 array [H, W, 3] -> float tensor [3, H, W] in [-1, 1]."""
    import numpy as np

    if hasattr(img, "convert"):
        img = img.convert("RGB")
        if size is not None:
            img = img.resize((size[1], size[0]))
        arr = np.asarray(img)
    else:
        arr = np.asarray(img)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)
