"""`contrastive prep imagefolder`: a classification set (one folder per class) as captioned, labelled shards.

The output matches CLIP_benchmark's WebDataset layout, so training, `contrastive zeroshot` and
CLIP_benchmark read it unchanged:

    OUT_DIR/classnames.txt                          one class name per line, in label order
    OUT_DIR/zeroshot_classification_templates.txt   the caption templates ({c} = class name)
    OUT_DIR/dataset_type.txt                        "classification"
    OUT_DIR/<split>/00000.tar ...                   img2dataset layout: key.jpg, .txt, .json, .cls
    OUT_DIR/<split>/nshards.txt, 0.tar -> 00000.tar CLIP_benchmark's shard count and names
"""
from __future__ import annotations

import os
import random
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

from contrastive.errors import UserError
from contrastive.data_prep.build import BuildOptions, Item, StreamDeduper, build_shards, is_safe_member, list_images, \
    mark_duplicates, tar_members
from contrastive.data_prep.images import IMAGE_SUFFIXES
from contrastive.data_prep.pairs import is_tar
from contrastive.data_prep.shards import shard_name

# A small generic subset of CLIP's prompt ensemble; --templates replaces it.
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a close-up photo of a {c}.",
    "a bright photo of a {c}.",
    "a dark photo of a {c}.",
    "a cropped photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of the {c}.",
    "a photo of a small {c}.",
    "a photo of a large {c}.",
    "a jpeg photo of a {c}.",
    "an image of a {c}.",
    "a picture of a {c}.",
)


