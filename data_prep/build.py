"""Write inputs (files, table rows or tar members) into img2dataset-style shards on all cores, resumably.

Inputs are listed in a fixed order and cut into chunks of `samples_per_shard`; chunk k becomes shard k,
written by one process. Every input is counted exactly once in its shard's `_stats.json`: as a success or
under one skip reason, so a bad input costs only itself. A re-run keeps finished shards (and checks that
they were made from the same inputs with the same options).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from contrastive.errors import UserError
from contrastive.data_prep.images import IMAGE_SUFFIXES, ImageOptions, Skip, clean_caption, process_image
from contrastive.data_prep.shards import chunked, shard_done, shard_name, write_shard, write_sizes

PREP_FILE = "prep.json"
MAX_SAMPLES_PER_SHARD = 10_000  # 4 digits of sample index in img2dataset's 9-digit keys


@dataclass
class Item:
    """One input: where its image and caption come from, or why it is refused before reading."""

    source: str  # shown in the parquet `url` column: a path, a table row's path, or a tar member name
    path: str | None = None  # an image file to read
    data: bytes | None = None  # image bytes (tar inputs)
    caption: str | bytes | None = None
    # All captions of an image, in file order (rows of a table naming the same image); `caption` is the first.
    captions: list | None = None
    caption_path: str | None = None  # a sidecar caption file to read
    meta_path: str | None = None  # a sidecar JSON whose fields join the sample's JSON
    meta: dict = field(default_factory=dict)
    cls: int | None = None
    skip: str | None = None  # a reason decided while listing (unsafe_path, duplicate, missing_caption, ...)
    skip_message: str = ""


@dataclass(frozen=True)
class BuildOptions:
    image: ImageOptions = ImageOptions()
    samples_per_shard: int = 10_000
    dedup: bool = True

    def __post_init__(self):
        if not 1 <= self.samples_per_shard <= MAX_SAMPLES_PER_SHARD:
            raise UserError(f"--samples-per-shard must be in 1..{MAX_SAMPLES_PER_SHARD} (img2dataset's 9-digit keys "
                            f"hold 4 digits of sample index), got {self.samples_per_shard}")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self.image), "samples_per_shard": self.samples_per_shard, "dedup": self.dedup}


def is_safe_member(name: str) -> bool:
    """A tar member name that stays inside the archive's root: relative and without '..' components."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def tar_members(path: Path) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, bytes, refusal) for each file member of a (compressed) tar, streamed in archive order.

    Members with absolute or '..' paths and links are refused (bytes None, refusal 'unsafe_path'): they are
    never read, let alone extracted.
    """
    try:
        archive = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path} is not a readable tar archive: {e}") from None
    last = "its start"
    with archive:
        try:
            for member in archive:
                last = member.name
                if member.isdir():
                    continue
                if not is_safe_member(member.name) or member.issym() or member.islnk():
                    yield member.name, None, "unsafe_path"
                    continue
                if not member.isreg():
                    continue
                handle = archive.extractfile(member)
                yield member.name, handle.read() if handle else b"", None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{path} is damaged after {last}: {e}; repair or re-download it "
                            f"(finished shards are kept)") from None


def list_images(root: Path, *, exclude: Path | None = None) -> list[tuple[str, Path]]:
    """(path relative to root, path) of the image files under `root`, sorted; hidden files and folders and
    anything under `exclude` (the output folder, when it lies inside the input) are left out."""
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        found.append((rel.as_posix(), path))
    return found


def _fingerprint(items: list[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.source.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def _hash_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except OSError:
        return None


def _clean_captions(raw: list) -> tuple[list[str], int]:
    """The usable captions of a list in order and how many were dropped; Skip (the first one's reason) if none is."""
    cleaned, first_skip = [], None
    for caption in raw:
        try:
            cleaned.append(clean_caption(caption))
        except Skip as e:
            first_skip = first_skip or e
    if not cleaned:
        raise first_skip or Skip("missing_caption")
    return cleaned, len(raw) - len(cleaned)


def _read_item(item: Item) -> tuple[bytes, str, list[str] | None, int, dict]:
    """The image bytes, caption, all captions (None for a one-caption input), number of captions dropped as
    empty or undecodable, and metadata of an input, or Skip."""
    if item.skip:
        raise Skip(item.skip, item.skip_message)
    captions, dropped = None, 0
    if item.captions is not None:
        captions, dropped = _clean_captions(item.captions)
        caption = captions[0]
    else:
        caption = item.caption
        if caption is None and item.caption_path is not None:
            try:
                caption = Path(item.caption_path).read_bytes()
            except OSError:
                raise Skip("missing_caption", f"no caption file {item.caption_path}") from None
        caption = clean_caption(caption)
    data = item.data
    if data is None:
        if item.path is None:
            raise Skip("missing_image")
        try:
            data = Path(item.path).read_bytes()
        except FileNotFoundError:
            raise Skip("missing_image", f"{item.path} does not exist") from None
        except OSError as e:
            raise Skip("unreadable_file", str(e)[:120]) from None
    meta = dict(item.meta)
    if item.meta_path is not None:
        try:
            extra = json.loads(Path(item.meta_path).read_text(encoding="utf-8"))
            if isinstance(extra, dict):
                meta.update({k: v for k, v in extra.items() if k not in ("key", "caption")})
        except (OSError, ValueError):
            pass  # a broken sidecar JSON loses only that metadata, not the sample
    return data, caption, captions, dropped, meta


def write_chunk(job: tuple) -> dict:
    """Process one chunk of inputs into shard `shard_id`; returns its stats."""
    out_dir, shard_id, items, opts, fingerprint = job
    samples, failures = [], []
    skipped, converted = Counter(), Counter()
    for index, item in enumerate(items):
        digest = None
        try:
            data, caption, captions, dropped, meta = _read_item(item)
            digest = hashlib.sha256(data).hexdigest()
            jpeg, info, conversions = process_image(data, opts.image)
        except Skip as e:
            skipped[e.reason] += 1
            failures.append({"index": index, "status": e.reason, "error_message": e.message, "url": item.source,
                             "caption": item.caption if isinstance(item.caption, str) else None,
                             "sha256": digest})
            continue
        converted.update(conversions)
        if dropped:
            # A grouped image keeps its usable captions; the others are counted, not silently lost.
            converted["caption_dropped"] += dropped
        record = {"url": item.source, "sha256": digest, **info, **meta}
        if captions is not None:
            record["captions"] = captions  # the multi-caption format: .txt holds captions[0]
        if conversions:
            record["converted"] = sorted(set(conversions))
        sample = {"index": index, "jpg": jpeg, "txt": caption, "json": record}
        if item.cls is not None:
            sample["cls"] = item.cls
        samples.append(sample)
    image_failures = sum(n for reason, n in skipped.items()
                         if reason in ("not_an_image", "truncated", "too_large", "too_small", "aspect_ratio",
                                       "bad_image"))
    extra = {"failed_to_resize": image_failures, "skipped": dict(sorted(skipped.items())),
             "converted": dict(sorted(converted.items())), "inputs_sha256": fingerprint}
    return write_shard(Path(out_dir), shard_id, samples, failures=failures, extra_stats=extra)


def _check_options(out_dir: Path, record: dict) -> None:
    path = out_dir / PREP_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in ("command", "options"):
        if old.get(key) != record.get(key):
            changed = sorted(k for k in set(old.get(key) or {}) | set(record.get(key) or {})
                             if (old.get(key) or {}).get(k) != (record.get(key) or {}).get(k)) \
                if isinstance(record.get(key), dict) else [key]
            changed = [name.replace("_", "-") for name in changed]
            raise UserError(f"{out_dir} holds shards made with other settings (--{', --'.join(changed)}"
                            f"{' differs' if len(changed) == 1 else ' differ'}); "
                            f"re-run with the same options to resume, or write to a new OUT_DIR")


def build_shards(items: Iterable[Item], out_dir: Path, *, opts: BuildOptions, record: dict, num_inputs: int | None,
                 num_procs: int | None = None, progress: bool = True, desc: str = "prep") -> dict:
    """Write all inputs into shards under `out_dir`; returns a summary with totals by reason.

    `record` (command, input and options) is kept in OUT_DIR/prep.json; a re-run with other options is refused.
    """
    import webdataset  # noqa: F401 -- imported once here, so forked writers do not each import torch
    from contrastive.progress import progress_bar

    out_dir.mkdir(parents=True, exist_ok=True)
    _check_options(out_dir, record)
    (out_dir / PREP_FILE).write_text(json.dumps(record, indent=2))
    num_procs = num_procs or len(os.sched_getaffinity(0))
    start = time.time()
    written = kept = 0
    bar = progress_bar(total=num_inputs, desc=desc, unit="img", disable=not progress, smoothing=0.05)

    def jobs() -> Iterator[tuple]:
        nonlocal kept
        for shard_id, chunk in enumerate(chunked(items, opts.samples_per_shard)):
            fingerprint = _fingerprint(chunk)
            if shard_done(out_dir, shard_id):
                stats = json.loads((out_dir / f"{shard_name(shard_id)}_stats.json").read_text())
                if stats.get("inputs_sha256") not in (None, fingerprint):
                    raise UserError(f"shard {shard_name(shard_id)} in {out_dir} was made from other inputs: the "
                                    f"input changed since the first run; write to a new OUT_DIR")
                kept += 1
                bar.update(len(chunk))
                continue
            yield (str(out_dir), shard_id, chunk, opts, fingerprint)

    try:
        if num_procs <= 1:
            for job in jobs():
                write_chunk(job)
                written += 1
                bar.update(len(job[2]))
        else:
            with ProcessPoolExecutor(num_procs) as pool:
                pending: dict = {}
                for job in jobs():
                    # Bounded submission: chunks of a streamed tar hold image bytes.
                    while len(pending) >= 2 * num_procs:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()
                            bar.update(pending.pop(future))
                            written += 1
                    pending[pool.submit(write_chunk, job)] = len(job[2])
                for future in list(pending):
                    future.result()
                    bar.update(pending.pop(future))
                    written += 1
    finally:
        bar.close()
    write_sizes(out_dir)
    summary = summarize(out_dir)
    if summary["num_shards"] != written + kept:
        raise UserError(f"{out_dir} holds {summary['num_shards']} shards but this input makes {written + kept}: "
                        f"the others come from an earlier, larger input; write to a new OUT_DIR")
    summary.update(shards_written=written, shards_kept=kept, seconds=round(time.time() - start, 3))
    (out_dir / PREP_FILE).write_text(json.dumps({**record, "summary": summary}, indent=2))
    return summary


def summarize(out_dir: Path) -> dict:
    """Totals over every shard's stats: inputs, samples, skips and conversions by reason."""
    from contrastive.data_prep.shards import SHARD_DIGITS

    totals = {"num_shards": 0, "num_inputs": 0, "num_samples": 0, "skipped": Counter(), "converted": Counter()}
    for stats_file in sorted(out_dir.glob(f"{'[0-9]' * SHARD_DIGITS}_stats.json")):
        stats = json.loads(stats_file.read_text())
        totals["num_shards"] += 1
        totals["num_inputs"] += stats["count"]
        totals["num_samples"] += stats["successes"]
        totals["skipped"].update(stats.get("skipped", {}))
        totals["converted"].update(stats.get("converted", {}))
    totals["skipped"] = dict(sorted(totals["skipped"].items()))
    totals["converted"] = dict(sorted(totals["converted"].items()))
    return totals


def mark_duplicates(items: list[Item], *, num_procs: int | None = None) -> None:
    """Mark inputs whose image bytes equal an earlier input's as skipped 'duplicate' (files hashed in parallel).

    Inputs naming the same image file are not duplicates of each other (one table row per caption of an image,
    open_clip's CSV layout); another file with the same bytes is.
    """
    paths = list(dict.fromkeys(it.path for it in items if it.skip is None and it.data is None and it.path))
    num_procs = num_procs or len(os.sched_getaffinity(0))
    if num_procs > 1 and len(paths) > 256:
        with ProcessPoolExecutor(num_procs) as pool:
            digests = list(pool.map(_hash_file, paths, chunksize=256))
    else:
        digests = [_hash_file(p) for p in paths]
    digest_of_path = dict(zip(paths, digests))
    first_path: dict[bytes, str | None] = {}  # digest -> the file that first had it (None: bytes of a tar)
    for item in items:
        if item.skip is not None:
            continue
        digest = hashlib.sha256(item.data).digest() if item.data is not None else digest_of_path.get(item.path)
        if digest is None:
            continue  # unreadable: the shard writer reports why
        if digest not in first_path:
            first_path[digest] = item.path if item.data is None else None
        elif item.data is not None or first_path[digest] != item.path:
            item.skip, item.skip_message, item.data = "duplicate", "same bytes as an earlier input", None


class StreamDeduper:
    """Marks duplicates in a stream of items that carry their bytes (tar inputs), in stream order."""

    def __init__(self, enabled: bool):
        self.enabled, self.seen = enabled, set()

    def __call__(self, item: Item) -> Item:
        if self.enabled and item.skip is None and item.data is not None:
            digest = hashlib.sha256(item.data).digest()
            if digest in self.seen:
                item.skip, item.skip_message, item.data = "duplicate", "same bytes as an earlier input", None
            else:
                self.seen.add(digest)
        return item
