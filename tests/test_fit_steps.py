"""train.fit_steps_to_time: the planned steps fill max_time_s on a slow machine (a fake budget clock that each
training step advances), the cosine schedule ends with them, ranks agree on rank 0's plan, and a resume keeps it."""
from __future__ import annotations

import json
import math

import pytest

from contrastive.config import ConfigError, OptimConfig, load_config
from tests.conftest import REPO
from tests.dist import run_ranks

LR, MIN_LR_RATIO = 1e-3, 0.1
MAX_TIME_S, RESERVE_S = 20.0, 2.0
STEP_S, STARTUP_STEPS, STARTUP_STEP_S = 1.0, 2, 4.0  # the first steps pay start-up: 4 s, then 1 s each


def _overrides(tiny_overrides, *extra) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith(("train.steps", "train.log_every", "optim.warmup",
                                                           "train.batch_size"))] + [
        "train.steps=30", "train.batch_size=16", "train.log_every=1", "train.checkpoint_every=100", f"optim.lr={LR}",
        f"optim.min_lr_ratio={MIN_LR_RATIO}", "optim.warmup_steps=10", f"train.max_time_s={MAX_TIME_S}",
        "train.fit_steps_to_time=true", "train.fit_skip_steps=2", "train.fit_measure_steps=4",
        f"train.fit_reserve_s={RESERVE_S}", *extra]


def _slow_machine(train_module, *, costs_s: list[float], stop_after: int = 0) -> dict:
    """Replace train_module's budget clock by one that only training steps advance: step i (of this process)
    costs costs_s[i], the last entry after that. stop_after > 0: a stop request (as SIGTERM) after that step."""
    state = {"now": 100.0, "steps": 0}  # any origin: the loop counts from its start
    real_step = train_module.train_step

    def slow_step(*args, **kwargs):
        if stop_after and state["steps"] >= stop_after:
            kwargs["stop"] = True
        out = real_step(*args, **kwargs)
        state["now"] += costs_s[min(state["steps"], len(costs_s) - 1)]
        state["steps"] += 1
        return out

    train_module.train_step = slow_step
    train_module.budget_clock = lambda: state["now"]
    return state


def _costs(*, hiccup_at: int = -1, hiccup_s: float = 0.0) -> list[float]:
    costs = [STARTUP_STEP_S] * STARTUP_STEPS + [STEP_S] * 30
    if hiccup_at >= 0:
        costs[hiccup_at] += hiccup_s
    return costs


def _steps_that_fit(costs_s: list[float], budget_s: float) -> int:
    """The reference plan, by walking the time line: the most steps whose summed cost stays within budget_s."""
    total, n = 0.0, 0
    while total + costs_s[min(n, len(costs_s) - 1)] <= budget_s:
        total += costs_s[min(n, len(costs_s) - 1)]
        n += 1
    return n


def _cosine_lr(step: int, *, total: int, warmup: int) -> float:
    """The lr after `step` steps (what the scheduler holds for the next one), written from the formula."""
    if step < warmup:
        return LR * (step + 1) / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * (1 + math.cos(math.pi * t)) / 2)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_lrs(run) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in _records(run) if "loss" in r}


def _state(run) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / latest / "state.json").read_text())


@pytest.fixture()
def train_slowly(monkeypatch):
    """train() on the fake slow machine of _slow_machine: (run_dir, overrides, costs_s=_costs(), stop_after=0)."""
    import contrastive.train as train_module

    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "budget_clock", train_module.budget_clock)
    monkeypatch.setattr(train_module, "train_step", real_step)

    def run(run_dir, overrides: list[str], *, costs_s: list[float] | None = None, stop_after: int = 0):
        train_module.train_step = real_step
        _slow_machine(train_module, costs_s=costs_s or _costs(), stop_after=stop_after)
        return train_module.train(load_config(None, overrides), run_dir, progress=False)

    return run


