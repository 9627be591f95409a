"""Image sets with several captions per image, for retrieval: shards, Kaggle's Flickr folder, CLIP_benchmark's
flickr layout; each read as (sample index, image source, [captions]) in the set's own order.

Layouts (`open_captioned` picks one from what DATA is):
- shards (a spec such as `val/{00000..00003}.tar`, or a folder of .tar files): one sample per image; its
  captions are json["captions"] when the sample's .json holds that list, else its .txt split into lines
  (CLIP_benchmark's retrieval shards keep several captions in one multi-line .txt).
- Kaggle's Flickr8k/30k folder: `captions.txt` (CSV with a header `image,caption`, one row per caption, several
  rows per image) and the images in `Images/` (or beside captions.txt when there is no Images/ folder).
- CLIP_benchmark's flickr layout (clip_benchmark/datasets/flickr.py and builder.py, v1.6.2): a root holding
  `flickr8k_{split}_karpathy.txt` or `flickr30k_{split}_karpathy.txt` and the images themselves (not in a sub
  folder); the annotation file has one header line, then one `NAME.jpg,caption` line per caption, read exactly
  as CLIP_benchmark reads it (split at ".jpg,", no CSV unquoting). The root's test split is used unless DATA names
  the annotation file itself.
Images come in the order of their first caption; `images_list` (a split file such as Flickr_8k.devImages.txt, one
image name a line) keeps the folder layouts' images it names.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from contrastive.errors import UserError

KAGGLE_CAPTIONS = "captions.txt"
KAGGLE_IMAGES = "Images"
KARPATHY_SUFFIX = "_karpathy.txt"


def caption_list(text: str | None, captions=None) -> list[str]:
    """A sample's captions: `captions` (its JSON's list) when it is a non-empty list, else `text` split into
    lines; blank ones dropped."""
    if isinstance(captions, list) and captions:
        found = [str(c).strip() for c in captions]
    else:
        found = [line.strip() for line in (text or "").splitlines()]
    return [c for c in found if c]


def sample_captions(sample: dict) -> list[str]:
    """Captions of a raw WebDataset sample (bytes values), per the shard format above."""
    record = None
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (ValueError, TypeError):
            record = None
    raw = sample.get("txt")
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return caption_list(text, record.get("captions") if isinstance(record, dict) else None)


def read_kaggle_captions(path: Path) -> dict[str, list[str]]:
    """{image name: [captions]} of Kaggle's captions.txt (CSV, header `image,caption`), in file order."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise UserError(f"{path} must be a CSV with the header 'image,caption' (Kaggle's Flickr layout); "
                            f"it has {reader.fieldnames}")
        for row in reader:
            name, caption = (row["image"] or "").strip(), (row["caption"] or "").strip()
            if name and caption:
                out.setdefault(name, []).append(caption)
    return out


def read_images_list(path: str | Path) -> list[str]:
    """A split file's image names (data_prep.pairs reads them for `prep pairs --images-list`; imported here when
    needed, as data_prep's shard writer is slow to import)."""
    from contrastive.data_prep.pairs import read_images_list as read

    return read(Path(path))


def read_karpathy_captions(path: Path) -> dict[str, list[str]]:
    """{image name: [captions]} of a CLIP_benchmark `*_karpathy.txt` file, parsed as its Flickr dataset does:
    the first line is a header; each other non-blank line is `NAME.jpg,caption`."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        f.readline()
        for number, line in enumerate(f, start=2):
            line = line.strip()
            if not line:
                continue
            stem, sep, caption = line.partition(".jpg,")
            if not sep:
                raise UserError(f"{path} line {number} is not 'NAME.jpg,caption' (CLIP_benchmark's flickr format)")
            out.setdefault(stem + ".jpg", []).append(caption)
    return out


def karpathy_file(root: Path) -> Path | None:
    """The annotation file of a CLIP_benchmark flickr root: its only `*_karpathy.txt`, else its test split's."""
    found = sorted(root.glob(f"flickr*{KARPATHY_SUFFIX}"))
    if len(found) <= 1:
        return found[0] if found else None
    tests = [p for p in found if p.name.endswith(f"_test{KARPATHY_SUFFIX}")]
    if len(tests) == 1:
        return tests[0]
    raise UserError(f"{root} holds several annotation files ({', '.join(p.name for p in found)}); "
                    f"give the one to use as --data")


@dataclass
class CaptionedSet:
    """A captioned image set. Folder layouts list (image file, captions) up front; shards stream."""

    data: str
    layout: str                       # shards | kaggle | clip_benchmark
    items: list[tuple[Path, list[str]]] = field(default_factory=list)

    def samples(self, *, max_samples: int = 0) -> Iterator[tuple[int, object, list[str]]]:
        """(index, image source, captions) of the first `max_samples` samples (0: all): the source is a file
        path (folders) or the raw image bytes (shards, None when the sample has no image)."""
        if self.layout != "shards":
            yield from ((n, path, caps) for n, (path, caps) in enumerate(self.items[:max_samples or None]))
            return
        from contrastive.data import eval_samples

        for n, sample in enumerate(eval_samples(self.data)):
            if max_samples and n >= max_samples:
                return
            raw = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            yield n, raw, sample_captions(sample)


def _folder_set(data: str, annotations: Path, image_dir: Path, layout: str,
                images_list: str | None) -> CaptionedSet:
    captions = (read_karpathy_captions if layout == "clip_benchmark" else read_kaggle_captions)(annotations)
    if not captions:
        raise UserError(f"{annotations} lists no captions")
    names = list(captions)
    if images_list:
        wanted = read_images_list(images_list)
        unknown = [n for n in wanted if n not in captions]
        if unknown:
            raise UserError(f"{len(unknown)} image(s) of {images_list} have no caption in {annotations} "
                            f"(e.g. {unknown[0]}); is it the split file of this set?")
        keep = set(wanted)
        names = [n for n in names if n in keep]
    missing = [n for n in names if not (image_dir / n).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) named in {annotations.name} are not in {image_dir} "
                        f"(e.g. {missing[0]})")
    return CaptionedSet(data=data, layout=layout, items=[(image_dir / n, captions[n]) for n in names])


def open_captioned(data: str, *, images_list: str | None = None) -> CaptionedSet:
    """The captioned set DATA names (see the module docstring); user mistakes are UserErrors."""
    from contrastive.data import expand_sources

    path = Path(data)
    if path.is_file() and path.name.endswith(KARPATHY_SUFFIX):
        return _folder_set(data, path, path.parent, "clip_benchmark", images_list)
    if path.is_file() and path.name == KAGGLE_CAPTIONS:
        path = path.parent
    if path.is_dir():
        annotations = karpathy_file(path)
        if annotations is not None:
            return _folder_set(data, annotations, path, "clip_benchmark", images_list)
        if (path / KAGGLE_CAPTIONS).is_file():
            images = path / KAGGLE_IMAGES if (path / KAGGLE_IMAGES).is_dir() else path
            return _folder_set(data, path / KAGGLE_CAPTIONS, images, "kaggle", images_list)
        if not any(path.glob("*.tar")):  # else expand_sources reads the folder's shards
            raise UserError(f"{path} is neither a captioned image folder ({KAGGLE_CAPTIONS}, or flickr*"
                            f"{KARPATHY_SUFFIX} as CLIP_benchmark has it) nor a folder of .tar shards")
    if images_list:
        raise UserError("--images-list selects images of a captioned folder; a shard set is its own split")
    expand_sources(data)  # a clear error for missing shards before any work
    return CaptionedSet(data=data, layout="shards")
