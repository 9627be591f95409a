"""bench/quality_vs_open_clip.py at equal compute: one probe rule for both sides, plans that fill the budget,
open_clip_train's CSV command line, the step savers listed, and bench/openclip_train.py holding open_clip_train
to a step cap and a deadline (run in-process with the open_clip_train of our .venv, same version as the
baseline's; its CSV loader needs only pandas, not webdataset)."""
import json
import logging
import math
import re
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import openclip_train  # noqa: E402
import quality_vs_open_clip as bench  # noqa: E402


def _cfg(*overrides):
    from contrastive.config import load_config

    return load_config(None, ["model.name=tiny-vit-32", "train.batch_size=8", "optim.lr=0.002",
                              "optim.warmup_steps=2", "data.num_workers=0", "train.seed=5", "model.aug={}",
                              *overrides])


# ---------------------------------------------------------------- the probe rule

def _step_times(*, first: float, fill_until: int, fill: float, steady: float, n: int) -> list[float]:
    """Seconds of each of n steps: a slow first step (worker start), slower steps while a buffer fills."""
    return [first if i == 1 else fill if i <= fill_until else steady for i in range(1, n + 1)]


def test_probe_rule_leaves_out_the_first_window_and_the_fill_for_both_sides():
    times = _step_times(first=5.0, fill_until=12, fill=1.4, steady=0.3, n=40)
    ends = [sum(times[:i]) for i in range(1, len(times) + 1)]
    window = 5
    # Ours logs (step, time_s) every `window` steps; open_clip's wrapper reports every step's end time.
    ours_points = [(k, ends[k - 1]) for k in range(window, 41, window)]
    theirs_points = bench.window_points(ends, window=window)
    assert theirs_points == ours_points
    ours, theirs = (bench.steady_rate(p, fill=12) for p in (ours_points, theirs_points))
    assert ours == theirs
    # Reference: the plain mean of the steps of the windows after the fill (steps 16..40; window 11..15 holds
    # fill steps).
    assert ours["steady_from_step"] == 15
    assert ours["step_s"] == pytest.approx(sum(times[15:]) / 25)
    assert ours["excess_s"] == pytest.approx(ends[14] - 15 * 0.3)
    # The steady rate plus the excess reproduces the whole run: what the plan relies on.
    assert ours["excess_s"] + 40 * ours["step_s"] == pytest.approx(ends[-1])
    # With no fill the first window (worker start) is still left out.
    assert bench.steady_rate(ours_points, fill=0)["steady_from_step"] == window
    # Without the fill rule the estimate is pessimistic (the 1.4 s steps of window 2 and 3 count).
    assert bench.steady_rate(ours_points, fill=0)["step_s"] > 0.3 * 1.2
    # A short last window (the run's end) counts like the others.
    assert bench.window_points(ends[:37], window=5)[-1] == (37, ends[36])
    with pytest.raises(RuntimeError, match="longer probe"):
        bench.steady_rate(ours_points[:3], fill=15)


def test_fill_is_the_larger_buffer_of_the_two_sides_and_open_clips_constant_is_its_own():
    from open_clip_train import data as oc_data

    assert bench.OPENCLIP_SHUFFLE_BUFFER == oc_data._SAMPLE_SHUFFLE_SIZE
    cfg = _cfg("data.num_workers=2", "data.shuffle_buffer=1000", "train.batch_size=256")
    assert bench.fill_steps(cfg, openclip_csv=False) == math.ceil(2 * 5000 / 256)  # open_clip's buffer is larger
    assert bench.fill_steps(cfg, openclip_csv=True) == math.ceil(2 * 1000 / 256)  # its CSV loader has none
    big = _cfg("data.num_workers=0", "data.shuffle_buffer=6000", "train.batch_size=100")
    assert bench.fill_steps(big, openclip_csv=False) == 60


@pytest.mark.parametrize("fill,window,steady", [(0, 5, 20), (12, 5, 20), (40, 5, 20), (3, 1, 2), (7, 4, 3)])
def test_a_probe_of_the_planned_length_measures_at_least_the_steady_steps(fill, window, steady):
    total = bench.probe_length(fill=fill, window=window, steady_steps=steady)
    ends = [0.5 * i for i in range(1, total + 1)]
    rate = bench.steady_rate(bench.window_points(ends, window=window), fill=fill)
    assert rate["steady_steps"] >= max(steady, 2 * window) and rate["steady_from_step"] >= max(fill, window)
    assert rate["step_s"] == pytest.approx(0.5)


