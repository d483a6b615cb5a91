"""Run outputs: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf literals
    return value


class MetricsLogger:
    """Appends ``{"step": s, "train/loss": ..., ...}`` lines and mirrors scalars to TensorBoard.

    Only the process that owns the run directory (process 0) should create one.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        # Wall-clock time (seconds since the epoch) lets reports plot curves against time
        # across resumes; TensorBoard records its own.
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, int(step))

    def text(self, step: int, tag: str, text: str) -> None:
        """A text record (e.g. a sample) into ``<tag>s.jsonl`` and TensorBoard."""
        path = self.path.parent / f"{tag}s.jsonl"
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), tag: text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def histogram(self, step: int, tag: str, values: Any) -> None:
        """A TensorBoard histogram (no-op without TensorBoard)."""
        if self._tb is not None:
            self._tb.add_histogram(tag, values, int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path, name: str = "metrics") -> list[dict[str, Any]]:
    """All records of a run's ``<name>.jsonl`` (``metrics`` or ``samples``); [] if absent."""
    path = Path(run_dir) / f"{name}.jsonl"
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
