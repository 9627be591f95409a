"""Checkpoints under faults: pruning by step, a broken `latest`, failed and killed saves, fsync before publishing,
re-saving a tag; the test-only fault hook; exports on a shared filesystem and their one-line errors.

Most tests drive checkpoint.save_checkpoint with a stand-in for DeepSpeed's engine (it writes one file per tag,
as DeepSpeed's save does into the directory it is given), so they take milliseconds; one tiny real run checks
that a resume falls back past a truncated checkpoint and continues exactly."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrastive import checkpoint, faults
from contrastive.checkpoint import CKPT_DIR, DS_MODEL_FILE, INCOMING, LATEST
from contrastive.errors import UserError
from tests.conftest import REPO


class FakeEngine:
    """DeepSpeed's engine as save_checkpoint sees it: writes its files into SAVE_DIR/TAG."""

    def __init__(self, payload: bytes = b"weights" * 512):
        self.payload = payload

    def save_checkpoint(self, save_dir: str, *, tag: str, save_latest: bool) -> None:
        assert not save_latest  # `latest` is ours to write, after publishing
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / DS_MODEL_FILE).write_bytes(self.payload)


def save(run: Path, step: int, *, keep: int = 2, engine=None) -> Path:
    return checkpoint.save_checkpoint(engine or FakeEngine(), run, step=step, rank=0, shared_state={"time_s": 1.0},
                                      rank_state={"loader": step}, config_yaml="x: 1\n", model_cfg={"embed_dim": 8},
                                      preprocess_cfg={}, keep=keep)


def steps_on_disk(run: Path) -> list[int]:
    return sorted(checkpoint.step_of(p.name) for p in (run / CKPT_DIR).glob("step_*") if checkpoint.step_of(p.name))


def latest(run: Path) -> str:
    return (run / CKPT_DIR / LATEST).read_text().strip()


@pytest.fixture(autouse=True)
def no_faults():
    yield
    faults.configure("")


# ---------------------------------------------------------------- pruning

def test_pruning_never_deletes_the_checkpoint_just_written_after_resuming_from_an_older_one(tmp_path):
    run = tmp_path / "run"
    for step in (3, 6, 9):
        save(run, step, keep=3)
    # The run resumed from step 3 (step_9 is left over from the abandoned timeline) and saves step 6 again,
    # then 7 and 8, keeping 2: name order would delete step_7 and step_8, the ones `latest` names.
    save(run, 6, keep=2)
    assert latest(run) == "step_00000006" and steps_on_disk(run) == [3, 6, 9]
    save(run, 7, keep=2)
    assert latest(run) == "step_00000007" and steps_on_disk(run) == [6, 7, 9]
    save(run, 8, keep=2)
    assert latest(run) == "step_00000008" and steps_on_disk(run) == [7, 8, 9]
    assert checkpoint.resolve_checkpoint(run, "latest") == run / CKPT_DIR / "step_00000008"
    save(run, 9, keep=2)  # the run reaches the leftover's step and replaces it: its own timeline again
    assert steps_on_disk(run) == [8, 9]
    assert json.loads((run / CKPT_DIR / "step_00000009" / "rank_00000.json").read_text()) == {"loader": 9}


def test_pruning_keeps_the_newest_by_step_and_leaves_other_directories_alone(tmp_path):
    run = tmp_path / "run"
    for step in (5, 10, 15, 20):
        save(run, step, keep=3)
    assert steps_on_disk(run) == [10, 15, 20]
    # A directory that sorts after the checkpoints but is none: name order would keep it and delete step 25.
    (run / CKPT_DIR / "step_notes").mkdir()
    save(run, 25, keep=1)
    assert steps_on_disk(run) == [25] and (run / CKPT_DIR / "step_notes").is_dir()


# ---------------------------------------------------------------- a broken `latest`

