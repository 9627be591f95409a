"""WebDataset pipelines: the resumable training stream (resampled or epoch-exact) and a plain evaluation reader.

Letters in names: B batch per rank, C channels, H/W image side, L tokens per caption.

Slots. Each (rank, DataLoader worker) pair is a slot; there are S = world_size x num_workers of them, and
each reads its own deterministic stream of *blocks* (contrastive/sharding.py says which samples: in
epoch-exact mode every sample exactly once per epoch over all slots, in resampled mode shards drawn with
replacement by data.train_weights). A block's samples are mixed by a shuffle buffer drained at the block's
end. Everything random is seeded from (seed, epoch, rank, worker, block[, sample]): the shards a block reads,
the shuffle buffer, and each sample's augmentation, so a run is reproducible.

Epochs and steps. A slot's stream runs on without end, epoch after epoch: batches run across epoch
boundaries instead of dropping or repeating the remainder, so all ranks take the same number of steps
(DDP/DeepSpeed need this), every sample is read exactly once per epoch, and the epoch advances by itself.

Resume. A slot's position is (epoch, block, offset): the next sample is output number `offset` of that block.
Positions are taken from batches the training loop has received (not from prefetched ones), so a checkpoint
holds exactly what was consumed. A resumed slot replays its block's shuffle on sample numbers (the buffer's
order depends on its rng and the count alone), so it knows which samples it gave out without reading them,
and reads only the others (in an indexed shard; a remote one is read from its first byte); with several
DataLoader workers, the round-robin of workers is rotated so the next batch comes from the slot whose turn
it is. Corrupt samples are skipped and counted by reason; the counts are part of the position, so they too
match an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from contrastive.config import DataConfig
from contrastive.device_decode import JpegBatch, JpegBatchBuilder, JpegCrop, JpegDraws, decode_batch, handover_empty
from contrastive.distributed import WorldInfo, host_broadcast_object, rank_and_world_size
from contrastive.errors import UserError
from contrastive.shard_reader import read_block, read_shard, shard_indexes
from contrastive.sharding import (Plan, class_caption_sets, expand_sources, make_seed, remaining_samples,
                                  shard_sizes)
from contrastive.transforms import DecodeThen, FastTransform, decode_image, fast_preprocess, to_rgb

__all__ = ["TrainLoader", "SKIP_REASONS", "eval_samples", "expand_sources", "make_seed", "read_shard",
           "shard_sizes", "decode_image", "fast_preprocess", "to_rgb"]

# Reasons a training sample is skipped. undecodable_on_device (data.decode_on_device): an image that passed
# the worker's JPEG header check but that no decoder could read; found only once its batch was formed, it
# trains as a blank image (see contrastive/device_decode.py).
SKIP_REASONS = ("unreadable_shard", "missing_sample", "no_image", "no_caption", "bad_image", "bad_caption",
                "undecodable_on_device")


@dataclass
class SlotState:
    epoch: int = 0
    block: int = 0
    offset: int = 0
    skipped: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "block": self.block, "offset": self.offset, "skipped": dict(self.skipped)}


@dataclass
class StreamSpec:
    plan: Plan
    slots: list[SlotState]
    worker_offset: int
    batch_size: int
    transform: Callable  # (image bytes, out=None) -> (C, H, W) tensor, or a JpegCrop (data.decode_on_device)
    tokenizer: Callable
    image_key: str
    caption_key: str
    class_sets: list
    class_set_of_shard: list[int]
    caption_sampling: str = "first"  # data.caption_sampling
    captions_per_sample: int = 1  # data.captions_per_sample


def _first_key(sample: dict, keys: str):
    for key in keys.split(";"):
        if key in sample:
            return sample[key]
    return None


def _captions_list(sample: dict) -> list[str]:
    """The non-empty captions in a raw sample's JSON "captions" (the multi-caption format), or [] if it has none
    or its JSON cannot be read (the .txt is used then)."""
    raw = sample.get("json")
    if raw is None:
        return []
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError):  # TypeError: not text; UnicodeDecodeError is a ValueError
        return []
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(captions, list):
        return []
    return [c for c in captions if isinstance(c, str) and c.strip()]


class _SlotStream(IterableDataset):
    """One slot's batches: (images_BCHW, tokens_BL, meta) with meta holding the position after the batch; the
    images are a JpegBatch with data.decode_on_device."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def _blocks(self, worker: int, state: SlotState) -> Iterator[tuple[int, int, list, tuple[int, int, int]]]:
        """(epoch, block, ranges, position of the next block's start) from the slot's position on."""
        plan = self.spec.plan
        slot = plan.rank * max(1, plan.num_workers) + worker
        epoch, block = state.epoch, state.block
        while True:
            if plan.resampled:
                yield epoch, block, plan.resampled_block(worker, block), (epoch, block + 1, 0)
                block += 1
                continue
            blocks = plan.blocks(epoch, slot)
            for b in range(block, len(blocks)):
                yield epoch, b, blocks[b], (epoch, b + 1, 0) if b + 1 < len(blocks) else (epoch + 1, 0, 0)
            epoch, block = epoch + 1, 0

    def _samples(self, worker: int, state: SlotState) -> Iterator[tuple[dict, tuple, tuple]]:
        """(raw sample, its position, the position after it) from the slot's position on. The position after
        the last sample of a block is the next block's start, so a finished epoch reads as finished."""
        plan = self.spec.plan
        offset = state.offset
        for epoch, block, ranges, next_block in self._blocks(worker, state):
            rng = plan.block_rng(epoch, worker, block)
            # Resampled mode indexes no shard at start-up (it reads whole shards): a resume indexes the few it
            # skips into.
            outputs = read_block(ranges, urls=plan.urls, index_of=plan.shard_index, index_missing=plan.resampled,
                                 shuffle_buffer=plan.shuffle_buffer, rng=rng, offset=offset)
            ahead, index = next(outputs, None), offset
            while ahead is not None:
                sample, ahead = ahead, next(outputs, None)
                yield sample, (epoch, block, index), (epoch, block, index + 1) if ahead is not None else next_block
                index += 1
            offset = 0

    def _captions(self, sample: dict, rng: random.Random) -> list[str]:
        """The sample's data.captions_per_sample (K) captions: with several in its JSON's "captions", one drawn
        with `rng` (caption_sampling=random; K > 1: K in a seeded shuffle) or the first K (first), repeated in
        turn when it has fewer than K; else its .txt, else a class template drawn with `rng`, K times;
        raises _Skipped."""
        spec, k = self.spec, self.spec.captions_per_sample
        captions = _captions_list(sample) if spec.caption_sampling == "random" or k > 1 else []
        if captions:
            if spec.caption_sampling == "random":
                # K = 1 keeps the draw of a plain random sampling (one choice), so its runs are unchanged.
                captions = [rng.choice(captions)] if k == 1 else rng.sample(captions, len(captions))
            return [captions[i % len(captions)] for i in range(k)]
        return [self._caption(sample, rng) for _ in range(k)]

    def _caption(self, sample: dict, rng: random.Random) -> str:
        """The sample's .txt, else a class template drawn with `rng`; raises _Skipped."""
        spec = self.spec
        txt = _first_key(sample, spec.caption_key)
        if txt is not None:
            try:
                caption = txt.decode("utf-8") if isinstance(txt, bytes) else str(txt)
            except UnicodeDecodeError:
                raise _Skipped("bad_caption") from None
        else:
            class_set = spec.class_set_of_shard[sample["__shard__"]]
            if "cls" not in sample or class_set < 0:
                raise _Skipped("no_caption")
            classnames, templates = spec.class_sets[class_set]
            try:
                caption = rng.choice(templates).format(c=classnames[int(sample["cls"])])
            except (ValueError, TypeError, IndexError):
                raise _Skipped("no_caption") from None
        if not caption.strip():
            raise _Skipped("bad_caption")
        return caption

    def _class_id(self, sample: dict) -> int:
        """The sample's class as one id across class sets (set << 32 | label), or -1 if it has none."""
        class_set = self.spec.class_set_of_shard[sample["__shard__"]]
        try:
            label = int(sample["cls"]) if class_set >= 0 and "cls" in sample else -1
        except (ValueError, TypeError):
            label = -1
        return class_set << 32 | label if 0 <= label < 2**32 else -1

    def _process(self, sample: dict, seed: int, out: torch.Tensor | None) -> tuple[torch.Tensor, list[str]]:
        """Caption, decode and augment one sample (the image written into `out` if given); raises _Skipped."""
        if "__bad__" in sample:
            raise _Skipped(sample["__bad__"])
        img_bytes = _first_key(sample, self.spec.image_key)
        if img_bytes is None:
            raise _Skipped("no_image")
        captions = self._captions(sample, random.Random(seed))
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            image = self.spec.transform(img_bytes, out=out)
        except Exception:
            raise _Skipped("bad_image") from None
        return image, captions

    def _new_batch(self, image: torch.Tensor | JpegCrop) -> "_PixelBatch | JpegBatchBuilder":
        """An empty batch for samples like the first one; in a worker it lives in shared memory (as
        DataLoader's collate does), so handing it to the training process copies nothing."""
        shared = get_worker_info() is not None
        if isinstance(self.spec.transform, JpegDraws):
            return JpegBatchBuilder(shared=shared)
        return _PixelBatch(image, batch_size=self.spec.batch_size, shared=shared)

    def __iter__(self):
        spec, plan = self.spec, self.spec.plan
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker_id + spec.worker_offset) % num_workers
        state = spec.slots[worker]
        skipped = dict(state.skipped)
        images, captions, keys, classes = None, [], [], []
        # Without DataLoader workers this runs in the training process: per-sample seeding must not move the
        # training's own random streams, so they are saved when a batch starts and restored before it is yielded.
        saved = None
        try:
            for sample, (epoch, block, index), after in self._samples(worker, state):
                if info is None and saved is None:
                    saved = (torch.get_rng_state(), random.getstate())
                seed = make_seed(plan.seed, epoch, plan.rank, worker, block, index)
                slot = images.slot(len(keys)) if images is not None else None
                try:
                    image, sample_captions = self._process(sample, seed, slot)
                except _Skipped as e:
                    skipped[e.reason] = skipped.get(e.reason, 0) + 1
                    continue
                if images is None:
                    images = self._new_batch(image)
                images.put(len(keys), image)
                captions.extend(sample_captions)  # sample-major: sample i's K captions are rows i*K .. i*K+K-1
                keys.append(f"{sample.get('__url__')}#{sample.get('__key__')}")
                classes.append(self._class_id(sample))
                if len(keys) == spec.batch_size:
                    meta = {"worker": worker, "position": after, "skipped": dict(skipped), "keys": keys,
                            "classes": classes}
                    batch = images.finish(), spec.tokenizer(captions), meta
                    images, captions, keys, classes = None, [], [], []
                    if saved is not None:
                        torch.set_rng_state(saved[0])
                        random.setstate(saved[1])
                        saved = None
                    yield batch
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])