def test_plans_fill_the_budget():
    assert bench.plan_steps(100.0, overhead_s=20.0, step_s=0.5) == 160
    assert bench.plan_steps(10.0, overhead_s=30.0, step_s=0.5) == 1
    # CSV: whole passes of rows // batch batches (drop_last); the wrapper's step cap ends the last pass.
    for steps, rows, batch in [(100, 1000, 32), (31, 1000, 32), (32, 1000, 32), (7, 40, 8)]:
        epochs, samples = bench.openclip_epochs_for(steps, batch_size=batch, csv_rows=rows)
        per_epoch = rows // batch
        assert samples == 0 and (epochs - 1) * per_epoch < steps <= epochs * per_epoch
    # Shards: open_clip_train's own count (get_wds_dataset: ceil to batches, then to a multiple of the workers).
    for steps, workers in [(100, 2), (101, 2), (7, 3), (5, 0)]:
        epochs, samples = bench.openclip_epochs_for(steps, batch_size=16, num_workers=workers)
        w = max(1, workers)
        assert epochs == 1 and steps <= math.ceil(math.ceil(samples / 16) / w) * w < steps + w
    with pytest.raises(Exception, match="fewer than one batch"):
        bench.openclip_epochs_for(5, batch_size=64, csv_rows=40)


def test_budget_warnings_outside_five_percent():
    sides = {"ours": {"train_s": 96.0, "stopped": ""}, "open_clip": {"train_s": 94.0, "stopped": ""}}
    (warning,) = bench.budget_warnings(sides, 100.0)
    assert warning.startswith("open_clip trained 94.0 s = 94.0%")
    assert bench.budget_warnings({"x": {"train_s": 104.9}}, 100.0) == []
    assert "105.5%" in bench.budget_warnings({"x": {"train_s": 105.5, "stopped": "deadline"}}, 100.0)[0]


def test_savers_listed_from_the_resolved_config():
    from contrastive.config import TrainConfig, load_config

    has_fit = "fit_steps_to_time" in {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    fit = {"train.fit_steps_to_time": True} if has_fit else {}
    savers = bench.our_savers(_cfg(*(["train.max_time_s=60", "train.fit_steps_to_time=true"] if has_fit else [])))
    assert savers == {"train.dedupe_captions": True, "data.fast_decode": True, **fit}
    none = bench.our_savers(_cfg("train.dedupe_captions=false", "data.fast_decode=false"))
    assert none == {}
    cifar = bench.our_savers(load_config(REPO / "configs" / "cifar10.yaml", []))
    assert cifar["optim.freeze"] == ["^token_embedding"]
    lit = bench.our_savers(load_config(REPO / "configs" / "cifar10_lit.yaml", []))
    assert {k for k, v in lit.items() if k.startswith("model.lock")} >= {"model.lock_text"}


def test_csv_command_line():
    from open_clip_train.params import parse_args

    cfg = _cfg("data.num_workers=1")
    argv = bench.openclip_train_args(cfg, logs=REPO / "runs" / "x", epochs=3, train_csv=REPO / "t.csv")
    a = parse_args(argv)
    assert (a.dataset_type, a.train_data, a.csv_separator, a.csv_img_key, a.csv_caption_key) == (
        "csv", str(REPO / "t.csv"), "\t", "filepath", "title")
    assert a.train_num_samples is None and not a.dataset_resampled and a.epochs == 3
    assert (a.batch_size, a.workers, a.seed, a.lr, a.warmup) == (8, 1, 5, 0.002, 2)
    # The wrapper's own options come off before open_clip_train parses the rest.
    own, rest = openclip_train.split_bench_args(
        argv + bench.budget_args(max_steps=70, deadline_s=60, report=REPO / "r.json"))
    assert own == {"bench_max_steps": 70, "bench_deadline_s": 60.0, "bench_report": str(REPO / "r.json")}
    assert rest == argv


# ---------------------------------------------------------------- open_clip_train held to the budget

def test_step_budget_applies_our_loops_deadline_rule():
    # A fake clock: the loader spends 1 s fetching each batch, the loop 1.5 s on each step.
    now = [0.0]

    def loader():
        for i in range(100):
            now[0] += 1.0
            yield i

    def train(budget, batches):
        taken = []
        for batch in budget.batches(batches):
            taken.append(batch)
            now[0] += 1.5
        return taken

    budget = openclip_train.StepBudget(deadline_s=5.0, clock=lambda: now[0])
    # Batches arrive at 1, 3.5, 6: steps end at 2.5, 5, 7.5. The step ending exactly at the deadline does not stop
    # the run; the batch arriving past it is still taken and is the last, as in our loop (contrastive/train.py).
    assert train(budget, loader()) == [0, 1, 2] and budget.stopped == "deadline"
    assert (budget.report()["steps"], budget.report()["train_s"]) == (3, 7.5)
    assert budget.report()["step_end_s"] == [2.5, 5.0, 7.5]
    capped = openclip_train.StepBudget(max_steps=4, clock=lambda: now[0])
    assert train(capped, range(3)) == [0, 1, 2] and capped.stopped == ""  # an epoch of 3 ends first
    assert train(capped, range(3)) == [0] and capped.stopped == "max_steps"


def _flickr_like_csv(root, *, num_images: int, captions_per_image: int):
    from PIL import Image

    rows = ["filepath\ttitle"]
    for i in range(num_images):
        path = root / f"{i}.jpg"
        Image.new("RGB", (32, 32), ((i * 37) % 256, (i * 91) % 256, 120)).save(path)
        rows += [f"{path}\ta photo number {i}, caption {c}" for c in range(captions_per_image)]
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.fixture()
def run_wrapper(tmp_path, monkeypatch):
    """Run bench/openclip_train.py in this process, undoing what it patches (open_clip_train.main's functions,
    DDP, logging)."""
    import open_clip_train.main as oc_main

    monkeypatch.chdir(tmp_path)
    for name in ("train_one_epoch", "cosine_lr"):
        monkeypatch.setattr(oc_main, name, getattr(oc_main, name))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", torch.nn.parallel.DistributedDataParallel)
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in [None, *logging.root.manager.loggerDict]}

    def run(argv):
        try:
            return openclip_train.run(argv)
        finally:  # open_clip_train's setup_logging sets every logger's level and adds root handlers
            for handler in root.handlers[len(handlers):]:
                handler.close()
            root.handlers[:] = handlers
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)

    yield run


