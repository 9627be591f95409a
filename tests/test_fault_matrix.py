"""The fault matrix (README "Reliability"): each fault injected into a tiny run, each ending either in an exact
resume (the losses of metrics.jsonl equal those of one uninterrupted run, step for step) or in one clear line with
the previous checkpoint intact.

Every run is a `contrastive train` process forked from one server that imported the heavy modules once
(tests/forked_runs.py), so a kill is a real SIGKILL of a real process. Faults inside the code go through
contrastive.faults (CONTRASTIVE_FAULT): the checkpoint save's points and the metrics writer's.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import tarfile
import time
from pathlib import Path

import pytest

from contrastive.faults import fault_point
from contrastive.eval.zeroshot import ZeroShotEvaluator
from tests.conftest import REPO
from tests.forked_runs import ForkServer

STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 24, 3, 8
ERROR = "contrastive train: error:"


class ZeroShotWithFaultPoint(ZeroShotEvaluator):
    """The zero-shot evaluator with a fault point as it starts (CONTRASTIVE_FAULT=test.eval=term@1 signals the
    process inside the first in-loop evaluation)."""

    def __call__(self, bundle) -> dict:
        fault_point("test.eval")
        return super().__call__(bundle)


@pytest.fixture(scope="module")
def server():
    forks = ForkServer()
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def overrides(synthetic_data) -> list[str]:
    """One config for every run of the matrix (exact resumes are compared with one reference run). ZeRO stage 1:
    the optimizer state gets a file of its own (at stage 0 it lives in the module's)."""
    evaluator = (f"eval.evaluators=[{{name: 'tests.test_fault_matrix:ZeroShotWithFaultPoint', "
                 f"data: '{synthetic_data['val']}', label_field: color, templates: ['a {{c}} shape']}}]")
    return [f"data.train={synthetic_data['train']}", "model.name=tiny-vit-32", "train.batch_size=16",
            f"train.steps={STEPS}", "train.log_every=1", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.keep_checkpoints=100", "data.num_workers=0", "data.shuffle_buffer=32", "optim.warmup_steps=2",
            "deepspeed.zero_stage=1", evaluator, f"eval.every={EVAL_EVERY}", "eval.batch_size=64"]


def _start(server, run: Path, overrides: list[str], *, fault: str = "", resume: bool = True) -> tuple[int, Path]:
    logs = sorted(run.parent.glob(f"{run.name}.*.log"))
    log = run.parent / f"{run.name}.{len(logs):02d}.log"
    argv = ["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(run), *overrides,
            *(["train.resume=latest"] if resume else [])]
    return server.run(argv, log=log, fault=fault), log


def _train(server, run: Path, overrides: list[str], **kwargs) -> tuple[int, str]:
    """(exit code, output) of one `contrastive train` (a death by a signal: minus its number)."""
    pid, log = _start(server, run, overrides, **kwargs)
    return server.wait(pid), log.read_text()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _evals(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if "/" in k} for r in _records(run) if any("/" in k for k in r)}


