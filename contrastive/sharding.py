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

Either way a slot's stream is a sequence of blocks: lists of (shard, first sample, end) ranges of at least
data.block_samples samples, the unit of shuffling and of resuming.

Reading. A local shard is read from its range's first sample on, found in the shard's index of sample byte
offsets, so an epoch reads each sample's bytes once however many slots share a shard. `contrastive prep`
writes the index beside each shard, NNNNN.tar -> NNNNN.index.json:

    {"tar_bytes": 4718592, "offsets": [0, 46080, ...], "complete": true}

offsets[i] is the byte where sample i's first tar header starts (members grouped into samples as webdataset
groups them) and the last entry the byte where the last indexed sample ends; tar_bytes is the shard's size
when indexed (an index whose size no longer matches is not used). Samples past the indexed ones exist only in
a damaged shard (complete: false: a member cut off, a duplicate file in a sample): they are read from the last
entry's byte on, as a whole-shard read meets them. Local plain tars without an index file (img2dataset's,
CLIP_benchmark's, hand-made ones) are indexed from their headers alone when training starts, on rank 0, which
also counts shards without sizes (remote ones included) and shares both with the other ranks. Remote shards,
compressed tars and tars with global pax headers are read from their first byte.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import tarfile
import warnings
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from contrastive.errors import UserError

CLASS_TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DEFAULT_CLASS_TEMPLATES = ("a photo of a {c}.",)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_sources(spec: str) -> list[list[str]]:
    """'a/{000..009}.tar::b.tar' -> [[a/000.tar, ...], [b.tar]]; local files must exist."""
    import braceexpand

    if not spec:
        raise UserError("no data given: set data.train (a shard spec such as data/train/{00000..00009}.tar)")
    sources = []
    for part in spec.split("::"):
        urls = list(braceexpand.braceexpand(part.strip()))
        if not urls or not all(urls):
            raise UserError(f"the shard spec {part!r} is empty; join sources with a single '::'")
        missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
        if missing:
            raise UserError(f"data path {missing[0]} does not exist ({len(missing)} of {len(urls)} shards of {part!r} missing)")
        sources.append(urls)
    return sources


def make_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def open_shard(path: str):
    """A local shard opened for reading, unbuffered (tarfile's stream reader buffers, and never past the byte
    range it is given); tests wrap it to count the bytes read."""
    return open(path, "rb", buffering=0)


class _Span:
    """Bytes [start, stop) of a seekable file (stop None: to its end), so that tarfile, which reads ahead in
    10 KiB records, reads no byte of the next sample."""

    def __init__(self, raw, start: int, stop: int | None):
        if start:
            raw.seek(start)
        self.raw, self.left = raw, None if stop is None else stop - start

    def read(self, size: int = -1) -> bytes:
        if self.left is not None:
            size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(size)
        if self.left is not None:
            self.left -= len(data)
        return data

    def close(self) -> None:
        self.raw.close()


def _skipped_member(member: tarfile.TarInfo) -> bool:
    """Members webdataset's tar_file_iterator skips without reading: non-files and metadata (__x__) files."""
    name = member.name
    return not member.isreg() or bool(re.match(r"__[^/]*__($|/)", name)) or \
        ("/" not in name and name.startswith("__") and name.endswith("__"))


def _tar_files(fileobj, url: str, *, handler: Callable) -> Iterator[dict]:
    """webdataset's tar_file_expander on one plain tar stream that may start at any member's header: the same
    member rules and error handling, but tarfile mode "r|" where webdataset's "r|*" would take a sample whose
    first file name starts like gzip's or bzip2's magic bytes for a compressed stream."""
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|")
        for member in stream:
            try:
                if _skipped_member(member):
                    continue
                yield {"fname": member.name, "data": stream.extractfile(member).read(), "__url__": url}
                stream.members = []
            except Exception as exn:
                if not handler(exn):
                    break
        yield {}
    except Exception as exn:
        handler(exn)


