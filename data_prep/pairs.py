"""`contrastive prep pairs`: image-caption pairs from a folder with sidecar captions, a table, or a tar."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path, PurePosixPath
from typing import Iterator

from contrastive.errors import UserError
from contrastive.data_prep.build import PREP_FILE, BuildOptions, Item, StreamDeduper, build_shards, list_images, \
    mark_duplicates, tar_members
from contrastive.data_prep.images import IMAGE_SUFFIXES

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
# A .txt input is read as a CSV table: Kaggle's Flickr8k/Flickr30k `captions.txt` (header `image,caption`).
CSV_SUFFIXES = (".csv", ".txt")
URL_PREFIXES = ("http://", "https://")
# The Kaggle Flickr layout: a folder holding this table and the images folder it names files in.
KAGGLE_TABLE, KAGGLE_IMAGES = "captions.txt", "Images"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Column names tried in order when none is given (open_clip's CSV, img2dataset's and common choices).
IMAGE_COLUMNS = ("filepath", "image_path", "image", "path", "file", "filename", "url")
CAPTION_COLUMNS = ("caption", "title", "text", "txt", "alt")


def is_tar(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TAR_SUFFIXES)


def is_kaggle_layout(path: Path) -> bool:
    """A folder with Kaggle's Flickr layout: captions.txt (one `image,caption` row per caption) and Images/."""
    return path.is_dir() and (path / KAGGLE_TABLE).is_file() and (path / KAGGLE_IMAGES).is_dir()


def json_safe(value):
    """A table cell as a JSON value: numbers, text, booleans and None stay; NaN becomes None; others text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if hasattr(value, "item") and not isinstance(value, (bytes, bytearray)):
        try:
            return json_safe(value.item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return str(value)


def folder_items(root: Path, *, exclude: Path | None = None) -> list[Item]:
    """Images anywhere under `root`, each with the caption in the .txt (and fields of the .json) beside it."""
    items = []
    for source, path in list_images(root, exclude=exclude):
        caption, meta = path.with_suffix(".txt"), path.with_suffix(".json")
        has_caption = caption.is_file()
        items.append(Item(source=source, path=str(path), caption_path=str(caption) if has_caption else None,
                          meta_path=str(meta) if meta.is_file() else None,
                          skip=None if has_caption else "missing_caption",
                          skip_message="" if has_caption else f"no {caption.name} beside the image"))
    return items


def _table_rows(path: Path) -> Iterator[dict | None]:
    """Rows of a table as dicts (None for a row that cannot be parsed). Undecodable text keeps its bytes as
    surrogates, so that one bad caption is skipped rather than failing the file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise UserError(f"{path} is not a readable parquet file: {e}") from None
        for batch in table.to_batches():
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        if suffix == ".jsonl":
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                yield row if isinstance(row, dict) else None
            return
        csv.field_size_limit(sys.maxsize)
        reader = csv.reader(f, delimiter="," if suffix in CSV_SUFFIXES else "\t")
        header = next(reader, None)
        if not header:
            raise UserError(f"{path} is empty: a table needs a header row naming its columns")
        header = [h.lstrip("\ufeff").strip() for h in header]
        for values in reader:
            if not values:
                continue
            yield dict(zip(header, values)) if len(values) == len(header) else None


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    if given:
        if given not in columns:
            raise UserError(f"the table has no column {given!r} ({flag}); its columns are {columns}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise UserError(f"the table has no {what} column (looked for {', '.join(candidates)}); name it with {flag}; "
                    f"its columns are {columns}")


def table_items(path: Path, *, image_column: str | None, caption_column: str | None,
                image_root: Path | None) -> list[Item]:
    """One input per row; relative image paths resolve against `image_root` (default: the table's folder)."""
    root = image_root or path.parent
    rows = list(_table_rows(path))
    columns = list(dict.fromkeys(k for row in rows[:1000] if row for k in row))
    if not columns:
        raise UserError(f"{path} has no rows")
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, "image-path", "--image-column")
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column")
    refuse_urls(path, rows, image_col=image_col, caption_col=caption_col)
    items = []
    for number, row in enumerate(rows, start=1):
        source = f"{path.name}:{number}"
        if row is None:
            items.append(Item(source=source, skip="bad_row", skip_message=f"row {number} cannot be parsed"))
            continue
        image = row.get(image_col)
        if image is None or (isinstance(image, float) and math.isnan(image)) or not str(image).strip():
            items.append(Item(source=source, skip="missing_image", skip_message=f"row {number} has no image path"))
            continue
        image_path = Path(str(image).strip())
        if not image_path.is_absolute():
            image_path = root / image_path
        meta = {k: json_safe(v) for k, v in row.items() if k not in (image_col, caption_col)}
        items.append(Item(source=str(image).strip(), path=str(image_path), caption=row.get(caption_col), meta=meta))
    return items


