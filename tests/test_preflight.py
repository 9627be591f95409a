"""What a run reads is checked before any process group or DeepSpeed import, by `train` and `slurm submit` alike:
a wrong model name, missing shards or missing evaluator data fail in one line, in seconds."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from contrastive import slurm
from contrastive.cli import main
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo.yaml")
MISSING = [
    ("model.name=ViT-B-99", "model.name 'ViT-B-99' is not an open_clip model config; e.g. "),
    ("data.train=/nonexistent/{00000..00001}.tar", "data path /nonexistent/00000.tar does not exist (2 of 2 shards"),
    ("eval.evaluators=[{name: zeroshot, data: /nonexistent/val.tar}]", "data path /nonexistent/val.tar does not exist"),
    ("eval.evaluators=[{name: retrieval, data: /nonexistent/val.tar}]", "data path /nonexistent/val.tar does not exist"),
    ("model.text_pretrained=/nonexistent/hf", "model.text_pretrained '/nonexistent/hf' is not a directory"),
    ("model.image_pretrained=/nonexistent/w.pt", "model.image_pretrained '/nonexistent/w.pt' is not a file"),
]


@pytest.mark.parametrize("command", ["train", "slurm"])
@pytest.mark.parametrize("override,message", MISSING)
def test_train_and_submit_refuse_what_the_run_cannot_read(tmp_path, tiny_overrides, monkeypatch, capsys, command,
                                                          override, message):
    monkeypatch.setattr(slurm, "query_cluster", lambda: None)  # no Slurm here: the config and inputs only
    argv = (["train", "--config", DEMO] if command == "train" else
            ["slurm", "submit", DEMO, "--gpus-per-node", "0", "--dry-run"])
    code = main([*argv, "--out", str(tmp_path / "run"), *tiny_overrides, override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"contrastive {command}: error: {message}") and "\n" not in err, err
    assert not (tmp_path / "run").exists()


# Run in a fresh interpreter: the test session may have imported DeepSpeed already.
_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from contrastive.cli import main
code = main(sys.argv[1:])
import torch.distributed as dist
print(json.dumps({"code": code, "seconds": time.perf_counter() - t0, "deepspeed": "deepspeed" in sys.modules,
                  "process_group": dist.is_available() and dist.is_initialized()}))
"""


def test_an_unknown_model_name_fails_before_deepspeed_is_imported(tmp_path, tiny_overrides):
    """`train model.name=ViT-B-99` used to start the process group and DeepSpeed (which, on a machine without its
    CPU communication op built, compiles it for ~90 s) before build_model saw the name."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PROBE, "train", "--config", DEMO, "--out", str(tmp_path / "run"),
                           *tiny_overrides, "model.name=ViT-B-99"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    wall_s = time.perf_counter() - t0
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 2 and "model.name 'ViT-B-99' is not an open_clip model config" in done.stderr
    assert not result["deepspeed"] and not result["process_group"], result
    # Importing torch and open_clip only: seconds (~8 s on a busy 2-core machine), against DeepSpeed's ~90 s.
    assert wall_s < 45, wall_s
