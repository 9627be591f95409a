"""Quality at equal compute: our trainer against open_clip's own (open_clip_train), same model, data, budget.

Both train the same open_clip model config, from the same run config (batch size, optimizer, warmup,
augmentation, seed, loader workers), in one process each, fp32, one after the other on this machine; then
both checkpoints are scored by the same code: zero-shot accuracy (eval/zeroshot.py) or image-text retrieval
on a captioned dev set (eval/retrieval.py, --task retrieval; the default when the config's first evaluator
is a retrieval one), with the same preprocessing and tokenizer. It prints both scores and their ratio.

Data: ours reads the config's shards; open_clip_train reads the same shards (webdataset, resampled) or, with
--openclip-train-csv, its own CSV loader with one row per caption (full shuffled passes over the file).

Budget, the same for both and enforced on both: --budget-s seconds of training loop (from the loop's start,
first batch included, to the end of its last step; imports, model build and the final save are outside it).
Ours stops itself with train.max_time_s; open_clip_train through bench/openclip_train.py's --bench-deadline-s,
which applies our loop's rule (the step whose batch arrives past the budget is the last) and lets
open_clip_train save its checkpoint. So that both cosine schedules end with the budget, each side's step count
is planned from a steady-state probe of that side: a short run whose first window (worker start) and the
windows ending before the larger of the two shuffle buffers is full are left out, by one rule for both
(`steady_rate`). The result gives each side's training seconds, steps and share of the budget used, and
warns when a side used less than 95% or more than 105% of it. Step savers of ours that were on are listed.

    flock /tmp/contrastive-heavy.lock .venv/bin/python bench/quality_vs_open_clip.py \\
        --config configs/cifar10.yaml --budget-s 900 --templates cifar [key=value overrides]
    flock /tmp/contrastive-heavy.lock .venv/bin/python bench/quality_vs_open_clip.py \\
        --config configs/flickr8k.yaml --budget-s 900 --task retrieval \\
        --openclip-train-csv /tmp/contrastive-flickr8k/openclip_train.csv

open_clip_train runs in its own virtualenv (bench/.venv-openclip, created on first use; see openclip_env.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

from contrastive.errors import UserError  # noqa: E402

# Variables that would make either trainer think it is one rank of a distributed job.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OPENCLIP_NAME = "openclip"


# ---------------------------------------------------------------- open_clip_train command line

def aug_cfg_args(aug: dict) -> list[str]:
    """Our model.aug dict as open_clip_train's `--aug-cfg k=v ...` (values as Python literals)."""
    out = []
    for key, value in aug.items():
        if key == "hflip":  # ours (open_clip never flips): listed by differences_from_open_clip
            continue
        value = tuple(value) if isinstance(value, list) else value
        out.append(f"{key}={value!r}".replace(" ", ""))
    return ["--aug-cfg", *out] if out else []


def openclip_train_args(cfg, *, logs: Path, epochs: int, train_spec: str = "", samples_per_epoch: int = 0,
                        train_csv: Path | None = None, name: str = OPENCLIP_NAME, log_every: int = 10) -> list[str]:
    """open_clip_train.main arguments that mirror run config `cfg`: 1 process, CPU, our precision (fp32 or
    amp_bf16: bf16 autocast with fp32 weights in both trainers); reading `train_spec`
    as resampled shards (`samples_per_epoch` a pass) or `train_csv` with its CSV loader (a tab-separated file,
    columns filepath and title, one row per caption; an epoch is one shuffled pass, so no sample count)."""
    o, m, t = cfg.optim, cfg.model, cfg.train
    precision = openclip_precision(cfg)
    if train_csv is not None:
        data = ["--train-data", str(train_csv), "--dataset-type", "csv", "--csv-separator", "\t",
                "--csv-img-key", "filepath", "--csv-caption-key", "title"]
    else:
        data = ["--train-data", train_spec, "--dataset-type", "webdataset", "--dataset-resampled",
                "--train-num-samples", str(samples_per_epoch)]
    args = [
        *data, "--epochs", str(epochs),
        "--model", m.name, "--batch-size", str(t.batch_size), "--precision", precision, "--device", "cpu",
        "--workers", str(cfg.data.num_workers), "--seed", str(t.seed),
        "--lr", repr(o.lr), "--wd", repr(o.weight_decay), "--beta1", repr(o.beta1), "--beta2", repr(o.beta2),
        "--eps", repr(o.eps), "--warmup", str(o.warmup_steps), "--lr-scheduler", "cosine",
        "--logs", str(logs), "--name", name, "--log-every-n-steps", str(log_every), "--report-to", "",
        # The latest epoch's checkpoint, also when bench/openclip_train.py ends an epoch early at the budget.
        "--save-frequency", "1", "--save-most-recent", "--delete-previous-checkpoint",
    ]
    if o.grad_clip > 0:
        args += ["--grad-clip-norm", repr(o.grad_clip)]
    if m.force_quick_gelu:
        args.append("--force-quick-gelu")
    if m.patch_dropout is not None:
        args += ["--force-patch-dropout", repr(m.patch_dropout)]
    return args + aug_cfg_args(dict(m.aug))


