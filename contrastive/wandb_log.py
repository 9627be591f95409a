"""Weights & Biases mirror of metrics.jsonl (train.log_to: [..., wandb]); a resumed run continues its wandb run."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from contrastive.errors import UserError

# The wandb run id of a run directory: a resume continues the same wandb run instead of starting another.
RUN_ID_FILE = "wandb_run.json"


def check_available(log_to: list[str]) -> None:
    """Before any process group exists: a missing package stops every rank alike, in one line."""
    if "wandb" in log_to and importlib.util.find_spec("wandb") is None:
        raise UserError("train.log_to names wandb but the wandb package is not installed: pip install wandb "
                        "(or drop wandb from train.log_to)")


class WandbMirror:
    """Logs each metrics.jsonl record to a wandb run, plotted against the record's own `step` (wandb's internal
    step only counts calls). Its files go to WANDB_DIR, else RUN_DIR/wandb; WANDB_MODE (offline, disabled),
    WANDB_ENTITY and WANDB_API_KEY come from the environment as wandb reads them."""

    def __init__(self, run_dir: Path, *, project: str, config: dict[str, Any], resuming: bool):
        import wandb

        id_file = Path(run_dir) / RUN_ID_FILE
        run_id = json.loads(id_file.read_text())["id"] if resuming and id_file.is_file() else None
        self.run = wandb.init(project=project, name=Path(run_dir).resolve().name, id=run_id,
                              resume="allow" if run_id else None, dir=os.environ.get("WANDB_DIR") or str(run_dir))
        # A resumed run may have changed settings on purpose (train.steps, train.resume): record the latest ones.
        self.run.config.update(config, allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        # Steps a resume repeats (logged after the checkpoint it starts from) appear twice in wandb's history:
        # rewinding a run is a wandb server feature (resume_from), which offline runs do not have.
        id_file.write_text(json.dumps({"id": self.run.id, "project": project}) + "\n")

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        self.run.finish()