def test_planned_steps_fill_the_budget_and_the_schedule_ends_with_them(tmp_path, tiny_overrides, train_slowly):
    expected = _steps_that_fit(_costs(), MAX_TIME_S - RESERVE_S)
    assert 8 < expected < 30  # the upper bound train.steps=30 does not decide it
    run = tmp_path / "run"
    result = train_slowly(run, _overrides(tiny_overrides))

    assert (result.step, result.preempted) == (expected, False)
    (plan_record,) = [r for r in _records(run) if "planned_steps" in r]
    # Measured after the start-up steps (2) over 4 steps: 1 s each, not the 2 s average of the first 6.
    assert plan_record["planned_steps"] == expected and plan_record["step_time_s"] == pytest.approx(STEP_S)
    assert plan_record["step"] == 6
    assert json.loads((run / "step_plan.json").read_text())["steps"] == expected
    state = _state(run)
    assert state["step"] == expected and state["time_s"] <= MAX_TIME_S and state["step_plan"]["steps"] == expected
    # Fitted within the warmup (10 steps): the plain cosine over the planned steps, ending at its floor.
    lrs = _train_lrs(run)
    assert list(lrs) == list(range(1, expected + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(_cosine_lr(step, total=expected, warmup=10), rel=1e-6), step
    assert lrs[expected] == pytest.approx(LR * MIN_LR_RATIO)


def test_without_the_fit_the_same_machine_cuts_the_schedule(tmp_path, tiny_overrides, train_slowly):
    """The problem the fit solves, on the same fake machine: train.steps=30 planned, max_time_s stops it early."""
    run = tmp_path / "run"
    result = train_slowly(run, _overrides(tiny_overrides, "train.fit_steps_to_time=false"))
    assert result.preempted and result.step < 30
    assert _train_lrs(run)[result.step] > 2 * LR * MIN_LR_RATIO  # cut part way down the cosine


def test_a_fit_after_the_warmup_bends_the_cosine_without_a_jump(tmp_path, tiny_overrides, train_slowly):
    run = tmp_path / "run"
    result = train_slowly(run, _overrides(tiny_overrides, "optim.warmup_steps=3"))
    lrs = _train_lrs(run)
    # Until the fit at step 6 the cosine over train.steps=30; then from there down to its floor at the plan.
    for step in range(1, 7):
        assert lrs[step] == pytest.approx(_cosine_lr(step, total=30, warmup=3), rel=1e-6), step
    # From the fit on, the cosine's progress goes on from where it stood (3/27 of the way) to 1 at the plan.
    planned, at_fit = result.step, (6 - 3) / (30 - 3)
    for step in range(6, planned + 1):
        progress = at_fit + (1 - at_fit) * (step - 6) / (planned - 6)
        expected = LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * (1 + math.cos(math.pi * progress)) / 2)
        assert lrs[step] == pytest.approx(expected, rel=1e-6), step
    after = [lrs[s] for s in range(3, planned + 1)]
    assert all(a > b for a, b in zip(after, after[1:])) and not result.preempted
    assert lrs[planned] == pytest.approx(LR * MIN_LR_RATIO)


def test_with_sync_every_the_step_time_is_measured_at_steps_the_host_read(tmp_path, tiny_overrides, train_slowly):
    """train.sync_every=3: between reads the host runs ahead of the device, so the window runs from the first read
    step after the skipped ones (3) to the first read step 4 steps later (9), not from step 2 to step 6."""
    run = tmp_path / "run"
    result = train_slowly(run, _overrides(tiny_overrides, "train.sync_every=3", "train.log_every=3"))
    (plan_record,) = [r for r in _records(run) if "planned_steps" in r]
    assert plan_record["step"] == 9 and plan_record["step_time_s"] == pytest.approx(STEP_S)
    assert result.step == plan_record["planned_steps"] == _steps_that_fit(_costs(), MAX_TIME_S - RESERVE_S)


def test_a_resume_keeps_the_plan_and_the_lr_of_every_step(tmp_path, tiny_overrides, train_slowly):
    ref = train_slowly(tmp_path / "uninterrupted", _overrides(tiny_overrides))
    run = tmp_path / "interrupted"
    first = train_slowly(run, _overrides(tiny_overrides), stop_after=8)  # stopped after the fit (step 6)
    assert first.preempted and first.step == 9 and _state(run)["step_plan"]["steps"] == ref.step
    # The resumed process measures nothing new: it restarts slower (its own start-up), which a refit would see.
    second = train_slowly(run, _overrides(tiny_overrides, "train.resume=latest"), costs_s=[1.2] * 3 + [STEP_S])
    assert (second.step, second.preempted) == (ref.step, False)
    assert _train_lrs(run) == _train_lrs(tmp_path / "uninterrupted")
    assert [r["planned_steps"] for r in _records(run) if "planned_steps" in r] == [ref.step]


def _rank_body(rank, world_size, overrides, run_dir):
    import contrastive.train as train_module

    # Rank 1's clock sees a 1 s hiccup inside the measured steps: alone it would plan fewer steps than rank 0.
    _slow_machine(train_module, costs_s=_costs(hiccup_at=4 if rank == 1 else -1, hiccup_s=1.0))
    result = train_module.train(load_config(None, overrides), run_dir, progress=False)
    return {"step": result.step, "preempted": result.preempted}


def test_two_ranks_adopt_rank_0s_plan_and_stop_together(tmp_path, tiny_overrides):
    expected = _steps_that_fit(_costs(), MAX_TIME_S - RESERVE_S)
    assert _steps_that_fit(_costs(hiccup_at=4, hiccup_s=1.0), MAX_TIME_S - RESERVE_S) < expected
    run = tmp_path / "run"
    results = run_ranks(_rank_body, world_size=2, args=(_overrides(tiny_overrides), run), timeout_s=60)
    assert results == [{"step": expected, "preempted": False}] * 2
    (plan_record,) = [r for r in _records(run) if "planned_steps" in r]
    assert plan_record["planned_steps"] == expected == _state(run)["step_plan"]["steps"]


def test_the_schedule_is_continuous_at_a_fit_and_ends_at_the_plan():
    from contrastive.step_plan import StepPlan, lr_lambda

    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.0)
    for fitted_at in (4, 10, 30):
        plan = StepPlan.configured(100)
        f = lr_lambda(cfg, plan)
        before = [f(s) for s in range(fitted_at + 1)]
        plan.fit(steps=60, at_step=fitted_at, step_time_s=1.0)
        assert [f(s) for s in range(fitted_at + 1)] == before  # the past (and the lr of the next step) unchanged
        assert f(60) == pytest.approx(0.0, abs=1e-12) and f(59) > 0
        assert all(f(s) >= f(s + 1) for s in range(10, 70))
    plain = lr_lambda(cfg, 60)
    within = StepPlan.configured(100)
    within.fit(steps=60, at_step=4, step_time_s=1.0)
    assert all(lr_lambda(cfg, within)(s) == pytest.approx(plain(s)) for s in range(70))


