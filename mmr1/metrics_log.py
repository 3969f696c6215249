"""One JSONL metrics writer for the trainers, the recipe and the demo."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union


class MetricsLog:
    """Appends one JSON object per line to ``path`` on rank 0 only (a resumed run continues the same file);
    ``path=None`` writes nothing. Values JSON cannot hold natively (tensors, numpy scalars) are written as floats."""

    def __init__(self, path: Optional[Union[str, Path]], rank: int = 0):
        self.path = None if path is None else Path(path)
        self.rank = rank

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None or self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


__all__ = ["MetricsLog"]
