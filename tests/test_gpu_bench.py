"""bench/gpu_throughput.py on a CPU (--tiny), and the speed options it measures: amp_bf16, compiled towers,
gradient clipping without host syncs, and train.sync_every (a non-finite step skipped on the device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from contrastive.config import load_config
from tests.conftest import REPO
from tests.dist import fresh_process_env


def _engine(overrides):
    from contrastive.engine import build_engine, init_distributed
    from contrastive.models import build_model

    cfg = load_config(None, ["model.name=tiny-vit-32", "train.batch_size=8", "optim.weight_decay=0.1", *overrides])
    world = init_distributed()
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    engine, _ = build_engine(bundle.model, cfg, world, lambda step: 1.0)
    return cfg, bundle, engine


def _batch(bundle, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = bundle.model_cfg["vision_cfg"]["image_size"]
    texts = [f"a {c} shape number {i}" for i, c in enumerate(["red", "blue", "green", "grey"] * (n // 4))]
    return torch.randn(n, 3, size, size, generator=g), bundle.tokenizer(texts)


def _grads_at_update(engine) -> dict:
    """The gradients the optimizer sees when it steps (after clipping)."""
    captured = {}
    real_step = engine.optimizer.step

    def step(*args, **kwargs):
        captured.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    engine.optimizer.step = step
    return captured


def test_gradient_clipping_without_host_syncs_equals_deepspeeds():
    from contrastive.losses import build_loss
    from contrastive.train import train_step

    grads = {}
    for ours in (True, False):
        cfg, bundle, engine = _engine(["optim.grad_clip=0.05"])
        assert "clip_fp32_gradients" in vars(engine)  # build_engine replaced DeepSpeed's clipping
        if not ours:
            del vars(engine)["clip_fp32_gradients"]
        captured = _grads_at_update(engine)
        train_step(engine, _batch(bundle), loss_fn=build_loss(cfg.loss))
        grads[ours] = captured
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[False].values()]))
    assert norm.item() == pytest.approx(0.05, rel=1e-4)  # clipping was active
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-9)


def test_sync_every_skips_a_nonfinite_update_on_the_device_without_host_reads():
    from contrastive.losses import build_loss
    from contrastive.train import DeviceCounters, train_step

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_throughput import count_host_syncs

    cfg, bundle, engine = _engine(["train.sync_every=4"])
    loss_fn = build_loss(cfg.loss)
    batch = _batch(bundle)
    counters = DeviceCounters()
    out = train_step(engine, batch, loss_fn=loss_fn, skip_on_device=True)  # a first, finite step
    counters.add(out)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    moments = {id(p): s["exp_avg"].clone() for p, s in engine.optimizer.state.items()}
    nan_loss = lambda image, text, scale, bias, group=None: (image * text).sum() * float("nan")  # noqa: E731
    reads = count_host_syncs(torch.device("cpu"), lambda: counters.add(
        train_step(engine, batch, loss_fn=nan_loss, skip_on_device=True)))
    assert reads == 0
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, before[n]), n
    for p, state in engine.optimizer.state.items():
        assert torch.equal(state["exp_avg"], moments[id(p)]) and state["step"].item() == 1
    out = train_step(engine, batch, loss_fn=loss_fn, skip_on_device=True)
    counters.add(out)
    assert not all(torch.equal(p, before[n]) for n, p in engine.module.named_parameters())
    out, nonfinite, in_a_row = counters.read(out)
    assert (nonfinite, in_a_row) == (1, 0) and isinstance(out["loss"], float) and out["stop"] is False


def test_sync_every_run_matches_every_step_run_and_stops_on_divergence(tmp_path, tiny_overrides, monkeypatch):
    import contrastive.train as train_mod

    base = tiny_overrides + ["train.log_every=2", "train.checkpoint_every=6"]
    every = train_mod.train(load_config(None, base), tmp_path / "every", progress=False)
    lazy = train_mod.train(load_config(None, base + ["train.sync_every=3"]), tmp_path / "lazy", progress=False)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("every", "lazy")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)  # fused vs plain AdamW
    assert every.step == lazy.step == 6

    real = train_mod.build_loss(load_config(None, []).loss)
    calls = {"n": 0}

    def sometimes_nan(image, text, scale, bias, group=None):
        calls["n"] += 1
        loss = real(image, text, scale, bias, group=group)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(train_mod, "build_loss", lambda cfg: sometimes_nan)
    cfg = load_config(None, tiny_overrides + ["train.sync_every=4", "train.checkpoint_every=2", "train.log_every=100",
                                              "train.max_nonfinite_in_a_row=3", "train.steps=20"])
    with pytest.raises(train_mod.TrainingDiverged, match="non-finite losses in a row"):
        train_mod.train(cfg, tmp_path / "diverged", progress=False)
    assert (tmp_path / "diverged" / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_sync_every_needs_an_optimizer_deepspeed_steps_directly():
    from contrastive.errors import UserError

    with pytest.raises(UserError, match="train.sync_every=4 needs deepspeed.zero_stage=0"):
        _engine(["train.sync_every=4", "deepspeed.precision=bf16"])


def test_compiled_towers_and_amp_bf16_give_the_eager_step():
    from contrastive.losses import build_loss
    from contrastive.train import train_step

    results = {}
    for compiled in (False, True):
        cfg, bundle, engine = _engine(["deepspeed.precision=amp_bf16", f"model.compile={compiled}",
                                       "model.compile_backend=eager"])
        assert all(p.dtype == torch.float32 for p in engine.module.parameters())
        out = engine(*_batch(bundle))
        assert out["image_features"].dtype == torch.bfloat16  # the forward ran under autocast
        captured = _grads_at_update(engine)
        loss = train_step(engine, _batch(bundle), loss_fn=build_loss(cfg.loss))["loss"]
        results[compiled] = (loss, captured, sorted(engine.module.state_dict()))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    assert results[True][2] == results[False][2]  # checkpoint keys do not change
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-4, atol=1e-6)


def test_tiny_benchmark_measures_both_sides(tmp_path):
    out = tmp_path / "gpu.json"
    # A fresh 1-rank process group: not the one earlier tests of this session started (its port is taken).
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--tiny", "--work", str(tmp_path),
                           "--out", str(out), "--profile", "--num-workers", "0", "--steps", "12"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env=fresh_process_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"results: {out}" in proc.stdout and "x open_clip" in proc.stdout
    result = json.loads(out.read_text())
    model = result["models"]["tiny-vit-32"]
    batch, peak = model["batch_size"], result["matmul_bf16"]["flops_per_s"]
    # FLOPs counted on the real model equal the count by hand from its config.
    assert model["flops_per_step"] == model["analytic_flops_per_step"] > 0
    rows = model["step"]
    assert set(rows) == {"open_clip", "bf16", "amp_bf16", "amp_bf16+sync", "fast", "fast-ds_clip", "fast-ds_allreduce"}
    e2e = {k: v for k, v in model["end_to_end"].items() if k != "shards"}
    for name, row in {**rows, **{f"e2e {k}": v for k, v in e2e.items()}}.items():
        base = (e2e if name.startswith("e2e") else rows)["open_clip"]
        assert row["samples_per_s"] > 0, name
        assert row["vs_open_clip"] == pytest.approx(row["samples_per_s"] / base["samples_per_s"]), name
        assert row["vs_open_clip_cpu_clock"] == pytest.approx(row["cpu_samples_per_s"] / base["cpu_samples_per_s"]), name
        assert row["mfu"] == pytest.approx(model["flops_per_step"] * row["samples_per_s"] / batch / peak), name
    # End to end, both sides are timed over the same window: the same warmup steps (loader start-up, shuffle
    # fill and compilation fall there), then the same timed steps; ours without caption dedupe, as open_clip.
    assert e2e["fast"]["steps"] == e2e["open_clip"]["steps"] == result["settings"]["steps"] == 12
    assert e2e["fast"]["warmup_steps"] == e2e["open_clip"]["warmup_steps"] == result["settings"]["warmup"] == 3
    assert e2e["fast"]["dedupe_captions"] is False
    assert all(row["warmup_s"] > 0 and row["data_wait_s_per_step"] > 0 for row in e2e.values())
    assert model["cpu_clock"] and "x (CPU clock)" in proc.stdout
    sync_every = result["settings"]["sync_every"]
    for name in ("amp_bf16+sync", "fast", "fast-ds_clip", "fast-ds_allreduce"):
        assert rows[name]["host_syncs_per_step"] == pytest.approx(1 / sync_every), name
    assert rows["bf16"]["host_syncs_per_step"] > 1  # DeepSpeed's bf16 wrapper checks every gradient on the host
    assert os.path.getsize(model["profile"]["trace"]) > 0 and "Name" in open(model["profile"]["table"]).read()
    search = model["max_batch_infonce_tiled"]
    assert [t["batch"] for t in search["tried"]] == [8, 16] and search["batch"] == 16


def test_spec_peak_is_looked_up_by_card_name():
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import spec_bf16_peak

    # Dense bf16 from the datasheets; the PCIe and NVL H100 must not read as the SXM part.
    assert spec_bf16_peak("NVIDIA H100 80GB HBM3") == spec_bf16_peak("NVIDIA H200") == 989e12
    assert spec_bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert spec_bf16_peak("NVIDIA H100 NVL") == 835e12
    assert spec_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert spec_bf16_peak("NVIDIA GeForce RTX 4090") is None


def test_tiny_gpu_check_runs_every_section_and_its_checks_hold(tmp_path):
    """bench/gpu_check.py --tiny: the GPU check's code on a CPU. Each section ran, and what its rows claim is
    in the JSON: the resumed run's losses equal the uninterrupted run's, no host sync between read steps while
    the watch did see the syncs at read steps, the export's embeddings equal the trained model's, and the
    search agrees with faiss."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--work", str(tmp_path),
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=fresh_process_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"results: {out}" in proc.stdout
    result = json.loads(out.read_text())
    statuses = {(r["section"], r["check"]): r["status"] for r in result["rows"]}
    assert not [k for k, v in statuses.items() if v in ("FAIL", "ERROR")], statuses
    sections = result["sections"]
    assert set(sections) >= {"card", "process_group", "defaults", "train", "export", "search", "decode", "tiny-vit-32"}
    assert sections["process_group"]["host_all_gather"] == "ok" and "gloo" in sections["process_group"]["backend_config"]

    train = sections["train"]
    losses, resumed = train["losses"], train["resumed_losses"]  # JSON: steps as strings
    assert sorted(map(int, losses)) == list(range(2, 13, 2))
    assert sorted(map(int, resumed)) == [8, 10, 12]
    assert all(resumed[s] == losses[s] for s in resumed) and train["equal"]
    assert sorted(map(int, train["evals"])) == [6, 12] and train["eval_equal"]
    syncs = train["syncs"]
    assert syncs["between"] == 0 and syncs["between_steps"] == 5  # steps 3, 5, 7, 9, 11 read nothing
    assert syncs["at_read_steps"] > 0  # the watch sees the reads the loop makes on purpose
    assert train["forward"]["autocast"] and train["forward"]["param_dtype"] == "torch.float32"  # amp_bf16

    assert sections["export"]["max_abs_diff"] == {"export": 0.0, "checkpoint": 0.0}
    assert sections["export"]["step"] == 12
    search = sections["search"]
    assert search["agreement"] == 1.0 and search["disagreeing_queries"] == 0 and search["reference"].startswith("faiss")

    # On a CPU both sides of the decode check are libjpeg-turbo: the same pixels.
    assert sections["decode"]["max_grey_levels"] == 0.0 and sections["decode"]["undecodable"] == 0

    throughput = sections["tiny-vit-32"]
    assert throughput["step"]["fast"]["samples_per_s"] > 0 and throughput["step"]["open_clip"]["samples_per_s"] > 0
    assert {"open_clip", "fast"} <= set(throughput["end_to_end"])
