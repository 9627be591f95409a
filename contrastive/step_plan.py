"""The run's planned total steps and the LR schedule over them; train.fit_steps_to_time fits the plan to max_time_s.

The plan starts as train.steps. With train.fit_steps_to_time, StepTimer measures the seconds per step early in the
run and rank 0 plans the steps that fit in what is left of train.max_time_s (fit_steps); every rank adopts rank
0's plan, the checkpoint saves it (state.json "step_plan") and a resume restores it, so the schedule of a resumed
run is the uninterrupted run's. The timer goes on measuring windows of the same length, and the plan is fitted
again where a window's step time moves the planned end by more than half of train.fit_reserve_s (steps that get
faster once a locked tower's feature cache is full, a machine that gets busier): the cosine bends again from
where it stands, so the schedule still ends with the budget.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from dataclasses import dataclass

from contrastive.config import OptimConfig, TrainConfig

RESERVE_FRACTION = 0.05  # of max_time_s, when train.fit_reserve_s is None


@dataclass
class StepPlan:
    """The schedule's total steps. `fitted_at` > 0: fitted to the time budget after that many steps, when the
    schedule had run on `configured_steps` (train.steps then) until it."""

    steps: int
    configured_steps: int
    fitted_at: int = 0
    step_time_s: float = 0.0
    # How far the cosine stood at max(fitted_at, warmup) when the plan was last fitted, and how many fits.
    anchor_progress: float = 0.0
    fits: int = 0

    @classmethod
    def configured(cls, steps: int) -> "StepPlan":
        return cls(steps=steps, configured_steps=steps)

    def fit(self, *, steps: int, at_step: int, step_time_s: float, warmup_steps: int = 0) -> None:
        """Plan `steps` in total from `at_step` on (again, if fitted before: from where the cosine stands)."""
        assert steps > at_step >= self.fitted_at, (steps, at_step, self.fitted_at)
        anchor_progress = self.cosine_progress(max(at_step, warmup_steps), warmup_steps) if self.fitted_at else 0.0
        self.steps, self.fitted_at, self.step_time_s = steps, at_step, step_time_s
        self.anchor_progress, self.fits = anchor_progress, self.fits + 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def restore(self, saved: dict, *, max_steps: int) -> None:
        """Adopt a checkpoint's plan; a lower train.steps on resume still caps it."""
        for f in dataclasses.fields(self):  # fields a checkpoint from before refits lacks keep their defaults
            if f.name in saved:
                setattr(self, f.name, type(getattr(self, f.name))(saved[f.name]))
        self.steps = min(self.steps, max_steps)

    def cosine_progress(self, step: int, warmup_steps: int) -> float:
        """How far (0..1) the cosine part of the schedule is at `step` (>= warmup_steps). Before the fit it runs
        over configured_steps; from the fit on it goes from where it stood to 1 at `steps`, so the factor is
        continuous at the fit (a fit within the warmup gives the plain cosine over `steps`). A refit anchors at
        the progress the previous fit had reached there (`anchor_progress`); steps before the last fit are the
        past, which the scheduler never asks for again (for a first fit they are exact)."""
        anchor = max(self.fitted_at, warmup_steps)
        before = min(1.0, (step - warmup_steps) / max(1, self.configured_steps - warmup_steps))
        if not self.fitted_at or step < anchor:
            return before
        at_anchor = (self.anchor_progress if self.fits > 1 else
                     min(1.0, (anchor - warmup_steps) / max(1, self.configured_steps - warmup_steps)))
        return min(1.0, at_anchor + (1 - at_anchor) * (step - anchor) / max(1, self.steps - anchor))


def lr_lambda(cfg: OptimConfig, total_steps: int | StepPlan):
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at the plan's total steps (an int: a
    fixed plan). A plain function, which torch's LambdaLR leaves out of its state_dict: the plan is saved by us."""
    plan = total_steps if isinstance(total_steps, StepPlan) else StepPlan.configured(total_steps)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = plan.cosine_progress(step, cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def reserve_s(cfg: TrainConfig) -> float:
    return cfg.max_time_s * RESERVE_FRACTION if cfg.fit_reserve_s is None else cfg.fit_reserve_s


def fit_steps(*, step: int, elapsed_s: float, step_time_s: float, cfg: TrainConfig) -> int:
    """The planned total after `step` steps and `elapsed_s` seconds of the budget: the steps of `step_time_s` that
    fit before max_time_s - reserve, at least one more (so the last step's checkpoint and evaluation run), at
    most train.steps."""
    if step_time_s <= 0:
        return cfg.steps
    left = cfg.max_time_s - reserve_s(cfg) - elapsed_s
    return max(step + 1, min(cfg.steps, step + math.floor(left / step_time_s)))


def worth_refitting(plan: StepPlan, *, planned: int, step_time_s: float, cfg: TrainConfig) -> bool:
    """Whether to adopt `planned`: always the first time; after that, with train.fit_refit, when it moves the
    planned end by more than half the reserve (smaller errors the reserve absorbs, and each refit bends the
    cosine once more)."""
    return not plan.fitted_at or (cfg.fit_refit and abs(planned - plan.steps) * step_time_s > reserve_s(cfg) / 2)


class StepTimer:
    """Seconds per step over consecutive windows of train.fit_measure_steps steps, after train.fit_skip_steps
    steps of this process (start-up, compilation, first batches). Fed at steps where the host has waited for
    the device, with the budget's elapsed seconds and the seconds spent in checkpoints and evaluations so far
    (left out). Each window reports the median of the last RECENT_WINDOWS windows' step times: one window slowed
    by a passing load on the machine does not move the plan, a lasting change (a full cache) does, a window
    later."""

    RECENT_WINDOWS = 3

    def __init__(self, cfg: TrainConfig, *, first_step: int):
        self.skip_until = first_step + cfg.fit_skip_steps
        self.measure_steps = cfg.fit_measure_steps
        self.start: tuple[int, float] | None = None
        self.recent: collections.deque[float] = collections.deque(maxlen=self.RECENT_WINDOWS)

    def observe(self, step: int, *, elapsed_s: float, overhead_s: float) -> float | None:
        """At each step that completes a window, the median step time of the recent windows; else None."""
        if self.start is None:
            if step >= self.skip_until:
                self.start = (step, elapsed_s - overhead_s)
            return None
        start_step, start_s = self.start
        if step - start_step < self.measure_steps:
            return None
        self.start = (step, elapsed_s - overhead_s)
        self.recent.append((elapsed_s - overhead_s - start_s) / (step - start_step))
        return statistics.median(self.recent)
