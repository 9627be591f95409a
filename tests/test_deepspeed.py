"""Training under DeepSpeed on CPU/gloo: ZeRO stages agree, a killed run resumes exactly, signals checkpoint,
gradient accumulation equals one big step, non-finite losses skip their update."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contrastive.config import load_config
from tests.conftest import REPO
from tests.dist import fresh_process_env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(run: Path, nproc: int, overrides: list[str]) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
              "-m", "contrastive.cli"] if nproc > 1 else [sys.executable, "-m", "contrastive.cli"]
    return launch + ["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(run), *overrides]


def _env() -> dict:
    # A 1-rank run (no torchrun to set them) must not reuse an in-process test's MASTER_PORT: its store holds it.
    return fresh_process_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _launch(run: Path, nproc: int, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(_train_cmd(run, nproc, overrides), cwd=run.parent, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run(run: Path, nproc: int, overrides: list[str], expect: int = 0) -> str:
    proc = _launch(run, nproc, overrides)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, out[-3000:]
    return out


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture()
def base(tiny_overrides) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith(("train.steps", "train.log_every", "train.checkpoint_every"))] \
        + ["train.log_every=1", "optim.lr=2e-3"]


def test_zero_stages_1_2_3_match_stage_0_on_two_ranks(tmp_path, base):
    losses = {}
    for stage in (0, 1, 2, 3):
        run = tmp_path / f"zero{stage}"
        _run(run, 2, base + [f"deepspeed.zero_stage={stage}", "train.steps=20", "train.checkpoint_every=20"])
        losses[stage] = _losses(run)
        assert list(losses[stage]) == list(range(1, 21))
    first, last = losses[0][1], losses[0][20]
    assert last < first - 0.3, losses[0]
    for stage in (1, 2, 3):
        for step, value in losses[0].items():
            assert losses[stage][step] == pytest.approx(value, rel=1e-5), (stage, step)


def test_sigkilled_run_resumes_bit_identically(tmp_path, base):
    common = base + ["deepspeed.zero_stage=2", "train.steps=12", "train.checkpoint_every=4", "data.num_workers=2",
                     "train.keep_checkpoints=5"]
    ref = tmp_path / "uninterrupted"
    _run(ref, 2, common)
    run = tmp_path / "killed"
    proc = _launch(run, 2, common + ["train.checkpoint_every=4"])
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000008" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = (run / "checkpoints" / "latest").read_text().strip()
    _run(run, 2, common + ["train.resume=latest"])
    expected, got = _losses(ref), _losses(run)
    assert list(got) == list(range(1, 13))
    resume_step = int(resumed_from.split("_")[1])
    assert resume_step >= 8
    for step in range(1, 13):
        assert got[step] == expected[step], (step, resume_step)


def test_signal_checkpoints_exits_75_and_resume_finishes(tmp_path, base):
    from contrastive.train import EXIT_PREEMPTED

    run = tmp_path / "run"
    common = base + ["train.steps=400", "train.checkpoint_every=1000"]
    proc = _launch(run, 1, common)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < 400
    assert max(_losses(run)) == stopped_at
    _run(run, 1, common[:-2] + ["train.steps=" + str(stopped_at + 3), "train.checkpoint_every=1000",
                                "train.resume=latest"])
    assert list(_losses(run)) == list(range(1, stopped_at + 4))


def _engine(overrides, lr_lambda=lambda s: 1.0):
    from contrastive.engine import build_engine, init_distributed
    from contrastive.models import build_model

    cfg = load_config(None, ["model.name=tiny-vit-32", "optim.warmup_steps=1", "optim.weight_decay=0",
                             "optim.grad_clip=0", *overrides])
    world = init_distributed()
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    engine, _ = build_engine(bundle.model, cfg, world, lr_lambda)
    return cfg, bundle, engine


def _batch(bundle, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = bundle.model_cfg["vision_cfg"]["image_size"]
    words = ["red", "blue", "star", "circle", "small", "large", "top", "left", "a", "the"]
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (5,), generator=g)) for _ in range(n)]
    return torch.randn(n, 3, size, size, generator=g), bundle.tokenizer(texts)


def _grads_at_update(engine) -> dict:
    """Capture the gradients the optimizer sees at the accumulation boundary (ZeRO stage 0, fp32)."""
    captured = {}
    real_step = engine.optimizer.step

    def step(*args, **kwargs):
        captured.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    engine.optimizer.step = step
    return captured


def test_four_accumulation_steps_equal_one_big_step():
    from contrastive.losses import build_loss
    from contrastive.train import train_step

    grads, losses = {}, {}
    for accum in (1, 4):
        cfg, bundle, engine = _engine(["train.batch_size=32", f"train.accum_steps={accum}"])
        batch = _batch(bundle, 32)
        captured = _grads_at_update(engine)
        out = train_step(engine, batch, loss_fn=build_loss(cfg.loss), accum_steps=accum)
        grads[accum], losses[accum] = captured, out["loss"]
    assert losses[4] == pytest.approx(losses[1], rel=1e-6)
    assert set(grads[1]) == set(grads[4]) and "logit_scale" in grads[1]
    for name, g in grads[1].items():
        assert torch.allclose(grads[4][name], g, rtol=1e-4, atol=1e-7), name


def test_nonfinite_loss_skips_the_update():
    from contrastive.train import train_step

    cfg, bundle, engine = _engine(["train.batch_size=8"])
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    nan_loss = lambda image, text, scale, bias, group=None: (image * text).sum() * float("nan")
    out = train_step(engine, _batch(bundle, 8), loss_fn=nan_loss)
    assert out["updated"] is False
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_repeated_nonfinite_losses_stop_the_run_keeping_the_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    import contrastive.train as train_mod

    real = train_mod.build_loss(load_config(None, []).loss)
    calls = {"n": 0}

    def sometimes_nan(image, text, scale, bias, group=None):
        calls["n"] += 1
        loss = real(image, text, scale, bias, group=group)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(train_mod, "build_loss", lambda cfg: sometimes_nan)
    cfg = load_config(None, tiny_overrides + ["train.checkpoint_every=2", "train.max_nonfinite_in_a_row=3"])
    with pytest.raises(train_mod.TrainingDiverged, match="3 non-finite losses in a row"):
        train_mod.train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