def _one_error_line(output: str) -> str:
    """The run's one error line (after the progress bar's last redraw, which it shares a line with)."""
    errors = [line[line.index(ERROR):] for line in output.splitlines() if ERROR in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


def _nothing_staged(run: Path) -> bool:
    """No checkpoint left half-saved under checkpoints/.incoming (DeepSpeed also copies its zero_to_fp32.py
    recovery scripts there, beside the tags it saves: those are no checkpoint)."""
    return not any((run / "checkpoints" / ".incoming").glob("step_*"))


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def _step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def reference(server, overrides, tmp_path_factory) -> Path:
    """The uninterrupted run, every checkpoint kept (the runs stopped midway below are copies of its start)."""
    run = tmp_path_factory.mktemp("fault_matrix") / "reference"
    code, output = _train(server, run, overrides, resume=False)
    assert code == 0, output[-3000:]
    assert list(_losses(run)) == list(range(1, STEPS + 1)) and sorted(_evals(run)) == [8, 16, 24]
    return run


def _stopped_at(reference: Path, step: int, dest: Path) -> Path:
    """A copy of the reference run as a run killed after its checkpoint at `step` left it: the checkpoints up to
    it (DeepSpeed's files hard-linked: nothing rewrites a published checkpoint), `latest` naming it."""
    def keep_until(folder, names):
        return [n for n in names if n.startswith("step_") and int(n.split("_")[1]) > step]

    def link_big(src, dst):
        return os.link(src, dst) if src.endswith(".pt") else shutil.copy2(src, dst)

    shutil.copytree(reference, dest, ignore=keep_until, copy_function=link_big)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return dest


def _assert_resumed_exactly(run: Path, reference: Path) -> None:
    assert _losses(run) == _losses(reference)  # every step 1..STEPS once, each loss bit for bit
    assert _evals(run) == _evals(reference)


# ---------------------------------------------------------------- SIGKILL at 10 seeded moments

KILL_POINTS = ("metrics.write", "checkpoint.write", "checkpoint.after_write_before_publish",
               "checkpoint.before_latest")
# Round by round: each fault point once (a kill at checkpoint.before_latest leaves a published checkpoint that
# `latest` does not name yet, so the next segment re-saves its tag: checkpoint.replace_aside fires), then kills
# at seeded moments of training (which land in steps, saves, evaluations and metrics writes alike).
KILL_ROUNDS = (*KILL_POINTS, "checkpoint.replace_aside", *["seeded"] * 5)


def _next_kill(rng: random.Random, run: Path, round_: int) -> tuple[str, int, float]:
    """The round's moment: (a fault point and which of its passes, 0, 0.0), or ("", step, delay): a kill `delay`
    seconds after the record of `step` was written. Chosen among the moments the segment still reaches before
    the run's end, so that every round kills: near the end, only the first pass of a point (the first save,
    the first record), which the run cannot outrun."""
    done = _done(run)
    left = STEPS - done
    kind = KILL_ROUNDS[round_]
    if kind == "seeded" and left > 2 * CHECKPOINT_EVERY:
        return "", done + rng.randint(1, min(8, left - 4)), rng.uniform(0.0, 0.05)
    if kind == "seeded":
        kind = rng.choice(KILL_POINTS)
    most = 1 if left <= 2 * CHECKPOINT_EVERY or kind == "checkpoint.replace_aside" else \
        (4 if kind == "metrics.write" else 2)
    return f"{kind}=kill@{rng.randint(1, most)}", 0, 0.0


def _done(run: Path) -> int:
    """The step of the checkpoint `latest` names (0: none yet)."""
    return int(_latest(run).split("_")[1]) if (run / "checkpoints" / "latest").is_file() else 0


def _logged_beyond(run: Path, step: int) -> bool:
    """Whether metrics.jsonl holds a complete record of a step after `step`."""
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []:
        try:
            if json.loads(line).get("step", 0) > step:
                return True
        except json.JSONDecodeError:  # the half line of an earlier kill, or one being written
            pass
    return False


def _kill_after(server, run: Path, overrides: list[str], *, step: int, delay_s: float) -> tuple[int, str]:
    pid, log = _start(server, run, overrides)
    deadline = time.time() + 120
    while not _logged_beyond(run, step - 1):
        assert time.time() < deadline and server.poll(pid) is None, log.read_text()[-3000:]
        time.sleep(0.005)
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)
    return server.wait(pid), log.read_text()


def test_sigkill_at_ten_seeded_moments_then_resume_exactly(server, overrides, reference, tmp_path):
    """One run killed ten times (inside metrics writes, inside checkpoint saves at each of their points, and at
    seeded times after seeded steps), resumed with train.resume=latest after each: its losses and evaluations are
    the uninterrupted run's. A kill inside a metrics write leaves half a line, which the resume drops."""
    rng = random.Random(19)
    run = tmp_path / "killed"
    moments = []
    for round_ in range(len(KILL_ROUNDS)):
        fault, step, delay_s = _next_kill(rng, run, round_)
        moments.append(fault or f"{delay_s:.3f} s after step {step}")
        if fault:
            code, output = _train(server, run, overrides, fault=fault)
        else:
            code, output = _kill_after(server, run, overrides, step=step, delay_s=delay_s)
        assert code == -signal.SIGKILL, (moments, output[-3000:])
    code, output = _train(server, run, overrides)
    assert code == 0, output[-3000:]
    _assert_resumed_exactly(run, reference)
    logs = "".join(p.read_text() for p in tmp_path.glob("killed.*.log"))
    assert "dropped 1 unreadable line(s)" in logs  # the half line of the kill inside a metrics write
    assert _nothing_staged(run)
    assert _latest(run) == f"step_{STEPS:08d}"
    _assert_tensorboard_shows_each_step_once(run)


def _assert_tensorboard_shows_each_step_once(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = {step: loss for step, loss in _losses(run).items()}
    shown = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in shown] == list(losses)
    assert all(value == pytest.approx(losses[step], rel=1e-6) for step, value in shown)  # float32 in events


# ---------------------------------------------------------------- a full disk, damaged or missing checkpoints

