"""CIFAR-10 for the recipe: unpack the shared tar to a work folder and split it into train and a fixed held-out val.

The held-out split is the list in configs/cifar10_val.txt (500 images per class, paths relative to the
ImageFolder root), drawn once by `make_val_list` with seed 0; keeping the list in the repo pins the split
even if the drawing code changes. The split folders hold hard links (copies where links fail) to the
unpacked files, so splitting costs no extra disk.

    python -m contrastive.data_prep.cifar10 split --out /tmp/contrastive-cifar10   # -> .../split/train, .../split/val
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tarfile
from pathlib import Path

from contrastive.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TAR = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-train.tar.gz"
DEFAULT_VAL_LIST = REPO / "configs" / "cifar10_val.txt"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGES_PER_CLASS = 5000
VAL_PER_CLASS = 500
# Inside the tar, the ImageFolder root.
TAR_ROOT = "cifar10/train"
UNPACKED_MARKER = ".unpacked"
SPLIT_MARKER = ".split"


def unpack(tar_path: str | Path, work_dir: str | Path, *, tar_root: str = TAR_ROOT, marker_name: str = UNPACKED_MARKER,
           what: str = "the CIFAR-10 ImageFolder tar (../shared/data/cifar10/cifar10-train.tar.gz)") -> Path:
    """Extract the tar into work_dir once (a marker records completion); returns work_dir / tar_root."""
    tar_path, work_dir = Path(tar_path), Path(work_dir)
    root = work_dir / tar_root
    marker = work_dir / marker_name
    if marker.is_file() and marker.read_text().strip() == str(tar_path.resolve()) and root.is_dir():
        return root
    if not tar_path.is_file():
        raise UserError(f"{tar_path} does not exist; expected {what}")
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work_dir / tar_root.split("/")[0], ignore_errors=True)  # a half-finished earlier unpack
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(work_dir, filter="data")  # "data" refuses absolute paths, links out and devices
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot unpack {tar_path} into {work_dir}: {e}") from None
    if not root.is_dir():
        raise UserError(f"{tar_path} has no {tar_root}/ folder; is it {what}?")
    marker.write_text(str(tar_path.resolve()) + "\n")
    return root


def class_files(root: Path) -> dict[str, list[str]]:
    """{class: sorted file names} of an ImageFolder root."""
    return {c.name: sorted(f.name for f in c.iterdir() if f.is_file()) for c in sorted(root.iterdir()) if c.is_dir()}


def make_val_list(root: str | Path, *, per_class: int = VAL_PER_CLASS, seed: int = 0) -> list[str]:
    """The held-out list of an unpacked ImageFolder root (see draw_val_list)."""
    return draw_val_list(class_files(Path(root)), per_class=per_class, seed=seed)


def draw_val_list(files_by_class: dict[str, list[str]], *, per_class: int = VAL_PER_CLASS, seed: int = 0) -> list[str]:
    """Draw `per_class` files of each class uniformly at random (one seeded generator, classes in sorted order);
    returns "class/file" paths, sorted within each class."""
    rng = random.Random(seed)
    chosen = []
    for cls, files in sorted(files_by_class.items()):
        files = sorted(files)
        if len(files) < per_class:
            raise UserError(f"class {cls} has {len(files)} images, fewer than {per_class}")
        chosen += [f"{cls}/{name}" for name in sorted(rng.sample(files, per_class))]
    return chosen


def read_val_list(path: str | Path) -> list[str]:
    """The held-out list: one "class/file" path per line, relative, without duplicates."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"validation list {path} does not exist")
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for entry in entries:
        parts = entry.split("/")
        if len(parts) != 2 or entry.startswith("/") or ".." in parts or not all(parts):
            raise UserError(f"validation list {path}: {entry!r} is not a relative class/file path")
    if len(set(entries)) != len(entries):
        raise UserError(f"validation list {path} names some files twice")
    return entries


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def split(root: str | Path, out_dir: str | Path, *, val_list: list[str], train_per_class: int = 0) -> dict:
    """Fill out_dir/train and out_dir/val (ImageFolder layout) from `root`.

    Files in `val_list` go to val, all others to train (or the first `train_per_class` of each class in name
    order, for small runs). Returns {"train": path, "val": path, "num_train": n, "num_val": n}.
    """
    root, out_dir = Path(root), Path(out_dir)
    files = class_files(root)
    missing = [e for e in val_list if e.split("/")[1] not in set(files.get(e.split("/")[0], ()))]
    if missing:
        raise UserError(f"{len(missing)} files of the validation list are not under {root}, e.g. {missing[0]}")
    val = set(val_list)
    key = hashlib.sha256("\n".join([str(root.resolve()), str(train_per_class), *sorted(val)]).encode()).hexdigest()
    marker = out_dir / SPLIT_MARKER
    plan = {"train": [], "val": []}
    for cls, names in files.items():
        train_names = [n for n in names if f"{cls}/{n}" not in val]
        if train_per_class:
            train_names = train_names[:train_per_class]
        plan["train"] += [(cls, n) for n in train_names]
        plan["val"] += [(cls, n) for n in names if f"{cls}/{n}" in val]
    counts = {part: len(items) for part, items in plan.items()}
    result = {"train": str(out_dir / "train"), "val": str(out_dir / "val"),
              "num_train": counts["train"], "num_val": counts["val"]}
    if marker.is_file() and marker.read_text().strip() == key:
        return result
    for part, items in plan.items():
        shutil.rmtree(out_dir / part, ignore_errors=True)
        for cls in files:
            (out_dir / part / cls).mkdir(parents=True, exist_ok=True)
        for cls, name in items:
            _link(root / cls / name, out_dir / part / cls / name)
    marker.write_text(key + "\n")
    return result