class _PixelBatch:
    """A (B, C, H, W) batch of pixel tensors in the first image's memory layout (planes, or channels-last for
    uint8 RGBX pixels), so that each image is written into it as one plain copy, or by the transform itself."""

    def __init__(self, image_CHW: torch.Tensor, *, batch_size: int, shared: bool):
        image_HWC = image_CHW.permute(1, 2, 0)
        channels_last = not image_CHW.is_contiguous() and image_HWC.is_contiguous()
        shape = (batch_size, *(image_HWC if channels_last else image_CHW).shape)
        batch = handover_empty(shape, image_CHW.dtype, shared=shared)
        self.images_BCHW = batch.permute(0, 3, 1, 2) if channels_last else batch

    def slot(self, index: int) -> torch.Tensor:
        """Where the transform may write sample `index` (as `out`)."""
        return self.images_BCHW[index]

    def put(self, index: int, image_CHW: torch.Tensor) -> None:
        row = self.images_BCHW[index]
        if image_CHW.data_ptr() != row.data_ptr():  # not written in place
            row.copy_(image_CHW)

    def finish(self) -> torch.Tensor:
        return self.images_BCHW


class CachedTokenizer:
    """`tokenizer` over a list of captions, each distinct caption tokenised once per batch and remembered
    (up to `max_entries` of them) for later batches: templated and repeated captions cost nothing after the
    first time. The rows are the tokenizer's own."""

    def __init__(self, tokenizer: Callable, max_entries: int = 50_000):
        self.tokenizer, self.max_entries = tokenizer, max_entries
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        distinct = list(dict.fromkeys(captions))
        new = [c for c in distinct if c not in self.rows]
        if len(self.rows) + len(new) > self.max_entries:
            self.rows.clear()  # web captions rarely repeat: start over rather than grow
            new = distinct
        if new:
            self.rows.update(zip(new, self.tokenizer(new)))
        return torch.stack([self.rows[c] for c in captions])