def _lrs(log_text: str) -> list[float]:
    return [float(x) for x in re.findall(r"LR: ([0-9.]+)", log_text)]


def test_wrapper_caps_steps_across_csv_epochs_and_sizes_the_cosine_to_them(tmp_path, run_wrapper):
    cfg = _cfg()
    csv = _flickr_like_csv(tmp_path, num_images=10, captions_per_image=4)  # 40 rows: 5 batches of 8 per epoch
    assert bench.csv_rows(csv) == 40
    steps = 7
    epochs, _ = bench.openclip_epochs_for(steps, batch_size=8, csv_rows=40)
    report = tmp_path / "report.json"
    argv = (bench.openclip_train_args(cfg, logs=tmp_path, epochs=epochs, train_csv=csv, log_every=1)
            + bench.budget_args(max_steps=steps, deadline_s=0.0, report=report))
    assert run_wrapper(argv) is None  # what open_clip_train's main() returns when done
    done = json.loads(report.read_text())
    assert (done["steps"], done["stopped"], done["batches_per_epoch"]) == (7, "max_steps", 5)
    assert len(done["step_end_s"]) == 7 and done["train_s"] == done["step_end_s"][-1]
    ckpt = torch.load(tmp_path / bench.OPENCLIP_NAME / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert ckpt["epoch"] == 2  # the second (cut) epoch saved
    # Logged LRs follow open_clip's cosine over the 7 planned steps (warmup 2), not over 2 epochs x 5 = 10.
    # open_clip logs each step's LR after it, with the scheduler set at that step's start.
    def cosine(step, total):
        if step < 2:
            return 0.002 * (step + 1) / 2
        return 0.5 * (1 + math.cos(math.pi * (step - 2) / (total - 2))) * 0.002

    lrs = _lrs((tmp_path / bench.OPENCLIP_NAME / "out.log").read_text())
    assert lrs == pytest.approx([round(cosine(s, 7), 6) for s in range(7)], abs=1e-6)
    assert lrs != pytest.approx([round(cosine(s, 10), 6) for s in range(7)], abs=1e-6)


def test_wrapper_stops_at_the_deadline_with_a_checkpoint_and_a_clean_exit(tmp_path, run_wrapper):
    cfg = _cfg()
    csv = _flickr_like_csv(tmp_path, num_images=6, captions_per_image=4)  # 3 batches per epoch
    report = tmp_path / "report.json"
    # Deadline 0: the first batch already arrives past it, so one step is taken, then the run saves and ends
    # although 3 epochs were asked for.
    argv = (bench.openclip_train_args(cfg, logs=tmp_path, epochs=3, train_csv=csv, log_every=1)
            + bench.budget_args(max_steps=9, deadline_s=1e-9, report=report))
    assert run_wrapper(argv) is None  # what open_clip_train's main() returns when done
    done = json.loads(report.read_text())
    assert (done["steps"], done["stopped"]) == (1, "deadline")
    ckpt = torch.load(tmp_path / bench.OPENCLIP_NAME / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert len(_lrs((tmp_path / bench.OPENCLIP_NAME / "out.log").read_text())) == 1


def test_retrieval_score_is_the_mean_of_the_six_recalls_from_the_shared_scorer(monkeypatch):
    import contrastive.eval.retrieval as retrieval

    recalls = {k: v for k, v in zip(bench.RECALL_KEYS, (0.1, 0.3, 0.5, 0.2, 0.4, 0.9))}
    calls = []

    def fake_score(bundle, data, *, batch_size, max_samples):
        calls.append((bundle, data, batch_size, max_samples))
        return {**recalls, "num_images": 7}

    monkeypatch.setattr(retrieval, "score_retrieval", fake_score, raising=False)
    out = bench.retrieval_metrics("bundle", "dev.tar", batch_size=50, max_samples=9)
    assert calls == [("bundle", "dev.tar", 50, 9)]
    assert out["mean_recall"] == pytest.approx(2.4 / 6) and out["num_images"] == 7
