"""Where each indexed image's bytes lie in its shard (recorded by `contrastive index`), read back without a scan.

OUT/image_locations.parquet has one row per indexed vector, in index order: shard (absolute path), offset (byte
where the image member's data starts), size (its bytes), ext (jpg, png, ...) and shard_bytes (the shard's size
when indexed; a shard that has changed since is not read). Images in remote or compressed shards have no
location (shard "", offset -1): tar offsets mean nothing inside a compressed stream.
"""
from __future__ import annotations

import os
import tarfile
from bisect import bisect_left
from pathlib import Path
from typing import Iterator

import numpy as np

LOCATIONS_FILE = "image_locations.parquet"
MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def _shard_samples(path: str, image_exts: tuple[str, ...]) -> Iterator[tuple[str, str, int, int]]:
    """(key, ext, data offset, size) of each sample of a plain local tar, its image member chosen as
    eval/embed.py chooses it (the first of `image_exts` present); ext "" for a sample without an image.

    Members are grouped into samples as webdataset groups them: consecutive members with the same key.
    """
    from contrastive.shard_reader import _skipped_member
    from webdataset.tariterators import base_plus_ext

    def emit(key, members):
        found = [(ext, members[ext]) for ext in image_exts if ext in members]
        ext, (offset, size) = found[0] if found else ("", (-1, 0))
        return key, ext, offset, size

    key, members = None, {}
    with tarfile.open(path, mode="r:") as tar:  # "r:": headers only, seeking past data; refuses compressed tars
        for member in tar:
            if _skipped_member(member):
                continue
            prefix, suffix = base_plus_ext(member.name)
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield emit(key, members)
                key, members = prefix, {}
            members.setdefault(suffix.lower(), (member.offset_data, member.size))
    if key is not None:
        yield emit(key, members)


def record_locations(data_spec: str, keys: list[str], *, image_exts: tuple[str, ...]):
    """A DataFrame of the locations of `keys` (the index's rows, in order: a subsequence of the samples of
    `data_spec`, in shard order, as eval_samples read them).

    Row i is matched to the first sample at or after row i-1's with the same key, so repeated keys in
    different shards each find their own image.
    """
    import pandas as pd

    from contrastive.data import expand_sources
    from contrastive.shard_reader import is_local

    samples: list[tuple[str, str, int, int, int]] = []  # (shard, ext, offset, size, shard bytes)
    positions: dict[str, list[int]] = {}
    for url in (u for source in expand_sources(data_spec) for u in source):
        if not is_local(url):
            continue
        path = str(Path(url).resolve())
        try:
            found = list(_shard_samples(path, image_exts))
        except (tarfile.TarError, OSError):  # compressed or unreadable: those images get no location
            continue
        shard_bytes = os.path.getsize(path)
        for key, ext, offset, size in found:
            positions.setdefault(key, []).append(len(samples))
            samples.append((path, ext, offset, size, shard_bytes))
    rows, cursor = [], 0
    for key in keys:
        candidates = positions.get(key, [])
        at = bisect_left(candidates, cursor)
        if at < len(candidates) and samples[candidates[at]][1]:
            cursor = candidates[at] + 1
            rows.append(samples[candidates[at]])
        else:
            rows.append(("", "", -1, 0, 0))
    return pd.DataFrame(rows, columns=["shard", "ext", "offset", "size", "shard_bytes"])


class ImageStore:
    """Reads the image of an index row from the shard and offset recorded for it."""

    def __init__(self, directory: str | Path, num_rows: int):
        import pandas as pd

        path = Path(directory) / LOCATIONS_FILE
        self.available = path.is_file()
        if not self.available:
            return
        frame = pd.read_parquet(path)
        if len(frame) != num_rows:
            self.available = False  # written for another index: never serve a wrong image
            return
        self.shards = frame["shard"].astype(str).tolist()
        self.exts = frame["ext"].astype(str).tolist()
        self.offsets = frame["offset"].to_numpy(np.int64)
        self.sizes = frame["size"].to_numpy(np.int64)
        self.shard_bytes = frame["shard_bytes"].to_numpy(np.int64)

    def locate(self, row: int) -> tuple[str, int, int, str] | None:
        """(shard, offset, size, media type) of a row, None where none was recorded."""
        if not self.available or self.offsets[row] < 0:
            return None
        return self.shards[row], int(self.offsets[row]), int(self.sizes[row]), \
            MEDIA_TYPES.get(self.exts[row], "application/octet-stream")

    def read(self, row: int) -> tuple[bytes, str, str] | None:
        """(bytes, media type, ETag) of a row's image; None where it has no location or its shard has changed
        (another size than when it was indexed) or gone."""
        found = self.locate(row)
        if found is None:
            return None
        shard, offset, size, media_type = found
        try:
            with open(shard, "rb", buffering=0) as f:
                stat = os.fstat(f.fileno())
                if stat.st_size != self.shard_bytes[row]:
                    return None
                data = os.pread(f.fileno(), size, offset)
        except OSError:
            return None
        if len(data) != size:
            return None
        return data, media_type, f'"{stat.st_mtime_ns:x}-{offset:x}-{size:x}"'
