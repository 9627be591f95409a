"""Resuming on another number of ranks, ZeRO stage or precision (contrastive/resume.py), and resume checks that
every rank agrees on. Gloo ranks on the CPU; what differs on GPUs and which check covers it: contrastive/resume.py."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections import Counter

import pytest
import torch

from contrastive.errors import UserError
from tests.test_data import _loader, _make_set, _take
from tests.test_deepspeed import _env, _losses, _run, _train_cmd


# ---------------------------------------------------------------- the data stream across a change of slots

def _keys(loader, num_samples: int) -> list[str]:
    keys: list[str] = []
    for _, _, batch_keys in loader.batches_with_keys():
        keys += batch_keys
        if len(keys) >= num_samples:
            return keys[:num_samples]
    raise AssertionError("the stream ended")


def _every_sample(spec: str) -> Counter:
    """The sample keys of one epoch of a single unshuffled slot: every sample once (tests/test_data.py checks)."""
    loader = _loader(spec, resampled=False, shuffle_buffer=0, batch=1)
    every = Counter(_keys(loader, loader.plan.num_samples))
    assert set(every.values()) == {1}
    return every


def _epoch_part(loader, epoch: int) -> int:
    """How many samples of epoch `epoch` this rank's single slot reads."""
    return sum(hi - lo for _, lo, hi in loader.plan.epoch_ranges(epoch, loader.world.rank))