def test_fit_steps_to_time_is_validated():
    with pytest.raises(ConfigError, match="max_time_s"):
        load_config(None, ["train.fit_steps_to_time=true"])
    with pytest.raises(ConfigError, match="fit_measure_steps"):
        load_config(None, ["train.fit_steps_to_time=true", "train.max_time_s=60", "train.fit_measure_steps=0"])
    with pytest.raises(ConfigError, match="fit_reserve_s"):
        load_config(None, ["train.fit_steps_to_time=true", "train.max_time_s=60", "train.fit_reserve_s=60"])
    assert load_config(None, ["train.fit_steps_to_time=true", "train.max_time_s=60"]).train.fit_reserve_s is None


def test_every_time_budgeted_recipe_fits_its_steps_to_its_budget():
    budgeted = [p.name for p in sorted((REPO / "configs").glob("*.yaml")) if load_config(p).train.max_time_s]
    assert budgeted and all(load_config(REPO / "configs" / name).train.fit_steps_to_time for name in budgeted), budgeted


def _lr_at(progress: float) -> float:
    return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * (1 + math.cos(math.pi * progress)) / 2)


# Steps that get faster after the first window (a locked tower's feature cache filling up): start-up, 4 steps of
# 2 s, then 0.5 s each. Fitted on the first window alone the plan would leave most of a 40 s budget unused.
FASTER_COSTS = [STARTUP_STEP_S] * STARTUP_STEPS + [2.0] * 4 + [0.5] * 100
REFIT = ("train.max_time_s=40", "train.steps=100", "optim.warmup_steps=3")


