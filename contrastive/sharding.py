"""Shard lists and the plan of which samples each (rank, worker) slot reads, in both training modes.

Epoch-exact mode. Epoch e lists every sample of every source once: shards in an order shuffled by
(seed, e), samples in shard order. That list is cut into S contiguous pieces, one per slot (S = world_size x
num_workers), of floor(N/S) or floor(N/S)+1 samples (N samples in all); which slots get the N mod S extra
samples rotates from epoch to epoch, so at any epoch boundary every slot has read the same number of samples
to within one. A piece enters at most two shards mid-way. Shard sizes come from sizes.json (or img2dataset's
*_stats.json), else the shards are counted once.

Resampled mode. Each block draws shards with replacement. A drawn shard is read whole, so equal chances per
shard make every sample equally likely; with data.train_weights the share of samples from source i is
weight_i / sum(weights), each source's own samples equally likely.

Resuming on another number of slots (contrastive/resume.py). The samples the old slots had not read yet of the
epochs they were in (sharding.remaining_samples: whole blocks, and the shuffle of a part-read block replayed) become
those epochs' lists (Plan.remaining), cut over the new slots as above; later epochs are as always. So across the
change every sample is still read exactly once per epoch. Resampled mode has no such list: the new slots start a
block past the furthest any old slot reached, so no draw repeats.

Either way a slot's stream is a sequence of blocks: lists of (shard, first sample, end) ranges of at least
data.block_samples samples, the unit of shuffling and of resuming. contrastive/shard_reader.py reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from contrastive.errors import UserError
from contrastive.shard_reader import ShardIndex, count_samples, is_local, load_index, shuffle_order


CLASS_TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DEFAULT_CLASS_TEMPLATES = ("a photo of a {c}.",)


def _natural_key(name: str) -> list:
    """Sort key that puts 2.tar before 10.tar (CLIP_benchmark numbers shards without zero-padding)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def folder_shards(folder: str) -> list[str]:
    """The .tar shards directly in `folder` (img2dataset's output folder, a CLIP_benchmark split folder), in
    numeric order; the .parquet, _stats.json and index files beside them are not shards."""
    names = sorted((e.name for e in os.scandir(folder) if e.name.endswith(".tar") and e.is_file()), key=_natural_key)
    if not names:
        splits = sorted(e.name for e in os.scandir(folder) if e.is_dir() and any(Path(e.path).glob("*.tar")))
        hint = f" (its sub-folders {', '.join(splits)} do: name one)" if splits else ""
        raise UserError(f"the folder {folder} holds no .tar shards{hint}")
    return [os.path.join(folder, name) for name in names]


def expand_sources(spec: str) -> list[list[str]]:
    """'a/{000..009}.tar::b.tar::c/' -> [[a/000.tar, ...], [b.tar], [c/00000.tar, ...]]: brace expansion, and a
    local folder stands for the .tar shards in it; local files must exist."""
    import braceexpand

    if not spec:
        raise UserError("no data given: set data.train (a shard spec such as data/train/{00000..00009}.tar)")
    sources = []
    for part in spec.split("::"):
        urls = list(braceexpand.braceexpand(part.strip()))
        if not urls or not all(urls):
            raise UserError(f"the shard spec {part!r} is empty; join sources with a single '::'")
        urls = [shard for u in urls for shard in (folder_shards(u) if is_local(u) and os.path.isdir(u) else [u])]
        missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
        if missing:
            raise UserError(f"data path {missing[0]} does not exist ({len(missing)} of {len(urls)} shards of {part!r} missing)")
        sources.append(urls)
    return sources