def openclip_precision(cfg) -> str:
    """open_clip_train's --precision for our deepspeed.precision (resolved for this machine): the same arithmetic
    on both sides, or a one-line refusal where open_clip_train has none (DeepSpeed's bf16/fp16 weights with fp32
    master weights)."""
    import torch

    from contrastive.config import resolve_auto

    precision = resolve_auto(cfg, cuda=torch.cuda.is_available()).deepspeed.precision
    if precision not in ("fp32", "amp_bf16"):
        raise SystemExit(f"deepspeed.precision={precision} has no open_clip_train equivalent: compare at fp32 or "
                         "amp_bf16")
    return precision


def budget_args(*, max_steps: int, deadline_s: float, report: Path) -> list[str]:
    """bench/openclip_train.py's own options: the step cap (and cosine length), the deadline, the report."""
    return ["--bench-max-steps", str(max_steps), "--bench-deadline-s", repr(float(deadline_s)),
            "--bench-report", str(report)]


def csv_rows(path: Path) -> int:
    """Rows of a tab-separated CSV with a header (what open_clip_train's pandas loader reads as samples)."""
    import csv

    with open(path, newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f, delimiter="\t")) - 1)


def openclip_epochs_for(steps: int, *, batch_size: int, csv_rows: int = 0, num_workers: int = 1) -> tuple[int, int]:
    """(epochs, samples per epoch) that give open_clip_train at least `steps` steps (the wrapper's step cap
    ends the run at `steps`). CSV: whole passes of csv_rows // batch_size batches (drop_last), samples 0.
    Shards: one epoch of `steps` batches, rounded up to a multiple of the workers as open_clip_train does."""
    if csv_rows:
        per_epoch = csv_rows // batch_size
        if per_epoch < 1:
            raise UserError(f"the open_clip CSV has {csv_rows} rows, fewer than one batch of {batch_size}")
        return math.ceil(steps / per_epoch), 0
    workers = max(1, num_workers)
    return 1, math.ceil(steps / workers) * workers * batch_size