def test_latest_naming_a_missing_or_incomplete_checkpoint_falls_back_with_one_line(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    for step in (3, 6):
        save(run, step, keep=5)
    root = run / CKPT_DIR
    capsys.readouterr()
    # A file truncated after the save (disk trouble, a partial copy): the manifest's sizes catch it.
    ds_file = root / "step_00000006" / DS_MODEL_FILE
    ds_file.write_bytes(ds_file.read_bytes()[:100])
    assert checkpoint.resolve_checkpoint(run, "latest") == root / "step_00000003"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000006" in err[0] and "step_00000003" in err[0] and "bytes" in err[0]
    # Neither the marker nor state.json (a copy that stopped early): incomplete too.
    (root / "step_00000006" / checkpoint.MANIFEST).unlink()
    (root / "step_00000006" / checkpoint.STATE_FILE).unlink()
    assert checkpoint.resolve_checkpoint(run, "latest") == root / "step_00000003"
    # Missing altogether.
    shutil.rmtree(root / "step_00000006")
    assert checkpoint.resolve_checkpoint(run, "latest") == root / "step_00000003"
    assert "missing" in capsys.readouterr().err
    # `latest` itself lost (killed between publishing the first checkpoint and writing `latest`).
    (root / LATEST).unlink()
    assert checkpoint.resolve_checkpoint(run, "latest") == root / "step_00000003"
    # Nothing complete before the step `latest` names: one line, no traceback, no silent fresh start.
    (root / LATEST).write_text("step_00000002\n")
    with pytest.raises(UserError, match="names step_00000002, which is missing") as err:
        checkpoint.resolve_checkpoint(run, "latest")
    assert "\n" not in str(err.value)
    # An explicit checkpoint path must be complete; it is never replaced by another one.
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoint.resolve_checkpoint(run, str(root / "step_00000006"))


def test_checkpoints_saved_before_manifests_still_resume(tmp_path):
    run = tmp_path / "run"
    save(run, 4)
    (run / CKPT_DIR / "step_00000004" / checkpoint.MANIFEST).unlink()  # as the previous version wrote them
    assert checkpoint.resolve_checkpoint(run, "latest") == run / CKPT_DIR / "step_00000004"


# ---------------------------------------------------------------- failed, killed and durable saves

def test_a_full_disk_during_a_save_leaves_nothing_staged_and_says_so_in_one_line(tmp_path):
    run = tmp_path / "run"
    save(run, 3)
    faults.configure("checkpoint.write=enospc")
    with pytest.raises(UserError, match="No space left on device") as err:
        save(run, 6)
    assert "\n" not in str(err.value) and "step_00000003" in str(err.value)
    assert not list((run / CKPT_DIR / INCOMING).glob("*")) and steps_on_disk(run) == [3]
    assert checkpoint.resolve_checkpoint(run, "latest") == run / CKPT_DIR / "step_00000003"
    faults.configure("")
    save(run, 6)
    assert latest(run) == "step_00000006"


def test_what_a_killed_save_staged_is_removed_by_the_next_save(tmp_path):
    run = tmp_path / "run"
    save(run, 3)
    left = run / CKPT_DIR / INCOMING / "step_00000004"  # SIGKILL mid-save: no handler ran
    left.mkdir(parents=True)
    (left / DS_MODEL_FILE).write_bytes(b"partial")
    save(run, 6)
    assert not list((run / CKPT_DIR / INCOMING).iterdir())


def test_every_file_and_directory_is_synced_before_the_renames_that_publish(tmp_path, monkeypatch):
    """A log of fsyncs (by inode) and renames: the staged checkpoint's files and directories are synced before
    it is renamed into place; checkpoints/ (which holds that rename) and `latest`'s new file are synced after it
    and before `latest` is replaced."""
    run = tmp_path / "run"
    save(run, 3)
    root = run / CKPT_DIR
    log: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def inode(path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def fsync(fd):
        st = os.fstat(fd)
        log.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        synced = {entry[1] for entry in log if entry[0] == "fsync"}
        if dst == root / "step_00000006":
            unsynced = [p.name for p in [src, *src.rglob("*")] if inode(p) not in synced]
            assert not unsynced, f"renamed into place before fsync of {unsynced}"
        if dst == root / LATEST:
            published = max(i for i, entry in enumerate(log) if entry[0] == "publish")
            assert inode(src) in synced, "`latest` replaced by a file not synced"
            assert ("fsync", inode(root)) in log[published:], "checkpoints/ not synced after the publishing rename"
        real_replace(src, dst)
        if dst == root / "step_00000006":
            log.append(("publish", dst))
        log.append(("replace", dst))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save(run, 6)
    assert ("publish", root / "step_00000006") in log and ("replace", root / LATEST) in log


def test_resaving_a_tag_keeps_the_published_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save(run, 3, engine=FakeEngine(b"old"))
    real_replace = os.replace

    def failing_publish(src, dst):  # the disk fails at the rename that would publish the new copy
        if Path(src).parent.name == INCOMING:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_publish)
    with pytest.raises(OSError):
        save(run, 3, engine=FakeEngine(b"new"))
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = checkpoint.resolve_checkpoint(run, "latest")
    assert ckpt == run / CKPT_DIR / "step_00000003" and (ckpt / DS_MODEL_FILE).read_bytes() == b"old"
    save(run, 3, engine=FakeEngine(b"new"))
    assert (ckpt / DS_MODEL_FILE).read_bytes() == b"new" and not list((run / CKPT_DIR).glob(".replaced/*"))


SAVE_SCRIPT = """
import sys
from pathlib import Path
from tests.test_checkpoint_faults import FakeEngine, save
save(Path(sys.argv[1]), int(sys.argv[2]), engine=FakeEngine(sys.argv[3].encode()))
"""


def _save_in_subprocess(run: Path, step: int, payload: str, fault: str = "") -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), CONTRASTIVE_FAULT=fault)
    return subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(run), str(step), payload], env=env, cwd=REPO,
                          timeout=120).returncode