def _read_span(url: str, *, first: int, start: int, stop: int | None, byte_start: int = 0,
               byte_stop: int | None = None, plain: bool = False) -> Iterator[dict]:
    """Samples numbered first, first+1, ... from byte `byte_start` (a sample's first header) of a shard up to
    `byte_stop`; those numbered start..stop-1 are yielded, and if the shard ends early or cannot be read, each
    missing one as {"__bad__": reason}. `plain`: a local uncompressed tar (its index says so)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors = []

    def stop_on_error(exn):
        errors.append(exn)
        return False

    number = first
    try:
        if is_local(url):
            stream = _Span(open_shard(url), byte_start, byte_stop)
        else:
            assert byte_start == 0 and byte_stop is None, "a remote shard is read from its first byte"
            stream = wds.gopen(url)
    except Exception as exn:  # a missing file, a failed download
        errors.append(exn)
        stream = None
    if stream is not None:
        try:
            if plain:
                files = _tar_files(stream, url, handler=stop_on_error)
            else:
                files = tar_file_expander([{"url": url, "stream": stream}], handler=stop_on_error)
            for sample in group_by_keys(files, handler=stop_on_error):
                if stop is not None and number >= stop:
                    break
                if number >= start:
                    yield sample
                number += 1
        finally:
            stream.close()
    if stop is not None:
        reason = "unreadable_shard" if errors else "missing_sample"
        for i in range(max(number, start), stop):
            yield {"__bad__": reason, "__key__": f"#{i}", "__url__": url}


def read_shard(url: str, start: int = 0, stop: int | None = None, *,
               index: ShardIndex | None = None) -> Iterator[dict]:
    """Samples number start..stop-1 of a shard, as webdataset groups them; if the shard ends early or cannot
    be read, each missing sample comes as {"__bad__": reason}, so a range always yields stop - start items.
    With the shard's `index` only the range's bytes are read; without one the shard is read from byte 0."""
    if index is None or stop is None:
        yield from _read_span(url, first=0, start=start, stop=stop)
        return
    offsets, indexed = index.offsets, index.num_indexed
    mid = max(start, min(stop, indexed))
    if start < mid:
        yield from _read_span(url, first=start, start=start, stop=mid, byte_start=offsets[start],
                              byte_stop=offsets[mid], plain=True)
    if mid < stop and index.complete:  # the shard holds no more samples: a whole-shard read would end here
        for i in range(mid, stop):
            yield {"__bad__": "missing_sample", "__key__": f"#{i}", "__url__": url}
    elif mid < stop:  # a damaged shard's tail: read as a whole-shard read meets it, from its first sample on
        yield from _read_span(url, first=indexed, start=mid, stop=stop, byte_start=offsets[indexed], plain=True)


# ---------------------------------------------------------------- shard indexes

INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class ShardIndex:
    """Where a shard's samples start (see the module docstring); `offsets` holds num_indexed + 1 bytes."""

    offsets: Sequence[int]
    complete: bool

    @property
    def num_indexed(self) -> int:
        return len(self.offsets) - 1


def index_file(url: str) -> Path:
    """The index file beside a local shard (beside the file a link points to): NNNNN.tar -> NNNNN.index.json."""
    path = Path(url).resolve()
    stem = path.name[:-len(".tar")] if path.name.endswith(".tar") else path.name
    return path.with_name(stem + INDEX_SUFFIX)


def build_index(url: str) -> ShardIndex | None:
    """A local shard's index from its member headers alone (tarfile seeks over member data). Members group
    into samples as webdataset's group_by_keys groups them; the first sample that would not read cleanly (a
    member cut off, a duplicate file name in a sample, a header tarfile raises on) ends the indexed part. None for what is
    not a plain tar: a compressed one, or one with global pax headers (they change every member after them)."""
    from webdataset.tariterators import base_plus_ext

    try:
        with open_shard(url) as raw, tarfile.open(fileobj=raw, mode="r:") as archive:
            starts, current, seen, complete = array("q"), None, set(), False
            try:
                for member in archive:
                    if archive.pax_headers or member.issparse():
                        return None
                    prefix, suffix = (None, None) if _skipped_member(member) else base_plus_ext(member.name)
                    if prefix is None:
                        continue
                    if prefix != current:
                        starts.append(member.offset)
                        current, seen = prefix, {"__key__", "__url__"}  # group_by_keys's own keys clash too
                    if suffix.lower() in seen:
                        break
                    seen.add(suffix.lower())
                else:
                    starts.append(archive.offset)
                    complete = True
            except (tarfile.TarError, EOFError):
                # Moving past a member whose data is cut off raises here, as it does in a whole-shard read.
                pass
    except (tarfile.TarError, OSError, EOFError):
        return None
    # Not complete: the damaged sample (the last one started) and all after it are read as a whole-shard read
    # meets them, from that sample's first header on; with none started, from the shard's first byte.
    return ShardIndex(starts if starts else array("q", [0]), complete=complete)


def write_index(tar_path: Path) -> bool:
    """Write a shard's index file beside it (`contrastive prep` does for each shard); False if not a plain tar."""
    index = build_index(str(tar_path))
    if index is None:
        return False
    out = index_file(str(tar_path))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"tar_bytes": os.path.getsize(tar_path), "offsets": list(index.offsets),
                               "complete": index.complete}))
    os.replace(tmp, out)
    return True


