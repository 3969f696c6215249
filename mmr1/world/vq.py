"""The world's VQ image tokenizer: one code per distinct cell patch, so renders round-trip exactly.

Every cell of a world image is a tile (mmr1.world.scene): a background color;
a subject color filling one of 8 partial masks over a background; or a full
cell in a subject's color and pattern. The codebook is the set of those
CELL x CELL x 3 patches: 5 backgrounds + 8 x 8 x 5 partial cells + 8 solid and
3 x 8 x 7 patterned full cells = 501 codes, each remembered with its cell key.
Encoding is nearest-patch (exact on renders, the nearest tile for any other
image); decoding is a lookup. An image block in Lumina's layout is then
``boi, H, W, (7 codes + newline) x 7, eoi``.

(The previous world fitted 128 k-means codes to 4 x 4-pixel patches: mean
reconstruction error was small, 5/255, yet only 30% of held-out renders were
still nearest to their own subject after a round trip -- a pixel error metric
does not see identity. Here the round trip is exact by construction and
mmr1.world.identity measures it.)
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .scene import (BACKGROUNDS, CELL, COLORS, GRID, PATTERN_MASKS, PATTERNS, SHAPE_MAPS, SIZE, TILE_NAMES, TILES,
                    AnyScene, Cell, cell_grid)

Key = Cell  # (tile, color, pattern, pattern color, background); "." tiles: background only


def _patch(key: Key) -> torch.Tensor:
    tile, color, pattern, pc, bg = key
    out = torch.tensor(BACKGROUNDS[bg], dtype=torch.float32).expand(CELL, CELL, 3).clone()
    if tile != ".":
        out[TILES[tile]] = torch.tensor(COLORS[color], dtype=torch.float32)
        if pc is not None:
            out[TILES[tile] & PATTERN_MASKS[pattern]] = torch.tensor(COLORS[pc], dtype=torch.float32)
    return out


def _used_tiles() -> List[str]:
    used = {t for maps in SHAPE_MAPS.values() for rows in maps.values() for row in rows for t in row if t != "."}
    return [t for t in TILE_NAMES if t in used]


class PatchVQ:
    """CELL x CELL patches -> the nearest of K codebook patches; codes -> patches."""

    def __init__(self, codebook: torch.Tensor, keys: List[Key]):
        if codebook.dim() != 2 or codebook.shape[1] != CELL * CELL * 3:
            raise ValueError(f"codebook must be [K, {CELL * CELL * 3}], got {tuple(codebook.shape)}")
        if len(keys) != codebook.shape[0]:
            raise ValueError(f"need one key per code: {len(keys)} keys for {codebook.shape[0]} codes")
        self.codebook = codebook.float()
        self.keys = [tuple(k) for k in keys]
        self.code_of: Dict[Key, int] = {}
        for i, k in enumerate(self.keys):
            self.code_of.setdefault(k, i)
        # a full tile looks the same on every background: those keys share one code
        for tile, color, pattern, pc, bg in list(self.keys):
            if tile == "#":
                for other in BACKGROUNDS:
                    self.code_of.setdefault(("#", color, pattern, pc, other), self.code_of[(tile, color, pattern, pc, bg)])
        # pixel L1 between every two codes (sum over the patch, in 0..255 units): the distance between two code
        # grids is then exactly the L1 distance between the decoded images (used to classify identity)
        self.distance = torch.cdist(self.codebook, self.codebook, p=1)

    @classmethod
    def build(cls) -> "PatchVQ":
        """The world's tile dictionary, in a fixed order: backgrounds, partial tiles, solid then patterned full
        cells."""
        keys: List[Key] = [(".", None, "solid", None, bg) for bg in BACKGROUNDS]
        keys += [(t, color, "solid", None, bg) for t in _used_tiles() if t != "#" for color in COLORS
                 for bg in BACKGROUNDS]
        keys += [("#", color, "solid", None, "white") for color in COLORS]
        keys += [("#", color, pattern, pc, "white") for color, pattern, pc in
                 itertools.product(COLORS, PATTERNS[1:], COLORS) if pc != color]
        return cls(torch.stack([_patch(k).reshape(-1) for k in keys]), keys)

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @staticmethod
    def patches(images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, SIZE, SIZE, 3] -> [N, GRID * GRID, CELL * CELL * 3]."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (SIZE, SIZE, 3):
            raise ValueError(f"images must be [N, {SIZE}, {SIZE}, 3], got {tuple(images.shape)}")
        n = images.shape[0]
        p = images.float().reshape(n, GRID, CELL, GRID, CELL, 3).permute(0, 1, 3, 2, 4, 5)
        return p.reshape(n, GRID * GRID, CELL * CELL * 3)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, SIZE, SIZE, 3] -> codes [N, GRID, GRID] (nearest patch; exact for the world's renders)."""
        p = self.patches(images)
        return torch.cdist(p, self.codebook[None].expand(p.shape[0], -1, -1)).argmin(-1).view(-1, GRID, GRID)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, GRID, GRID] -> uint8 [N, SIZE, SIZE, 3]."""
        n = codes.shape[0]
        p = self.codebook[codes.reshape(n, -1).cpu()].reshape(n, GRID, GRID, CELL, CELL, 3).permute(0, 1, 3, 2, 4, 5)
        return p.reshape(n, SIZE, SIZE, 3).round().clamp(0, 255).to(torch.uint8)

    def scene_codes(self, scene: AnyScene) -> torch.Tensor:
        """The codes of a scene's ideal render, straight from its cell grid: [GRID, GRID] (== encode(render))."""
        return torch.tensor([[self.code_of[k] for k in row] for row in cell_grid(scene)], dtype=torch.long)

    def render(self, scene: AnyScene) -> torch.Tensor:
        """The scene's image: uint8 [SIZE, SIZE, 3]."""
        return self.decode(self.scene_codes(scene)[None])[0]

    def save(self, directory) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        save_file({"codebook": self.codebook.contiguous()}, str(directory / "vq.safetensors"))
        (directory / "vq_keys.json").write_text(json.dumps(self.keys))

    @classmethod
    def load(cls, directory) -> "PatchVQ":
        from safetensors.torch import load_file

        directory = Path(directory)
        keys = [tuple(k) for k in json.loads((directory / "vq_keys.json").read_text())]
        return cls(load_file(str(directory / "vq.safetensors"))["codebook"], keys)


_DEFAULT: Optional[PatchVQ] = None


def default_vq() -> PatchVQ:
    """The world's tokenizer (built once per process; it is deterministic)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PatchVQ.build()
    return _DEFAULT


def render(scene: AnyScene) -> torch.Tensor:
    """uint8 [SIZE, SIZE, 3]: the scene drawn from its tiles."""
    return default_vq().render(scene)


__all__ = ["PatchVQ", "default_vq", "render"]
