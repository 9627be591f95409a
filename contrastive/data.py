"""WebDataset pipelines: a deterministic, resumable training stream and a plain evaluation reader.

Every (rank, worker) pair reads its own deterministic stream: the shards it draws, the shuffle buffer and
the augmentation of each sample are seeded from (seed, rank, worker, sample index). A checkpoint stores
how many samples each worker's stream has delivered in consumed batches; a resumed loader replays each
stream and drops that many samples before decoding, so training continues with exactly the batches an
uninterrupted run would have seen next.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from contrastive.config import DataConfig
from contrastive.distributed import WorldInfo
from contrastive.errors import UserError


def expand_sources(spec: str) -> list[list[str]]:
    """'a/{000..009}.tar::b.tar' -> [[a/000.tar, ...], [b.tar]]; local files must exist."""
    import os

    import braceexpand

    if not spec:
        raise UserError("no data given: set data.train (a shard spec such as data/train/{00000..00009}.tar)")
    sources = []
    for part in spec.split("::"):
        urls = list(braceexpand.braceexpand(part.strip()))
        is_local = ["://" not in u and not u.startswith("pipe:") for u in urls]
        missing = [u for u, local in zip(urls, is_local) if local and not os.path.exists(u)]
        if missing:
            raise UserError(f"data path {missing[0]} does not exist ({len(missing)} of {len(urls)} shards of {part!r} missing)")
        sources.append(urls)
    return sources


def make_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    import hashlib

    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def decode_image(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _first_key(sample: dict, keys: str):
    for key in keys.split(";"):
        if key in sample:
            return sample[key]
    return None


@dataclass
class StreamSpec:
    """What a worker needs to rebuild its stream; picklable for DataLoader workers."""

    sources: list[list[str]]
    weights: list[float]
    cfg: DataConfig
    preprocess: Callable
    tokenizer: Callable
    batch_size: int
    seed: int
    rank: int
    skip_per_worker: list[int]
    # DataLoader worker i plays logical stream (i + worker_offset) % num_workers, so that a resumed loader,
    # whose first batch comes from DataLoader worker 0, continues the round-robin where the last one stopped.
    worker_offset: int = 0


class _TrainStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def _shard_urls(self, rng: random.Random) -> Iterator[str]:
        sources, weights = self.spec.sources, self.spec.weights
        while True:
            source = rng.choices(range(len(sources)), weights=weights)[0] if len(sources) > 1 else 0
            yield rng.choice(sources[source])

    def __iter__(self):
        import webdataset as wds

        spec, cfg = self.spec, self.spec.cfg
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + spec.worker_offset) % num_workers
        stream_seed = make_seed(spec.seed, spec.rank, worker)
        skipped = {"corrupt": 0}

        def count_and_continue(exn):
            skipped["corrupt"] += 1
            return True

        rng = random.Random(stream_seed)
        raw = wds.tarfile_to_samples(handler=count_and_continue)({"url": u} for u in self._shard_urls(rng))
        if cfg.shuffle_buffer > 1:
            raw = wds.filters._shuffle(raw, cfg.shuffle_buffer, min(cfg.shuffle_buffer, 100),
                                       rng=random.Random(stream_seed + 1))
        to_skip = spec.skip_per_worker[worker] if worker < len(spec.skip_per_worker) else 0
        position = 0
        images, texts = [], []
        for sample in raw:
            position += 1
            if position <= to_skip:
                continue
            try:
                img_bytes = _first_key(sample, cfg.image_key)
                txt = _first_key(sample, cfg.caption_key)
                if img_bytes is None or txt is None:
                    raise ValueError("sample lacks an image or a caption")
                caption = txt.decode("utf-8") if isinstance(txt, bytes) else str(txt)
                torch.manual_seed(make_seed(stream_seed, position))
                image = spec.preprocess(decode_image(img_bytes))
            except Exception:
                skipped["corrupt"] += 1
                continue
            images.append(image)
            texts.append(caption)
            if len(images) == spec.batch_size:
                meta = {"worker": worker, "position": position, "skipped": dict(skipped)}
                yield torch.stack(images), spec.tokenizer(texts), meta
                images, texts = [], []


class TrainLoader:
    """Iterates (images_BCHW, tokens_BL) batches for one rank and knows how to resume its position."""

    def __init__(self, cfg: DataConfig, *, preprocess: Callable, tokenizer: Callable, batch_size_per_rank: int,
                 seed: int, world: WorldInfo):
        self.cfg = cfg
        self.sources = expand_sources(cfg.train)
        weights = list(cfg.train_weights) or [1.0] * len(self.sources)
        if len(weights) != len(self.sources):
            raise UserError(f"data.train_weights has {len(weights)} weights for {len(self.sources)} '::' sources")
        self.weights = weights
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size = batch_size_per_rank
        self.seed, self.world = seed, world
        self.num_workers = cfg.num_workers
        self.position = [0] * max(1, self.num_workers)
        self.num_batches = 0
        self.skipped = [dict() for _ in range(max(1, self.num_workers))]

    def state_dict(self) -> dict:
        return {"position": list(self.position), "num_batches": self.num_batches, "num_workers": self.num_workers, "rank": self.world.rank,
                "world_size": self.world.world_size, "seed": self.seed, "skipped": [dict(s) for s in self.skipped]}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_workers", self.num_workers), ("world_size", self.world.world_size), ("seed", self.seed)):
            if state[key] != mine:
                raise UserError(f"cannot resume the data stream exactly: the checkpoint has {key}={state[key]}, "
                                f"this run {mine}; use the same value")
        self.position = list(state["position"])
        self.num_batches = int(state["num_batches"])
        self.skipped = [dict(s) for s in state["skipped"]]

    @property
    def num_skipped(self) -> int:
        return sum(sum(s.values()) for s in self.skipped)

    def __iter__(self):
        spec = StreamSpec(self.sources, self.weights, self.cfg, self.preprocess, self.tokenizer, self.batch_size,
                          self.seed, self.world.rank, list(self.position),
                          worker_offset=self.num_batches % max(1, self.num_workers))
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": False}
        loader = DataLoader(_TrainStream(spec), batch_size=None, num_workers=self.num_workers, **kwargs)
        for images, texts, meta in loader:
            self.position[meta["worker"]] = meta["position"]
            self.skipped[meta["worker"]] = meta["skipped"]
            self.num_batches += 1
            yield images, texts


def eval_samples(spec: str, *, handler_counts: dict | None = None) -> Iterator[dict]:
    """Raw samples of a shard set in order (no shuffle), for evaluation; corrupt tar members are counted."""
    import webdataset as wds

    counts = handler_counts if handler_counts is not None else {}

    def count_and_continue(exn):
        counts["corrupt"] = counts.get("corrupt", 0) + 1
        return True

    urls = [u for source in expand_sources(spec) for u in source]
    yield from wds.tarfile_to_samples(handler=count_and_continue)({"url": u} for u in urls)
