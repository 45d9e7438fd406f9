"""Training metrics to ``metrics.jsonl`` (one JSON object per line, each with ``step``) and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from clip_med.core.io import write_text_atomic

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3),
                  **{f"{prefix}/{key}": value for key, value in values.items()}}
        # An append-only stream, on purpose not atomic_write: readers parse it line by line and skip a last
        # line cut short by a kill (_parse); drop_after rewrites it atomically.
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def drop_after(self, step: int) -> None:
        """Forget lines past ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                record = _parse(line)
                if record is not None and record.get("step", 0) <= step:
                    kept.append(json.dumps(record) + "\n")
        write_text_atomic(self.path, "".join(kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _parse(line: str) -> dict[str, Any] | None:
    """One metrics line, or None for a blank one or one cut short by a killed process."""
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        log.warning("ignoring an incomplete line in metrics.jsonl (written when a run was killed): %.80s", line)
        return None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [record for line in handle if (record := _parse(line)) is not None]
