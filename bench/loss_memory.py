"""Peak memory and time of one forward + backward of the contrastive loss at large global batches.

Compares our `infonce_tiled` with open_clip's `ClipLoss` on random L2-normalised features (fp32,
embedding dim 512). Every configuration runs in a fresh process, which reports its peak resident memory
(ru_maxrss) above its resident memory just before the features were made: features, their gradients and
everything the loss allocates. Timing is wall-clock of forward + backward; other jobs on the machine slow
every variant alike only if they run alike, so configurations of one batch size run back to back and the
printed ratios are the figures to compare.

    losses           one process (world size 1)
      cliploss         open_clip ClipLoss() -- at world size 1, local_loss and gather_with_grad change
                       nothing (its code only reads them when world_size > 1)
      infonce          ours, plain (same algorithm as ClipLoss(local_loss=True, gather_with_grad=True))
      infonce_tiled    ours, tiled (--tile-size)
    with --world-size N (N gloo ranks on this machine, each global batch split evenly; per-rank peak)
      cliploss         ClipLoss(gather_with_grad=True): every rank builds the global G x G logits
      cliploss_local   ClipLoss(local_loss=True, gather_with_grad=True): B x G per rank
      infonce_tiled    ours

A configuration whose memory, extrapolated from smaller batches of the same loss (quadratic for
ClipLoss, linear for the tiled loss), would pass --max-gb is not run: it is reported as not fitting.
After the sweep the tiled loss's peaks are fitted with a + b * G and the model is printed for the
global batches of --model-batches (1,048,576 by default) against the analytic 16 * D bytes per sample
(fp32 image and text features and their gradients).

    python bench/loss_memory.py --batches 8192 16384 32768 65536            # world size 1
    python bench/loss_memory.py --world-size 2 --losses cliploss cliploss_local infonce_tiled --batches 8192 16384
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GB = 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> dict:
    """One forward + backward in this process (one rank of spec['world_size'])."""
    import torch
    import torch.distributed as dist
    from open_clip.loss import ClipLoss

    from contrastive.losses import infonce, infonce_tiled

    rank, world_size = int(os.environ.get("RANK", 0)), spec["world_size"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    group = None
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        group = dist.group.WORLD
    num_local, dim = spec["batch"] // world_size, spec["dim"]
    gen = torch.Generator().manual_seed(rank)
    before = _rss_bytes()
    features = []
    for _ in range(2):
        x = torch.randn(num_local, dim, generator=gen)
        features.append(x.div_(x.norm(dim=1, keepdim=True)).requires_grad_())
    image_BD, text_BD = features
    scale = torch.tensor([14.3], requires_grad=True)
    name = spec["loss"]
    if name == "infonce_tiled":
        fn = lambda: infonce_tiled(image_BD, text_BD, scale, group=group, tile_size=spec["tile_size"])  # noqa: E731
    elif name == "infonce":
        fn = lambda: infonce(image_BD, text_BD, scale, group=group)  # noqa: E731
    else:
        clip = ClipLoss(local_loss=name == "cliploss_local", gather_with_grad=True, rank=rank, world_size=world_size)
        fn = lambda: clip(image_BD, text_BD, scale)  # noqa: E731
    if world_size > 1:
        dist.barrier()
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": rank, "seconds": seconds, "peak_gb": (peak - before) / GB, "loss": loss.item(),
              "grad_norm": float(image_BD.grad.norm())}
    if world_size > 1:
        dist.destroy_process_group()
    return result


def run_config(spec: dict, timeout_s: float) -> dict:
    """Run one configuration in fresh processes (one per rank); the worst rank's peak and time."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(spec["world_size"]):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(spec["world_size"]),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results, errors = [], []
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
        if p.returncode:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    if errors:
        return {**spec, "error": errors[0]}
    return {**spec, "seconds": max(r["seconds"] for r in results), "peak_gb": max(r["peak_gb"] for r in results),
            "loss_value": sum(r["loss"] for r in results) / len(results)}


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024 / GB


def _wait_for_memory(need_gb: float, wait_s: float) -> bool:
    """The machine is shared: wait (up to wait_s) until need_gb is free rather than push others into the
    OOM killer."""
    deadline = time.monotonic() + wait_s
    while _available_gb() < need_gb:
        if time.monotonic() > deadline:
            return False
        time.sleep(30)
    return True


