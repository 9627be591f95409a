"""The guard on a run directory: a new run never writes into another run's directory by mistake."""
from __future__ import annotations

from pathlib import Path

from contrastive.errors import UserError


def refuse_reused_run_dir(run_dir: Path, *, resume: str) -> None:
    """Refuse to start a new run (no train.resume) in a run directory that holds anything: it would append to the
    earlier run's metrics.jsonl and TensorBoard logs and put its checkpoints beside (and `latest` over) the earlier
    run's. Checked on every rank before any rank writes (rank 0 writes only after the process group is up)."""
    if resume:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file: write the run to a new or empty directory (--out)")
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise UserError(f"run directory {run_dir} is not empty ({shown}): continue that run with train.resume=latest, "
                        f"or write this one to a new or empty directory (--out)")