def test_sigkill_between_moving_the_old_copy_aside_and_the_new_one_in_is_recovered(tmp_path):
    """Through the test-only hook, a real SIGKILL inside a re-save: resume finds the old copy aside, and the
    next save puts things straight."""
    run = tmp_path / "run"
    save(run, 3, engine=FakeEngine(b"old"))
    assert _save_in_subprocess(run, 3, "new", "checkpoint.replace_aside=kill") == -9
    assert not (run / CKPT_DIR / "step_00000003").exists()  # killed between the two renames
    ckpt = checkpoint.resolve_checkpoint(run, "latest")
    assert ckpt is not None and (ckpt / DS_MODEL_FILE).read_bytes() == b"old"
    assert _save_in_subprocess(run, 6, "six") == 0
    assert steps_on_disk(run) == [3, 6] and not list((run / CKPT_DIR).glob(".replaced/*"))
    assert (run / CKPT_DIR / "step_00000003" / DS_MODEL_FILE).read_bytes() == b"old"
    # Killed after staging, before publishing: the previous checkpoint stays `latest`, the staged one goes later.
    assert _save_in_subprocess(run, 9, "nine", "checkpoint.after_write_before_publish=kill") == -9
    assert latest(run) == "step_00000006" and (run / CKPT_DIR / INCOMING / "step_00000009").is_dir()
    assert checkpoint.resolve_checkpoint(run, "latest") == run / CKPT_DIR / "step_00000006"


# ---------------------------------------------------------------- the fault hook

def test_fault_hook_fires_on_the_nth_pass_on_the_chosen_rank_and_refuses_typos(monkeypatch):
    faults.configure("p=enospc@2:0,q=raise:1")
    faults.fault_point("p")
    with pytest.raises(OSError) as err:
        faults.fault_point("p")
    assert err.value.errno == 28
    faults.fault_point("p")  # only the 2nd pass
    faults.fault_point("q")  # RANK is 0 here: not rank 1's fault
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError):
        faults.fault_point("q")
    faults.fault_point("unset-point")
    with pytest.raises(ValueError, match="not point=ACTION"):
        faults.configure("checkpoint.write=enospace")


