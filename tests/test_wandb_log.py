"""train.log_to: [tensorboard, wandb] in wandb's offline mode: wandb's history holds metrics.jsonl's records, and
a resumed run continues the same wandb run id. Needs the wandb package (the dev extra)."""
import json
import struct
import time

import pytest

from contrastive.config import ConfigError, load_config
from contrastive.train import train

wandb = pytest.importorskip("wandb")


def offline_history(path, *, timeout_s: float = 30.0) -> list[dict]:
    """The history rows of an offline run file (run-ID.wandb) once wandb's service has written its exit record
    (run.finish() can return before the service's writer has flushed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows, finished = _read_offline_run(path)
        if finished or time.monotonic() > deadline:
            assert finished, f"{path} has no exit record after {timeout_s} s"
            return rows
        time.sleep(0.2)


def _read_offline_run(path) -> tuple[list[dict], bool]:
    """wandb's LevelDB-style log of Record protos, read here without wandb's own reader (it lives in its Go
    core): (history rows, whether the exit record is there)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, rows, finished = 7, b"", [], False
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            finished = finished or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                items = {(item.key or "/".join(item.nested_key)): item.value_json for item in record.history.item}
                rows.append({k: json.loads(v) for k, v in items.items() if not k.startswith("_")})
    return rows, finished


def test_wandb_mirrors_metrics_and_a_resume_continues_the_run(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    (tmp_path / "wandb_dir").mkdir()
    run = tmp_path / "run"
    overrides = [*tiny_overrides, "train.log_to=[tensorboard, wandb]", "train.wandb_project=tests"]
    train(load_config(None, overrides), run, progress=False)
    first_id = json.loads((run / "wandb_run.json").read_text())["id"]
    train(load_config(None, [*overrides, "train.steps=10", "train.resume=latest"]), run, progress=False)
    assert json.loads((run / "wandb_run.json").read_text())["id"] == first_id

    runs = sorted((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{first_id}*"))
    assert len(runs) == 2  # offline, each process writes its own folder of the same run id; `wandb sync` joins them
    history = [row for folder in runs for row in offline_history(folder / f"run-{first_id}.wandb")]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    numeric = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for r in logged]
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10] == [r["step"] for r in numeric]
    assert history == numeric
    assert list((run / "tensorboard").iterdir())


def test_wandb_off_by_default_and_unknown_sinks_refused(tmp_path, tiny_overrides):
    assert load_config(None, []).train.log_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="train.log_to: 'mlflow' is not one of tensorboard, wandb"):
        load_config(None, ["train.log_to=[mlflow]"])
    run = tmp_path / "run"
    train(load_config(None, [*tiny_overrides, "train.log_to=[]", "train.steps=2"]), run, progress=False)
    assert not (run / "tensorboard").exists() and not (run / "wandb_run.json").exists()


def test_wandb_asked_for_but_not_installed_stops_before_training(tmp_path, tiny_overrides, monkeypatch):
    import sys

    from contrastive.errors import UserError

    monkeypatch.setitem(sys.modules, "wandb", None)  # what importlib finds when the package is absent
    with pytest.raises(UserError, match="pip install wandb"):
        train(load_config(None, [*tiny_overrides, "train.log_to=[wandb]"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
