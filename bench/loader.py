"""Loader throughput per worker: decode + augment + tokenise from shards, against a decode-only ceiling.

All figures come from one process on one thread (as a DataLoader worker runs), on the same shards, measured
in alternating rounds so that load from other jobs hits every variant alike; the ratios are what to compare.
The in-process variants are also given per CPU second of the process (`*_cpu`), which other jobs on a
shared machine move far less than the wall clock.

    ceiling   read the shards and decode each image to RGB at full size (webdataset's .decode("pil"))
    loader    our TrainLoader (data.fast_decode=true): read, shuffle, per-sample seeding, decode (JPEGs at
              the largest DCT reduction that still leaves the random crop >= the output size), the model's
              open_clip train transform run on uint8 pixels (contrastive/transforms.py), batch assembly,
              and tokenising each batch with the model's tokenizer; timed once the shuffle buffer is full
              (until then it reads two samples per sample out; from then on one, as the ceiling does)
    plain     the same loader with data.fast_decode=false: open_clip's transform exactly as built
    uint8     `loader` with data.uint8_batches=true (the default when training on a GPU): the transform stops
              before Normalize, uint8 RGBX batches in channels-last memory, a third of the bytes to write;
              the train step normalises them on its device (TrainLoader.to_device)
    uint8_planar `uint8` writing each image into a batch of (B, 3, H, W) planes, as uint8 batches were held
              before they became RGBX channels-last: the baseline of that change
    decode_only  `loader` with the transform cut down to decoding (a 1-pixel placeholder as the image): the
              most any augmentation can leave, i.e. the ceiling less the loader's own per-sample work
              (shuffle buffer, seeding, captions, batches, tokenising)
    device_decode `loader` with data.decode_on_device=true: the worker reads each JPEG's size from its header,
              draws the crop and flip, and packs the batch's bytes; decoding, cropping and resampling move
              to the training device (contrastive/device_decode.py), which this does not time: what a GPU
              trainer sees of its workers. Not to be read against the ceiling, which includes the decode.
    device_decode_per_batch (reported apart) the training process's side of it on this CPU, for reference:
              TrainLoader.to_device on each batch (libjpeg-turbo decode of the batch, crop, float32
              antialiased resample, flip, normalise) with torch on one thread, in ms per batch and us per image

    *_worker  (--worker) `loader`, `uint8` and `device_decode` produced by one DataLoader worker process, as
              training runs them:
              batches in fresh shared memory, handed over a pipe; the clock starts as for `loader`, with at
              most one more batch already waiting (prefetch_factor=1)

The shards are CIFAR-10 photographs from the shared archive, prepared with `prep imagefolder` at
--image-size (center_crop), once per size under --work.

    python bench/loader.py --image-size 256 --model ViT-B-32
"""
from __future__ import annotations

import argparse
import io
import json
import math
import statistics
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


def cifar_subset(work: Path, per_class: int) -> Path:
    """A tar.gz of the first `per_class` images of each class, streamed out of the shared archive."""
    out = work / f"cifar-{per_class}.tar.gz"
    if out.is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    taken = Counter()
    tmp = out.with_suffix(".tmp")
    with tarfile.open(CIFAR, "r|gz") as src, tarfile.open(tmp, "w:gz") as dst:
        for member in src:
            if member.isreg() and taken[member.name.split("/")[2]] < per_class:
                taken[member.name.split("/")[2]] += 1
                dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
    tmp.rename(out)
    return out


def make_shards(work: Path, *, image_size: int, per_class: int) -> str:
    from contrastive.data_prep.build import BuildOptions
    from contrastive.data_prep.imagefolder import prep_imagefolder
    from contrastive.data_prep.images import ImageOptions

    out = work / f"shards-{image_size}-{per_class}"
    opts = BuildOptions(ImageOptions(image_size=image_size, resize_mode="center_crop", jpeg_quality=90),
                        samples_per_shard=500)
    summary = prep_imagefolder(cifar_subset(work, per_class), out, opts=opts, progress=False)
    return str(out / "train" / f"{{00000..{summary['num_shards'] - 1:05d}}}.tar")