def _fit(points: list[tuple[float, float]], power: int) -> tuple[float, float] | None:
    """Least squares y = a + b * x**power."""
    if len(points) < 2:
        return None
    xs, ys = [x ** power for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def predicted_gb(loss: str, batch: int, done: list[dict]) -> float | None:
    points = [(r["batch"], r["peak_gb"]) for r in done if r["loss"] == loss and "peak_gb" in r]
    fit = _fit(points, 1 if loss == "infonce_tiled" else 2)
    return None if fit is None else fit[0] + fit[1] * batch ** (1 if loss == "infonce_tiled" else 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8192, 16384, 32768, 65536], help="global batches")
    ap.add_argument("--losses", nargs="+", default=["cliploss", "infonce_tiled"],
                    choices=["cliploss", "cliploss_local", "infonce", "infonce_tiled"])
    ap.add_argument("--world-size", type=int, default=1, help="gloo ranks on this machine (default 1)")
    ap.add_argument("--dim", type=int, default=512, help="embedding dim (default 512)")
    ap.add_argument("--tile-size", type=int, default=2048, help="infonce_tiled tile size (default 2048)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: torch's choice)")
    ap.add_argument("--max-gb", type=float, default=22.0,
                    help="skip a configuration whose extrapolated peak (all ranks) passes this (default 22)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration (default 3600)")
    ap.add_argument("--wait-for-memory", type=float, default=1800,
                    help="seconds to wait for the extrapolated peak (+1 GB) to be free before skipping (default 1800)")
    ap.add_argument("--model-batches", type=int, nargs="*", default=[1 << 20],
                    help="global batches to evaluate the tiled loss's fitted memory model at")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    done: list[dict] = []
    print(f"world size {args.world_size}, dim {args.dim}, fp32, forward + backward; peak = max over ranks of "
          f"peak RSS above the RSS before the features were made", flush=True)
    for batch in args.batches:
        for loss in args.losses:
            spec = {"loss": loss, "batch": batch, "dim": args.dim, "world_size": args.world_size,
                    "tile_size": args.tile_size, "threads": args.threads or None}
            guess = predicted_gb(loss, batch, done)
            if guess is not None and guess * args.world_size > args.max_gb:
                result = {**spec, "skipped": f"predicted {guess:.1f} GB per rank > --max-gb {args.max_gb:g} in all"}
            elif guess is not None and not _wait_for_memory(guess * args.world_size + 1, args.wait_for_memory):
                result = {**spec, "skipped": f"predicted {guess:.1f} GB per rank; only {_available_gb():.1f} GB free"}
            else:
                result = run_config(spec, args.timeout)
            done.append(result)
            if "error" in result or "skipped" in result:
                print(f"  G={batch:>8} {loss:<15} {result.get('error') or result['skipped']}", flush=True)
            else:
                print(f"  G={batch:>8} {loss:<15} peak {result['peak_gb']:7.3f} GB  {result['seconds']:8.2f} s  "
                      f"loss {result['loss_value']:.5f}", flush=True)
        ours = next((r for r in done if r["batch"] == batch and r["loss"] == "infonce_tiled" and "peak_gb" in r), None)
        for r in done:
            if ours and r["batch"] == batch and r["loss"] != "infonce_tiled" and "peak_gb" in r:
                print(f"    tiled / {r['loss']}: memory {ours['peak_gb'] / r['peak_gb']:.4f} (1/"
                      f"{r['peak_gb'] / ours['peak_gb']:.1f}), time {ours['seconds'] / r['seconds']:.3f}", flush=True)

    print("\nmodels fitted to the measured peaks:")
    for loss in args.losses:
        power = 1 if loss == "infonce_tiled" else 2
        points = [(r["batch"], r["peak_gb"]) for r in done if r["loss"] == loss and "peak_gb" in r]
        fit = _fit(points, power)
        if fit is None:
            continue
        a, b = fit
        print(f"  {loss:<15} peak_gb = {a:.3f} + {b:.3e} * G{'^2' if power == 2 else ''}   (from G = "
              f"{', '.join(str(x) for x, _ in points)})")
        for batch in sorted(set(args.model_batches + args.batches)):
            if not any(r["batch"] == batch and r["loss"] == loss and "peak_gb" in r for r in done):
                line = f"    G={batch:>8}: {a + b * batch ** power:8.2f} GB per rank (model)"
                if loss == "infonce_tiled":
                    line += f"; features + gradients alone {16 * args.dim * batch / args.world_size / GB:.2f} GB"
                print(line)
    tiled = {r["batch"]: r for r in done if r["loss"] == "infonce_tiled" and "peak_gb" in r}
    for loss in args.losses:
        if loss == "infonce_tiled":
            continue
        fit = _fit([(r["batch"], r["peak_gb"]) for r in done if r["loss"] == loss and "peak_gb" in r], 2)
        for batch, ours in tiled.items():
            if fit and not any(r["batch"] == batch and r["loss"] == loss and "peak_gb" in r for r in done):
                theirs = fit[0] + fit[1] * batch ** 2
                print(f"  G={batch}: {loss} extrapolated {theirs:.1f} GB; tiled measured {ours['peak_gb']:.3f} GB "
                      f"= 1/{theirs / ours['peak_gb']:.0f}")
    if args.json:
        args.json.write_text(json.dumps(done, indent=1))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
