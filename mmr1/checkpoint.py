"""Training checkpoints: safetensors weights + optimizer / scheduler / RNG state + config, written atomically.

A checkpoint is a directory. It is written to ``<dir>.tmp-<pid>`` first and
then renamed into place (the previous checkpoint is renamed aside and removed
only after the new one is in place), so a crash at any point leaves either the
old or the new checkpoint complete -- never a half-written one. Resuming
restores the RNG states, so a resumed run continues bit-identically.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, config: Dict[str, Any],
                    optimizer: Union[torch.optim.Optimizer, Dict[str, Any], None] = None, scheduler=None,
                    step: int = 0, extra: Optional[Dict[str, Any]] = None) -> Path:
    """``optimizer``: an optimizer, or an optimizer state dict already gathered (FSDP's full state)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    torch.save({
        "step": step,
        "optimizer": (optimizer if isinstance(optimizer, dict) or optimizer is None else optimizer.state_dict()),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "extra": extra or {},
    }, tmp / "trainer_state.pt")
    (tmp / "train_config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Union[str, Path], model: torch.nn.Module, config: Optional[Dict[str, Any]] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                    restore_rng: bool = True, full_state: bool = False) -> Dict[str, Any]:
    """Load into ``model`` (and optimizer / scheduler); returns {"step", "extra", "config"}.

    ``config``: the current run's config; a checkpoint from a different
    config (other than run-length fields) is refused with the differing keys.
    ``full_state=True`` loads nothing into ``model`` / ``optimizer`` and returns the weights and the optimizer
    state as "model_state" / "optimizer_state" instead (for FSDP, which re-shards them itself).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected model.safetensors)")
    saved_cfg = json.loads((path / "train_config.json").read_text())
    if config is not None:
        ignore = {"steps", "log_path", "checkpoint_every", "out_dir"}
        cur = json.loads(json.dumps(config, sort_keys=True, default=str))
        diff = sorted(k for k in set(saved_cfg) | set(cur) if k not in ignore and saved_cfg.get(k) != cur.get(k))
        if diff:
            raise ValueError(f"checkpoint {path} was written with a different config: "
                             + ", ".join(f"{k}: {saved_cfg.get(k)!r} != {cur.get(k)!r}" for k in diff[:8]))
    state = load_file(str(path / "model.safetensors"))
    ts = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if full_state:
        if scheduler is not None and ts["scheduler"] is not None:
            scheduler.load_state_dict(ts["scheduler"])
        if restore_rng:
            _set_rng_state(ts["rng"])
        return {"step": ts["step"], "extra": ts["extra"], "config": saved_cfg, "model_state": state,
                "optimizer_state": ts["optimizer"]}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    if optimizer is not None and ts["optimizer"] is not None:
        optimizer.load_state_dict(ts["optimizer"])
    if scheduler is not None and ts["scheduler"] is not None:
        scheduler.load_state_dict(ts["scheduler"])
    if restore_rng:
        _set_rng_state(ts["rng"])
    return {"step": ts["step"], "extra": ts["extra"], "config": saved_cfg}