def refuse_urls(path: Path, rows: list[dict | None], *, image_col: str, caption_col: str) -> None:
    """A table of image URLs (LAION, CC3M, ...) is img2dataset's input, not ours: say so and how to go on,
    instead of skipping every row as a missing file."""
    urls = [str(row[image_col]).strip() for row in rows
            if row and isinstance(row.get(image_col), str) and row[image_col].strip().lower().startswith(URL_PREFIXES)]
    if not urls:
        return
    fmt = {".txt": "csv"}.get(path.suffix.lower(), path.suffix.lower().lstrip("."))
    raise UserError(f"{len(urls)} of {len(rows)} rows of {path} name their image by URL (e.g. {urls[0]}); downloading "
                    f"is img2dataset's job: img2dataset --url_list {path} --input_format {fmt} --url_col {image_col} "
                    f"--caption_col {caption_col} --output_format webdataset --output_folder shards, then train on "
                    f"data.train=shards (its output folder is a shard spec here)")


def group_by_image(items: list[Item]) -> list[Item]:
    """Rows naming the same image become one input with all their captions in row order (at the first row's
    place, with the first row's other columns); refused rows stay inputs of their own."""
    grouped: list[Item] = []
    by_image: dict[str, Item] = {}
    for item in items:
        if item.skip is not None or item.path is None:
            grouped.append(item)
            continue
        first = by_image.get(item.source)
        if first is None:
            first = by_image[item.source] = Item(source=item.source, path=item.path, caption=item.caption,
                                                 captions=[], meta=item.meta)
            grouped.append(first)
        first.captions.append(item.caption)
    return grouped


