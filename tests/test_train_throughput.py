"""bench/train_throughput.py: both trainers' logs read into the same steady-state samples/s, open_clip_train's DDP
on CPU, and (with the open_clip environment) a --tiny run of both sides on 2 gloo ranks."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import openclip_env  # noqa: E402
import train_throughput as bench  # noqa: E402

# Three log lines of a 2-rank open_clip_train run, global batch 64 (32 per rank), logging every 2 steps.
OPENCLIP_LOG = """\
2026-11-28,03:28:19 | INFO | Train Epoch: 0 [ 64/384 (17%)] Data (t): 1.030 Batch (t): 2.197, 29.1258/s, 14.5629/s/gpu LR: 0.0
2026-11-28,03:28:20 | INFO | Train Epoch: 0 [192/384 (50%)] Data (t): 0.023 Batch (t): 0.500, 128.000/s, 64.0000/s/gpu LR: 0.0
2026-11-28,03:28:20 | INFO | Some other line
2026-11-28,03:28:22 | INFO | Train Epoch: 0 [320/384 (83%)] Data (t): 0.023 Batch (t): 0.250, 256.000/s, 128.000/s/gpu LR: 0.0
2026-11-28,03:28:22 | INFO | Train Epoch: 0 [384/384 (100%)] Data (t): 0.023 Batch (t): 0.400, 160.000/s, 80.0000/s/gpu LR: 0.0
"""


def test_openclip_log_windows_and_steady_rate():
    windows = bench.openclip_windows(OPENCLIP_LOG, 64)
    assert windows == [(1, 1, pytest.approx(2.197)), (2, 3, pytest.approx(1.0)), (4, 5, pytest.approx(0.5)),
                       (6, 6, pytest.approx(0.4))]
    # Windows starting after step 1: steps 2..6 = 5 steps in 1.9 s.
    steady = bench.steady_rate(windows, global_batch=64, warmup_steps=1)
    assert steady["steps"] == 5 and steady["from_step"] == 2 and steady["to_step"] == 6
    assert steady["samples_per_s"] == pytest.approx(5 * 64 / 1.9)
    # A later epoch continues the step count.
    two_epochs = bench.openclip_windows(OPENCLIP_LOG + OPENCLIP_LOG.replace("Epoch: 0", "Epoch: 1"), 64)
    assert [w[:2] for w in two_epochs[4:]] == [(7, 7), (8, 9), (10, 11), (12, 12)]


def test_our_log_windows_and_steady_rate(tmp_path):
    rows = [{"step": 4, "samples_per_s": 32.0}, {"step": 8, "samples_per_s": 64.0},
            {"step": 8, "zeroshot/acc1": 0.5}, {"step": 12, "samples_per_s": 128.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    windows = bench.our_windows(path, 16)
    assert windows == [(1, 4, 2.0), (5, 8, 1.0), (9, 12, 0.5)]
    steady = bench.steady_rate(windows, global_batch=16, warmup_steps=4)
    assert steady["samples_per_s"] == pytest.approx(8 * 16 / 1.5)
    # Fewer steps than the warmup: all windows rather than none.
    assert bench.steady_rate(windows, global_batch=16, warmup_steps=100)["steps"] == 12


def test_openclip_wrapper_lets_ddp_take_the_cpu_device(monkeypatch, tmp_path):
    """open_clip_train wraps its model as DDP(model, device_ids=[cpu]), which torch refuses; the wrapper's patch
    makes that the same as device_ids=None: gradients averaged over ranks (here 1) and forward unchanged."""
    import torch.distributed as dist

    import openclip_train

    original = torch.nn.parallel.distributed.DistributedDataParallel  # the genuine class, even after another
    # test in this process ran the wrapper (which rebinds only torch.nn.parallel.DistributedDataParallel)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", original)
    model = torch.nn.Linear(3, 2)
    created_group = not dist.is_initialized()
    if created_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="device_ids"):
            original(model, device_ids=[torch.device("cpu")])
        openclip_train.allow_ddp_on_cpu()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.device("cpu")])
        assert isinstance(ddp, original) and ddp.device_ids is None
        x = torch.randn(4, 3)
        ddp(x).sum().backward()
        torch.testing.assert_close(model.weight.grad, x.sum(0).expand(2, 3))
    finally:
        if created_group:
            dist.destroy_process_group()


@pytest.mark.slow  # two torchrun launches of 2 ranks each: about a minute
@pytest.mark.skipif(not openclip_env.is_ready(), reason="bench/.venv-openclip is missing (make openclip-venv)")
def test_tiny_run_trains_both_sides_on_two_ranks_and_prints_the_ratio(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ranks"] == 2 and result["global_batch"] == 16 and result["steps"] == 8
    for side in ("ours", "open_clip"):
        (run,) = result["runs"][side]
        assert run["steps_done"] == 8
        # The steady rate leaves out startup, so it is above the whole process's rate.
        assert run["samples_per_s"] > run["wall_samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["samples_per_s"]["ours"] / result["samples_per_s"]["open_clip"])
    assert f"ratio ours/open_clip: {result['ratio']:.3f}" in out.stdout
    # Both trained from the same shards: our resolved config names them, open_clip's command line too.
    ours_cfg = (tmp_path / "ours.yaml").read_text()
    assert result["data"] in ours_cfg
    assert result["data"] in (tmp_path / "logs" / "openclip.log").read_text().splitlines()[0]
    # 2 ranks each: open_clip reports distributed mode; ours logs both ranks' rates.
    assert "Running in distributed mode" in (tmp_path / "openclip_logs" / "openclip" / "out.log").read_text()
    rows = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["samples_per_s_per_rank"]) == 2 for r in rows if "samples_per_s_per_rank" in r)