def read_templates(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    if not Path(path).is_file():
        raise UserError(f"--templates {path} does not exist")
    templates = [t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    if not templates:
        raise UserError(f"--templates {path} holds no templates")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(f"template {bad[0]!r} in {path} has no {{c}} placeholder for the class name")
    return templates


def caption_for(source: str, classname: str, templates: list[str]) -> str:
    """A template picked by a hash of the input's name: the same on every run and machine."""
    return templates[zlib.crc32(source.encode("utf-8", "surrogateescape")) % len(templates)].format(c=classname)


def _class_names(folders: list[str], classnames_file: Path | None) -> list[str]:
    if classnames_file is None:
        return [f.replace("_", " ") for f in folders]
    if not Path(classnames_file).is_file():
        raise UserError(f"--classnames {classnames_file} does not exist")
    names = [n.strip() for n in Path(classnames_file).read_text(encoding="utf-8").splitlines() if n.strip()]
    if len(names) != len(folders):
        raise UserError(f"--classnames {classnames_file} has {len(names)} names for {len(folders)} class folders "
                        f"(one name per line, in the sorted order of the folders)")
    return names


def folder_listing(root: Path, *, exclude: Path | None = None) -> tuple[list[str], list[tuple[str, Path, str | None]]]:
    """(class folders, [(source, path, class folder or None for images outside any class folder)])."""
    exclude_resolved = exclude.resolve() if exclude is not None else None
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.resolve() != exclude_resolved)
    files = [(source, path, source.split("/")[0] if "/" in source else None)
             for source, path in list_images(root, exclude=exclude)]
    return folders, files


def tar_listing(path: Path) -> tuple[tuple[str, ...], list[str]]:
    """(root inside the archive, sorted class folders): the root is the deepest folder holding all images."""
    parents = []
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                if member.isreg() and is_safe_member(member.name) and \
                        PurePosixPath(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    parents.append(PurePosixPath(member.name).parent.parts)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable tar archive: {e}") from None
    if not parents:
        raise UserError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    root = list(parents[0])
    for parts in parents[1:]:
        while tuple(parts[:len(root)]) != tuple(root):
            root.pop()
    if all(len(parts) == len(root) for parts in parents):  # a single class folder
        root = root[:-1]
    root = tuple(root)
    folders = sorted({parts[len(root)] for parts in parents if len(parts) > len(root)})
    return root, folders


def prep_imagefolder(root: Path, out_dir: Path, *, opts: BuildOptions, split: str = "train",
                     templates_file: Path | None = None, classnames_file: Path | None = None,
                     shuffle_seed: int | None = 0, num_procs: int | None = None, progress: bool = True) -> dict:
    """Shard an ImageFolder (a folder, or a tar of one) into OUT_DIR/<split>; returns the summary.

    A folder's images are written in an order shuffled with `shuffle_seed` (None: folder order), so that each
    shard holds every class: written folder by folder, a shard holds one class, and a loader's shuffle buffer
    smaller than the set then fills batches with a few classes. A tar is streamed in its own order."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.exists():
        raise UserError(f"input {root} does not exist")
    if not split or "/" in split or split.startswith("."):
        raise UserError(f"--split must be a plain folder name such as train or test, got {split!r}")
    templates = read_templates(templates_file)
    if root.is_dir():
        folders, files = folder_listing(root, exclude=out_dir)
    elif is_tar(root):
        tar_root, folders = tar_listing(root)
    else:
        raise UserError(f"input {root} is neither a folder of class folders nor a tar of one")
    if not folders:
        raise UserError(f"{root} has no class folders: put each class's images in a folder named after the class")
    classnames = _class_names(folders, classnames_file)
    if len(set(classnames)) != len(classnames):
        raise UserError(f"class names are not unique: {sorted({c for c in classnames if classnames.count(c) > 1})}")
    label = {folder: i for i, folder in enumerate(folders)}

    def item_for(source: str, folder: str | None, **where) -> Item:
        if folder is None:
            return Item(source=source, skip="no_class", skip_message="image outside any class folder", **where)
        name = classnames[label[folder]]
        return Item(source=source, caption=caption_for(source, name, templates), cls=label[folder],
                    meta={"cls": label[folder], "classname": name}, **where)

    if root.is_dir():
        items = [item_for(source, folder, path=str(path)) for source, path, folder in files]
        if opts.dedup:
            mark_duplicates(items, num_procs=num_procs)  # keeps the first copy in folder order
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(items)
        num_inputs = len(items)
    else:
        def streamed() -> Iterator[Item]:
            for name, data, refusal in tar_members(root):
                if refusal:
                    yield Item(source=name, skip=refusal, skip_message="absolute or '..' path, or a link")
                    continue
                parts = PurePosixPath(name).parts
                if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES or parts[:len(tar_root)] != tar_root:
                    continue
                folder = parts[len(tar_root)] if len(parts) > len(tar_root) + 1 else None
                yield item_for("/".join(parts[len(tar_root):]), folder, data=data)

        items, num_inputs = map(StreamDeduper(opts.dedup), streamed()), None
        shuffle_seed = None  # a tar is streamed in its own order; prep.json says so

    _write_set_files(out_dir, classnames, templates)
    split_dir = out_dir / split
    record = {"command": "imagefolder", "input": str(root),
              "options": {**opts.as_dict(), "split": split, "shuffle_seed": shuffle_seed},
              "classnames": classnames, "templates": templates}
    summary = build_shards(items, split_dir, opts=opts, record=record, num_inputs=num_inputs, num_procs=num_procs,
                           progress=progress, desc="prep imagefolder")
    _write_clip_benchmark_names(split_dir, summary["num_shards"])
    summary["classes"] = len(classnames)
    return summary


def _write_set_files(out_dir: Path, classnames: list[str], templates: list[str]) -> None:
    """classnames.txt and the templates at the set's root, shared by its splits (which must agree)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in (("classnames.txt", classnames), ("zeroshot_classification_templates.txt", templates),
                        ("dataset_type.txt", ["classification"])):
        path = out_dir / name
        text = "".join(line + "\n" for line in lines)
        if path.is_file() and path.read_text(encoding="utf-8") != text:
            raise UserError(f"{path} already lists other {name.split('.')[0].replace('_', ' ')}: every split of a "
                            f"set must share them; use the same class folders and templates, or a new OUT_DIR")
        path.write_text(text, encoding="utf-8")


def _write_clip_benchmark_names(split_dir: Path, num_shards: int) -> None:
    """CLIP_benchmark opens <split>/{0..n-1}.tar after reading <split>/nshards.txt: link those names."""
    for shard_id in range(num_shards):
        link = split_dir / f"{shard_id}.tar"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(f"{shard_name(shard_id)}.tar", link)
    (split_dir / "nshards.txt").write_text(f"{num_shards}\n")
