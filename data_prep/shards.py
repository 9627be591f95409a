"""Write WebDataset shards in img2dataset's layout: NNNNN.tar + NNNNN.parquet + NNNNN_stats.json, and sizes.json;
plus NNNNN.index.json, each sample's byte offset in the tar (contrastive/shard_reader.py describes it), so that a
training slot starting mid-shard seeks to its first sample."""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from contrastive.shard_reader import write_index

# img2dataset: 5 digits of shard id + 4 digits of sample index = 9-digit keys.
SHARD_DIGITS = 5
SAMPLE_DIGITS = 4


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def sample_key(shard_id: int, index: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}{index:0{SAMPLE_DIGITS}d}"


def shard_done(out_dir: Path, shard_id: int) -> bool:
    """A shard is finished once its stats file exists: the tar and parquet are renamed into place first."""
    return (out_dir / f"{shard_name(shard_id)}_stats.json").is_file()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(out_dir: Path, shard_id: int, samples: Iterable[dict], *, failures: Iterable[dict] = (),
                extra_stats: dict | None = None) -> dict:
    """Write one shard atomically from samples {"jpg": bytes, "txt": str, "json": dict, optional "cls": int}.

    Keys are assigned here: shard id + the sample's "index" (its input position, as img2dataset numbers
    inputs, so skipped inputs leave gaps) or its position in `samples`. `failures` are rows
    {"index", "status", "error_message", ...} for inputs that became no sample: they appear in the parquet
    and the stats, not in the tar. Returns the shard's stats dict.
    """
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard_id)
    start = time.time()
    tar_tmp = out_dir / f"{name}.tar.tmp"
    rows = []
    with wds.TarWriter(str(tar_tmp), mtime=0, user="", group="", encoder=False) as sink:
        for position, sample in enumerate(samples):
            key = sample_key(shard_id, sample.get("index", position))
            meta = dict(sample.get("json", {}))
            meta.update(key=key, caption=sample["txt"])
            record = {"__key__": key, "jpg": sample["jpg"], "txt": sample["txt"].encode("utf-8"),
                      "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
            if "cls" in sample:
                record["cls"] = str(int(sample["cls"])).encode("ascii")
            sink.write(record)
            row = {"key": key, "caption": sample["txt"], "status": "success", "error_message": None}
            row.update({k: v for k, v in meta.items() if k not in row})
            rows.append((sample.get("index", position), row))
    os.replace(tar_tmp, out_dir / f"{name}.tar")
    write_index(out_dir / f"{name}.tar")
    status = Counter({"success": len(rows)})
    for failure in failures:
        failure = dict(failure)
        index = failure.pop("index")
        row = {"key": sample_key(shard_id, index), "caption": None, "status": failure.pop("status"),
               "error_message": failure.pop("error_message", None)}
        row.update(failure)
        status[row["status"]] += 1
        rows.append((index, row))
    rows = [row for _, row in sorted(rows, key=lambda r: r[0])]
    table = _rows_to_table(rows)
    pq_tmp = out_dir / f"{name}.parquet.tmp"
    pq.write_table(table, pq_tmp)
    os.replace(pq_tmp, out_dir / f"{name}.parquet")
    end = time.time()
    successes = status["success"]
    stats = {"count": len(rows), "successes": successes, "failed_to_download": 0,
             "failed_to_resize": len(rows) - successes, "duration": end - start, "start_time": start,
             "end_time": end, "status_dict": dict(status)}
    if extra_stats:
        stats.update(extra_stats)
    _atomic_write_bytes(out_dir / f"{name}_stats.json", json.dumps(stats, indent=2).encode())
    return stats


def _rows_to_table(rows: list[dict]) -> pa.Table:
    """A parquet table over the union of the rows' columns; a column of mixed types is stored as text."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        values = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in values]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            columns[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    if not names:
        return pa.table({"key": pa.array([], type=pa.string())})
    return pa.table(columns)


def write_sizes(out_dir: Path) -> dict:
    """sizes.json maps each shard's file name to its sample count (read by loaders to size an epoch)."""
    sizes = {}
    for stats_file in sorted(out_dir.glob(f"{'[0-9]' * SHARD_DIGITS}_stats.json")):
        shard = stats_file.name[:SHARD_DIGITS]
        sizes[f"{shard}.tar"] = json.loads(stats_file.read_text())["successes"]
    _atomic_write_bytes(out_dir / "sizes.json", json.dumps(sizes, indent=2).encode())
    return sizes


def shard_spec(out_dir: Path, num_shards: int) -> str:
    """A brace-expanded spec covering shards 0..num_shards-1 of `out_dir`."""
    if num_shards == 1:
        return str(out_dir / f"{shard_name(0)}.tar")
    return str(out_dir / f"{{{shard_name(0)}..{shard_name(num_shards - 1)}}}.tar")


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