def test_a_full_disk_during_a_checkpoint_save_stops_in_one_line_and_keeps_the_previous_one(server, overrides,
                                                                                         reference, tmp_path):
    run = _stopped_at(reference, 12, tmp_path / "full_disk")
    code, output = _train(server, run, overrides, fault="checkpoint.write=enospc@1")  # the save of step 15
    assert code == 2
    assert "No space left on device" in _one_error_line(output)
    assert _latest(run) == "step_00000012" and _step_dirs(run) == [f"step_{s:08d}" for s in (3, 6, 9, 12)]
    assert _nothing_staged(run)  # the failed save's staging is gone
    code, output = _train(server, run, overrides)  # disk freed: the run continues from step 12
    assert code == 0, output[-3000:]
    _assert_resumed_exactly(run, reference)


def test_a_truncated_optimizer_state_in_the_newest_checkpoint_resumes_from_the_one_before(server, overrides,
                                                                                        reference, tmp_path):
    run = _stopped_at(reference, 12, tmp_path / "truncated")
    (optim,) = (run / "checkpoints" / "step_00000012").glob("*optim_states.pt")
    data = optim.read_bytes()
    optim.unlink()  # a hard link to the reference's file: write a file of its own
    optim.write_bytes(data[:len(data) // 2])
    code, output = _train(server, run, overrides)
    assert code == 0, output[-3000:]
    assert "step_00000009" in output and "step_00000012" in output  # the one line saying which it used, and why
    _assert_resumed_exactly(run, reference)


def test_a_latest_pointing_nowhere_resumes_from_the_newest_complete_checkpoint(server, overrides, reference,
                                                                              tmp_path):
    run = _stopped_at(reference, 12, tmp_path / "nowhere")
    (run / "checkpoints" / "latest").write_text("step_00000013\n")
    code, output = _train(server, run, overrides)
    assert code == 0, output[-3000:]
    assert "step_00000013" in output and "step_00000012" in output
    _assert_resumed_exactly(run, reference)


# ---------------------------------------------------------------- a signal during evaluation, a reused directory

def test_sigterm_during_an_in_loop_evaluation_checkpoints_at_the_next_step_and_resumes_exactly(server, overrides,
                                                                                              reference, tmp_path):
    from contrastive.preemption import EXIT_PREEMPTED

    run = tmp_path / "terminated"
    code, output = _train(server, run, overrides, fault="test.eval=term@1")  # inside the evaluation of step 8
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert _latest(run) == "step_00000009" and max(_losses(run)) == 9 and sorted(_evals(run)) == [8]
    code, output = _train(server, run, overrides)
    assert code == 0, output[-3000:]
    _assert_resumed_exactly(run, reference)


def test_a_run_directory_reused_by_mistake_is_refused_in_one_line(server, overrides, reference, tmp_path):
    run = _stopped_at(reference, 12, tmp_path / "reused")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, output = _train(server, run, overrides, resume=False)
    assert code == 2 and "train.resume=latest" in _one_error_line(output)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


# ---------------------------------------------------------------- bad images in a shard

def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_nan_and_undecodable_images_in_a_shard_are_skipped_and_counted(server, synthetic_data, tmp_path):
    """A shard whose first 8 samples are float TIFFs with NaN pixels (4) and JPEGs cut short (4), then 32 good
    ones: an epoch of 2 batches of 16 trains on the good ones (finite losses) and counts the 8 as skipped."""
    import numpy as np
    from PIL import Image

    from contrastive.data import eval_samples

    good = [s for _, s in zip(range(32), eval_samples(synthetic_data["train"].replace("{00000..00003}", "00000")))]
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(4):
            pixels = np.full((32, 32), 100.0, np.float32)
            pixels[i:i + 5] = np.nan
            tiff = io.BytesIO()
            Image.fromarray(pixels, "F").save(tiff, format="TIFF")
            _tar_member(tf, f"nan{i}.tiff", tiff.getvalue())
            _tar_member(tf, f"nan{i}.txt", b"a red circle")
            _tar_member(tf, f"cut{i}.jpg", good[i]["jpg"][:len(good[i]["jpg"]) // 3])
            _tar_member(tf, f"cut{i}.txt", b"a blue square")
        for i, sample in enumerate(good):
            _tar_member(tf, f"good{i:02d}.jpg", sample["jpg"])
            _tar_member(tf, f"good{i:02d}.txt", sample["txt"])
    run = tmp_path / "run"
    code, output = _train(server, run, [f"data.train={shard}", "data.image_key=jpg;tiff", "data.resampled=false",
                                        "model.name=tiny-vit-32", "train.batch_size=16", "train.steps=2",
                                        "train.log_every=1", "data.num_workers=0", "eval.evaluators=[]"],
                          resume=False)
    assert code == 0, output[-3000:]
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["skipped_samples"] == 8 and records[-1]["nonfinite_skips"] == 0
