"""Flickr8k for the recipes: unpack the shared tar once and shard its train and dev splits with `prep pairs`.

The tar holds Kaggle's layout (flickr8k/Images/*.jpg at 128x128, flickr8k/captions.txt with one `image,caption`
row per caption, and the standard split files Flickr_8k.trainImages.txt / Flickr_8k.devImages.txt). Parts
written under OUT/shards, each through `prep pairs` with the JPEGs kept byte for byte (--resize-mode no):

    train       one sample per train image with all its captions (.txt the first, the JSON's "captions" all)
    train_rows  one sample per caption row of the train split (open_clip's CSV layout)
    dev         one sample per dev image with all its captions

and OUT/openclip_train.csv (tab-separated `filepath<TAB>title`, absolute paths, one row per train caption) for
open_clip_train's CSV loader (--csv-separator '\\t' --csv-img-key filepath --csv-caption-key title).
Deduplication is off so the splits keep their standard sizes: two train images (2851198725_37b6027625.jpg and
3050606344_af711c726c.jpg) have the same bytes here but different captions.

    python -m contrastive.data_prep.flickr8k split --out /tmp/contrastive-flickr8k
    python -m contrastive.data_prep.flickr8k spec /tmp/contrastive-flickr8k/shards/train
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

from contrastive.errors import UserError
from contrastive.data_prep.build import PREP_FILE, BuildOptions
from contrastive.data_prep.cifar10 import shard_spec_of, unpack
from contrastive.data_prep.images import ImageOptions, Skip, clean_caption
from contrastive.data_prep.pairs import KAGGLE_IMAGES, KAGGLE_TABLE, ImagesListFilter, is_kaggle_layout, prep_pairs, \
    read_images_list, table_items
from contrastive.data_prep.shards import shard_done

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TAR = REPO.parent / "shared" / "data" / "flickr8k" / "flickr8k-trainval.tar"
TAR_ROOT = "flickr8k"
UNPACKED_MARKER = ".unpacked-flickr8k"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt"}
# part: (split, one row per caption)
PARTS = {"train": ("train", False), "train_rows": ("train", True), "dev": ("dev", False)}
OPENCLIP_CSV = "openclip_train.csv"
SAMPLES_PER_SHARD = 1000


def build_options() -> BuildOptions:
    # The images are 128x128 JPEGs already: stored as they are, not re-encoded.
    return BuildOptions(ImageOptions(resize_mode="no"), samples_per_shard=SAMPLES_PER_SHARD, dedup=False)


def split_lists(root: Path, out_dir: Path, *, max_images: dict[str, int]) -> dict[str, Path]:
    """The split file of each split, or a copy of its first N names under out_dir/lists (for small runs)."""
    lists = {}
    for split, name in SPLIT_FILES.items():
        path = root / name
        if not path.is_file():
            raise UserError(f"{root} has no split file {name}; is it the Flickr8k train/dev tar?")
        if max_images.get(split):
            names = read_images_list(path)[:max_images[split]]
            path = out_dir / "lists" / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_file() or path.read_text() != "".join(n + "\n" for n in names):
                path.write_text("".join(n + "\n" for n in names))
        lists[split] = path
    return lists


def _part_complete(out_dir: Path, *, root: Path, images_list: Path, one_row_per_caption: bool) -> bool:
    """Shards of a part finished by an earlier run with the same input and options."""
    path = out_dir / PREP_FILE
    if not path.is_file():
        return False
    prep = json.loads(path.read_text())
    options = {**build_options().as_dict(), "images_list": str(images_list), "image_column": None,
               "caption_column": None, "image_root": str(root / KAGGLE_IMAGES),
               "one_row_per_caption": one_row_per_caption}
    summary = prep.get("summary") or {}
    return (prep.get("input") == str(root) and prep.get("options") == options and summary.get("num_shards", 0) > 0
            and all(shard_done(out_dir, i) for i in range(summary["num_shards"])))


def write_openclip_csv(root: Path, images_list: Path, out_path: Path) -> int:
    """open_clip_train's CSV of a split: `filepath<TAB>title`, absolute paths, one row per usable caption in
    captions.txt order, captions cleaned as `prep pairs` cleans them; returns the number of rows."""
    selection = ImagesListFilter(read_images_list(images_list))
    items = table_items(root / KAGGLE_TABLE, image_column=None, caption_column=None, image_root=root / KAGGLE_IMAGES)
    rows = []
    for item in filter(selection.keep, items):
        if item.path is None:
            continue
        try:
            rows.append((str(Path(item.path).resolve()), clean_caption(item.caption)))
        except Skip:
            continue
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # quotes a field only if it needs it
        writer.writerow(("filepath", "title"))
        writer.writerows(rows)
    os.replace(tmp, out_path)
    return len(rows)


def split(tar_path: Path, out_dir: Path, *, unpack_to: Path | None = None, max_images: dict[str, int] | None = None,
          num_procs: int | None = None, progress: bool = True) -> dict:
    """Unpack (once) and write every part under out_dir/shards plus out_dir/openclip_train.csv; a part whose
    shards an earlier run finished is kept. Returns {part: summary} with "openclip_csv" and its row count."""
    root = unpack(tar_path, unpack_to or out_dir, tar_root=TAR_ROOT, marker_name=UNPACKED_MARKER,
                  what="the Flickr8k train/dev tar (../shared/data/flickr8k/flickr8k-trainval.tar)")
    if not is_kaggle_layout(root):
        raise UserError(f"{root} lacks {KAGGLE_TABLE} or {KAGGLE_IMAGES}/; is it the Flickr8k train/dev tar?")
    lists = split_lists(root, out_dir, max_images=max_images or {})
    results = {}
    for part, (split_name, one_row_per_caption) in PARTS.items():
        part_dir = out_dir / "shards" / part
        if _part_complete(part_dir, root=root, images_list=lists[split_name],
                          one_row_per_caption=one_row_per_caption):
            results[part] = {**json.loads((part_dir / PREP_FILE).read_text())["summary"], "kept": True}
            continue
        if part_dir.exists():
            # Shards of other inputs or options (another tar, or a different --max-*): they cannot be resumed.
            shutil.rmtree(part_dir)
        results[part] = prep_pairs(root, part_dir, opts=build_options(), images_list=lists[split_name],
                                   one_row_per_caption=one_row_per_caption, num_procs=num_procs, progress=progress)
    csv_path = out_dir / OPENCLIP_CSV
    results["openclip_csv"] = {"path": str(csv_path),
                               "rows": write_openclip_csv(root, lists["train"], csv_path)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive.data_prep.flickr8k", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split", help="unpack the tar and write OUT/shards/{train,train_rows,dev} and "
                                      "OUT/openclip_train.csv")
    sp.add_argument("--out", required=True, type=Path,
                    help="work folder (outside the repo), e.g. /tmp/contrastive-flickr8k")
    sp.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="the Flickr8k train/dev tar")
    sp.add_argument("--unpack-to", type=Path, default=None,
                    help="folder to unpack the tar into, shared between work folders (default: --out)")
    sp.add_argument("--max-train", type=int, default=0, help="keep only the first N train images (0: all 6,000)")
    sp.add_argument("--max-dev", type=int, default=0, help="keep only the first N dev images (0: all 1,000)")
    sp.add_argument("--num-procs", type=int, default=None, help="worker processes (default: all cores)")
    sh = sub.add_parser("spec", help="print the brace spec of a folder's shards")
    sh.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "spec":
            print(shard_spec_of(args.folder))
            return 0
        if args.max_train < 0 or args.max_dev < 0:
            raise UserError("--max-train and --max-dev must be >= 0")
        results = split(args.tar, args.out, unpack_to=args.unpack_to, num_procs=args.num_procs,
                        max_images={"train": args.max_train, "dev": args.max_dev})
    except UserError as e:
        print(f"contrastive.data_prep.flickr8k: error: {e}", file=sys.stderr)
        return 2
    for part in PARTS:
        summary = results[part]
        took = "kept from an earlier run" if summary.get("kept") else f"{summary['seconds']} s"
        print(f"{part}: {summary['num_samples']} samples from {summary['num_inputs']} inputs in "
              f"{summary['num_shards']} shards ({took}; {summary['images_list']['not_found']} listed images not "
              f"found) -> {shard_spec_of(args.out / 'shards' / part)}")
    print(f"open_clip CSV: {results['openclip_csv']['rows']} rows -> {results['openclip_csv']['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
