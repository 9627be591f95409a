"""The run directory: a new run refuses another run's directory; a resume repairs metrics.jsonl and TensorBoard."""
from __future__ import annotations

import json

from contrastive.cli import main
from contrastive.metrics import MetricsLogger
from tests.conftest import REPO


def _train(run, overrides, capsys) -> tuple[int, str]:
    code = main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(run), *overrides])
    return code, capsys.readouterr().err.strip()


def test_a_new_run_refuses_a_run_directory_that_holds_anything(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert _train(run, [*tiny_overrides, "train.steps=1"], capsys)[0] == 0  # an empty directory is a new run's
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = _train(run, [*tiny_overrides, "train.steps=1"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"run directory {run} is not empty" in err and "train.resume=latest" in err and "--out" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written, nothing mixed
    (tmp_path / "notes.txt").write_text("mine")
    code, err = _train(tmp_path / "notes.txt", tiny_overrides, capsys)
    assert code == 2 and "is a file" in err and (tmp_path / "notes.txt").read_text() == "mine"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_resume_drops_a_record_cut_short_and_the_records_after_its_checkpoint(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3, 4):
        logger.log({"step": step, "loss": 5.0 - step})
    line = json.dumps({"step": 5, "loss": 0.5})
    with logger.path.open("a") as f:
        f.write(line[:len(line) // 2])  # the kill's half line, no newline
    MetricsLogger(tmp_path, tensorboard=False).resume_at(3)
    assert _records(logger.path) == [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3)]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dropped 1 unreadable line(s)" in err and "line 5" in err
    resumed = MetricsLogger(tmp_path, tensorboard=False)
    resumed.resume_at(3)  # a second resume finds a clean file and says nothing
    resumed.log({"step": 4, "loss": 9.0})
    assert [r["step"] for r in _records(logger.path)] == [1, 2, 3, 4] and capsys.readouterr().err == ""


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """The resumed run writes steps 3 and 4 again into a new event file; TensorBoard's reader (which purges by
    the SessionLog.START event that SummaryWriter's purge_step writes) must show the resumed values only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path)
    for step in (1, 2, 3, 4):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path)
    resumed.resume_at(2)
    for step in (3, 4, 5):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0),
                                                                  (5, 50.0)]