class Clock:
    """Wall time and this process's CPU time since it was made. The CPU clock does not run while other jobs
    hold the core, so on a shared machine it is the steadier measure of work done in this process; work in
    a DataLoader worker only shows on the wall clock."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, done: int) -> tuple[float, float]:
        """(images per wall second, images per CPU second of this process)."""
        return done / (time.perf_counter() - self.wall), done / (time.process_time() - self.cpu)


def rate_ceiling(spec: str, num_images: int) -> float:
    from contrastive.data import decode_image, expand_sources, read_shard

    urls = [u for source in expand_sources(spec) for u in source]
    done, clock = 0, Clock()
    while done < num_images:
        for url in urls:
            for sample in read_shard(url):
                decode_image(sample["jpg"])
                done += 1
                if done == num_images:
                    return clock.rates(done)
    return clock.rates(done)


def decode_only(data: bytes, out=None):
    """A transform that decodes and stops: the image comes out as one black pixel."""
    import torch

    from contrastive.data import decode_image

    decode_image(data)
    pixel = torch.zeros(3, 1, 1, dtype=torch.uint8)
    return pixel if out is None else out.copy_(pixel)


class Planar:
    """A uint8 transform's images written into plain (3, H, W) planes: packing them out of RGBX pixels."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, data: bytes, out=None):
        pixels = self.transform(data)[:3]
        return pixels.contiguous() if out is None else out.copy_(pixels)


def _loader(spec: str, *, model: str, fast: bool, batch: int, uint8: bool = False, workers: int = 0,
            device_decode: bool = False):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from contrastive.config import DataConfig
    from contrastive.data import TrainLoader
    from contrastive.distributed import WorldInfo
    from contrastive.models import get_open_clip_config

    size = get_open_clip_config(model)["vision_cfg"]["image_size"]
    preprocess = image_transform_v2(PreprocessCfg(size=size), is_train=True)
    cfg = DataConfig(train=spec, num_workers=workers, shuffle_buffer=1000, fast_decode=fast, uint8_batches=uint8,
                     decode_on_device=device_decode,
                     prefetch_factor=1)  # with a worker: at most one batch ready when the clock starts
    return TrainLoader(cfg, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model),
                       batch_size_per_rank=batch, seed=0, world=WorldInfo())


def _steady(loader, batch: int):
    """The loader's batches once its shuffle buffer is full.

    webdataset's shuffle buffer starts yielding at 100 samples and grows by one per sample yielded (reading
    two), so it is full only once `shuffle_buffer` samples are out; from then on the loader reads one sample
    per sample it yields, as through a whole run, and as the ceiling does."""
    batches = iter(loader)
    for _ in range(math.ceil(loader.cfg.shuffle_buffer / batch) + 1):
        next(batches)
    return batches


def rate_loader(spec: str, num_images: int, *, model: str, fast: bool, batch: int, uint8: bool = False,
                workers: int = 0, transform=None, device_decode: bool = False) -> float:
    """Images/s of a TrainLoader in steady state; `transform` (the loader's transform -> another) swaps
    in another per-sample transform."""
    loader = _loader(spec, model=model, fast=fast, batch=batch, uint8=uint8, workers=workers,
                     device_decode=device_decode)
    if transform is not None:
        loader.transform = transform(loader.transform)
    batches = _steady(loader, batch)
    done, clock = 0, Clock()
    for images, tokens in batches:
        done += len(images)
        if done >= num_images:
            break
    return clock.rates(done)


