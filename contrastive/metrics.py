"""Run metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, mirrored to TensorBoard."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from contrastive.faults import fault_point


class MetricsLogger:
    """Appends to metrics.jsonl (so a resumed run keeps its history); only the main rank writes."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True, mirrors: tuple = ()):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb_dir = run_dir / "tensorboard"
        self._tb = self._summary_writer = None
        self._mirrors = mirrors  # more sinks for each record (log and close), e.g. wandb_log.WandbMirror
        if enabled and tensorboard:
            try:  # imported here, not at the first record, whose step time train.fit_steps_to_time may measure
                from torch.utils.tensorboard import SummaryWriter

                self._summary_writer = SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                pass

    def resume_at(self, step: int) -> None:
        """Continue a run from its checkpoint at `step` (0: from the start): drop the records written after it, and
        any line a kill or a full disk cut short, which would make the file unreadable JSONL; tell TensorBoard
        to hide the events of steps after it (its purge_step), which the resumed run writes again."""
        if self.enabled and self.path.is_file():
            kept, dropped = [], []
            for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    dropped.append(number)
                    continue
                if record is not None and record.get("step", 0) <= step:
                    kept.append(line)
            if dropped:
                print(f"resume: dropped {len(dropped)} unreadable line(s) of {self.path} (line "
                      f"{', '.join(map(str, dropped[:3]))}: a record cut short by a kill or a full disk)",
                      file=sys.stderr, flush=True)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self._open_tensorboard(purge_step=step + 1)

    def _open_tensorboard(self, *, purge_step: int | None = None) -> None:
        if self._tb is None and self._summary_writer is not None:
            self._tb = self._summary_writer(str(self._tb_dir), purge_step=purge_step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(clean) + "\n"
        with self.path.open("a") as f:
            # In two writes with the fault point between: a test's kill there leaves half a line on disk, as a
            # kill or a full disk can in the middle of one write (resume_at drops it).
            f.write(line[:len(line) // 2])
            f.flush()
            fault_point("metrics.write")
            f.write(line[len(line) // 2:])
        self._open_tensorboard()
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
