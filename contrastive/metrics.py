"""Run metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends to metrics.jsonl (so a resumed run keeps its history); only the main rank writes."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True, mirrors: tuple = ()):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._mirrors = mirrors  # more sinks for each record (log and close), e.g. wandb_log.WandbMirror
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resumed run starts from)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        for mirror in self._mirrors:
            mirror.log(clean)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for mirror in self._mirrors:
            mirror.close()
