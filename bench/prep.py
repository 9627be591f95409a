"""`prep imagefolder` throughput on the CIFAR-10 archive, against a bare single-process loop doing the same work.

    bare      one process: stream the archive, hash, decode and check each image, write it with its caption,
              label and JSON to a tar (the per-image work of prep, without its bookkeeping or parallelism)
    prep/1    `prep imagefolder` with --num-procs 1 (the cost of the bookkeeping: parquet, stats, planning)
    prep/all  `prep imagefolder` on all cores (what a user runs)

The subset measurements (--subset images, streamed out of the archive once) give the ratios; --full also times
the whole 50,000-image archive on all cores. Options match the README's CIFAR command (--resize-mode no);
--resize-mode/--image-size measure a re-encoding configuration instead.

    python bench/prep.py --subset 5000 --full
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CIFAR = next((p for p in (REPO.parent / "shared" / "data" / "cifar10" / "cifar10-train.tar.gz",
                          Path("/work/shared/data/cifar10/cifar10-train.tar.gz")) if p.is_file()),
             REPO.parent / "shared" / "data" / "cifar10" / "cifar10-train.tar.gz")


def subset_archive(work: Path, num_images: int) -> Path:
    """The first num_images / 10 images of each class as a tar.gz with the archive's own paths."""
    out = work / f"cifar-subset-{num_images}.tar.gz"
    if out.is_file():
        return out
    per_class, taken = num_images // 10, Counter()
    tmp = out.with_suffix(".tmp")
    with tarfile.open(CIFAR, "r|gz") as src, tarfile.open(tmp, "w:gz") as dst:
        for member in src:
            if member.isreg() and taken[member.name.split("/")[2]] < per_class:
                taken[member.name.split("/")[2]] += 1
                dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
    tmp.rename(out)
    return out


def bare(archive: Path, out: Path, opts) -> int:
    """The same per-image work in one loop: no parquet, no stats, no planning, no processes."""
    import webdataset as wds

    from contrastive.data_prep.images import process_image

    out.mkdir(parents=True, exist_ok=True)
    classes: dict[str, int] = {}
    count = 0
    with tarfile.open(archive, "r|*") as src, wds.TarWriter(str(out / "bare.tar"), encoder=False) as sink:
        for member in src:
            if not member.isreg():
                continue
            data = src.extractfile(member).read()
            cls = member.name.split("/")[-2]
            label = classes.setdefault(cls, len(classes))
            digest = hashlib.sha256(data).hexdigest()
            jpeg, info, _ = process_image(data, opts.image)
            caption = f"a photo of a {cls}."
            sink.write({"__key__": f"{count:09d}", "jpg": jpeg, "txt": caption.encode(),
                        "cls": str(label).encode(),
                        "json": json.dumps({"sha256": digest, "caption": caption, **info}).encode()})
            count += 1
    return count


def run_prep(archive: Path, out: Path, opts, num_procs: int) -> int:
    from contrastive.data_prep.imagefolder import prep_imagefolder

    summary = prep_imagefolder(archive, out, opts=opts, num_procs=num_procs, progress=False)
    assert summary["shards_kept"] == 0, "the output folder was not empty"
    return summary["num_samples"]


def timed(fn, out: Path) -> float:
    """Images per second of one call writing into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    count = fn(out)
    rate = count / (time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=int, default=5000, help="images in the subset the ratios are taken on")
    parser.add_argument("--full", action="store_true", help="also time the whole archive on all cores")
    parser.add_argument("--resize-mode", default="no", help="prep's --resize-mode")
    parser.add_argument("--image-size", type=int, default=256, help="prep's --image-size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/contrastive-bench-prep"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    from contrastive.data_prep.build import BuildOptions
    from contrastive.data_prep.images import ImageOptions

    opts = BuildOptions(ImageOptions(image_size=args.image_size, resize_mode=args.resize_mode),
                        samples_per_shard=1000)
    cores = len(os.sched_getaffinity(0))
    args.work.mkdir(parents=True, exist_ok=True)
    archive = subset_archive(args.work, args.subset)
    rates = {
        "bare": timed(lambda out: bare(archive, out, opts), args.work / "bare"),
        "prep/1": timed(lambda out: run_prep(archive, out, opts, 1), args.work / "prep1"),
        f"prep/{cores}": timed(lambda out: run_prep(archive, out, opts, cores), args.work / "prepall"),
    }
    result = {"images": args.subset, "resize_mode": args.resize_mode, "cores": cores,
              "images_per_s": {k: round(v, 1) for k, v in rates.items()},
              "prep1_vs_bare": round(rates["prep/1"] / rates["bare"], 3),
              "prep_all_vs_bare": round(rates[f"prep/{cores}"] / rates["bare"], 3)}
    if args.full:
        rate = timed(lambda out: run_prep(CIFAR, out, opts, cores), args.work / "full")
        result["full_archive_images_per_s"] = round(rate, 1)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