def shard_spec_of(folder: str | Path) -> str:
    """A brace spec covering the NNNNN.tar shards of a folder (as `prep` writes them)."""
    from contrastive.data_prep.shards import shard_name

    folder = Path(folder)
    tars = sorted(p.name for p in folder.glob("[0-9]" * 5 + ".tar"))
    if not tars:
        raise UserError(f"no NNNNN.tar shards in {folder}")
    expected = [f"{shard_name(i)}.tar" for i in range(len(tars))]
    if tars != expected:
        raise UserError(f"the shards of {folder} are not numbered 00000..{len(tars) - 1:05d} without gaps")
    if len(tars) == 1:
        return str(folder / tars[0])
    return str(folder / f"{{{shard_name(0)}..{shard_name(len(tars) - 1)}}}.tar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive.data_prep.cifar10", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split", help="unpack the tar and write OUT/split/train and OUT/split/val")
    sp.add_argument("--out", required=True, type=Path, help="work folder (outside the repo), e.g. /tmp/contrastive-cifar10")
    sp.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="the CIFAR-10 ImageFolder tar")
    sp.add_argument("--unpack-to", type=Path, default=None,
                    help="folder to unpack the tar into, shared between work folders (default: --out)")
    sp.add_argument("--val-list", type=Path, default=DEFAULT_VAL_LIST, help="held-out files, class/file per line")
    sp.add_argument("--train-per-class", type=int, default=0,
                    help="keep only the first N training images of each class (0: all 4,500)")
    mk = sub.add_parser("make-val-list", help="draw a held-out list (how configs/cifar10_val.txt was made)")
    mk.add_argument("--out", required=True, type=Path, help="work folder to unpack into")
    mk.add_argument("--tar", type=Path, default=DEFAULT_TAR)
    mk.add_argument("--per-class", type=int, default=VAL_PER_CLASS)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--output", type=Path, default=DEFAULT_VAL_LIST)
    sh = sub.add_parser("spec", help="print the brace spec of a folder's shards")
    sh.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "spec":
            print(shard_spec_of(args.folder))
        elif args.command == "make-val-list":
            entries = make_val_list(unpack(args.tar, args.out), per_class=args.per_class, seed=args.seed)
            args.output.write_text("".join(e + "\n" for e in entries))
            print(f"{len(entries)} held-out files -> {args.output}")
        else:
            if args.train_per_class < 0:
                raise UserError("--train-per-class must be >= 0")
            root = unpack(args.tar, args.unpack_to or args.out)
            result = split(root, args.out / "split", val_list=read_val_list(args.val_list),
                           train_per_class=args.train_per_class)
            print(f"train: {result['num_train']} images in {result['train']}")
            print(f"val: {result['num_val']} images in {result['val']}")
    except UserError as e:
        print(f"contrastive.data_prep.cifar10: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