def load_index(url: str) -> ShardIndex | None:
    """A local shard's index file, or None if there is none or it no longer fits the shard (with a warning: the
    shard is then read from its first byte)."""
    try:
        path, tar = index_file(url), os.stat(url)
        stat = path.stat()
    except OSError:
        return None
    try:
        return _read_index_file(str(path), stat.st_mtime_ns, stat.st_size, url, tar.st_mtime_ns, tar.st_size)
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as exn:
        warnings.warn(f"{path} does not fit its shard ({exn}): reading the shard from its first byte; run "
                      f"`contrastive prep` again or delete the file to have it indexed when training starts")
        return None


@functools.lru_cache(maxsize=16)  # a slot reads a few shards per block, and each several times per epoch
def _read_index_file(path: str, mtime_ns: int, size: int, url: str, tar_mtime_ns: int, tar_bytes: int) -> ShardIndex:
    saved = json.loads(Path(path).read_text())
    index = ShardIndex(array("q", saved["offsets"]), complete=bool(saved["complete"]))
    if saved["tar_bytes"] != tar_bytes:
        raise ValueError(f"written for a shard of {saved['tar_bytes']} bytes, this one has {tar_bytes}")
    if index.complete:  # an append (tarfile's "a" mode) may keep the size: the archive's end must still be there
        with open_shard(url) as raw:
            raw.seek(index.offsets[-1])
            if raw.read(512).strip(b"\0"):
                raise ValueError("the shard holds more members than its index")
    return index


def shard_indexes(urls: list[str], *, build: bool) -> list:
    """Per shard: the path of its index file (read by the slots that read the shard), else (`build`) an index
    built from its headers, else None (read from byte 0: remote shards and what is not a plain tar). Run once,
    on one rank: headers are read here."""

    def one(url: str):
        if not is_local(url):
            return None
        if index_file(url).is_file():  # checked against the shard when a slot loads it (load_index)
            return str(index_file(url))
        return build_index(url) if build else None

    with ThreadPoolExecutor(max_workers=16) as pool:  # file system latency, not CPU: threads overlap it
        return list(pool.map(one, urls))


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


def count_samples(url: str) -> int:
    """The number of samples webdataset reads from a shard. A local tar is counted from its member headers
    alone (grouped by key as webdataset groups them); anything else, or a damaged tar, is read through."""
    from webdataset.tariterators import base_plus_ext

    if is_local(url):
        try:
            count, current = 0, None
            with tarfile.open(url, mode="r:*") as archive:
                for member in archive:
                    if _skipped_member(member):
                        continue
                    prefix, _ = base_plus_ext(member.name)
                    if prefix is not None and prefix != current:
                        count, current = count + 1, prefix
            return count
        except (tarfile.TarError, OSError, EOFError):
            pass
    return sum(1 for sample in read_shard(url) if "__bad__" not in sample)


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


def shuffle_order(num_items: int, *, bufsize: int, initial: int, rng: random.Random) -> list[int]:
    """The order in which webdataset's shuffle(bufsize, initial, rng=rng) gives out items 0..num_items-1. It
    depends on the rng and the count alone, never on the items: a stream can know which samples it gave out
    before a resume, and which it gives out next, without reading any."""
    import webdataset as wds

    return list(wds.shuffle(bufsize, initial, rng=rng)(iter(range(num_items))))


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

    def shard_index(self, shard: int) -> ShardIndex | None:
        entry = self.index[shard] if self.index else None
        return load_index(self.urls[shard]) if isinstance(entry, str) else entry

    @property
    def num_samples(self) -> int:
        return sum(s or 0 for s in self.sizes)

    def epoch_ranges(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """Slot `slot`'s piece of epoch `epoch`: [(shard, first sample, end)] in reading order."""
        num_slots = self.world_size * max(1, self.num_workers)
        order = list(range(len(self.urls)))
        random.Random(make_seed(self.seed, epoch, 0x5A4D)).shuffle(order)
        base, extra = divmod(self.num_samples, num_slots)
        # The extra samples go to the `extra` slots after the previous epoch's: a rotating window.
        gets_extra = [(k - epoch * extra) % num_slots < extra for k in range(num_slots)]
        start = slot * base + sum(gets_extra[:slot])
        stop = start + base + gets_extra[slot]
        ranges, position = [], 0
        for shard in order:
            size = self.sizes[shard] or 0
            lo, hi = max(start, position), min(stop, position + size)
            if lo < hi:
                ranges.append((shard, lo - position, hi - position))
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
