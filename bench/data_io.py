"""Bytes the training stream reads from its shards: per epoch with more slots than shards, and for a resume.

    epoch     bytes read by every (rank, worker) slot over one epoch-exact epoch, each slot iterated in this
              process (as its DataLoader worker would), against the shards' total size: 1.0 reads each
              sample's bytes once
    resume    a loader resumed near the end of its block: seconds from building the loader to its first
              batch, and the bytes it read to get there

Bytes are the process's read() bytes (/proc/self/io rchar: index files included), so the figures hold for any
version of the reader: run the script from a checkout of another commit (with PYTHONPATH set to it) to
compare. The shards are synthetic JPEGs of noise (incompressible, as photographs are) in --work, written by
data_prep's write_shard, with index files where that version writes them; delete the *.index.json files to
time a start-up that indexes the shards from their headers. The page cache is warm: on network storage the
bytes not read save more time than here.

    python bench/data_io.py --ranks 2 --workers 4 --shards 3 --per-shard 1000
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def read_bytes() -> int:
    """Bytes this process has read through read() calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def make_set(folder: Path, *, num_shards: int, per_shard: int, side: int) -> tuple[str, int]:
    """Shards of noise JPEGs; returns (shard spec, total bytes of the tars)."""
    import numpy as np
    from PIL import Image

    from contrastive.data_prep.shards import shard_spec, write_shard, write_sizes

    if not (folder / "sizes.json").is_file():
        rng = np.random.default_rng(0)
        for shard in range(num_shards):
            samples = []
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                samples.append({"jpg": buf.getvalue(), "txt": f"sample {shard} {i}"})
            write_shard(folder, shard, samples)
        write_sizes(folder)
    total = sum((folder / f"{shard:05d}.tar").stat().st_size for shard in range(num_shards))
    return shard_spec(folder, num_shards), total


def _loader(spec: str, *, rank: int, world_size: int, workers: int, **data):
    import torch
    from torchvision import transforms as T

    from contrastive.config import DataConfig
    from contrastive.data import TrainLoader
    from contrastive.distributed import WorldInfo

    cfg = DataConfig(train=spec, resampled=False, num_workers=workers, **data)
    preprocess = T.Compose([T.RandomResizedCrop(64), T.ToTensor()])
    return TrainLoader(cfg, preprocess=preprocess, tokenizer=lambda captions: torch.zeros(len(captions), 4),
                       batch_size_per_rank=16, seed=0, world=WorldInfo(rank, world_size))


def epoch_bytes(spec: str, *, ranks: int, workers: int, shuffle_buffer: int, block_samples: int) -> int:
    """Bytes read by all slots over epoch 0 (raw samples only: nothing is decoded)."""
    from contrastive.data import SlotState, StreamSpec, _SlotStream

    total = 0
    for rank in range(ranks):
        loader = _loader(spec, rank=rank, world_size=ranks, workers=workers, shuffle_buffer=shuffle_buffer,
                         block_samples=block_samples)
        spec_ = StreamSpec(plan=loader.plan, slots=[SlotState() for _ in range(workers)], worker_offset=0,
                           batch_size=16, transform=None, tokenizer=None, image_key="jpg", caption_key="txt",
                           class_sets=[], class_set_of_shard=[])
        stream = _SlotStream(spec_)
        for worker in range(workers):
            before = read_bytes()
            for _, _, after in stream._samples(worker, SlotState()):
                if after[0] == 1:  # the position after this sample is in epoch 1: epoch 0 is done
                    break
            total += read_bytes() - before
    return total


def resume_first_batch(spec: str, *, num_samples: int, batch: int) -> tuple[float, int]:
    """(seconds, bytes) from building a loader resumed `batch` samples before its block's end to its first batch."""
    options = dict(rank=0, world_size=1, workers=0, shuffle_buffer=100, block_samples=num_samples)
    state = _loader(spec, **options).state_dict()
    state["slots"][0]["offset"] = num_samples - batch
    before, start = read_bytes(), time.perf_counter()
    loader = _loader(spec, **options)
    loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - start, read_bytes() - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-data-io"), help="where the shards go")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--per-shard", type=int, default=300)
    parser.add_argument("--side", type=int, default=160, help="image side of the noise JPEGs")
    parser.add_argument("--repeats", type=int, default=3, help="resume timings (the median is reported)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    folder = args.work / f"s{args.shards}x{args.per_shard}x{args.side}"
    spec, total = make_set(folder, num_shards=args.shards, per_shard=args.per_shard, side=args.side)
    num_samples = args.shards * args.per_shard
    read = epoch_bytes(spec, ranks=args.ranks, workers=args.workers, shuffle_buffer=100, block_samples=1000)
    runs = [resume_first_batch(spec, num_samples=num_samples, batch=16) for _ in range(args.repeats)]
    result = {"shards": args.shards, "samples": num_samples, "slots": args.ranks * args.workers,
              "tar_bytes": total, "epoch_bytes_read": read, "epoch_read_over_size": round(read / total, 3),
              "resume_first_batch_s": round(statistics.median(t for t, _ in runs), 4),
              "resume_bytes_read": statistics.median(b for _, b in runs)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