# ---------------------------------------------------------------- a real run resumes past a broken checkpoint

def test_resume_falls_back_past_a_truncated_checkpoint_and_continues_exactly(tmp_path, tiny_overrides, capfd):
    from contrastive.config import load_config
    from contrastive.train import train

    overrides = [*tiny_overrides, "train.log_every=1", "train.keep_checkpoints=3"]
    run = tmp_path / "run"
    train(load_config(None, overrides), run, progress=False)
    expected = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    states = run / CKPT_DIR / "step_00000006" / DS_MODEL_FILE  # weights and optimizer state at ZeRO stage 0
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # the newest checkpoint truncated
    capfd.readouterr()
    train(load_config(None, [*overrides, "train.resume=latest"]), run, progress=False)
    said = [line for line in capfd.readouterr().err.splitlines() if "checkpoints/latest" in line]
    assert len(said) == 1 and "step_00000006" in said[0] and "using" in said[0] and "step_00000003" in said[0]
    got = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == 6 and got == expected  # steps 4-6 again, from step 3, as the first time
    assert latest(run) == "step_00000006" and checkpoint.checkpoint_problem(run / CKPT_DIR / "step_00000006") is None


# ---------------------------------------------------------------- exports

def _stage(parent: Path, host: str, pid: int, *, age_s: float = 0.0) -> Path:
    stage = parent / f".o.incoming-{host}-{pid}"
    (stage / "part").mkdir(parents=True)
    (stage / "part" / "f").write_text("x")
    then = time.time() - age_s
    for p in (stage / "part" / "f", stage / "part", stage):
        os.utime(p, (then, then))
    return stage


def test_export_staging_of_another_host_is_stale_only_when_old(tmp_path):
    from contrastive.export import STALE_STAGE_S, _remove_stale_stages

    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    live_elsewhere = _stage(tmp_path, "node-17.cluster", dead.pid)  # that pid means nothing here
    dead_here = _stage(tmp_path, here, dead.pid)
    live_here = _stage(tmp_path, here, os.getpid(), age_s=STALE_STAGE_S / 2)
    abandoned = _stage(tmp_path, "node-17.cluster", dead.pid + 1, age_s=STALE_STAGE_S + 60)
    _remove_stale_stages(tmp_path / "o")
    assert live_elsewhere.is_dir() and live_here.is_dir()
    assert not dead_here.exists() and not abandoned.exists()


def test_export_errors_a_user_can_cause_are_one_line(tmp_path, synthetic_data, capsys, monkeypatch):
    from contrastive import export as export_module
    from contrastive.cli import main
    from tests.test_export import make_run

    run, _ = make_run(tmp_path, synthetic_data)

    def export(out, model=run) -> str:
        assert main(["export", "--model", str(model), "--format", "open_clip", "--out", str(out), "--no-check"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "does not exist" in export(tmp_path / "o", tmp_path / "no-such-run")
    (tmp_path / "fresh" / CKPT_DIR).mkdir(parents=True)
    (tmp_path / "fresh" / "config.yaml").write_text("x: 1\n")
    assert "without checkpoints" in export(tmp_path / "o", tmp_path / "fresh")
    (tmp_path / "fresh" / CKPT_DIR / LATEST).write_text("step_00000009\n")  # names a checkpoint that is gone
    assert "names step_00000009, which is missing" in export(tmp_path / "o", tmp_path / "fresh")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert "not empty" in export(tmp_path / "full")
    (tmp_path / "afile").write_text("x")
    assert "cannot write" in export(tmp_path / "afile" / "o")  # the destination's parent is not a directory
    monkeypatch.setattr(export_module, "write_open_clip",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert "No space left on device" in export(tmp_path / "o")
    assert not list(tmp_path.glob(".o.*")) and not (tmp_path / "o").exists()
