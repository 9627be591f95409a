"""The command line: user mistakes give one clear line and a non-zero exit, never a traceback."""
import json
import subprocess
import sys

import pytest

from contrastive.cli import main
from tests.conftest import REPO
from tests.dist import fresh_process_env


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args,message", [
    (["train", "--config", "configs/demo.yaml", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["train", "--config", "configs/nope.yaml"], "does not exist"),
    (["train", "--config", "configs/demo.yaml", "data.train=/nonexistent/{000..003}.tar"], "does not exist"),
    (["zeroshot", "--model", "/nonexistent", "--data", ".", "--output", "/tmp/x.json"], "does not exist"),
    (["zeroshot", "--model", "configs", "--data", "configs", "--output", "/tmp/x.json", "--classes", ""],
     "class list is empty"),
])
def test_user_errors_are_one_line(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    if args[0] == "train":
        args = args[:1] + ["--out", str(tmp_path / "run")] + args[1:]
    code, err = _run(args, capsys)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_model_that_is_not_a_run(tmp_path, capsys, synthetic_data):
    (tmp_path / "notes.txt").write_text("hello")
    code, err = _run(["zeroshot", "--model", str(tmp_path), "--data", synthetic_data["val"], "--output",
                      str(tmp_path / "o.json"), "--label-field", "shape"], capsys)
    assert code == 2 and "is not a run directory, a checkpoint or an exported model" in err


def test_train_then_zeroshot_from_the_command_line(tmp_path, tiny_overrides):
    """The real console entry point, in a fresh process: exit codes, files and printed paths."""
    run = tmp_path / "run"
    exe = [sys.executable, "-m", "contrastive.cli"]
    done = subprocess.run(exe + ["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(run)]
                          + tiny_overrides, capture_output=True, text=True, cwd=tmp_path, env=fresh_process_env())
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "zs.json"
    val = [o.split("=", 1)[1] for o in tiny_overrides if o.startswith("data.val=")][0]
    done = subprocess.run(exe + ["zeroshot", "--model", str(run), "--data", val, "--output", str(out),
                                 "--label-field", "color", "--templates", "cifar"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_classification"
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert result["classes"] == sorted(result["classes"]) and len(result["classes"]) == 6
    assert str(out) in done.stdout
    bad = subprocess.run(exe + ["zeroshot", "--model", str(run), "--data", val, "--output", str(out),
                                "--classes", ""], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