def test_steps_that_get_faster_are_refitted_and_fill_the_budget(tmp_path, tiny_overrides, train_slowly):
    expected = _steps_that_fit(FASTER_COSTS, 40 - RESERVE_S)
    assert expected == 50
    run = tmp_path / "run"
    result = train_slowly(run, _overrides(tiny_overrides, *REFIT), costs_s=FASTER_COSTS)
    assert (result.step, result.preempted) == (expected, False)
    fits = [(r["step"], r["planned_steps"], r["fit"]) for r in _records(run) if "planned_steps" in r]
    # Each window reports the median of the last three windows' step times: the first fit at step 6 from the slow
    # window (6 + 22 s / 2 s), at step 10 from the median of 2 s and 0.5 s (10 + 20 s / 1.25 s), at step 14 from
    # the fast steps' 0.5 s (14 + 18 s / 0.5 s); the windows after it agree with the plan, so nothing more.
    assert fits == [(6, 17, 1), (10, 26, 2), (14, expected, 3)]
    assert _state(run)["step_plan"]["steps"] == expected and _state(run)["time_s"] <= 40
    # The cosine bends at each fit from where it stands, without a jump, and ends at its floor with the budget.
    lrs, first = _train_lrs(run), (6 - 3) / (100 - 3)
    second = first + (1 - first) * (10 - 6) / (17 - 6)
    third = second + (1 - second) * (14 - 10) / (26 - 10)
    for lo, hi, at, total, start in ((6, 10, 6, 17, first), (10, 14, 10, 26, second), (14, expected + 1, 14, expected, third)):
        for step in range(lo, hi):
            assert lrs[step] == pytest.approx(_lr_at(start + (1 - start) * (step - at) / (total - at)), rel=1e-6), step
    after = [lrs[s] for s in range(3, expected + 1)]
    assert all(a > b for a, b in zip(after, after[1:]))
    assert lrs[expected] == pytest.approx(LR * MIN_LR_RATIO)


def test_one_slow_window_is_not_taken_for_the_rest_of_the_run(tmp_path, tiny_overrides, train_slowly):
    """A passing load on the machine (one window of 3 s steps among 1 s ones): the plan gives up the seconds it
    lost, at the recent median of 1 s a step, instead of planning the rest at 3 s and bending the cosine twice
    (last window alone: 52 -> 24 at step 14, back to 44 at step 18)."""
    costs = [STARTUP_STEP_S] * STARTUP_STEPS + [1.0] * 8 + [3.0] * 4 + [1.0] * 100
    run = tmp_path / "run"
    result = train_slowly(run, _overrides(tiny_overrides, "train.max_time_s=60", "train.steps=100"), costs_s=costs)
    assert [(r["step"], r["planned_steps"]) for r in _records(run) if "planned_steps" in r] == [(6, 52), (14, 44)]
    assert result.step == 44 == _steps_that_fit(costs, 60 - RESERVE_S)


def test_without_refits_faster_steps_leave_the_budget_unused(tmp_path, tiny_overrides, train_slowly):
    run = tmp_path / "run"
    result = train_slowly(run, _overrides(tiny_overrides, *REFIT, "train.fit_refit=false"), costs_s=FASTER_COSTS)
    assert result.step == 17 and _state(run)["time_s"] < 25
    assert [r["planned_steps"] for r in _records(run) if "planned_steps" in r] == [17]


def test_a_refit_keeps_the_schedule_continuous():
    from contrastive.step_plan import StepPlan, lr_lambda

    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.0)
    plan = StepPlan.configured(1000)
    f = lr_lambda(cfg, plan)
    plan.fit(steps=100, at_step=20, step_time_s=1.0, warmup_steps=10)
    for at, steps in ((40, 300), (120, 150), (130, 131)):
        before = f(at)
        plan.fit(steps=steps, at_step=at, step_time_s=1.0, warmup_steps=10)
        assert f(at) == pytest.approx(before, rel=1e-12)  # no jump where the plan changes
        assert f(steps) == pytest.approx(0.0, abs=1e-12) and all(f(s) >= f(s + 1) for s in range(at, steps + 5))
    saved = plan.to_json()
    restored = StepPlan.configured(1000)
    restored.restore(saved, max_steps=1000)
    assert restored == plan
    old = {k: v for k, v in saved.items() if k not in ("anchor_progress", "fits")}  # a checkpoint before refits
    StepPlan.configured(1000).restore(old, max_steps=1000)
