"""Training samples/s on several gloo ranks: `contrastive train` against open_clip's own trainer, same everything.

Both trainers train the same open_clip model config (default tiny-vit-32) from the same shards, with the same
global batch, number of steps, optimizer settings, seed, fp32 weights and DataLoader workers per rank, each
launched by torchrun as N ranks on this machine (gloo, OMP_NUM_THREADS=1 per rank), one after the other and
alternating (ours, open_clip, ours, open_clip, ...) so that a change in the machine's load hits both alike:

    ours       torchrun --standalone --nproc-per-node N -m contrastive.cli train --config OUT/ours.yaml ...
    open_clip  torchrun --standalone --nproc-per-node N bench/openclip_train.py -- --device cpu ...
               (open_clip_train.main in bench/.venv-openclip; bench/openclip_train.py registers configs/models/
               and lets its DistributedDataParallel take the CPU device; see that file)

Steady-state samples/s comes from each trainer's own log, with the same rule for both: every logged window
(train.log_every / --log-every-n-steps steps) gives its steps and seconds (ours: metrics.jsonl `samples_per_s`;
open_clip: out.log `Batch (t)`, the mean step time of the window, data wait included in both), the windows
that start before step --warmup-steps are left out (process start, first batches, workers, DeepSpeed's
first steps), and the rate is the sum of their samples over the sum of their seconds. The wall-clock of
each whole torchrun process (startup, imports, checkpoint at the end) is printed beside it.

    flock /tmp/contrastive-heavy.lock nice -n 19 .venv/bin/python bench/train_throughput.py           # ~10 min
    .venv/bin/python bench/train_throughput.py --tiny                                                  # ~1 min

Without --data, synthetic shards at the model's image size are drawn into OUT/data by data_prep/synthetic.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

from quality_vs_open_clip import clean_env, openclip_train_args, run_timed  # noqa: E402

OPENCLIP_NAME = "openclip"


# ---------------------------------------------------------------- reading each trainer's log

def our_windows(metrics_path: Path, global_batch: int) -> list[tuple[int, int, float]]:
    """(first step, last step, seconds) of each logged window of our metrics.jsonl; steps count from 1."""
    windows, prev = [], 0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if not row.get("samples_per_s"):
            continue  # evaluator rows
        steps = row["step"] - prev
        windows.append((prev + 1, row["step"], steps * global_batch / row["samples_per_s"]))
        prev = row["step"]
    return windows


_OPENCLIP_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Batch \(t\): ([0-9.]+)")


def openclip_windows(log_text: str, global_batch: int) -> list[tuple[int, int, float]]:
    """(first step, last step, seconds) of each logged window of an open_clip_train out.log. A line reports
    the samples of its epoch so far (all ranks) and `Batch (t)`, the mean seconds per step since its last line."""
    windows, prev = [], 0
    for epoch, done, per_epoch, step_s in _OPENCLIP_LINE.findall(log_text):
        step = int(epoch) * (int(per_epoch) // global_batch) + int(done) // global_batch
        windows.append((prev + 1, step, (step - prev) * float(step_s)))
        prev = step
    return windows


def steady_rate(windows: list[tuple[int, int, float]], *, global_batch: int, warmup_steps: int) -> dict:
    """Samples/s over the windows that start after `warmup_steps` (all of them if none does)."""
    steady = [w for w in windows if w[0] > warmup_steps] or windows
    if not steady:
        raise RuntimeError("the run logged no steps")
    steps = sum(last - first + 1 for first, last, _ in steady)
    seconds = sum(s for _, _, s in steady)
    return {"samples_per_s": steps * global_batch / seconds, "steps": steps, "seconds": seconds,
            "from_step": steady[0][0], "to_step": steady[-1][1]}


# ---------------------------------------------------------------- launching both

def torchrun(python: str | Path, num_ranks: int) -> list[str]:
    return [str(python), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(num_ranks)]


def rank_env() -> dict:
    env = clean_env()  # no RANK/WORLD_SIZE/SLURM_* of an enclosing job
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def write_our_config(path: Path, *, model: str, data: str, global_batch: int, steps: int, workers: int,
                     log_every: int, overrides: list[str]):
    from contrastive.config import load_config, save_config

    cfg = load_config(None, [f"model.name={model}", f"data.train={data}", f"data.num_workers={workers}",
                             f"train.batch_size={global_batch}", f"train.steps={steps}",
                             f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
                             "deepspeed.precision=fp32", "eval.evaluators=[]", *overrides])
    save_config(cfg, path)
    return cfg


def run_ours(cfg, config_path: Path, out: Path, *, num_ranks: int, warmup_steps: int, timeout_s: float) -> dict:
    import shutil

    run_dir = out / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = torchrun(sys.executable, num_ranks) + ["-m", "contrastive.cli", "train", "--config", str(config_path),
                                                 "--out", str(run_dir)]
    result = run_timed(cmd, log=out / "logs" / "ours.log", timeout_s=timeout_s, env=rank_env())
    _check(result, "our run")
    windows = our_windows(run_dir / "metrics.jsonl", cfg.train.batch_size)
    return _summary(result, windows, cfg, warmup_steps)


def run_open_clip(cfg, python: Path, out: Path, *, num_ranks: int, warmup_steps: int, timeout_s: float) -> dict:
    import shutil

    logs = out / "openclip_logs"
    shutil.rmtree(logs, ignore_errors=True)
    t = cfg.train
    args = openclip_train_args(cfg, train_spec=cfg.data.train, samples_per_epoch=t.steps * t.batch_size, epochs=1,
                               logs=logs, name=OPENCLIP_NAME, log_every=t.log_every)
    args += ["--batch-size", str(t.batch_size // num_ranks)]  # open_clip's is per rank; the last one counts
    cmd = torchrun(python, num_ranks) + [str(BENCH_DIR / "openclip_train.py"), "--", *args]
    result = run_timed(cmd, log=out / "logs" / "openclip.log", timeout_s=timeout_s, env=rank_env())
    _check(result, "open_clip_train run")
    windows = openclip_windows((logs / OPENCLIP_NAME / "out.log").read_text(), t.batch_size)
    return _summary(result, windows, cfg, warmup_steps)


def _check(result: dict, what: str) -> None:
    if result["returncode"] != 0 or result["killed"]:
        tail = "".join(Path(result["log"]).read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{what} failed (exit {result['returncode']}, killed={result['killed']}); "
                           f"end of {result['log']}:\n{tail}")


def _summary(result: dict, windows: list, cfg, warmup_steps: int) -> dict:
    steps_done = windows[-1][1] if windows else 0
    if steps_done != cfg.train.steps:
        raise RuntimeError(f"the run logged {steps_done} steps, not {cfg.train.steps}; see {result['log']}")
    steady = steady_rate(windows, global_batch=cfg.train.batch_size, warmup_steps=warmup_steps)
    return {**steady, "steps_done": steps_done, "wall_s": result["wall_s"],
            "wall_samples_per_s": steps_done * cfg.train.batch_size / result["wall_s"], "log": result["log"]}


def make_shards(out: Path, *, model: str, num_samples: int) -> str:
    """Synthetic shards at the model config's image size; returns their brace spec."""
    from contrastive.models import register_model_configs

    register_model_configs()
    import open_clip

    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    data = out / "data"
    marker = data / f"done-{num_samples}-{size}"
    if not marker.is_file():
        per_shard = max(10, num_samples // 4)
        cmd = [sys.executable, "-m", "contrastive.cli", "prep", "synthetic", str(data), "--num-samples",
               str(num_samples), "--num-val", "10", "--image-size", str(size), "--samples-per-shard", str(per_shard)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        marker.write_text("")
    shards = sorted((data / "train").glob("*.tar"))
    return f"{data}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar"


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit-32", help="open_clip model config, ours or open_clip's "
                        "(default tiny-vit-32)")
    parser.add_argument("--data", default=None, help="shards, brace spec (default: synthetic ones in OUT/data)")
    parser.add_argument("--num-samples", type=int, default=4000, help="synthetic samples to draw (default 4000)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks per trainer (default 2)")
    parser.add_argument("--global-batch", type=int, default=256, help="global batch, all ranks (default 256)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="leave out the logged windows that start at or before this step (default 20)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per logged window (default 5)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank, both (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, alternating (default 2)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run before it is killed")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_train_throughput", help="work folder")
    parser.add_argument("--openclip-python", type=Path, default=None,
                        help="python of an environment with open_clip_train (default: bench/.venv-openclip, "
                             "created on first use)")
    parser.add_argument("--tiny", action="store_true",
                        help="a check that everything runs (batch 16, 8 steps, 1 round): no speed claim")
    parser.add_argument("overrides", nargs="*", help="overrides of our config (key=value); those open_clip_train "
                        "has (optim.*, train.seed) reach it too")
    args = parser.parse_args(argv)
    if args.tiny:
        args.global_batch, args.steps, args.warmup_steps, args.log_every = 16, 8, 2, 2
        args.rounds, args.num_samples = 1, min(args.num_samples, 200)
    if args.global_batch % args.ranks:
        parser.error(f"--global-batch {args.global_batch} must be divisible by --ranks {args.ranks}")

    from openclip_env import ensure_venv

    python = args.openclip_python or ensure_venv()  # before any training, so a broken environment fails fast
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or make_shards(out, model=args.model, num_samples=args.num_samples)
    config_path = out / "ours.yaml"
    cfg = write_our_config(config_path, model=args.model, data=data, global_batch=args.global_batch,
                           steps=args.steps, workers=args.workers, log_every=args.log_every,
                           overrides=args.overrides)
    print(f"{args.model}, global batch {args.global_batch} on {args.ranks} gloo ranks, {args.steps} steps, "
          f"fp32, {args.workers} loader worker(s) per rank; steady = logged windows after step "
          f"{args.warmup_steps}", flush=True)
    runs: dict[str, list[dict]] = {"ours": [], "open_clip": []}
    for round_ in range(args.rounds):
        for side in ("ours", "open_clip"):
            if side == "ours":
                r = run_ours(cfg, config_path, out, num_ranks=args.ranks, warmup_steps=args.warmup_steps,
                             timeout_s=args.timeout)
            else:
                r = run_open_clip(cfg, python, out, num_ranks=args.ranks, warmup_steps=args.warmup_steps,
                                  timeout_s=args.timeout)
            runs[side].append(r)
            print(f"  round {round_ + 1} {side:<9} steady {r['samples_per_s']:8.1f} samples/s (steps "
                  f"{r['from_step']}-{r['to_step']}, {r['seconds']:.1f} s)   whole process {r['wall_s']:6.1f} s "
                  f"= {r['wall_samples_per_s']:.1f} samples/s", flush=True)
    mean = {side: statistics.mean(r["samples_per_s"] for r in rs) for side, rs in runs.items()}
    per_round = [o["samples_per_s"] / c["samples_per_s"] for o, c in zip(runs["ours"], runs["open_clip"])]
    result = {"model": args.model, "data": data, "ranks": args.ranks, "global_batch": args.global_batch,
              "steps": args.steps, "warmup_steps": args.warmup_steps, "workers": args.workers,
              "overrides": args.overrides, "tiny": args.tiny, "runs": runs, "samples_per_s": mean,
              "ratio": mean["ours"] / mean["open_clip"], "ratio_per_round": per_round,
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(f"ours       {mean['ours']:8.1f} samples/s (mean of {args.rounds} runs)")
    print(f"open_clip  {mean['open_clip']:8.1f} samples/s (mean of {args.rounds} runs)")
    print(f"ratio ours/open_clip: {result['ratio']:.3f}  (per round: {', '.join(f'{x:.3f}' for x in per_round)})")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"results: {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
