"""Run open_clip's own trainer (open_clip_train.main) with this repo's model configs registered.

open_clip_train only knows registered model names; configs/models/*.json use open_clip's schema, so adding that
folder to open_clip's registry before main() lets `--model tiny-vit-32` (or any of ours) build the same
architecture our trainer builds. Every other argument goes to open_clip_train unchanged:

    bench/.venv-openclip/bin/python bench/openclip_train.py --model tiny-vit-32 --train-data ... [open_clip_train args]

Several ranks on CPUs (gloo), e.g. for bench/train_throughput.py; the `--` keeps torchrun's own parser away
from open_clip_train's `--logs` (torchrun reads it as an abbreviation of its `--logs-specs`):

    torchrun --nproc-per-node 2 bench/openclip_train.py -- --device cpu --model tiny-vit-32 ...

open_clip_train 3.3 already starts gloo for `--device cpu` and leaves the device alone there, but then wraps
the model as DistributedDataParallel(model, device_ids=[torch.device('cpu')]), which torch refuses ("device_ids
... only work with ... GPU modules"). For CPU modules DDP wants device_ids=None and does the same thing with
it (one replica, gradients all-reduced in buckets during backward), so `run` drops a device_ids list made only
of CPU devices; GPU runs are untouched.

bench/quality_vs_open_clip.py holds open_clip_train to the budget our trainer gets, through options of this
wrapper (taken out before open_clip_train parses the rest):

    --bench-max-steps N   stop after N optimizer steps, and size the cosine schedule to N steps (open_clip_train
                          sizes it to whole epochs: batches per epoch x --epochs)
    --bench-deadline-s T  stop at the step whose batch arrives T seconds or more after training started (the
                          first train_one_epoch call), as our loop's train.max_time_s does
    --bench-report FILE   write {steps, train_s, stopped, batches_per_epoch, step_end_s} there as JSON

A stop ends the epoch in progress early, so open_clip_train's own end-of-epoch code saves the checkpoint
(--save-most-recent writes epoch_latest.pt); the next epoch then does not start.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


def allow_ddp_on_cpu() -> None:
    """Make torch.nn.parallel.DistributedDataParallel accept device_ids=[cpu] (as device_ids=None)."""
    import torch

    ddp = torch.nn.parallel.DistributedDataParallel
    if getattr(ddp, "_drops_cpu_device_ids", False):
        return

    class CpuTolerantDDP(ddp):
        _drops_cpu_device_ids = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuTolerantDDP


class BudgetSpent(Exception):
    """Raised at the start of an epoch after the step budget ran out (the previous epoch has saved)."""


class StepBudget:
    """Counts open_clip_train's steps and ends its epochs at the step cap or the deadline.

    Deadline rule (our loop's, contrastive/train.py): a step whose batch arrives at or after the deadline is
    still taken, and is the last. A step ends when the loop asks for the next batch (after its optimizer step
    and logging); step_end_s holds those times from the first epoch's start."""

    def __init__(self, *, max_steps: int = 0, deadline_s: float = 0.0, clock=time.perf_counter):
        self.max_steps, self.deadline_s, self.clock = max_steps, deadline_s, clock
        self.start: float | None = None
        self.step_end_s: list[float] = []
        self.stopped = ""  # "", "max_steps" or "deadline"
        self.batches_per_epoch = 0

    def batches(self, dataloader):
        if self.start is None:
            self.start = self.clock()
        for batch in dataloader:
            last = bool(self.deadline_s) and self.clock() - self.start >= self.deadline_s
            yield batch
            self.step_end_s.append(self.clock() - self.start)
            if last:
                self.stopped = "deadline"
                return
            if self.max_steps and len(self.step_end_s) >= self.max_steps:
                self.stopped = "max_steps"
                return

    def report(self) -> dict:
        return {"steps": len(self.step_end_s), "train_s": round(self.step_end_s[-1], 4) if self.step_end_s else 0.0,
                "stopped": self.stopped, "batches_per_epoch": self.batches_per_epoch,
                "max_steps": self.max_steps, "deadline_s": self.deadline_s,
                "step_end_s": [round(t, 4) for t in self.step_end_s]}


class _BudgetedLoader:
    """open_clip_train's DataLoader as train_one_epoch sees it (num_batches, num_samples kept), cut by `budget`."""

    def __init__(self, loader, budget: StepBudget):
        self._loader, self._budget = loader, budget

    def __iter__(self):
        return self._budget.batches(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def install_budget(budget: StepBudget) -> None:
    """Patch open_clip_train.main (which imported these names) so `budget` caps its steps, its deadline and,
    with a step cap, the length of its cosine schedule."""
    import open_clip_train.main as oc_main

    train_one_epoch, cosine_lr = oc_main.train_one_epoch, oc_main.cosine_lr

    def budgeted_epoch(model, data, *args, **kwargs):
        if budget.stopped:
            raise BudgetSpent
        info = data["train"]
        loader = info.dataloader
        budget.batches_per_epoch = loader.num_batches
        info.dataloader = _BudgetedLoader(loader, budget)
        try:
            return train_one_epoch(model, data, *args, **kwargs)
        finally:
            info.dataloader = loader

    def planned_cosine(optimizer, base_lr, warmup_length, steps):
        return cosine_lr(optimizer, base_lr, warmup_length, budget.max_steps or steps)

    oc_main.train_one_epoch = budgeted_epoch
    oc_main.cosine_lr = planned_cosine


def split_bench_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(this wrapper's --bench-* options, open_clip_train's arguments)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--bench-max-steps", type=int, default=0)
    parser.add_argument("--bench-deadline-s", type=float, default=0.0)
    parser.add_argument("--bench-report", default="")
    ours, rest = parser.parse_known_args(argv)
    return vars(ours), rest


def run(argv: list[str]):
    import open_clip
    from open_clip_train.main import main

    if argv[:1] == ["--"]:
        argv = argv[1:]
    bench, argv = split_bench_args(argv)
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    sys.path.insert(0, str(MODEL_CONFIG_DIR.parent.parent))
    import contrastive.towers  # noqa: F401  (our timm trunks, convnet_*, which some of configs/models name)

    allow_ddp_on_cpu()
    budget = None
    if bench["bench_max_steps"] or bench["bench_deadline_s"] or bench["bench_report"]:
        budget = StepBudget(max_steps=bench["bench_max_steps"], deadline_s=bench["bench_deadline_s"])
        install_budget(budget)
    try:
        return main(argv)
    except BudgetSpent:  # as main() ends after its last epoch
        return None
    finally:
        if budget is not None and bench["bench_report"]:
            Path(bench["bench_report"]).write_text(json.dumps(budget.report()))


if __name__ == "__main__":
    result = run(sys.argv[1:])
    sys.exit(1 if result == -1 else 0)  # main() returns -1 for "experiment already exists" and similar
