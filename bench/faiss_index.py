"""Benchmark: the index `contrastive index` chooses automatically against exact search, per kind of data.

Kinds: `clustered` (unit vectors around random centres, well separated), `uniform` (Gaussian vectors
normalised: uniform on the sphere, no structure for an IVF index to use), and real image embeddings of the
shared photos through a trained model: `cifar10` (49,000 CIFAR-10 images and their mirror images, 98,000
vectors; queries: 1,000 images of the held-out split configs/cifar10_val.txt the model never trained on) and
`flickr8k` (the 6,000 train-split photos in 16 views each, the photo, its mirror and 14 random crops,
96,000 vectors; queries: 1,000 dev-split photos). Query images and all their views stay out of the index.

For each kind: which index `build_tuned_index` chose (as `contrastive index --index-type auto` does, with its
own held-out sample taken from the indexed vectors), its recall@10 against exact search on the bench's
queries (never in the index, never seen by the tuning), and queries/s of both on them, timed interleaved in
the same run, best of --repeats. On a machine where faiss sees a GPU the same with both indexes on the GPU.

The model: --model (a run, checkpoint or export; e.g. runs/cifar10), else one is trained here: a short run of
configs/cifar10.yaml (cifar-convnet-xs, 128-d) on 2,000 images per class of the CIFAR-10 train split, a few
minutes on 2 CPU cores, scored by zero-shot accuracy on the held-out split. Flickr8k photos go through the same
model (downscaled to its 32 px).

    flock /tmp/contrastive-heavy.lock .venv/bin/python bench/faiss_index.py --threads 1 --repeats 5 --json bench_faiss.json
    .venv/bin/python bench/faiss_index.py --kinds clustered,uniform --num-vectors 20000 --dim 32   # quick check

Letters in names: N indexed vectors, Q queries, D dim.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contrastive.eval.index import MIN_SPEEDUP, build_tuned_index, gpu_available, knn_recall, to_gpu  # noqa: E402

KINDS = ("clustered", "uniform", "cifar10", "flickr8k")
WORK = Path("/tmp/contrastive-faiss-bench")
CIFAR_UNPACK = Path("/tmp/contrastive-cifar10")  # where `make cifar10` unpacks the same tar (reused)
FLICKR_TAR = REPO.parent / "shared" / "data" / "flickr8k" / "flickr8k-trainval.tar"
FLICKR_VIEWS = 16


@dataclass
class Collection:
    """Vectors to index and queries that are not among them (unit rows, float32)."""

    kind: str
    base_ND: np.ndarray
    queries_QD: np.ndarray
    what: str


def clustered_vectors(num: int, dim: int, *, num_clusters: int, noise: float, seed: int, num_groups: int = 0,
                      group_spread: float = 0.5, block: int = 100_000) -> np.ndarray:
    """Unit vectors around `num_clusters` random centres: cos(point, centre) ~ 1/sqrt(1 + noise^2).

    With `num_groups`, the centres themselves gather around group centres (cos between two centres of a group
    ~ 1/(1 + group_spread^2)), so neighbourhoods cross cluster borders, as in real embedding collections.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    if num_groups:
        groups = rng.standard_normal((num_groups, dim), dtype=np.float32)
        centres = groups[rng.integers(num_groups, size=num_clusters)] + group_spread * centres
    out = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, block):
        n = min(block, num - start)
        x = centres[rng.integers(num_clusters, size=n)] + noise * rng.standard_normal((n, dim), dtype=np.float32)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def uniform_vectors(num: int, dim: int, *, seed: int) -> np.ndarray:
    """Gaussian vectors normalised: uniform on the unit sphere."""
    x = np.random.default_rng(seed).standard_normal((num, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- real image embeddings

def trained_model(args) -> Path:
    """--model, or a short configs/cifar10.yaml run on 2,000 images per class (reused when already there)."""
    if args.model:
        return Path(args.model)
    import shutil

    from contrastive.cli import main as contrastive
    from contrastive.data_prep.cifar10 import shard_spec_of

    def run(argv: list[str]) -> None:
        print("$ contrastive " + " ".join(argv), flush=True)
        if contrastive(argv) not in (0, 75):  # 75: train stopped by train.max_time_s, with its checkpoint
            raise SystemExit(f"`contrastive {argv[0]}` failed (its error is above)")

    run_dir = args.work / "model"
    if (run_dir / "zeroshot_cifar10_val.json").is_file():
        print(f"model: reusing {run_dir}", flush=True)
        return run_dir
    start = time.perf_counter()
    split = cifar_split(args)
    shards = args.work / "cifar10" / "shards"
    if not (shards / "train" / "sizes.json").is_file():
        shutil.rmtree(shards, ignore_errors=True)
        run(["prep", "imagefolder", str(split / "train"), str(shards), "--split", "train", "--templates",
             str(REPO / "eval" / "templates" / "cifar.txt"), "--image-size", "32", "--resize-mode", "no",
             "--samples-per-shard", "1000", "--no-dedup"])
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier run: start afresh
    run(["train", "--config", str(REPO / "configs" / "cifar10.yaml"), "--out", str(run_dir),
         f"data.train={shard_spec_of(shards / 'train')}", f"train.steps={args.train_steps}",
         f"train.max_time_s={args.train_seconds}", "eval.every=0", "eval.evaluators=[]"])
    run(["zeroshot", "--model", str(run_dir), "--data", str(split / "val"), "--templates", "cifar",
         "--output", str(run_dir / "zeroshot_cifar10_val.json")])
    print(f"model: trained and scored in {time.perf_counter() - start:.0f} s: {run_dir}", flush=True)
    return run_dir


def cifar_split(args) -> Path:
    """The CIFAR-10 train/val ImageFolders (hard links), the val split being configs/cifar10_val.txt."""
    from contrastive.data_prep.cifar10 import DEFAULT_TAR, DEFAULT_VAL_LIST, read_val_list, split, unpack

    out = args.work / "cifar10" / "split"
    split(unpack(DEFAULT_TAR, CIFAR_UNPACK), out, val_list=read_val_list(DEFAULT_VAL_LIST), train_per_class=2000)
    return out


def embed(bundle, images, *, batch: int = 500) -> np.ndarray:
    """Unit image embeddings (float32) of an iterable of PIL images, in order."""
    import torch

    from contrastive.evaluators import FeatureEncoder

    encoder, out, pending = FeatureEncoder(bundle.model), [], []

    def flush():
        out.append(encoder.encode_image(torch.stack([bundle.preprocess_val(im) for im in pending])).numpy())
        pending.clear()

    for image in images:
        pending.append(image)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return np.concatenate(out).astype(np.float32)


def cifar10_collection(bundle, *, num_queries: int, seed: int) -> Collection:
    """All 50,000 CIFAR-10 images: `num_queries` of the held-out split as queries, the rest and their mirror
    images indexed."""
    from PIL import Image, ImageOps

    from contrastive.data_prep.cifar10 import DEFAULT_TAR, DEFAULT_VAL_LIST, class_files, read_val_list, unpack

    root = unpack(DEFAULT_TAR, CIFAR_UNPACK)
    paths = [f"{c}/{n}" for c, names in class_files(root).items() for n in names]
    val = read_val_list(DEFAULT_VAL_LIST)
    query_paths = set(np.random.default_rng(seed).choice(val, size=num_queries, replace=False))
    indexed = [p for p in paths if p not in query_paths]
    load = lambda p: Image.open(root / p).convert("RGB")  # noqa: E731
    queries = embed(bundle, (load(p) for p in sorted(query_paths)))
    base = embed(bundle, (view for p in indexed for im in [load(p)] for view in (im, ImageOps.mirror(im))))
    return Collection("cifar10", base, queries, f"{len(indexed):,} CIFAR-10 images and their mirror images; "
                                                f"queries: {num_queries:,} held-out images")


def flickr_views(image, rng: np.random.Generator, num_views: int) -> list:
    """The photo, its mirror, and random crops (35-100% of the area, aspect 3/4-4/3, mirrored half the time)."""
    from PIL import ImageOps

    views = [image, ImageOps.mirror(image)]
    w, h = image.size
    while len(views) < num_views:
        area = rng.uniform(0.35, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if not (0 < cw <= w and 0 < ch <= h):
            continue
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = image.crop((x, y, x + cw, y + ch))
        views.append(ImageOps.mirror(crop) if rng.random() < 0.5 else crop)
    return views


def flickr8k_collection(bundle, *, num_queries: int, seed: int, num_views: int = FLICKR_VIEWS) -> Collection:
    """Flickr8k train photos in `num_views` views each indexed; `num_queries` dev photos as queries."""
    from PIL import Image

    with tarfile.open(FLICKR_TAR) as tar:
        listed = {name: tar.extractfile(f"flickr8k/Flickr_8k.{name}Images.txt").read().decode().split()
                  for name in ("train", "dev")}
        wanted = set(listed["train"]) | set(listed["dev"])
        photos = {}
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name in wanted:
                photos[name] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    rng = np.random.default_rng(seed)
    dev = sorted(rng.choice(listed["dev"], size=num_queries, replace=False))
    queries = embed(bundle, (photos[n] for n in dev))
    base = embed(bundle, (v for n in listed["train"] for v in flickr_views(photos[n], rng, num_views)))
    return Collection("flickr8k", base, queries, f"{len(listed['train']):,} Flickr8k train photos in {num_views} "
                                                 f"views each; queries: {num_queries:,} dev photos")


def cached_embeddings(kind: str, bundle, args) -> Collection:
    """A real kind's Collection, embedded once per model and settings (kept in --work), so that timing reruns
    skip the minutes of decoding and embedding."""
    model = Path(args.model_used).resolve()
    key = json.dumps({"model": str(model), "mtime": model.stat().st_mtime_ns, "queries": args.num_queries,
                      "seed": args.seed})
    path = args.work / f"{kind}_embeddings.npz"
    if path.is_file():
        with np.load(path) as saved:
            if str(saved["key"]) == key:
                return Collection(kind, saved["base"], saved["queries"], str(saved["what"]) + " (cached)")
    make = cifar10_collection if kind == "cifar10" else flickr8k_collection
    c = make(bundle, num_queries=args.num_queries, seed=args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=key, base=c.base_ND, queries=c.queries_QD, what=c.what)
    return c


def collections(args):
    """Yield each asked-for kind's Collection (the model is trained or loaded once, when a real kind needs it)."""
    bundle = None
    for kind in args.kinds:
        start = time.perf_counter()
        if kind == "clustered":
            num_clusters = args.num_clusters or max(10, args.num_vectors // 1000)
            data = clustered_vectors(args.num_vectors + args.num_queries, args.dim, num_clusters=num_clusters,
                                     noise=args.noise, seed=args.seed, num_groups=args.num_groups,
                                     group_spread=args.group_spread)
            c = Collection(kind, data[:args.num_vectors], data[args.num_vectors:],
                           f"{num_clusters} clusters, noise {args.noise}; queries: fresh draws")
        elif kind == "uniform":
            data = uniform_vectors(args.num_vectors + args.num_queries, args.dim, seed=args.seed)
            c = Collection(kind, data[:args.num_vectors], data[args.num_vectors:],
                           "Gaussian vectors normalised; queries: fresh draws")
        else:
            if bundle is None:
                from contrastive.loading import load_for_inference

                model = trained_model(args)
                bundle, _ = load_for_inference(model)
                args.model_used = str(model)
            c = cached_embeddings(kind, bundle, args)
        print(f"{kind}: {len(c.base_ND):,} x {c.base_ND.shape[1]} ({c.what}), ready in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        yield c


# ---------------------------------------------------------------- timing

def timed_search(index, queries_QD: np.ndarray, k: int, batch: int) -> tuple[float, np.ndarray]:
    """(queries per second, ids) searching `batch` queries per call."""
    ids = []
    start = time.perf_counter()
    for s in range(0, len(queries_QD), batch):
        ids.append(index.search(queries_QD[s:s + batch], k)[1])
    return len(queries_QD) / (time.perf_counter() - start), np.concatenate(ids)


def compare(exact, approx, queries_QD: np.ndarray, *, k: int, batch: int, repeats: int) -> dict:
    """Interleaved timing (exact, approx, exact, ...) so both see the same machine load; best of `repeats`."""
    qps_exact, qps_approx, truth, found = [], [], None, None
    for _ in range(repeats):
        q, truth = timed_search(exact, queries_QD, k, batch)
        qps_exact.append(q)
        q, found = timed_search(approx, queries_QD, k, batch)
        qps_approx.append(q)
    best_exact, best_approx = max(qps_exact), max(qps_approx)
    return {"qps_exact": best_exact, "qps_chosen": best_approx, "speedup": best_approx / best_exact,
            f"recall@{k}": knn_recall(found, truth), "batch": batch}


def measure(c: Collection, args) -> dict:
    import faiss

    dim = c.base_ND.shape[1]
    exact = faiss.IndexFlatIP(dim)
    exact.add(c.base_ND)
    start = time.perf_counter()
    index, params = build_tuned_index(c.base_ND, kind=args.index_type, target_recall=args.target_recall,
                                      seed=args.seed, use_gpu=False)
    build_s = time.perf_counter() - start
    probe = f" nprobe {params.nprobe}" if params.nprobe else ""
    print(f"  chose {params.factory}{probe} in {build_s:.0f} s: {params.choice['reason']}", flush=True)
    result = {"kind": c.kind, "what": c.what, "num_vectors": len(c.base_ND), "dim": dim,
              "num_queries": len(c.queries_QD), "index": params.factory, "nprobe": params.nprobe,
              "build_seconds": round(build_s, 1), "choice": params.choice,
              "cpu": compare(exact, index, c.queries_QD, k=10, batch=args.batch, repeats=args.repeats)}
    cpu = result["cpu"]
    print(f"  CPU: exact {cpu['qps_exact']:,.0f} q/s, {params.factory}{probe} {cpu['qps_chosen']:,.0f} q/s -> "
          f"{cpu['speedup']:.1f}x at recall@10 {cpu['recall@10']:.3f} on the held-out queries", flush=True)
    if gpu_available():
        result["gpu"] = compare(to_gpu(exact), to_gpu(index), c.queries_QD, k=10, batch=args.batch,
                                repeats=args.repeats)
        gpu = result["gpu"]
        print(f"  GPU: exact {gpu['qps_exact']:,.0f} q/s, chosen {gpu['qps_chosen']:,.0f} q/s -> "
              f"{gpu['speedup']:.1f}x at recall@10 {gpu['recall@10']:.3f}", flush=True)
    result["meets_target"] = cpu["recall@10"] >= args.target_recall
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--num-vectors", type=int, default=100_000, help="clustered and uniform")
    parser.add_argument("--dim", type=int, default=128, help="clustered and uniform (cifar-convnet-xs's 128)")
    parser.add_argument("--num-clusters", type=int, default=0, help="0: one per 1000 vectors")
    parser.add_argument("--noise", type=float, default=1.3, help="per-coordinate noise around the cluster centres")
    parser.add_argument("--num-groups", type=int, default=0, help="gather the cluster centres into this many groups")
    parser.add_argument("--group-spread", type=float, default=0.5, help="spread of centres around their group")
    parser.add_argument("--num-queries", type=int, default=1000, help="held-out queries timed and scored")
    parser.add_argument("--index-type", default="auto", help="as `contrastive index --index-type`")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--model", default=None, help="model for the real kinds (default: train one here)")
    parser.add_argument("--work", type=Path, default=WORK, help="where the CIFAR split, shards and model go")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the model trained here")
    parser.add_argument("--train-seconds", type=int, default=240, help="time budget of the model trained here")
    parser.add_argument("--batch", type=int, default=1000, help="queries per search call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    args.model_used = None

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, auto keeps an approximate index at "
          f">= {MIN_SPEEDUP}x exact search", flush=True)
    results = [measure(c, args) for c in collections(args)]
    print("\n| kind | N x D | chosen index | recall@10 (held-out queries) | exact q/s | chosen q/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        probe = f", nprobe {r['nprobe']}" if r["nprobe"] else ""
        print(f"| {r['kind']} | {r['num_vectors']:,} x {r['dim']} | {r['index']}{probe} | {r['cpu']['recall@10']:.3f} "
              f"| {r['cpu']['qps_exact']:,.0f} | {r['cpu']['qps_chosen']:,.0f} | {r['cpu']['speedup']:.1f}x |")
    ok = all(r["meets_target"] for r in results)
    print(f"target (recall@10 >= {args.target_recall} on each kind's held-out queries): {'met' if ok else 'NOT met'}")
    model_info = None
    if args.model_used:
        score = Path(args.model_used) / "zeroshot_cifar10_val.json"
        model_info = {"path": args.model_used,
                      "zeroshot_cifar10_val": json.loads(score.read_text()) if score.is_file() else None}
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": faiss.omp_get_max_threads(), "model": model_info,
                                               "kinds": results, "meets_target": ok}, indent=2, default=float))
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