def make_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sizes_from_files(url: str, cache: dict) -> int | None:
    """A local shard's sample count from sizes.json or img2dataset's _stats.json beside it."""
    path = Path(url).resolve()
    folder = path.parent
    if folder not in cache:
        sizes_file = folder / "sizes.json"
        try:
            cache[folder] = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
        except (OSError, ValueError):
            cache[folder] = {}
    for name in (path.name, Path(url).name):
        if name in cache[folder]:
            return int(cache[folder][name])
    stats = folder / f"{path.name[:-len('.tar')] if path.name.endswith('.tar') else path.stem}_stats.json"
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def shard_sizes(urls: list[str], *, count_unknown: bool = True) -> list[int | None]:
    """Samples per shard: from sizes.json or *_stats.json where they exist, else counted once (CLIP_benchmark
    sets and remote shards have neither) when `count_unknown`; None where not counted."""
    cache: dict = {}
    sizes = [_sizes_from_files(url, cache) if is_local(url) else None for url in urls]
    unknown = [i for i, size in enumerate(sizes) if size is None] if count_unknown else []
    with ThreadPoolExecutor(max_workers=16) as pool:  # remote shards are read whole: overlap their downloads
        for i, size in zip(unknown, pool.map(count_samples, [urls[i] for i in unknown])):
            sizes[i] = size
    return sizes


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def class_caption_sets(urls: list[str]) -> tuple[list[tuple[list[str], list[str]]], list[int]]:
    """For shards of classification sets (classnames.txt beside the shards or one folder up, CLIP_benchmark's
    layout): ([(classnames, templates)], set index per shard or -1), to caption samples that only have .cls."""
    sets, index_of, per_shard = [], {}, []
    for url in urls:
        found = -1
        folder = Path(url).parent if is_local(url) else None
        for root in (folder, folder.parent) if folder is not None else ():
            if (root / "classnames.txt").is_file():
                if root not in index_of:
                    templates_file = root / CLASS_TEMPLATES_FILE
                    templates = [t for t in _lines(templates_file) if "{c}" in t] if templates_file.is_file() else []
                    index_of[root] = len(sets)
                    sets.append((_lines(root / "classnames.txt"), templates or list(DEFAULT_CLASS_TEMPLATES)))
                found = index_of[root]
                break
        per_shard.append(found)
    return sets, per_shard