class _Skipped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- the loader

class TrainLoader:
    """Iterates (images_BCHW, tokens_BL) batches for one rank and knows how to resume its position."""

    def __init__(self, cfg: DataConfig, *, preprocess: Callable, tokenizer: Callable, batch_size_per_rank: int,
                 seed: int, world: WorldInfo, on_gpu: bool = False):
        self.cfg = cfg
        self.sources = expand_sources(cfg.train)
        if cfg.train_weights and len(cfg.train_weights) != len(self.sources):
            raise UserError(f"data.train_weights has {len(cfg.train_weights)} weights for {len(self.sources)} "
                            f"'::' sources")
        if cfg.train_weights and not cfg.resampled:
            raise UserError("data.train_weights needs data.resampled=true: epoch-exact mode reads every sample once "
                            "per epoch, so sources cannot be weighted")
        urls = [u for source in self.sources for u in source]
        # Epoch-exact mode needs every size; resampled mode draws shards without them (with train_weights,
        # an uncounted shard is taken to hold the mean of the counted ones, or all the same if none is).
        # Epoch-exact slots start mid-shard, where an index finds their first sample (resampled mode reads whole
        # shards). Local shards without index files are indexed from their headers only where there are at
        # least a quarter as many slots as shards: read from byte 0, a slot reads on average half a shard
        # before its start, about slots / (2 x shards) of an epoch in all (under an eighth here), while a header
        # walk costs ~20 us a member (LAION-400M's 41k shards: hours on one core at every start). Rank 0 alone
        # counts (a remote shard is read whole) and indexes; the other ranks take its results.
        num_slots = world.world_size * max(1, cfg.num_workers)
        survey = None
        if rank_and_world_size()[0] == 0:
            try:
                survey = (shard_sizes(urls, count_unknown=not cfg.resampled),
                          shard_indexes(urls, build=not cfg.resampled and 4 * num_slots >= len(urls)))
            except Exception as exn:  # e.g. a remote shard that fails: every rank stops, none waits for rank 0
                survey = exn
        survey = host_broadcast_object(survey)
        if isinstance(survey, Exception):
            raise survey
        sizes, index = survey
        num_workers = cfg.num_workers
        if not cfg.resampled and sum(s or 0 for s in sizes) == 0:
            raise UserError(f"data.train {cfg.train!r} holds no samples")
        self.plan = Plan(urls=urls, sizes=sizes, resampled=cfg.resampled,
                         shard_weights=self._shard_weights(sizes), seed=seed, rank=world.rank,
                         world_size=world.world_size, num_workers=num_workers,
                         block_samples=cfg.block_samples or max(1000, 10 * cfg.shuffle_buffer),
                         shuffle_buffer=cfg.shuffle_buffer, index=index)
        self.transform = fast_preprocess(preprocess) if cfg.fast_decode else DecodeThen(preprocess)
        want_uint8 = on_gpu if cfg.uint8_batches is None else cfg.uint8_batches
        if cfg.decode_on_device:
            fast = self.transform
            if not isinstance(fast, FastTransform) or fast.kind != "crop":
                raise UserError("data.decode_on_device=true needs the model's plain open_clip train transform "
                                "(a random resized crop; this one has other steps such as colour jitter): set it "
                                "to false")
            self.device_transform = fast
            self.transform = JpegDraws(fast.as_uint8())
        elif want_uint8 and hasattr(self.transform, "as_uint8"):
            self.transform = self.transform.as_uint8()
        elif cfg.uint8_batches:
            raise UserError("data.uint8_batches=true needs the model's plain open_clip transform (this one has "
                            "PIL steps such as colour jitter): set it to false")
        self.class_sets, self.class_set_of_shard = class_caption_sets(urls)
        self.tokenizer = tokenizer
        self.batch_size = batch_size_per_rank
        self.seed, self.world, self.on_gpu = seed, world, on_gpu
        self.num_workers = num_workers
        self.slots = [SlotState() for _ in range(max(1, num_workers))]
        self.num_undecodable_on_device = 0  # counted by to_device, in the order batches are consumed
        self.num_batches = 0
        self.last_keys: list[str] = []
        self.last_classes = torch.empty(0, dtype=torch.int64)

    def _shard_weights(self, sizes: list[int | None]) -> list[float]:
        """Draw chances per shard. A drawn shard is read whole, so equal chances make every sample equally
        likely; data.train_weights are shares of samples: a source's chance is its weight divided by the
        samples one of its shards holds on average, spread evenly over its shards."""
        known = [s for s in sizes if s]
        guess = sum(known) / len(known) if known else 1.0
        size = [float(guess if s is None else s) for s in sizes]
        if not any(size):
            raise UserError(f"data.train {self.cfg.train!r} holds no samples")
        weights = self.cfg.train_weights or [1.0] * len(self.sources)
        chances, start = [], 0
        for source, weight in zip(self.sources, weights):
            own = size[start:start + len(source)]
            start += len(source)
            if not sum(own):
                if self.cfg.train_weights and weight > 0:
                    raise UserError(f"the data.train source starting at {source[0]} holds no samples but has a weight")
                chances += [0.0] * len(own)
                continue
            per_shard = sum(own) / len(own)
            share = weight / per_shard if self.cfg.train_weights else 1.0
            chances += [share / len(own) if self.cfg.train_weights else (1.0 if s else 0.0) for s in own]
        total = sum(chances)
        return [c / total for c in chances]

    def to_device(self, images_BCHW: torch.Tensor | JpegBatch, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        """A batch on the training device as the model takes it: JPEG batches (data.decode_on_device) are
        decoded, cropped, resampled and normalised there (contrastive/device_decode.py); uint8 batches
        (data.uint8_batches: RGBX pixels in channels-last memory) are moved, then normalised there into plain
        (B, 3, H, W) planes, bit for bit what the workers would have written; float batches are moved."""
        if isinstance(images_BCHW, JpegBatch):
            images_BCHW, num_undecodable = decode_batch(images_BCHW, fast=self.device_transform, device=device,
                                                        dtype=dtype)
            self.num_undecodable_on_device += num_undecodable
            return images_BCHW
        if images_BCHW.dtype != torch.uint8:
            return images_BCHW.to(device, dtype=dtype, non_blocking=True)
        return self.transform.normalize.normalize_batch(images_BCHW.to(device, non_blocking=True)).to(dtype)

    # -- position

    @property
    def epoch(self) -> int:
        """Epoch-exact: the epoch the next batch starts in (the earliest over this rank's slots).
        Resampled: complete passes over the data's size, counted in samples this rank's slots have read."""
        if not self.plan.resampled:
            return min(s.epoch for s in self.slots)
        return 0 if not self.plan.num_samples else \
            self.num_batches * self.batch_size * self.world.world_size // self.plan.num_samples

    def skipped_by_reason(self) -> dict[str, int]:
        """Samples this rank skipped so far, by reason (see SKIP_REASONS)."""
        totals: dict[str, int] = {}
        for slot in self.slots:
            for reason, count in slot.skipped.items():
                totals[reason] = totals.get(reason, 0) + count
        if self.num_undecodable_on_device:
            totals["undecodable_on_device"] = self.num_undecodable_on_device
        return dict(sorted(totals.items()))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped_by_reason().values())

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.plan.urls, self.plan.sizes]).encode())
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict:
        epoch = min(s.epoch for s in self.slots)
        return {"version": 2, "resampled": self.plan.resampled, "num_workers": self.num_workers,
                "world_size": self.world.world_size, "rank": self.world.rank, "seed": self.seed,
                "data": self._fingerprint(), "num_batches": self.num_batches,
                "slots": [s.as_dict() for s in self.slots],
                "num_undecodable_on_device": self.num_undecodable_on_device,
                "block_samples": self.plan.block_samples, "shuffle_buffer": self.plan.shuffle_buffer,
                "remaining": {str(e): ranges for e, ranges in self.plan.remaining.items() if e >= epoch}}

    def _check_resumable(self, state: dict, keys: tuple[str, ...]) -> None:
        if state.get("version") != 2:
            raise UserError("the checkpoint's data position comes from an older loader and cannot be resumed exactly")
        mine = {"resampled": self.plan.resampled, "num_workers": self.num_workers, "world_size": self.world.world_size,
                "rank": self.world.rank, "seed": self.seed}
        for key in keys:
            if state[key] != mine[key]:
                raise UserError(f"cannot resume the data stream exactly: the checkpoint has {key}={state[key]}, "
                                f"this run {mine[key]}; use the same value")
        if state["data"] != self._fingerprint():
            raise UserError("cannot resume the data stream exactly: data.train names other shards (or shards of "
                            "other sizes) than the checkpoint's run; train on the same shards to resume")

    def load_state_dict(self, state: dict) -> None:
        self._check_resumable(state, ("resampled", "num_workers", "world_size", "rank", "seed"))
        self.num_batches = int(state["num_batches"])
        self.num_undecodable_on_device = int(state.get("num_undecodable_on_device", 0))
        self.slots = [SlotState(s["epoch"], s["block"], s["offset"], dict(s["skipped"])) for s in state["slots"]]
        self.plan.remaining = _remaining_from_json(state.get("remaining", {}))

    def load_resharded(self, states: list[dict]) -> None:
        """Continue from the global position of a run with another number of ranks or DataLoader workers
        (`states`: every old rank's state_dict, in rank order). Epoch-exact mode: the samples the old slots had
        yet to read in the epochs they were in are read first, cut over this run's slots (Plan.remaining), then
        the next epochs as usual, so no sample is read twice or skipped. Resampled mode: every slot starts a
        block past the furthest an old slot reached. The old ranks' skip counts go to rank 0's first slot."""
        for state in states:
            self._check_resumable(state, ("resampled", "seed"))
        first = states[0]
        positions = {(state["rank"], worker): (slot["epoch"], slot["block"], slot["offset"])
                     for state in states for worker, slot in enumerate(state["slots"])}
        fresh = [SlotState() for _ in self.slots]
        if self.plan.resampled:
            block = max(b for _, b, _ in positions.values()) + 1
            fresh = [SlotState(0, block, 0) for _ in self.slots]
        else:
            old = replace(self.plan, world_size=first["world_size"], num_workers=first["num_workers"],
                          block_samples=first.get("block_samples", self.plan.block_samples),
                          shuffle_buffer=first.get("shuffle_buffer", self.plan.shuffle_buffer),
                          remaining=_remaining_from_json(first.get("remaining", {})))
            self.plan.remaining = remaining_samples(old, positions)
            fresh = [SlotState(min(e for e, _, _ in positions.values()), 0, 0) for _ in self.slots]
        if self.world.rank == 0:
            for state in states:
                for slot in state["slots"]:
                    for reason, count in slot["skipped"].items():
                        fresh[0].skipped[reason] = fresh[0].skipped.get(reason, 0) + count
            self.num_undecodable_on_device = sum(int(s.get("num_undecodable_on_device", 0)) for s in states)
        self.slots = fresh
        self.num_batches = int(first["num_batches"])  # every rank takes one batch a step

    # -- iteration

    def batches_with_keys(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """(images_BCHW, tokens_BL, sample keys "url#key"), advancing the position batch by batch."""
        num_slots = max(1, self.num_workers)
        spec = StreamSpec(plan=self.plan, slots=[SlotState(**s.as_dict()) for s in self.slots],
                          worker_offset=self.num_batches % num_slots, batch_size=self.batch_size,
                          transform=self.transform, tokenizer=CachedTokenizer(self.tokenizer),
                          image_key=self.cfg.image_key, caption_key=self.cfg.caption_key,
                          caption_sampling=self.cfg.caption_sampling,
                          captions_per_sample=self.cfg.captions_per_sample, class_sets=self.class_sets,
                          class_set_of_shard=self.class_set_of_shard)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": False}
        # The DataLoader draws a base seed from this generator, not the global one, so starting the loader
        # does not move the training process's random stream (every sample is seeded by position anyway).
        # Pinned batches (on a GPU) make the step's non-blocking copies truly asynchronous: from pageable memory
        # a host-to-device copy first waits for the device.
        loader = DataLoader(_SlotStream(spec), batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed), pin_memory=self.on_gpu, **kwargs)
        for images, tokens, meta in loader:
            epoch, block, offset = meta["position"]
            self.slots[meta["worker"]] = SlotState(epoch, block, offset, meta["skipped"])
            self.num_batches += 1
            self.last_keys = meta["keys"]
            # Class ids (loss.positives=class), -1 where a sample has none. They travel as a list: each tensor
            # in a batch from a worker costs the training process a shared-memory handle to open.
            self.last_classes = torch.tensor(meta["classes"], dtype=torch.int64)
            yield images, tokens, meta["keys"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, tokens, _ in self.batches_with_keys():
            yield images, tokens


def _remaining_from_json(saved: dict) -> dict[int, list[tuple[int, int, int]]]:
    return {int(e): [tuple(r) for r in ranges] for e, ranges in saved.items()}


def eval_samples(spec: str, *, handler_counts: dict | None = None) -> Iterator[dict]:
    """Raw samples of a shard set in order (no shuffle), for evaluation; corrupt tar members are counted."""
    import webdataset as wds

    counts = handler_counts if handler_counts is not None else {}

    def count_and_continue(exn):
        counts["corrupt"] = counts.get("corrupt", 0) + 1
        return True

    urls = [u for source in expand_sources(spec) for u in source]
    yield from wds.tarfile_to_samples(handler=count_and_continue)({"url": u} for u in urls)
