"""Benchmark: `contrastive serve` under load on loopback: p50/p99 latency, requests/s and errors per query kind.

Builds an index directory of --num-vectors unit vectors (near-uniform random ones, which cost exact search as
much as real embeddings do) for a model (default: the demo model's architecture, random weights), starts
`contrastive serve` on 127.0.0.1 in its own process, and sends a fixed number of requests of each kind (text;
an uploaded image; an uploaded image minus one text plus another) from 1 and 16 concurrent clients (asyncio,
httpx, in this process). It stops by itself; nothing leaves the machine.

    flock /tmp/contrastive-heavy.lock .venv/bin/python bench/serve_load.py               # 100,000 vectors
    .venv/bin/python bench/serve_load.py --num-vectors 5000 --requests 50 --model tiny-vit-32   # quick check

Letters in names: N indexed vectors, D dim.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = ("text", "image", "arithmetic")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")


def model_dir(model: str, work: Path) -> Path:
    """A checkpoint directory: `model` itself, or a random init of the model config of that name."""
    if Path(model).exists():
        return Path(model)
    import torch
    from safetensors.torch import save_file

    from contrastive.checkpoint import ARCH_FILE, MODEL_FILE
    from contrastive.config import ModelConfig
    from contrastive.models import build_model

    out = work / f"model_{model}"
    if not (out / MODEL_FILE).is_file():
        torch.manual_seed(0)
        bundle = build_model(ModelConfig(name=model))
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(out / MODEL_FILE))
        (out / ARCH_FILE).write_text(json.dumps({"model_cfg": bundle.model_cfg,
                                                 "preprocess_cfg": bundle.preprocess_cfg}))
    return out


def build_index_dir(out: Path, *, model: Path, num_vectors: int, seed: int = 0) -> dict:
    """An index directory as `contrastive index` writes it (embeddings, metadata, tuned index), of random unit
    vectors with made-up captions; rebuilt only when missing."""
    import pandas as pd

    from contrastive.checkpoint import load_arch, find_weights
    from contrastive.eval.embed import IMG_DIR, META_DIR, TEXT_DIR
    from contrastive.eval.index import PARAMS_FILE, build_tuned_index, save_index

    if (out / PARAMS_FILE).is_file():
        return json.loads((out / PARAMS_FILE).read_text())
    dim = int(load_arch(find_weights(model))["model_cfg"]["embed_dim"])
    rng = np.random.default_rng(seed)
    vectors_ND = rng.standard_normal((num_vectors, dim), dtype=np.float32)
    vectors_ND /= np.linalg.norm(vectors_ND, axis=1, keepdims=True)
    for sub in (IMG_DIR, TEXT_DIR, META_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    np.save(out / IMG_DIR / "img_emb_0.npy", vectors_ND.astype(np.float16))
    np.save(out / TEXT_DIR / "text_emb_0.npy", vectors_ND.astype(np.float16))
    captions = [f"a {COLORS[i % 6]} {SHAPES[(i // 6) % 6]}" for i in range(num_vectors)]
    pd.DataFrame({"image_path": [f"{i:09d}" for i in range(num_vectors)], "caption": captions}).to_parquet(
        out / META_DIR / "metadata_0.parquet", index=False)
    stored = np.load(out / IMG_DIR / "img_emb_0.npy").astype(np.float32)  # index what the service reads back
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    index, params = build_tuned_index(stored, seed=seed)
    params.extra = {"model": str(model.resolve()), "data": "random unit vectors (bench/serve_load.py)"}
    save_index(index, params, out)
    return json.loads((out / PARAMS_FILE).read_text())


def query_images(num: int = 8, side: int = 64) -> list[bytes]:
    """Small JPEGs of coloured shapes on grey, as a user's query images."""
    from PIL import Image, ImageDraw

    out = []
    rgb = [(215, 35, 35), (40, 170, 50), (35, 75, 215), (235, 215, 40)]
    for i in range(num):
        img = Image.new("RGB", (side, side), (128, 128, 128))
        r = side // 4 + i % 3 * 3
        ImageDraw.Draw(img).ellipse([side // 2 - r, side // 2 - r, side // 2 + r, side // 2 + r], fill=rgb[i % 4])
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def request_of(kind: str, i: int, images: list[bytes]) -> dict:
    """httpx keyword arguments of request i of a kind (texts and images vary from request to request)."""
    color, shape = COLORS[i % 6], SHAPES[(i // 6) % 6]
    if kind == "text":
        return {"json": {"text": f"a photo of a {color} {shape}", "k": 10}}
    query = {"k": 10}
    if kind == "arithmetic":
        query.update(minus=[{"text": color}], plus=[{"text": COLORS[(i + 1) % 6], "weight": 1.0}])
    return {"data": {"query": json.dumps(query)}, "files": {"image": ("q.jpg", images[i % len(images)], "image/jpeg")}}


async def run_load(base: str, kind: str, *, num_requests: int, concurrency: int, images: list[bytes],
                   warmup: int) -> dict:
    """`num_requests` requests from `concurrency` clients, each sending its next one when the last is answered."""
    import httpx

    latencies, errors = [], []
    async with httpx.AsyncClient(base_url=base, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        for i in range(warmup):
            await client.post("search", **request_of(kind, i, images))
        counter = iter(range(num_requests))

        async def worker():
            for i in counter:
                start = time.perf_counter()
                try:
                    response = await client.post("search", **request_of(kind, i, images))
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                latencies.append(time.perf_counter() - start)

        start, cpu_start = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, client_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ms = np.array(latencies) * 1000
    return {"kind": kind, "concurrency": concurrency, "requests": num_requests, "errors": len(errors),
            "first_error": errors[0] if errors else None, "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
            "req_per_s": round(num_requests / wall, 1), "wall_s": round(wall, 2),
            "client_cpu_ms_per_request": round(1000 * client_cpu / num_requests, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "contrastive.cli", "serve", "--index", str(index), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"contrastive serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"contrastive serve did not answer in 180 s: {log.read_text()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-vectors", type=int, default=100_000, help="indexed vectors")
    parser.add_argument("--model", default="demo-convnet",
                        help="a model directory, or a model config name to build with random weights")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per (kind, concurrency)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests before each timed run")
    parser.add_argument("--concurrency", default="1,16", help="concurrent clients, comma-separated")
    parser.add_argument("--kinds", default=",".join(KINDS), help="query kinds, comma-separated")
    parser.add_argument("--work", default=None, help="where the index is built (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="results as JSON")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - set(KINDS):
        parser.error(f"--kinds: choose among {', '.join(KINDS)}")
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = model_dir(args.model, work)
        index = work / f"index_{args.num_vectors}_{model.name}"
        params = build_index_dir(index, model=model, num_vectors=args.num_vectors)
        load_before = os.getloadavg()
        proc, base = start_server(index, work / "serve.log")
        try:
            images = query_images()
            rows = [asyncio.run(run_load(base, kind, num_requests=args.requests, concurrency=c, images=images,
                                         warmup=args.warmup)) for kind in kinds for c in levels]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"num_vectors": params["count"], "index": params["factory"], "nprobe": params["nprobe"],
              "dim": params["dim"], "model": args.model, "cpus": os.cpu_count(),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    print(f"{params['count']} vectors of dimension {params['dim']} ({params['factory']}), model {args.model}, "
          f"{os.cpu_count()} CPUs; load average before {result['load_average_before'][0]}")
    print(f"{'kind':<11}{'clients':>8}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'errors':>8}{'client CPU ms/req':>19}")
    for r in rows:
        print(f"{r['kind']:<11}{r['concurrency']:>8}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['req_per_s']:>8.1f}"
              f"{r['errors']:>8}{r['client_cpu_ms_per_request']:>19.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results: {args.json}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
