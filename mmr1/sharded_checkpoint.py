"""Sharded, atomic, keep-last-K training checkpoints through torch.distributed.checkpoint (DCP).

Layout of ``<root>``::

    step-00000012/       DCP files: model + optimizer, written by every rank as they lie in memory (FSDP2's
                         DTensor shards, each once; DDP's replicated tensors, deduplicated by DCP's planner)
        meta.json        rank 0: step, scheduler state, data position, world size, the run's config
        rng-rank<r>.pt   each rank's RNG streams (torch CPU / CUDA, Python, NumPy)
        manifest.json    rank 0, last: every other file's size and SHA-256
    latest               the name of the newest complete checkpoint

Integrity: loading verifies every file against the manifest first (rank 0 reads and hashes, every rank gets the
verdict). A flipped bit, a truncated or a missing file is a CorruptCheckpoint error naming the file; given a root,
the load falls back to the newest checkpoint that verifies, with a warning, and never reads an unverified one.
Checkpoints written before manifests existed load with a warning that they are unverified.

Atomic: a checkpoint is written into ``.step-00000012.tmp`` and published only after every rank has
finished (a barrier), by a rename of the directory and then of ``latest`` (written to a temporary file
first). A crash at any point leaves the previous checkpoint and ``latest`` as they were; the next save
removes the stale temporary directory. ``keep_last`` older checkpoints are removed after the new one is
published.

Resume (``load_sharded``): DCP reads the model and optimizer into whatever sharding the current run has
-- another number of processes works, DCP reshards -- and the scheduler, step and data position come from
meta.json; the RNG streams are restored exactly when the world size is the one that saved (with another
world size there is no exact continuation to restore, and a warning says so).

``export_consolidated`` turns a checkpoint into one HF-layout safetensors directory that
``mmr1.model.load_transformer`` reads (no process group needed).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

LATEST = "latest"
MANIFEST = "manifest.json"


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated, or does not match its recorded checksum."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(path: Path) -> None:
    files = {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))


def verify_checkpoint(path: Union[str, Path]) -> bool:
    """Check every file of a checkpoint directory against its manifest: True when it verifies, False when it has
    no manifest (written before checksums; a warning says it is unverified); CorruptCheckpoint naming the first
    file that is missing, of another size or another SHA-256 (or an unreadable manifest)."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpoint(f"checkpoint {path} is missing")
    manifest = path / MANIFEST
    if not manifest.exists():
        warnings.warn(f"checkpoint {path} has no {MANIFEST} (written before checksums): loading it unverified")
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CorruptCheckpoint(f"checkpoint {path}: {MANIFEST} is unreadable ({err})") from err
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != want["bytes"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, {want['bytes']} were "
                                    f"written (truncated or overwritten)")
        if _sha256(f) != want["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its SHA-256 (corrupted)")
    return True


def _verified_on_rank0(path: Path) -> Optional[str]:
    """verify_checkpoint on rank 0 only (one read of the files), the verdict shared with every rank: None when it
    verifies (or is an unverified old checkpoint), else the error message."""
    message = ""
    if _rank() == 0:
        try:
            verify_checkpoint(path)
        except CorruptCheckpoint as err:
            message = str(err)
    if dist.is_initialized():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    return message or None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class _ModelAndOptimizer(Stateful):
    """DCP's view of the training state: DCP's state-dict API handles plain modules, DDP and FSDP2 alike."""

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> Dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_state_dict(self.model, [])[0]}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.optimizer is None:
            set_state_dict(self.model, [], model_state_dict=state["model"], optim_state_dict={})
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _publish_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)


def save_sharded(root: Union[str, Path], step: int, model: torch.nn.Module,
                 optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                 extra: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None,
                 keep_last: int = 3) -> Path:
    """Write ``<root>/step-<step>`` (call on every rank). ``extra``: JSON-able run state, e.g. the data position.
    Returns the published directory."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be a positive int, got {keep_last!r}")
    root = Path(root)
    name = step_dir_name(step)
    final, tmp = root / name, root / f".{name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a crashed earlier attempt at this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    error = None
    try:  # a write error (disk full, permission, I/O) is caught here so that every rank reaches the agreement below
        dcp.save({"train": _ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{_rank()}.pt")
        if _rank() == 0:
            meta = {"step": step, "world_size": _world(), "extra": extra or {},
                    "scheduler": scheduler.state_dict() if scheduler is not None else None, "config": config or {}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    except Exception as err:
        error = err
    _agree_on_write(error, tmp, final)  # every rank's shards and RNG are on disk, or every rank raises
    if _rank() == 0:
        try:
            _write_manifest(tmp)
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step: the older copy goes only after the new one is complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            _publish_latest(root, name)
        except Exception as err:
            error = err
    _agree_on_write(error, tmp, final)
    if _rank() == 0:
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep_last]:
            shutil.rmtree(old)
        for stale in root.glob(".step-*.tmp"):  # attempts at other steps that crashed
            shutil.rmtree(stale)
    _barrier()
    return final


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed on some rank: raised on every rank; the partial directory is removed and the
    previous ``latest`` is untouched."""


