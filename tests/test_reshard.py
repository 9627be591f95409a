"""Resuming on another number of ranks, ZeRO stage or precision (contrastive/resume.py), and resume checks that
every rank agrees on. Gloo ranks on the CPU; on GPUs only the transport of the same collectives differs (NCCL for
DeepSpeed's gathers, the group's gloo side for the verdicts), which bench/gpu_check.py's resume run covers."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter

import pytest

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