def device_decode_cost(spec: str, num_images: int, *, model: str, batch: int) -> dict[str, float]:
    """The training process's side of data.decode_on_device on this CPU (TrainLoader.to_device on each
    batch), per batch and per image, CPU time of this process; the batches are made first, untimed."""
    import torch

    loader = _loader(spec, model=model, fast=True, batch=batch, device_decode=True)
    batches = _steady(loader, batch)
    jpeg_batches = [next(batches)[0] for _ in range(max(1, num_images // batch))]
    start = time.process_time()
    for jpegs in jpeg_batches:
        loader.to_device(jpegs, torch.device("cpu"), torch.float32)
    per_batch = (time.process_time() - start) / len(jpeg_batches)
    return {"ms_per_batch": round(per_batch * 1e3, 1), "us_per_image": round(per_batch / batch * 1e6, 1),
            "batch": batch}


def stage_costs(spec: str, num_images: int, *, model: str, batch: int) -> dict[str, float]:
    """Microseconds per image of each step of our transform, timed one after the other on the same images
    (CPU time of this process, so other jobs' load counts less), plus tokenising and writing into a fresh
    batch: what the loader adds to the ceiling's decode."""
    import numpy as np
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from contrastive.data import expand_sources, read_shard
    from contrastive.models import get_open_clip_config
    from contrastive.transforms import fast_preprocess, random_resized_crop_params, rgbx_pixels

    size = get_open_clip_config(model)["vision_cfg"]["image_size"]
    fast = fast_preprocess(image_transform_v2(PreprocessCfg(size=size), is_train=True))
    samples = []
    for url in (u for source in expand_sources(spec) for u in source):
        samples += [(s["jpg"], s.get("txt", b"a photo").decode()) for s in read_shard(url)]
        if len(samples) >= num_images:
            break
    samples = samples[:num_images]
    tokenizer = open_clip.get_tokenizer(model)
    totals: dict[str, float] = {}

    def lap(name: str, start: float) -> float:
        now = time.process_time()
        totals[name] = totals.get(name, 0.0) + now - start
        return now

    reused = torch.empty(batch, 3, *fast.size_hw)
    for k, (data, _) in enumerate(samples):
        torch.default_generator.manual_seed(k)  # as the loader seeds each sample
        t = time.process_time()
        img = Image.open(io.BytesIO(data))
        t = lap("open", t)
        top, left, h, w = random_resized_crop_params(height=img.size[1], width=img.size[0], scale=fast.scale,
                                                     ratio=fast.ratio)
        t = lap("crop_params", t)
        img.load()
        t = lap("decode", t)
        x = rgbx_pixels(img)
        t = lap("pixel_copy", t)
        x = x[..., top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        t = lap("crop_copy", t)
        x = F.interpolate(x, size=fast.size_hw, mode=fast.mode, antialias=True)
        t = lap("resample", t)
        fast.normalize.normalize_into(x[0, :3], reused[k % batch])
        lap("normalize", t)
    t = time.process_time()
    for k in range(0, len(samples), batch):
        tokenizer([caption for _, caption in samples[k:k + batch]])
    t = lap("tokenize", t)
    for k in range(0, len(samples), batch):
        fresh = torch.empty(batch, 3, *fast.size_hw)
        for row in fresh[:len(samples) - k]:
            row.copy_(reused[0])
        del fresh
    fresh_cost = time.process_time() - t
    t = time.process_time()
    for k in range(0, len(samples), batch):
        for row in reused[:len(samples) - k]:
            row.copy_(reused[0])
    totals["fresh_batch_pages"] = fresh_cost - (time.process_time() - t)
    return {name: round(total / len(samples) * 1e6, 1) for name, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256, help="side of the images stored in the shards")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model config: its transform and tokenizer")
    parser.add_argument("--images", type=int, default=2000, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    parser.add_argument("--per-class", type=int, default=200, help="CIFAR-10 images per class in the shards")
    parser.add_argument("--batch", type=int, default=100, help="batch size of the loader")
    parser.add_argument("--work", type=Path, default=Path("/tmp/contrastive-bench-loader"), help="cache folder")
    parser.add_argument("--worker", action="store_true",
                        help="also time loader, uint8 and device_decode in one DataLoader worker (the training "
                             "process's side idle)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker
    spec = make_shards(args.work, image_size=args.image_size, per_class=args.per_class)
    variants = {
        "ceiling": lambda: rate_ceiling(spec, args.images),
        "loader": lambda: rate_loader(spec, args.images, model=args.model, fast=True, batch=args.batch),
        "plain": lambda: rate_loader(spec, args.images, model=args.model, fast=False, batch=args.batch),
        "uint8": lambda: rate_loader(spec, args.images, model=args.model, fast=True, batch=args.batch, uint8=True),
        "uint8_planar": lambda: rate_loader(spec, args.images, model=args.model, fast=True, batch=args.batch,
                                            uint8=True, transform=Planar),
        "decode_only": lambda: rate_loader(spec, args.images, model=args.model, fast=True, batch=args.batch,
                                           transform=lambda _: decode_only),
        "device_decode": lambda: rate_loader(spec, args.images, model=args.model, fast=True, batch=args.batch,
                                             device_decode=True),
    }
    if args.worker:  # the same loaders in one real DataLoader worker: batches in fresh shared memory, pickled over
        variants["loader_worker"] = lambda: rate_loader(spec, args.images, model=args.model, fast=True,
                                                        batch=args.batch, workers=1)
        variants["uint8_worker"] = lambda: rate_loader(spec, args.images, model=args.model, fast=True,
                                                       batch=args.batch, uint8=True, workers=1)
        variants["device_decode_worker"] = lambda: rate_loader(spec, args.images, model=args.model, fast=True,
                                                               batch=args.batch, device_decode=True, workers=1)
    for fn in variants.values():  # warm up imports, caches and the page cache
        fn()
    rates = {name: [] for name in variants}
    cpu_rates = {name: [] for name in variants if not name.endswith("_worker")}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            wall, cpu = fn()
            rates[name].append(wall)
            if name in cpu_rates:
                cpu_rates[name].append(cpu)
    median = {name: statistics.median(r) for name, r in rates.items()}
    cpu = {name: statistics.median(r) for name, r in cpu_rates.items()}
    result = {
        "model": args.model, "shard_image_size": args.image_size, "images_per_measurement": args.images,
        "images_per_s_per_worker": {k: round(v, 1) for k, v in median.items()},
        "loader_vs_ceiling": round(median["loader"] / median["ceiling"], 3),
        "plain_vs_ceiling": round(median["plain"] / median["ceiling"], 3),
        "loader_vs_plain": round(median["loader"] / median["plain"], 3),
        "uint8_vs_ceiling": round(median["uint8"] / median["ceiling"], 3),
        "decode_only_vs_ceiling": round(median["decode_only"] / median["ceiling"], 3),
        "uint8_vs_uint8_planar": round(median["uint8"] / median["uint8_planar"], 3),
        "device_decode_vs_uint8": round(median["device_decode"] / median["uint8"], 3),
        **{f"{k}_vs_ceiling": round(median[k] / median["ceiling"], 3) for k in ("loader_worker", "uint8_worker")
           if k in median},
        **({"device_decode_worker_vs_uint8_worker": round(median["device_decode_worker"] / median["uint8_worker"], 3)}
           if "device_decode_worker" in median else {}),
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        # the in-process variants again, per CPU second: other jobs on the machine move these far less
        "images_per_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "vs_ceiling_cpu": {k: round(v / cpu["ceiling"], 3) for k, v in cpu.items() if k != "ceiling"},
        "uint8_vs_uint8_planar_cpu": round(cpu["uint8"] / cpu["uint8_planar"], 3),
        "device_decode_vs_uint8_cpu": round(cpu["device_decode"] / cpu["uint8"], 3),
        "rounds_cpu": {k: [round(x, 1) for x in v] for k, v in cpu_rates.items()},
    }
    result["us_per_image_by_step"] = stage_costs(spec, min(args.images, 1000), model=args.model, batch=args.batch)
    result["device_decode_per_batch"] = device_decode_cost(spec, min(args.images, 1000), model=args.model,
                                                           batch=args.batch)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