def read_images_list(path: Path) -> list[str]:
    """A split file (Flickr_8k.trainImages.txt): one image file name per line, blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--images-list {path} does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise UserError(f"--images-list {path} names no images")
    return names


class ImagesListFilter:
    """Keeps the inputs whose image file name is listed; remembers which listed names it met. Inputs that name
    no image file (a row that cannot be parsed or has no image path) are kept, so they are counted as skips."""

    def __init__(self, names: list[str]):
        self.listed, self.found = set(names), set()

    def keep(self, item: Item) -> bool:
        if item.path is None and item.data is None:
            return True
        name = PurePosixPath((item.path or item.source).replace("\\", "/")).name
        if name in self.listed:
            self.found.add(name)
            return True
        return False

    def report(self, path: Path) -> dict:
        return {"file": str(path), "listed": len(self.listed), "found": len(self.found),
                "not_found": len(self.listed - self.found)}


def _split_key(name: str) -> tuple[str | None, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    path = PurePosixPath(name)
    stem, dot, ext = path.name.partition(".")
    if not dot or not stem:
        return None, ""
    return str(path.parent / stem), ext.lower()


def tar_items(path: Path) -> Iterator[Item]:
    """Samples of a tar grouped by key (key.jpg + key.txt [+ key.json]), in archive order.

    Members of one key usually sit together; a group still lacking its image or caption waits until the end of
    the archive for the missing member before it is counted as missing.
    """
    pending: dict[str, dict] = {}
    current_key, current = None, None

    def finish(key, group, final: bool):
        image_ext = next((e for e in group if "." + e in IMAGE_SUFFIXES), None)
        if image_ext and "txt" in group:
            meta = {}
            if "json" in group:
                try:
                    loaded = json.loads(group["json"])
                    meta = {k: json_safe(v) for k, v in loaded.items() if k not in ("key", "caption")} \
                        if isinstance(loaded, dict) else {}
                except ValueError:
                    meta = {}
            return Item(source=f"{key}.{image_ext}", data=group[image_ext], caption=group["txt"], meta=meta)
        if not final:
            pending[key] = group
            return None
        if image_ext is None and "txt" not in group:
            return None  # neither image nor caption: not an input (e.g. a README)
        reason = "missing_caption" if image_ext else "missing_image"
        return Item(source=key, skip=reason, skip_message=f"{key} has no {'caption' if image_ext else 'image'}")

    for name, data, refusal in tar_members(path):
        if refusal:
            yield Item(source=name, skip=refusal, skip_message="absolute or '..' path, or a link")
            continue
        key, ext = _split_key(name)
        if key is None:
            continue
        if key != current_key:
            if current is not None and (item := finish(current_key, current, final=False)) is not None:
                yield item
            current_key, current = key, pending.pop(key, {})
        current.setdefault(ext, data)
    if current is not None and (item := finish(current_key, current, final=False)) is not None:
        yield item
    for key, group in list(pending.items()):
        if (item := finish(key, group, final=True)) is not None:
            yield item


def prep_pairs(input_path: Path, out_dir: Path, *, opts: BuildOptions, image_column: str | None = None,
               caption_column: str | None = None, image_root: Path | None = None, images_list: Path | None = None,
               one_row_per_caption: bool = False, num_procs: int | None = None, progress: bool = True) -> dict:
    """Shard image-caption pairs from a folder, a table (CSV/TSV/JSONL/Parquet, or Kaggle's captions.txt), a
    folder in Kaggle's Flickr layout (captions.txt + Images/) or a tar; returns the summary.

    Table rows naming the same image become one sample with all its captions (`.txt` the first, the JSON's
    "captions" all of them in row order) unless `one_row_per_caption`; `images_list` keeps only the listed
    image file names.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise UserError(f"input {input_path} does not exist")
    if image_root is not None and not Path(image_root).is_dir():
        raise UserError(f"--image-root {image_root} is not a folder")
    record = {"command": "pairs", "input": str(input_path), "options": opts.as_dict()}
    record["options"].update(images_list=str(images_list) if images_list else None)
    selection = ImagesListFilter(read_images_list(images_list)) if images_list else None
    table = None
    if is_kaggle_layout(input_path):
        table, image_root = input_path / KAGGLE_TABLE, image_root or input_path / KAGGLE_IMAGES
    elif input_path.is_dir():
        items = folder_items(input_path, exclude=out_dir)
        if not items:
            raise UserError(f"{input_path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    elif is_tar(input_path):
        items = tar_items(input_path)
    elif input_path.suffix.lower() in TABLE_SUFFIXES + CSV_SUFFIXES:
        table = input_path
    else:
        raise UserError(f"input {input_path} is not a folder, a tar or a table "
                        f"({', '.join(TABLE_SUFFIXES + CSV_SUFFIXES)})")
    if table is not None:
        items = table_items(table, image_column=image_column, caption_column=caption_column,
                            image_root=Path(image_root) if image_root else None)
        record["options"].update(image_column=image_column, caption_column=caption_column,
                                 image_root=str(image_root) if image_root else None,
                                 one_row_per_caption=one_row_per_caption)
    if selection is not None:
        items = filter(selection.keep, items)
        if table is not None or input_path.is_dir():
            items = list(items)
            if not selection.found:
                raise UserError(f"none of the {len(selection.listed)} images named in --images-list {images_list} "
                                f"is in {input_path}; is it the split file of this dataset?")
    if table is not None and not one_row_per_caption:
        items = group_by_image(items)
    if isinstance(items, list):
        if opts.dedup:
            mark_duplicates(items, num_procs=num_procs)
    else:
        items = map(StreamDeduper(opts.dedup), items)
    summary = build_shards(items, Path(out_dir), opts=opts, record=record,
                           num_inputs=len(items) if isinstance(items, list) else None, num_procs=num_procs,
                           progress=progress, desc="prep pairs")
    if selection is not None:
        # Known only once a streamed tar has been read through.
        summary["images_list"] = selection.report(Path(images_list))
        prep_file = Path(out_dir) / PREP_FILE
        prep_file.write_text(json.dumps({**json.loads(prep_file.read_text()), "summary": summary}, indent=2))
    return summary