@dataclass
class Plan:
    """What every slot needs to rebuild its stream; picklable for DataLoader workers."""

    urls: list[str]
    sizes: list[int | None]
    resampled: bool
    shard_weights: list[float]  # resampled mode: the chance of drawing each shard (sums to 1)
    seed: int
    rank: int
    world_size: int
    num_workers: int
    block_samples: int
    shuffle_buffer: int
    # Per shard: its ShardIndex, the path of its index file (read when the shard is), or None: read from byte 0.
    index: list = field(default_factory=list)
    # Epoch -> its list of samples [(shard, first, end)] where a resume on another number of slots started in it
    # (remaining_samples); other epochs list every sample.
    remaining: dict = field(default_factory=dict)

    def shard_index(self, shard: int) -> ShardIndex | None:
        entry = self.index[shard] if self.index else None
        return load_index(self.urls[shard]) if isinstance(entry, str) else entry

    @property
    def num_samples(self) -> int:
        return sum(s or 0 for s in self.sizes)

    def epoch_list(self, epoch: int) -> list[tuple[int, int, int]]:
        """Epoch `epoch`'s samples in reading order, [(shard, first, end)]: every shard whole, in an order shuffled
        by (seed, epoch), or the remaining samples where a resume on another number of slots began the epoch."""
        if epoch in self.remaining:
            return self.remaining[epoch]
        order = list(range(len(self.urls)))
        random.Random(make_seed(self.seed, epoch, 0x5A4D)).shuffle(order)
        return [(shard, 0, self.sizes[shard]) for shard in order if self.sizes[shard]]

    def epoch_ranges(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """Slot `slot`'s piece of epoch `epoch`: [(shard, first sample, end)] in reading order."""
        num_slots = self.world_size * max(1, self.num_workers)
        listed = self.epoch_list(epoch)
        base, extra = divmod(sum(hi - lo for _, lo, hi in listed), num_slots)
        # The extra samples go to the `extra` slots after the previous epoch's: a rotating window.
        gets_extra = [(k - epoch * extra) % num_slots < extra for k in range(num_slots)]
        start = slot * base + sum(gets_extra[:slot])
        stop = start + base + gets_extra[slot]
        ranges, position = [], 0
        for shard, first, end in listed:
            size = end - first
            lo, hi = max(start, position), min(stop, position + size)
            if lo < hi:
                ranges.append((shard, first + lo - position, first + hi - position))
            position += size
            if position >= stop:
                break
        return ranges

    def blocks(self, epoch: int, slot: int) -> list[list[tuple[int, int, int]]]:
        """Epoch-exact mode: the slot's piece cut into blocks of whole ranges of >= block_samples samples."""
        blocks, current, count = [], [], 0
        for shard, lo, hi in self.epoch_ranges(epoch, slot):
            current.append((shard, lo, hi))
            count += hi - lo
            if count >= self.block_samples:
                blocks.append(current)
                current, count = [], 0
        if current:
            blocks.append(current)
        return blocks

    def block_rng(self, epoch: int, worker: int, block: int) -> random.Random:
        """The random stream of a block's shuffle buffer (and of nothing else)."""
        return random.Random(make_seed(self.seed, epoch, self.rank, worker, block, 0x5F))

    def resampled_block(self, worker: int, block: int) -> list[tuple[int, int, int | None]]:
        """Resampled mode: shards drawn with replacement until the block holds >= block_samples samples."""
        rng = random.Random(make_seed(self.seed, self.rank, worker, block, 0x2E5A))
        ranges, count = [], 0
        while count < self.block_samples:
            shard = rng.choices(range(len(self.urls)), weights=self.shard_weights)[0]
            size = self.sizes[shard]
            ranges.append((shard, 0, size))
            count += size if size is not None else self.guessed_size
        return ranges

    @property
    def guessed_size(self) -> float:
        """The size assumed for a shard that was not counted (remote shards without sizes.json)."""
        known = [s for s in self.sizes if s]
        return sum(known) / len(known) if known else 1000.0


def remaining_samples(old: Plan, positions: dict[tuple[int, int], tuple[int, int, int]]) -> dict[int, list]:
    """Epoch-exact mode: for each epoch some slot of `old` (a plan of the old run, any rank) was in, the samples of
    that epoch no old slot had read yet, in the epoch's reading order ([(shard, first, end)]). `positions`: each
    old slot's (rank, worker) -> (epoch, block, offset), the position after the last sample it gave out. A slot
    read its blocks before `block` whole and the first `offset` outputs of block `block`, which its shuffle buffer's
    order (replayed on sample numbers) names without reading a sample."""
    first = min(e for e, _, _ in positions.values())
    last = max([e for e, _, _ in positions.values()] + list(old.remaining))
    out = {}
    for epoch in range(first, last + 1):
        read: dict[int, list[tuple[int, int]]] = {}
        for (rank, worker), (at_epoch, at_block, offset) in positions.items():
            if at_epoch < epoch:
                continue
            plan = replace(old, rank=rank)
            blocks = plan.blocks(epoch, rank * max(1, old.num_workers) + worker)
            for ranges in blocks if at_epoch > epoch else blocks[:at_block]:
                for shard, lo, hi in ranges:
                    read.setdefault(shard, []).append((lo, hi))
            if at_epoch == epoch and offset:
                ranges = blocks[at_block]
                numbers = sum(hi - lo for _, lo, hi in ranges)
                order = shuffle_order(numbers, bufsize=old.shuffle_buffer, initial=min(old.shuffle_buffer, 100),
                                      rng=plan.block_rng(epoch, worker, at_block)) \
                    if old.shuffle_buffer > 1 else list(range(numbers))
                starts = [0]
                for _, lo, hi in ranges:
                    starts.append(starts[-1] + hi - lo)
                for number in order[:offset]:
                    k = next(i for i in range(len(ranges)) if number < starts[i + 1])
                    shard, lo, _ = ranges[k]
                    read.setdefault(shard, []).append((lo + number - starts[k], lo + number - starts[k] + 1))
        out[epoch] = _without(old.epoch_list(epoch), read)
    return out


def _without(listed: list, read: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
    """The ranges [(shard, first, end)] of `listed` with the spans in `read` (shard -> [(first, end)]) taken out."""
    out = []
    for shard, lo, hi in listed:
        cursor = lo
        for a, b in sorted(read.get(shard, [])):
            if b <= cursor or a >= hi:
                continue
            if a > cursor:
                out.append((shard, cursor, a))
            cursor = max(cursor, b)
        if cursor < hi:
            out.append((shard, cursor, hi))
    return out