def differences_from_open_clip(cfg) -> list[str]:
    """Settings of ours that open_clip_train cannot mirror (the comparison then includes them as ours)."""
    notes = []
    if cfg.loss.name != "infonce" or cfg.loss.label_smoothing:
        notes.append(f"loss {cfg.loss.name} (label smoothing {cfg.loss.label_smoothing}) vs open_clip's plain ClipLoss")
    if cfg.data.captions_per_sample > 1:  # open_clip_train trains each image with one caption per visit
        notes.append(f"data.captions_per_sample={cfg.data.captions_per_sample}: each image trains with that many of "
                     "its captions per step (open_clip_train: one caption row per sample)")
    if cfg.loss.positives != "pair":  # open_clip's ClipLoss: only an image's own caption is a positive
        notes.append(f"loss.positives={cfg.loss.positives!r} has no open_clip_train equivalent")
    if cfg.optim.min_lr_ratio:
        notes.append(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} (open_clip's cosine decays to 0)")
    if cfg.model.init_logit_bias is not None:
        notes.append("model.init_logit_bias (SigLIP-style bias) is not passed to open_clip_train")
    if cfg.model.max_logit_scale != 100.0:
        notes.append(f"model.max_logit_scale={cfg.model.max_logit_scale} (open_clip clamps at 100)")
    if cfg.model.aug.get("hflip"):
        notes.append(f"model.aug.hflip={cfg.model.aug['hflip']} (open_clip_train's transforms never flip)")
    if getattr(cfg.optim, "freeze", None):
        notes.append(f"optim.freeze={cfg.optim.freeze} is not passed to open_clip_train")
    for key in ("text_pretrained", "image_pretrained"):
        if getattr(cfg.model, key, ""):
            notes.append(f"model.{key}={getattr(cfg.model, key)!r}: open_clip_train trains that tower from scratch")
    return notes


# ---------------------------------------------------------------- probes and plans

# open_clip_train's sample shuffle buffer of a webdataset (its data.py _SAMPLE_SHUFFLE_SIZE, per worker); its
# CSV loader shuffles indices and has none.
OPENCLIP_SHUFFLE_BUFFER = 5000


def fill_steps(cfg, *, openclip_csv: bool) -> int:
    """Steps until the larger of the two sides' shuffle buffers is full (every worker fills its own): the probe
    rule leaves out the windows before it on both sides, so both are measured in the same steady state."""
    workers = max(1, cfg.data.num_workers)
    ours = workers * cfg.data.shuffle_buffer
    theirs = 0 if openclip_csv else workers * OPENCLIP_SHUFFLE_BUFFER
    return math.ceil(max(ours, theirs) / cfg.train.batch_size)


def probe_length(*, fill: int, window: int, steady_steps: int) -> int:
    """Probe steps: past the fill and the first window (both left out), then `steady_steps` more, in whole
    windows."""
    skipped = max(fill, window)
    return math.ceil(skipped / window) * window + max(2 * window, math.ceil(steady_steps / window) * window)


def steady_rate(points: list[tuple[int, float]], *, fill: int) -> dict:
    """Steady seconds per step from (step, seconds since the loop started) at window ends, the same rule for
    both sides: the first window (worker start, first batch) and every window that holds a step up to `fill`
    (a shuffle buffer still filling) are left out; the rest give the mean step time over their span.
    `excess_s`: what the left-out start cost beyond that rate (planned once per run)."""
    points = sorted(points)
    starts = [(0, 0.0)] + points[:-1]
    kept = [(s, e) for n, (s, e) in enumerate(zip(starts, points)) if n > 0 and s[0] >= fill]
    if not kept:
        raise RuntimeError(f"the probe has no window after the first one and step {fill}: give a longer probe")
    (step0, t0), (step1, t1) = kept[0][0], kept[-1][1]
    step_s = (t1 - t0) / (step1 - step0)
    return {"step_s": step_s, "excess_s": max(0.0, t0 - step0 * step_s), "steady_from_step": step0,
            "steady_steps": step1 - step0}


def window_points(step_end_s: list[float], *, window: int) -> list[tuple[int, float]]:
    """(step, end time) of every `window`-th step (and the last) from per-step end times."""
    n = len(step_end_s)
    return [(k, step_end_s[k - 1]) for k in range(window, n + 1, window)] + (
        [(n, step_end_s[-1])] if n % window else [])


def our_points(metrics_path: Path) -> list[tuple[int, float]]:
    """(step, time_s) of each logged training window of our run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["time_s"]) for r in rows if "loss" in r and "time_s" in r]


def plan_steps(budget_s: float, *, overhead_s: float, step_s: float) -> int:
    """Steps that fit in the budget after the fixed overhead (at least 1)."""
    return max(1, int((budget_s - max(0.0, overhead_s)) / step_s))


BUDGET_TOLERANCE = 0.05


def budget_warnings(sides: dict, budget_s: float) -> list[str]:
    """A warning for each side whose training seconds are not within 5% of the budget."""
    out = []
    for name, info in sides.items():
        used = info["train_s"] / budget_s
        if abs(used - 1.0) > BUDGET_TOLERANCE:
            out.append(f"{name} trained {info['train_s']:.1f} s = {used:.1%} of the {budget_s:.0f} s budget "
                       f"(outside {1 - BUDGET_TOLERANCE:.0%}..{1 + BUDGET_TOLERANCE:.0%}; stopped: "
                       f"{info.get('stopped') or 'schedule done'})")
    return out


def our_savers(cfg) -> dict:
    """Step savers of ours that are on in `cfg` (resolved for this machine), key -> value; open_clip_train has
    none of them. Keys missing from this version of the config are skipped."""
    import torch

    from contrastive.config import resolve_auto

    cfg = resolve_auto(cfg, cuda=torch.cuda.is_available())
    found = {}
    for key in ("train.dedupe_captions", "train.fit_steps_to_time", "data.fast_decode", "data.uint8_batches",
                "data.decode_on_device", "model.lock_image", "model.lock_text", "model.lock_text_cache_size",
                "optim.freeze", "model.compile", "train.sync_every"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        if key == "train.sync_every":  # reading the device every step is the plain loop
            value = value if value and value > 1 else None
        if value:
            found[key] = value
    return found


# ---------------------------------------------------------------- running the trainers

def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("SLURM_")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_timed(cmd: list[str], *, log: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Run `cmd` in its own process group, output to `log`; kill the group at `timeout_s`. Returns timing."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env or clean_env(),
                                start_new_session=True)
        killed = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"wall_s": time.perf_counter() - start, "returncode": proc.returncode, "killed": killed, "log": str(log)}


def _exit_time_limit() -> int:
    """The exit status of `contrastive train` when it stopped early (train.max_time_s or a signal) after
    checkpointing."""
    try:
        from contrastive.preemption import EXIT_PREEMPTED
    except ImportError:
        from contrastive.train import EXIT_PREEMPTED
    return EXIT_PREEMPTED


def _check(result: dict, what: str, *, ok=(0,)) -> None:
    if result["returncode"] not in ok and not result["killed"]:
        tail = "".join(Path(result["log"]).read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{what} failed (exit {result['returncode']}); end of {result['log']}:\n{tail}")


def our_cmd(config_path: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "contrastive.cli", "train", "--config", str(config_path), "--out", str(run_dir),
            "eval.evaluators=[]", "train.resume=", *overrides]


def _has_train_field(name: str) -> bool:
    from contrastive.config import TrainConfig

    return name in {f.name for f in dataclasses.fields(TrainConfig)}


def _kill_after(budget_s: float, grace: float, startup_s: float | None) -> float:
    """Seconds after which a run's process is killed: a safety net behind the in-loop budget of each side."""
    return budget_s * (1 + grace) + (max(60.0, 2 * startup_s) if startup_s is not None else 300.0)


def _side_result(*, planned: int, steps: int, train_s: float, budget_s: float, stopped: str, process: dict,
                 probe: dict | None) -> dict:
    return {"planned_steps": planned, "steps_done": steps, "train_s": round(train_s, 1),
            "budget_used": round(train_s / budget_s, 4), "stopped": stopped, "process_s": round(process["wall_s"], 1),
            "killed": process["killed"], **({"probe": probe} if probe else {})}


def run_ours(cfg, config_path: Path, out: Path, *, budget_s: float, fill: int, window: int, steady_steps: int,
             steps: int | None, grace: float) -> dict:
    import shutil

    probe_info, startup = None, None
    if steps is None:
        total = probe_length(fill=fill, window=window, steady_steps=steady_steps)
        probe_dir = out / "ours_probe"
        shutil.rmtree(probe_dir, ignore_errors=True)
        overrides = [f"train.steps={total}", f"train.log_every={window}", f"train.checkpoint_every={total}",
                     "train.max_time_s=0"]
        if _has_train_field("fit_steps_to_time"):  # the probe runs exactly `total` steps
            overrides.append("train.fit_steps_to_time=false")
        probe = run_timed(our_cmd(config_path, probe_dir, overrides), log=out / "logs" / "ours_probe.log",
                          timeout_s=max(600.0, budget_s))
        _check(probe, "our probe run")
        points = our_points(probe_dir / "metrics.jsonl")
        rate = steady_rate(points, fill=fill)
        startup = probe["wall_s"] - points[-1][1]
        steps = plan_steps(budget_s, overhead_s=rate["excess_s"], step_s=rate["step_s"])
        probe_info = {"steps": total, "process_s": round(probe["wall_s"], 1), "startup_s": round(startup, 1),
                      **{k: round(v, 4) for k, v in rate.items()}}
        shutil.rmtree(probe_dir, ignore_errors=True)
    run_dir = out / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.max_time_s={budget_s}"]
    result = run_timed(our_cmd(config_path, run_dir, overrides), log=out / "logs" / "ours.log",
                       timeout_s=_kill_after(budget_s, grace, startup))
    # Stopping at train.max_time_s (with a checkpoint) is how our run meets the budget when the machine slows.
    _check(result, "our training run", ok=(0, _exit_time_limit()))
    points = our_points(run_dir / "metrics.jsonl")
    done, train_s = points[-1] if points else (0, 0.0)
    stopped = "deadline" if result["returncode"] == _exit_time_limit() else ("killed" if result["killed"] else "")
    return {**_side_result(planned=steps, steps=done, train_s=train_s, budget_s=budget_s, stopped=stopped,
                           process=result, probe=probe_info),
            "run_dir": str(run_dir), "samples_seen": done * cfg.train.batch_size}


def run_open_clip(cfg, python: Path, out: Path, *, budget_s: float, fill: int, window: int, steady_steps: int,
                  steps: int | None, grace: float, train_csv: Path | None, extra: list[str]) -> dict:
    import shutil

    batch = cfg.train.batch_size
    rows = csv_rows(train_csv) if train_csv is not None else 0
    wrapper = [str(python), str(BENCH_DIR / "openclip_train.py")]
    logs = out / "openclip_logs"

    def args_for(n: int, *, name: str, deadline_s: float, log_every: int, report: Path) -> list[str]:
        epochs, samples = openclip_epochs_for(n, batch_size=batch, csv_rows=rows, num_workers=cfg.data.num_workers)
        return (openclip_train_args(cfg, logs=logs, epochs=epochs, train_spec=cfg.data.train,
                                    samples_per_epoch=samples, train_csv=train_csv, name=name, log_every=log_every)
                + extra + budget_args(max_steps=n, deadline_s=deadline_s, report=report))

    probe_info, startup = None, None
    if steps is None:
        total = probe_length(fill=fill, window=window, steady_steps=steady_steps)
        name, report = f"{OPENCLIP_NAME}_probe", out / "logs" / "openclip_probe.json"
        shutil.rmtree(logs / name, ignore_errors=True)
        probe = run_timed(wrapper + args_for(total, name=name, deadline_s=0.0, log_every=window, report=report),
                          log=out / "logs" / "openclip_probe.log", timeout_s=max(600.0, budget_s))
        _check(probe, "open_clip probe run")
        step_end_s = json.loads(report.read_text())["step_end_s"]
        rate = steady_rate(window_points(step_end_s, window=window), fill=fill)
        startup = probe["wall_s"] - step_end_s[-1]
        steps = plan_steps(budget_s, overhead_s=rate["excess_s"], step_s=rate["step_s"])
        probe_info = {"steps": total, "process_s": round(probe["wall_s"], 1), "startup_s": round(startup, 1),
                      **{k: round(v, 4) for k, v in rate.items()}}
        shutil.rmtree(logs / name, ignore_errors=True)
    shutil.rmtree(logs / OPENCLIP_NAME, ignore_errors=True)
    report = out / "logs" / "openclip.json"
    args = args_for(steps, name=OPENCLIP_NAME, deadline_s=budget_s, log_every=cfg.train.log_every, report=report)
    result = run_timed(wrapper + args, log=out / "logs" / "openclip.log",
                       timeout_s=_kill_after(budget_s, grace, startup))
    _check(result, "open_clip_train run")
    checkpoint = logs / OPENCLIP_NAME / "checkpoints" / "epoch_latest.pt"
    if not checkpoint.is_file() or not report.is_file():
        raise RuntimeError(f"open_clip_train left no checkpoint or report ({checkpoint}); see {result['log']}")
    done = json.loads(report.read_text())
    stopped = "killed" if result["killed"] else ("deadline" if done["stopped"] == "deadline" else "")
    import shlex

    return {**_side_result(planned=steps, steps=done["steps"], train_s=done["train_s"], budget_s=budget_s,
                           stopped=stopped, process=result, probe=probe_info),
            "batches_per_epoch": done["batches_per_epoch"], "checkpoint": str(checkpoint),
            "command": "python bench/openclip_train.py " + shlex.join(args)}


# ---------------------------------------------------------------- scoring both the same way

def load_open_clip_checkpoint(model, path: str | Path) -> dict:
    """Load an open_clip_train checkpoint ({"state_dict", "epoch", ...}; keys may carry DDP's "module." or
    torch.compile's "_orig_mod." prefix) into `model`, an open_clip model of the same config. Our models keep
    logit_scale 1-D (for DeepSpeed) where open_clip's is 0-D: same-size tensors are reshaped."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    target = model.state_dict()
    fixed = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key in target and target[key].shape != value.shape and target[key].numel() == value.numel():
            value = value.reshape(target[key].shape)
        fixed[key] = value
    try:
        missing, unexpected = model.load_state_dict(fixed, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise RuntimeError(f"{path} does not match the model config: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return {"epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None}


def load_both(cfg, *, ours_run: Path, openclip_ckpt: Path) -> tuple[dict, dict]:
    """({"ours": bundle, "open_clip": bundle}, open_clip checkpoint info). Both bundles share ours'
    preprocessing and tokenizer (rebuilt from the same model config), so only the weights differ."""
    from contrastive.loading import load_for_inference
    from contrastive.models import build_model

    ours, _ = load_for_inference(ours_run)
    theirs = build_model(cfg.model)
    info = load_open_clip_checkpoint(theirs.model, openclip_ckpt)
    theirs.model.eval()
    theirs = dataclasses.replace(theirs, preprocess_val=ours.preprocess_val, tokenizer=ours.tokenizer)
    return {"ours": ours, "open_clip": theirs}, info


def score_zeroshot(bundles: dict, *, data: str, label_field: str, templates, classes, max_samples: int,
                   batch_size: int) -> dict:
    from contrastive.eval.zeroshot import LabelledImages, evaluate, load_templates

    templates = load_templates(templates)
    scores = {}
    for name, bundle in bundles.items():
        images = LabelledImages(data, label_field=label_field, classes=classes, max_samples=max_samples)
        out = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, images, templates,
                       batch_size=batch_size, progress=False)
        scores[name] = {**out["metrics"], "num_images": out["num_images"]}
    return scores


def score_both(cfg, *, ours_run: Path, openclip_ckpt: Path, data: str, label_field: str, templates, classes,
               max_samples: int, batch_size: int) -> dict:
    """Zero-shot scores of both checkpoints (the call BENCHMARKS.md's run 4b records)."""
    bundles, info = load_both(cfg, ours_run=ours_run, openclip_ckpt=openclip_ckpt)
    scores = score_zeroshot(bundles, data=data, label_field=label_field, templates=templates, classes=classes,
                            max_samples=max_samples, batch_size=batch_size)
    scores["open_clip"]["checkpoint_epoch"] = info["epoch"]
    return scores


RECALL_KEYS = tuple(f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (1, 5, 10))


def retrieval_metrics(bundle, data: str, *, batch_size: int, max_samples: int) -> dict:
    """Recall@1/5/10 both ways and mean_recall (the mean of the six) of `bundle` on captioned shards `data`."""
    import contrastive.eval.retrieval as retrieval

    if hasattr(retrieval, "score_retrieval"):  # reads every caption of a sample (json "captions")
        out = dict(retrieval.score_retrieval(bundle, data, batch_size=batch_size, max_samples=max_samples))
    else:  # older eval/retrieval.py: a sample's captions are the lines of its .txt
        image_ND, text_MD, owner_M = retrieval.embed_captioned(bundle, data, batch_size=batch_size,
                                                               max_samples=max_samples)
        out = retrieval.retrieval_recall(image_ND, text_MD, owner_M)
    out["mean_recall"] = sum(out[k] for k in RECALL_KEYS) / len(RECALL_KEYS)
    return out


def score_retrieval(bundles: dict, *, data: str, max_samples: int, batch_size: int) -> dict:
    return {name: retrieval_metrics(bundle, data, batch_size=batch_size, max_samples=max_samples)
            for name, bundle in bundles.items()}


# ---------------------------------------------------------------- main

def summary_table(result: dict, *, metric: str) -> str:
    """The printed comparison: score, steps, training seconds and budget share of each side."""
    lines = [f"{'side':<10} {metric:>12} {'steps':>7} {'planned':>8} {'train_s':>8} {'budget':>7} "
             f"{'process_s':>9}  stopped"]
    for side in ("ours", "open_clip"):
        r = result[side]
        lines.append(f"{side:<10} {r['score'][metric]:>12.4f} {r['steps_done']:>7} {r['planned_steps']:>8} "
                     f"{r['train_s']:>8.1f} {r['budget_used']:>7.1%} {r['process_s']:>9.1f}  "
                     f"{r['stopped'] or 'schedule done'}")
    lines.append(f"ratio ours/open_clip {metric}: {result['ratio']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="our run config (data.train, model, optim, train)")
    parser.add_argument("--budget-s", type=float, default=900.0,
                        help="training-loop seconds per trainer, enforced on both (default 900)")
    parser.add_argument("--task", choices=("zeroshot", "retrieval"), default=None,
                        help="how both are scored (default: retrieval if the config's first evaluator is one, "
                             "else zeroshot)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality_vs_open_clip", help="work folder")
    parser.add_argument("--eval-data", default=None, help="eval set (default: the config's first evaluator's)")
    parser.add_argument("--label-field", default=None, help="zeroshot: JSON label field (default: evaluator's, "
                                                            "else .cls)")
    parser.add_argument("--templates", default=None, help="zeroshot: template file or built-in set "
                                                          "(default: evaluator's)")
    parser.add_argument("--classnames", default=None, help="zeroshot: class names file (default: classnames.txt "
                                                           "by the shards)")
    parser.add_argument("--eval-max-samples", type=int, default=0, help="score at most this many images (0: all)")
    # 20 steady steps put open_clip's Flickr8k step at 1.26 s where its 15-minute run averaged 1.14 s (it then
    # used 90% of the budget; BENCHMARKS.md, issue 18): 60 steps.
    parser.add_argument("--probe-steps", type=int, default=60,
                        help="steady steps each speed probe measures, after the shuffle buffers fill (default 60)")
    parser.add_argument("--ours-steps", type=int, default=None, help="skip our probe and plan this many steps")
    parser.add_argument("--openclip-steps", type=int, default=None, help="skip open_clip's probe, plan this many")
    parser.add_argument("--openclip-train-csv", type=Path, default=None,
                        help="open_clip_train reads this CSV (tab-separated, columns filepath and title, one row "
                             "per caption) with its CSV loader instead of the config's shards")
    parser.add_argument("--openclip-python", type=Path, default=None,
                        help="python of an environment with open_clip_train (default: bench/.venv-openclip, "
                             "created on first use)")
    parser.add_argument("--openclip-arg", action="append", default=[],
                        help="extra argument for open_clip_train (repeat), e.g. --openclip-arg=--lr=1e-3")
    parser.add_argument("--grace", type=float, default=0.15,
                        help="kill a process still running at budget x (1 + grace) plus its startup")
    parser.add_argument("--only", choices=("ours", "open_clip"), default=None, help="train only one side (debug)")
    parser.add_argument("overrides", nargs="*", help="overrides of our config, key=value")
    args = parser.parse_args(argv)

    from contrastive.config import load_config, save_config

    try:
        cfg = load_config(args.config, args.overrides)
        evaluator = cfg.eval.evaluators[0] if cfg.eval.evaluators else None
        task = args.task or ("retrieval" if evaluator and evaluator.name == "retrieval" else "zeroshot")
        data = args.eval_data or (evaluator.data if evaluator else "")
        if not data:
            raise UserError("no eval data: give --eval-data or an evaluator in the config")
        label_field = args.label_field if args.label_field is not None else (evaluator.label_field if evaluator else "")
        templates = args.templates or (list(evaluator.templates) if evaluator and evaluator.templates else None)
        classes = None
        if args.classnames:
            from contrastive.eval.zeroshot import read_lines

            classes = read_lines(args.classnames, "classnames")
        elif evaluator and evaluator.classes:
            classes = list(evaluator.classes)
        from contrastive.data import expand_sources

        expand_sources(cfg.data.train)
        train_csv = args.openclip_train_csv.resolve() if args.openclip_train_csv else None
        if train_csv is not None and not train_csv.is_file():
            raise UserError(f"--openclip-train-csv {train_csv} does not exist")
        if args.probe_steps < 2:
            raise UserError(f"--probe-steps must be >= 2, got {args.probe_steps}")
    except UserError as e:
        print(f"quality_vs_open_clip: error: {e}", file=sys.stderr)
        return 2

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    save_config(cfg, config_path)  # both sides train from this resolved config
    notes = differences_from_open_clip(cfg)
    if train_csv is not None:
        notes.append(f"open_clip_train reads {train_csv.name} with its CSV loader (one row per caption, full "
                     f"passes); ours reads {cfg.data.train}")
    savers = our_savers(cfg)
    for note in notes:
        print(f"note: {note}", flush=True)
    print("our step savers on: " + (", ".join(f"{k}={v}" for k, v in savers.items()) or "none"), flush=True)
    fill = fill_steps(cfg, openclip_csv=train_csv is not None)
    window = max(1, args.probe_steps // 4)
    result: dict = {"config": str(args.config), "overrides": args.overrides, "task": task, "budget_s": args.budget_s,
                    "model": cfg.model.name, "batch_size": cfg.train.batch_size, "train_data": cfg.data.train,
                    "openclip_train_csv": str(train_csv) if train_csv else None, "eval_data": data,
                    "notes": notes, "our_savers": savers,
                    "probe_rule": {"fill_steps": fill, "window_steps": window, "steady_steps": args.probe_steps}}
    python = None
    if args.only != "ours":  # before any training, so a broken environment fails fast
        from openclip_env import ensure_venv

        python = args.openclip_python or ensure_venv()
    plan = {"budget_s": args.budget_s, "fill": fill, "window": window, "steady_steps": args.probe_steps,
            "grace": args.grace}
    if args.only != "open_clip":
        print(f"[ours] training for {args.budget_s:.0f} s", flush=True)
        result["ours"] = run_ours(cfg, config_path, out, steps=args.ours_steps, **plan)
        print(f"[ours] {json.dumps(result['ours'])}", flush=True)
    if args.only != "ours":
        print(f"[open_clip] training for {args.budget_s:.0f} s", flush=True)
        result["open_clip"] = run_open_clip(cfg, python, out, steps=args.openclip_steps, train_csv=train_csv,
                                            extra=args.openclip_arg, **plan)
        print(f"[open_clip] {json.dumps({k: v for k, v in result['open_clip'].items() if k != 'command'})}",
              flush=True)
    if args.only is None:
        print(f"[eval] {task}, same code for both", flush=True)
        bundles, ckpt_info = load_both(cfg, ours_run=Path(result["ours"]["run_dir"]),
                                       openclip_ckpt=Path(result["open_clip"]["checkpoint"]))
        if task == "retrieval":
            scores = score_retrieval(bundles, data=data, max_samples=args.eval_max_samples,
                                     batch_size=cfg.eval.batch_size)
            metric = "mean_recall"
        else:
            scores = score_zeroshot(bundles, data=data, label_field=label_field, templates=templates,
                                    classes=classes, max_samples=args.eval_max_samples, batch_size=cfg.eval.batch_size)
            metric = "acc1"
        for side in ("ours", "open_clip"):
            result[side]["score"] = scores[side]
        result["open_clip"]["checkpoint_epoch"] = ckpt_info["epoch"]
        ours_score, their_score = scores["ours"][metric], scores["open_clip"][metric]
        result["metric"] = metric
        result["ratio"] = ours_score / their_score if their_score > 0 else math.inf
        print(summary_table(result, metric=metric))
    trained = {side: result[side] for side in ("ours", "open_clip") if side in result}
    result["warnings"] = budget_warnings(trained, args.budget_s)
    for warning in result["warnings"]:
        print(f"warning: {warning}", flush=True)
    print("our step savers on: " + (", ".join(f"{k}={v}" for k, v in savers.items()) or "none"))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"results: {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
