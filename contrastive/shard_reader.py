"""Reading samples out of tar shards: byte ranges found with each shard's index of sample offsets.

A local shard is read from its range's first sample on, found in the shard's index of sample byte
offsets, so an epoch reads each sample's bytes once however many slots share a shard. `contrastive prep`
writes the index beside each shard, NNNNN.tar -> NNNNN.index.json:

    {"tar_bytes": 4718592, "offsets": [0, 46080, ...], "complete": true}

offsets[i] is the byte where sample i's first tar header starts (members grouped into samples as webdataset
groups them) and the last entry the byte where the last indexed sample ends; tar_bytes is the shard's size
when indexed (an index whose size no longer matches is not used). Samples past the indexed ones exist only in
a damaged shard (complete: false: a member cut off, a duplicate file in a sample): they are read from the last
entry's byte on, as a whole-shard read meets them. Local plain tars without an index file (img2dataset's,
CLIP_benchmark's, hand-made ones) are indexed from their headers alone when training starts, on rank 0, where
slots would otherwise read much twice (contrastive/data.py says when); rank 0 also counts shards without sizes
(remote ones included) and shares both with the other ranks. Remote shards, compressed tars, tars with global
pax headers and unindexed shards are read from their first byte.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
import tarfile
import warnings
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


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
    member cut off, a duplicate file name in a sample, a header tarfile raises on) ends the indexed part. None
    for what is not a plain tar: a compressed one, or one with global pax headers (they change every member
    after them)."""
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


def read_block(ranges: list, *, urls: list[str], index_of: Callable[[int], ShardIndex | None], index_missing: bool,
               shuffle_buffer: int, rng: random.Random, offset: int = 0) -> Iterator[dict]:
    """A block's samples (ranges [(shard, first, end)] read in turn, each sample tagged with its "__shard__") as
    webdataset's shuffle(shuffle_buffer, min(shuffle_buffer, 100), rng=rng) gives them out, from output number
    `offset` on. The shuffle is replayed on sample numbers (its order depends on the rng and the count alone),
    so a resumed block reads only the samples it has yet to give out (`index_missing`: indexing local shards
    without an index on the way); the samples held at any time are those the buffer would hold, or fewer. A
    block with an uncounted shard (end None: resampled mode) is read from its start, the first `offset` samples
    given out dropped undecoded."""
    if any(hi is None for _, _, hi in ranges):
        yield from _read_unsized_block(ranges, urls=urls, shuffle_buffer=shuffle_buffer, rng=rng, offset=offset)
        return
    num_samples = sum(hi - lo for _, lo, hi in ranges)
    if shuffle_buffer > 1:
        order = shuffle_order(num_samples, bufsize=shuffle_buffer, initial=min(shuffle_buffer, 100), rng=rng)
    else:
        order = list(range(num_samples))
    built: dict = {}

    def index_or_build(shard: int) -> ShardIndex | None:
        index = index_of(shard)
        if index is None and offset and index_missing and is_local(urls[shard]):
            if shard not in built:  # once each: a resampled block may draw a shard twice
                built[shard] = build_index(urls[shard])
            index = built[shard]
        return index

    read = read_ranges(ranges, sorted(order[offset:]) if offset else range(num_samples), urls=urls,
                       index_of=index_or_build)
    pending: dict[int, dict] = {}
    for number in order[offset:]:
        while number not in pending:
            got, sample = next(read)
            pending[got] = sample
        yield pending.pop(number)


def _read_unsized_block(ranges: list, *, urls: list[str], shuffle_buffer: int, rng: random.Random,
                        offset: int) -> Iterator[dict]:
    import webdataset as wds

    def tagged(shard: int, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["__shard__"] = shard
            yield sample

    raw = (s for shard, lo, hi in ranges for s in tagged(shard, read_shard(urls[shard], lo, hi)))
    if shuffle_buffer > 1:
        raw = wds.shuffle(shuffle_buffer, min(shuffle_buffer, 100), rng=rng)(raw)
    for number, sample in enumerate(raw):
        if number >= offset:
            yield sample


def read_ranges(ranges: list, wanted: Sequence[int], *, urls: list[str],
                index_of: Callable[[int], ShardIndex | None]) -> Iterator[tuple[int, dict]]:
    """(number, raw sample) for the samples numbered `wanted` (ascending) of ranges [(shard, first, end)] read
    in turn and numbered from 0; each sample is tagged with its "__shard__". A shard with an index is read in
    the byte spans of the wanted samples alone; any other is read from its first byte."""
    base, k = 0, 0
    for shard, lo, hi in ranges:
        numbers = []
        while k < len(wanted) and wanted[k] < base + hi - lo:
            numbers.append(wanted[k] - base + lo)
            k += 1
        if numbers:
            for n, sample in _read_numbers(urls[shard], numbers, index_of(shard)):
                sample["__shard__"] = shard
                yield base + n - lo, sample
        base += hi - lo


def _read_numbers(url: str, numbers: list[int], index: ShardIndex | None) -> Iterator[tuple[int, dict]]:
    """(number, raw sample) for a shard's samples `numbers` (ascending)."""
    if index is not None:
        for first, stop in _runs(numbers):
            yield from zip(range(first, stop), read_shard(url, first, stop, index=index))
        return
    # A remote shard (or a compressed tar) streams from its first byte, also when the range starts mid-shard;
    # the samples before and between the wanted ones are dropped undecoded.
    keep = set(numbers)
    for n, sample in zip(range(numbers[0], numbers[-1] + 1), read_shard(url, numbers[0], numbers[-1] + 1)):
        if n in keep:
            yield n, sample


def _runs(numbers: list[int]) -> Iterator[tuple[int, int]]:
    """[first, stop) runs of consecutive numbers in an ascending list: [1, 2, 3, 7, 8] -> (1, 4), (7, 9)."""
    first = previous = None
    for n in numbers:
        if first is None:
            first = n
        elif n != previous + 1:
            yield first, previous + 1
            first = n
        previous = n
    if first is not None:
        yield first, previous + 1



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


def shuffle_order(num_items: int, *, bufsize: int, initial: int, rng: random.Random) -> list[int]:
    """The order in which webdataset's shuffle(bufsize, initial, rng=rng) gives out items 0..num_items-1. It
    depends on the rng and the count alone, never on the items: a stream can know which samples it gave out
    before a resume, and which it gives out next, without reading any."""
    import webdataset as wds

    return list(wds.shuffle(bufsize, initial, rng=rng)(iter(range(num_items))))