@pytest.mark.parametrize("old_ranks,new_ranks", [(2, 1), (1, 2), (2, 3)])
def test_epoch_exact_reads_every_sample_once_across_a_change_of_ranks(tmp_path, old_ranks, new_ranks):
    """123 samples; the old ranks stop mid-epoch and mid-block (shuffled); the new ranks read exactly the samples
    the old ones had not, then the next epoch whole."""
    spec = _make_set(tmp_path / "set", [37, 23, 41, 22])
    every = _every_sample(spec)
    global_batch = 6
    old = [_loader(spec, rank=r, world_size=old_ranks, batch=global_batch // old_ranks, resampled=False)
           for r in range(old_ranks)]
    read = Counter()
    for loader in old:
        for _, _, keys in _take(loader, 7):
            read.update(keys)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]  # as the rank files hold them
    assert len(read) == 42 and set(read.values()) == {1}
    new = [_loader(spec, rank=r, world_size=new_ranks, batch=global_batch // new_ranks, resampled=False)
           for r in range(new_ranks)]
    for loader in new:
        loader.load_resharded(states)
    rest, next_epoch = Counter(), Counter()
    for loader in new:
        part = _epoch_part(loader, 0)
        keys = _keys(loader, part + _epoch_part(loader, 1))
        rest.update(keys[:part])
        next_epoch.update(keys[part:])
    assert sum(rest.values()) == 123 - 42
    assert read + rest == every  # epoch 0: every sample exactly once across the change
    assert next_epoch == every  # epoch 1: as usual
    # A resume at the new size (the same layout) continues the remainder exactly: state -> same keys.
    loader = new[0]
    again = _loader(spec, rank=0, world_size=new_ranks, batch=global_batch // new_ranks, resampled=False)
    again.load_state_dict(json.loads(json.dumps(new[0].state_dict())))
    assert _keys(again, 12) == _keys(loader, 12)


def test_a_part_read_epoch_resharded_twice_still_reads_every_sample_once(tmp_path):
    spec = _make_set(tmp_path / "set", [30, 31, 29])
    every = _every_sample(spec)
    read = Counter()
    states = None
    for ranks, batches in ((2, 4), (3, 3), (1, 0)):
        loaders = [_loader(spec, rank=r, world_size=ranks, batch=6 // ranks, resampled=False) for r in range(ranks)]
        for loader in loaders:
            if states:
                loader.load_resharded(states)
            for _, _, keys in _take(loader, batches) if batches else []:
                read.update(keys)
        states = [loader.state_dict() for loader in loaders]
    last = loaders[0]
    read.update(_keys(last, _epoch_part(last, 0)))
    assert read == every


def test_resampled_mode_starts_past_every_old_block(tmp_path):
    spec = _make_set(tmp_path / "set", [10] * 6)
    old = [_loader(spec, rank=r, world_size=2, resampled=True, block_samples=10) for r in range(2)]
    for loader in old:
        _take(loader, 5)
    new = _loader(spec, rank=0, world_size=1, batch=10, resampled=True, block_samples=10)
    new.load_resharded([loader.state_dict() for loader in old])
    furthest = max(s["block"] for loader in old for s in loader.state_dict()["slots"])
    assert [s.block for s in new.slots] == [furthest + 1]


# ---------------------------------------------------------------- checks every rank agrees on

def _launch_rank(rank: int, port: int, run, overrides: list[str]):
    """One rank as srun starts it: its own process, ranks from the environment, no agent to end the others."""
    import subprocess

    env = _env()
    env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(_train_cmd(run, 1, overrides), cwd=run.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, synthetic_data) -> dict:
    """A 2-rank ZeRO-1 run of 3 steps with its checkpoint, shared by the tests below (copy before changing)."""
    run = tmp_path_factory.mktemp("reshard") / "two_ranks"
    overrides = [f"data.train={synthetic_data['train']}", "model.name=tiny-vit-32", "train.batch_size=32",
                 "data.num_workers=0", "data.shuffle_buffer=64", "optim.warmup_steps=2", "eval.evaluators=[]",
                 "train.log_every=1", "optim.lr=2e-3", "train.checkpoint_every=3"]
    _run(run, 2, overrides + ["train.steps=3", "deepspeed.zero_stage=1"])
    return {"run": run, "overrides": overrides}


def _copy_run(two_rank_run, dest):
    shutil.copytree(two_rank_run["run"], dest)
    return dest


def test_a_rank_file_missing_fails_on_every_rank_before_any_load(tmp_path, two_rank_run):
    """Rank 1's file is gone: before, rank 1 stopped while rank 0 entered DeepSpeed's collective load and waited
    there until the group's timeout. Now both ranks stop at once with the same line."""
    from tests.dist import free_port

    run = _copy_run(two_rank_run, tmp_path / "run")
    (run / "checkpoints" / "step_00000003" / "rank_00001.json").unlink()
    # Without its manifest (a checkpoint from before complete.json, or files that went missing on one node only)
    # the file is not caught when `latest` is resolved: the ranks' own checks must agree.
    (run / "checkpoints" / "step_00000003" / "complete.json").unlink()
    port = free_port()
    overrides = two_rank_run["overrides"] + ["train.steps=6", "deepspeed.zero_stage=1", "train.resume=latest",
                                             "train.dist_timeout_s=60"]
    procs = [_launch_rank(rank, port, run, overrides) for rank in range(2)]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=50)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung: the ranks did not agree before the collective load")
    lines = [[line for line in out.splitlines() if "error:" in line] for out in outs]
    for proc, found, out in zip(procs, lines, outs):
        assert proc.returncode == 2, out[-2000:]
        assert found == [f"contrastive train: error: cannot resume: checkpoint {run / 'checkpoints' / 'step_00000003'} "
                         f"is incomplete: rank 0 finds no rank_00001.json (and 1 other rank(s)); resume from an "
                         f"earlier checkpoint with train.resume=PATH"], out[-2000:]


def _agree_body(rank: int, world_size: int, path: str):
    from pathlib import Path

    from contrastive.distributed import WorldInfo
    from contrastive.resume import agree_on_resume

    out = []
    for elsewhere_on_rank in (None, 1):  # every rank the same checkpoint; rank 1 another one
        try:
            plan = agree_on_resume(Path(path + ("-elsewhere" if rank == elsewhere_on_rank else "")),
                                   world=WorldInfo(rank, world_size), zero_stage=2, precision="fp32")
            out.append({"reshard": plan.reshard, "saved": str(plan.saved)})
        except UserError as e:
            out.append({"error": str(e)})
    return out


def test_ranks_compare_the_saved_layout_and_refuse_together_when_they_resolve_different_checkpoints(two_rank_run):
    from tests.dist import run_ranks

    ckpt = str(two_rank_run["run"] / "checkpoints" / "step_00000003")
    (same, differ), other_rank = run_ranks(_agree_body, world_size=2, args=(ckpt,), timeout_s=30)
    # World size and ZeRO stage are compared now: 2 ranks at stage 2 reshard a stage-1 checkpoint.
    assert same == {"reshard": True, "saved": "2 rank(s), ZeRO stage 1, fp32"}
    assert "resolved train.resume to different checkpoints" in differ["error"]
    assert other_rank == [same, differ]


# ---------------------------------------------------------------- model and optimizer state across layouts

LAYOUTS = [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "fp32")]  # stage 0 bf16 runs as 1: deepspeed_config


def _live_state(engine) -> tuple[dict, dict, int]:
    """An engine's fp32 weights, Adam moments and step as DeepSpeed's own API gathers them (a collective under
    ZeRO; every rank calls it): the reference the files are read against."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights, moments = {}, {}
    plain = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8's ZeRO 1/2 links each parameter to its moments after the first group's first step,
        # before the later groups have any: link again now that all have them.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        if plain:
            weights[name] = p.detach().float().clone()
            moments[name] = {k: engine.optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
        else:
            weights[name] = safe_get_full_fp32_param(p).clone()
            moments[name] = {k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}
    state = engine.optimizer.state if plain else engine.optimizer.optimizer.state
    return weights, moments, {int(s["step"]) for s in state.values()}.pop()


def _trained_engine(stage: int, precision: str, *, steps: int, world_size: int, rank: int):
    from contrastive.losses import build_loss
    from contrastive.train import train_step
    from tests.test_deepspeed import _batch, _engine

    cfg, bundle, engine = _engine([f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                                   "train.batch_size=8", "optim.weight_decay=0.1"])
    for step in range(steps):
        images, texts = _batch(bundle, 8 // world_size, seed=100 * step + rank)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        train_step(engine, (images.to(dtype), texts), loss_fn=build_loss(cfg.loss))
    return engine


def _save_and_gather_body(rank: int, world_size: int, out: str):
    live = {}
    for stage, precision in LAYOUTS:
        engine = _trained_engine(stage, precision, steps=2, world_size=world_size, rank=rank)
        engine.save_checkpoint(out, tag=f"{stage}-{precision}", save_latest=False)
        live[(stage, precision)] = _live_state(engine)
    return live if rank == 0 else None


def _assert_same_state(got, weights: dict, moments: dict, step: int, what: str):
    got_weights, got_moments, got_step = got
    assert got_step == step, what
    assert set(got_weights) == set(weights), what
    for name in weights:
        assert torch.equal(got_weights[name], weights[name]), (what, name)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got_moments[name][key], moments[name][key]), (what, name, key)


def test_state_read_from_the_files_of_every_layout_equals_deepspeeds_and_goes_into_every_other(tmp_path):
    """Read: the FullState of 2-rank checkpoints (ZeRO 0-3, fp32 and bf16) equals what DeepSpeed's live gather
    gives at save time, exactly. Write: that state put into a 1-rank engine of each other layout reads back
    exactly (the new engine's own gather), so resuming there continues from the very same state."""
    from pathlib import Path

    from contrastive.resume import Layout, apply_full_state, optimizer_names, read_full_state
    from tests.dist import run_ranks

    live = run_ranks(_save_and_gather_body, world_size=2, args=(str(tmp_path),), timeout_s=300)[0]
    for (stage, precision), (weights, moments, step) in live.items():
        target_stage, target_precision = {0: (2, "fp32"), 1: (0, "fp32"), 2: (3, "fp32"), 3: (1, "bf16")}[stage]
        target = _trained_engine(target_stage, target_precision, steps=0, world_size=1, rank=0)
        saved = Layout(2, max(stage, int(precision == "bf16")), precision)
        full = read_full_state(Path(tmp_path) / f"{stage}-{precision}", layout=saved,
                               optimizer_names=optimizer_names(target))
        _assert_same_state((full.weights, full.moments, full.optimizer_step), weights, moments, step,
                           f"read {stage}-{precision}")
        apply_full_state(target, target.lr_scheduler, full)
        _assert_same_state(_live_state(target), weights, moments, step,
                           f"{stage}-{precision} written at {target_stage}-{target_precision}")


def test_a_two_rank_run_continues_on_one_rank_then_on_two_at_other_zero_stages(tmp_path, two_rank_run):
    """2 ranks at ZeRO 1 -> 1 rank at ZeRO 0 and, from the same checkpoint, 1 rank at ZeRO 2: the two resumed
    runs start from the same consolidated state through different engines and read the same data, so their
    losses agree to float tolerance. Then 1 rank -> 2 ranks at ZeRO 3 finishes the run."""
    from contrastive.config import load_config
    from contrastive.train import train

    overrides = two_rank_run["overrides"] + ["train.steps=6", "train.resume=latest"]
    losses, lrs = {}, {}
    for stage in (0, 2):
        run = _copy_run(two_rank_run, tmp_path / f"zero{stage}")
        train(load_config(None, overrides + [f"deepspeed.zero_stage={stage}"]), run, progress=False)
        losses[stage] = _losses(run)
        lrs[stage] = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert list(losses[stage]) == [1, 2, 3, 4, 5, 6]
    assert lrs[0] == pytest.approx(lrs[2], rel=1e-12)
    for step in (4, 5, 6):
        assert losses[0][step] == pytest.approx(losses[2][step], rel=1e-5), step
    run = tmp_path / "zero0"
    _run(run, 2, overrides[:-2] + ["train.steps=8", "train.resume=latest", "deepspeed.zero_stage=3"])
    again = _losses(run)
    assert list(again) == list(range(1, 9)) and all(math.isfinite(v) for v in again.values())
    assert {s: again[s] for s in range(1, 7)} == losses[0]
