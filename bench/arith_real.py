"""Embedding arithmetic on real photographs: CIFAR-10 class swaps and Flickr8k caption-attribute swaps.

1. CIFAR-10 held-out split (configs/cifar10_val.txt, 500 images per class): image of class A - text(A) + text(B)
   should find class-B images (`arith-eval --attribute classname`, nothing kept, CLIP's CIFAR templates).
2. Flickr8k dev split (1,000 images): `animal` (dog, cat, horse, bird) and `clothing_color` read from each
   image's five captions by eval/caption_attributes.py's rules (`arith-eval --attributes-from-captions`).
Each against image only, target text only and image + target text, Recall@1/5/10, with the W sweep.

    python bench/arith_real.py --cifar-model runs/cifar10 --flickr-model runs/flickr8k --out runs/arith_real
    python bench/arith_real.py --cifar-model M --flickr-model M --max-images 200 --out /tmp/arith_quick

The script builds its own shards under OUT/data (CIFAR: `data_prep.cifar10 split` if --cifar-val is missing,
then `prep imagefolder` as `make cifar10` does; Flickr8k: the dev images unpacked from the shared tar, one
sample per image with its first caption, `prep pairs`), indexes them with each model (`contrastive index`),
runs `contrastive arith-eval` per case (JSON and chart in OUT) and prints one table of all cases
(OUT/arith_real.md, OUT/arith_real.json). `--max-images N` keeps the first N/10 images of each CIFAR class and
the first N dev images of Flickr8k.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contrastive.cli import main as contrastive  # noqa: E402
from contrastive.errors import UserError  # noqa: E402

CIFAR_WORK = Path("/tmp/contrastive-cifar10")
FLICKR_TAR = REPO.parent / "shared" / "data" / "flickr8k" / "flickr8k-trainval.tar"
FLICKR_DEV_LIST = "flickr8k/Flickr_8k.devImages.txt"
FLICKR_CAPTIONS = "flickr8k/captions.txt"
METHODS = {"arithmetic": "arithmetic", "image_only": "image only", "text_only": "target text only",
           "image_plus_text": "image + target text"}


def cifar_images(val_dir: Path, work: Path, *, max_images: int) -> Path:
    """The held-out ImageFolder, or a copy of its first max_images/10 images per class (hard links)."""
    if not val_dir.is_dir():
        if val_dir != CIFAR_WORK / "split" / "val":
            raise UserError(f"--cifar-val {val_dir} does not exist")
        from contrastive.data_prep.cifar10 import main as cifar10

        if cifar10(["split", "--out", str(CIFAR_WORK)]) != 0:
            raise UserError("could not make the CIFAR-10 held-out split")
    if not max_images:
        return val_dir
    classes = sorted(p for p in val_dir.iterdir() if p.is_dir())
    per_class = math.ceil(max_images / len(classes))
    subset = work / "cifar_val_subset"
    shutil.rmtree(subset, ignore_errors=True)
    for folder in classes:
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            try:
                (subset / folder.name / image.name).hardlink_to(image)
            except OSError:
                shutil.copy2(image, subset / folder.name / image.name)
    return subset


def flickr_table(tar_path: Path, work: Path, *, max_images: int) -> tuple[Path, Path]:
    """Unpack the dev images, captions and list; write a one-row-per-image table (first caption).
    Returns (table CSV, captions.txt)."""
    if not tar_path.is_file():
        raise UserError(f"--flickr-tar {tar_path} does not exist")
    root = work / "flickr8k-dev"
    with tarfile.open(tar_path) as tar:
        for name in (FLICKR_DEV_LIST, FLICKR_CAPTIONS):
            tar.extract(name, root, filter="data")
        names = [n.strip() for n in (root / FLICKR_DEV_LIST).read_text().splitlines() if n.strip()]
        names = names[:max_images] if max_images else names
        wanted = {f"flickr8k/Images/{n}" for n in names}
        members = [m for m in tar.getmembers() if m.name in wanted]
        if len(members) != len(wanted):
            raise UserError(f"{tar_path} lacks {len(wanted) - len(members)} of the dev images")
        tar.extractall(root, members=members, filter="data")
    first: dict[str, str] = {}
    with open(root / FLICKR_CAPTIONS, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            first.setdefault(row["image"], row["caption"])
    table = work / "flickr8k_dev.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([f"Images/{n}", first[n]] for n in names)
    return table, root / FLICKR_CAPTIONS


def run(argv: list[str]) -> None:
    print("$ contrastive " + " ".join(argv), flush=True)
    if contrastive(argv) != 0:
        raise UserError(f"`contrastive {argv[0]}` failed (its error is above)")


def shards(prep_argv: list[str], out: Path) -> str:
    from contrastive.data_prep.cifar10 import shard_spec_of

    shutil.rmtree(out, ignore_errors=True)
    run(["prep", *prep_argv, "--no-dedup", "--num-procs", "1"])
    return shard_spec_of(out)


def cases(args, data: Path) -> list[dict]:
    """[{name, model, spec, attribute, extra arith-eval args}]; builds the shards they need."""
    todo = []
    if args.cifar_model:
        images = cifar_images(args.cifar_val, data, max_images=args.max_images)
        spec = shards(["imagefolder", str(images), str(data / "cifar10"), "--split", "val", "--templates",
                       str(REPO / "eval" / "templates" / "cifar.txt"), "--image-size", "32", "--resize-mode", "no",
                       "--samples-per-shard", "1000"], data / "cifar10" / "val")
        todo.append({"name": "cifar10", "model": args.cifar_model, "spec": spec, "attributes": ["classname"],
                     "extra": []})
    if args.flickr_model:
        table, captions = flickr_table(args.flickr_tar, data, max_images=args.max_images)
        spec = shards(["pairs", str(table), str(data / "flickr8k"), "--image-root", str(table.parent / "flickr8k-dev"
                                                                                          / "flickr8k"),
                       "--image-size", "128", "--resize-mode", "no"], data / "flickr8k")
        todo.append({"name": "flickr8k", "model": args.flickr_model, "spec": spec,
                     "attributes": ["animal", "clothing_color"], "extra": ["--attributes-from-captions",
                                                                           str(captions)]})
    return todo


def recall_text(recall: dict) -> str:
    return " / ".join(f"{recall[k]:.3f}" for k in ("1", "5", "10"))


def table(results: list[dict]) -> str:
    """Markdown: every method's R@1/5/10 per case, then arithmetic's R@10 over the W sweep."""
    ok = [r for r in results if "recall" in r]
    lines = ["| case | labelled images | queries | " + " | ".join(f"{m} R@1 / R@5 / R@10" for m in METHODS.values())
             + " |", "|---" * (3 + len(METHODS)) + "|"]
    for r in ok:
        lines.append(f"| {r['case']} | {r['num_labelled_images']} | {r['num_queries']} | "
                     + " | ".join(recall_text(r["recall"][m]) for m in METHODS) + " |")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | not run: {r['error']} |")
    if ok:
        weights = list(ok[0]["weight_sweep"])
        lines += ["", "| case: arithmetic R@10 at W = | " + " | ".join(weights) + " |",
                  "|---" * (1 + len(weights)) + "|"]
        lines += [f"| {r['case']} | " + " | ".join(f"{r['weight_sweep'][w]['10']:.3f}" for w in weights) + " |"
                  for r in ok]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-model", default=None, help="run, checkpoint or export for the CIFAR-10 case")
    parser.add_argument("--flickr-model", default=None, help="run, checkpoint or export for the Flickr8k case")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "arith_real", help="results and data folder")
    parser.add_argument("--max-images", type=int, default=0, help="images per gallery (0: the whole split)")
    parser.add_argument("--max-queries", type=int, default=2000, help="query images per case (arith-eval's)")
    parser.add_argument("--cifar-val", type=Path, default=CIFAR_WORK / "split" / "val",
                        help="the CIFAR-10 held-out ImageFolder (made with `data_prep.cifar10 split` if missing)")
    parser.add_argument("--flickr-tar", type=Path, default=FLICKR_TAR, help="the Flickr8k train+dev tar")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass when indexing")
    args = parser.parse_args(argv)
    try:
        if not (args.cifar_model or args.flickr_model):
            raise UserError("give --cifar-model, --flickr-model or both")
        if args.max_images < 0:
            raise UserError("--max-images must be >= 0")
        data = args.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        todo = cases(args, data)
        results = []
        for case in todo:
            index = args.out / f"index_{case['name']}"
            run(["index", "--model", case["model"], "--data", case["spec"], "--out", str(index), "--overwrite",
                 "--batch-size", str(args.batch_size)])
            for attribute in case["attributes"]:
                name = f"{case['name']} {attribute}"
                output = args.out / f"{case['name']}_{attribute}.json"
                output.unlink(missing_ok=True)
                print(f"$ contrastive arith-eval ... --attribute {attribute}", flush=True)
                code = contrastive(["arith-eval", "--index", str(index), "--attribute", attribute, "--output",
                                    str(output), "--max-queries", str(args.max_queries), *case["extra"]])
                # A case can fail alone (e.g. a small --max-images leaves one value): it is reported, not fatal.
                results.append({"case": name, **json.loads(output.read_text())} if code == 0 and output.is_file()
                               else {"case": name, "error": f"arith-eval exited {code}"})
    except UserError as e:
        print(f"arith_real: error: {e}", file=sys.stderr)
        return 2
    markdown = table(results)
    (args.out / "arith_real.md").write_text(markdown + "\n")
    (args.out / "arith_real.json").write_text(json.dumps(results, indent=2))
    print("\n" + markdown)
    print(f"\nresults: {args.out / 'arith_real.json'}, {args.out / 'arith_real.md'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