def _agree_on_write(error: Optional[BaseException], tmp: Path, final: Path) -> None:
    """Every rank learns whether any rank failed (one all_gather of the error messages, which every rank reaches
    because errors are caught before it: no rank waits forever on one that raised); on a failure rank 0 removes the
    partial directory and every rank raises CheckpointWriteError naming the failed ranks."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = [message]
    if dist.is_initialized():
        messages = [None] * _world()
        dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()  # the partial directory is gone before any rank reports the failure
    raise CheckpointWriteError(f"writing checkpoint {final} failed (" + "; ".join(f"rank {r}: {m}" for r, m in failed)
                               + "); the partial directory is removed, the previous checkpoint is untouched") \
        from error


def latest_checkpoint(root: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (``latest``), or None."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a checkpoint directory")
    return path  # complete as published; load_sharded verifies its files


def read_meta(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if (path / LATEST).exists():
        path = latest_checkpoint(path)
    meta = path / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected meta.json and DCP files)")
    return json.loads(meta.read_text())


def _check_config(path: Path, saved: Dict[str, Any], current: Optional[Dict[str, Any]], ignore) -> None:
    if current is None or not saved:
        return
    cur = json.loads(json.dumps(current, sort_keys=True, default=str))
    # a setting the checkpoint does not record was added after it was written: nothing to compare it with
    diff = sorted(k for k in saved if k not in ignore and saved.get(k) != cur.get(k))
    if diff:
        raise ValueError(f"checkpoint {path} was written with a different config: "
                         + ", ".join(f"{k}: {saved.get(k)!r} != {cur.get(k)!r}" for k in diff[:8]))


RUN_LENGTH_KEYS = frozenset({"steps", "log_path", "checkpoint_every", "out_dir", "keep_last"})


def _verified(path: Path) -> Path:
    """The checkpoint to load: ``path`` itself when it is a step directory (it must verify), or for a root the
    newest checkpoint under it that verifies (a warning for each newer one that does not)."""
    if not (path / LATEST).exists():
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint at {path} (expected a step directory or a root with '{LATEST}')")
        error = _verified_on_rank0(path)
        if error:
            raise CorruptCheckpoint(error)
        return path
    newest = path / (path / LATEST).read_text().strip()
    candidates = [newest] + [p for p in sorted(path.glob("step-*"), reverse=True) if p.is_dir() and p != newest]
    errors = []
    for candidate in candidates:
        error = _verified_on_rank0(candidate)
        if error is None:
            if errors:
                warnings.warn("newer checkpoints did not verify, resuming from " + str(candidate) + ": "
                              + "; ".join(errors))
            return candidate
        errors.append(error)
    raise CorruptCheckpoint(f"no checkpoint under {path} verifies: " + "; ".join(errors))


def load_sharded(path: Union[str, Path], model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler=None, config: Optional[Dict[str, Any]] = None, restore_rng: bool = True,
                 ignore: Iterable[str] = ()) -> Dict[str, Any]:
    """Load a checkpoint directory (or a root: its ``latest``) into ``model`` / ``optimizer`` / ``scheduler``
    (call on every rank). Returns {"step", "extra", "config", "path"}. A checkpoint from a different config
    (other than run-length fields and the keys in ``ignore``) is refused, naming the differing keys."""
    path = _verified(Path(path))
    meta = read_meta(path)
    _check_config(path, meta.get("config", {}), config, RUN_LENGTH_KEYS | frozenset(ignore))
    dcp.load({"train": _ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(path))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        rng = path / f"rng-rank{_rank()}.pt"
        if meta["world_size"] == _world() and rng.exists():
            _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        else:
            warnings.warn(f"checkpoint {path} was written by {meta['world_size']} process(es), this run has "
                          f"{_world()}: weights and optimizer are resharded, the RNG streams are not restored")
    return {"step": meta["step"], "extra": meta["extra"], "config": meta.get("config", {}), "path": path}


def export_consolidated(path: Union[str, Path], out_dir: Union[str, Path],
                        base: Optional[Union[str, Path]] = None) -> Path:
    """A checkpoint (or a root: its latest) -> a consolidated directory that ``mmr1.model.load_model`` reads:
    Chameleon / Lumina-mGPT: config.json + model.safetensors in HF names; Janus-Pro: ``base`` (the checkpoint
    directory the run started from, required) with the trained weights in its layout (mmr1.janus.save_janus_into).
    Runs in one process, no process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from .model import ModelConfig, Transformer, save_transformer

    path = Path(path)
    if (path / LATEST).exists():
        path = latest_checkpoint(path)
    error = _verified_on_rank0(path)  # export reads exactly the checkpoint named: no fallback
    if error:
        raise CorruptCheckpoint(error)
    meta = read_meta(path)
    model_cfg = meta.get("config", {}).get("model")
    if not model_cfg:
        raise ValueError(f"checkpoint {path} has no model config in meta.json (was it written by mmr1?)")
    janus = model_cfg.get("model_type") == "mmr1_janus"
    if janus and base is None:
        raise ValueError(f"checkpoint {path} holds a Janus-Pro model: it exports into the layout of the checkpoint "
                         f"the run started from -- pass base (mmr1 export --base <that directory>)")
    if not janus and base is not None:
        raise ValueError(f"checkpoint {path} holds a Chameleon / Lumina-mGPT model: base is for Janus-Pro only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".consolidated.pt"
    try:
        dcp_to_torch_save(str(path), str(scratch))
        state = torch.load(scratch, map_location="cpu", weights_only=False)["train"]["model"]
    finally:
        if scratch.exists():
            scratch.unlink()
    if janus:
        from .janus import Janus, JanusConfig, save_janus_into

        model = Janus(JanusConfig.from_dict(model_cfg))
        model.load_state_dict(state)
        return save_janus_into(model, base, out_dir)
    model = Transformer(ModelConfig(**model_cfg))
    model.load_state_dict(state)
    save_transformer(model, out_dir)
    return out_dir


__all__ = ["save_sharded", "load_sharded", "latest_checkpoint", "read_meta", "export_consolidated",
           "step_dir_name", "verify_checkpoint", "CorruptCheckpoint", "CheckpointWriteError"]
