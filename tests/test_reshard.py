"""Resuming on another number of ranks, ZeRO stage or precision (contrastive/resume.py), and resume checks that
every rank agrees on. Gloo ranks on the CPU; on GPUs only the transport of the same collectives differs (NCCL for
DeepSpeed's gathers, the group's gloo side for the verdicts), which bench/gpu_check.py's resume run covers."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from contrastive.errors import UserError
from tests.test_data import _loader, _make_set, _take


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
