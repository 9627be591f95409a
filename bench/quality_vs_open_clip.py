"""Zero-shot quality at equal wall-clock: our trainer against open_clip's own (open_clip_train) on the same shards.

Both train the same open_clip model config, from the same run config (shards, batch size, optimizer, warmup,
augmentation, seed, loader workers), in one process each, fp32, one after the other on this machine, each
within the same wall-clock budget; then both checkpoints are scored by the same zero-shot code
(eval/zeroshot.py, same preprocessing, tokenizer and templates) and the script prints both accuracies and
their ratio.

Budget: the wall-clock of the training process, start to exit (imports and startup included, the same for
both). Each trainer's schedule is sized to its own speed: a short probe run of each measures its seconds per
step and its fixed overhead, and the real run gets the number of steps that fills the budget, so both
cosine schedules finish. A run still going at budget x (1 + --grace) is killed and scored on its last
checkpoint (open_clip_train has no time limit; ours also stops itself via train.max_time_s).

    flock /tmp/contrastive-heavy.lock .venv/bin/python bench/quality_vs_open_clip.py \\
        --config configs/cifar10.yaml --budget-s 900 --templates cifar [key=value overrides]

open_clip_train runs in its own virtualenv (bench/.venv-openclip, created on first use; see openclip_env.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
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


def openclip_train_args(cfg, *, train_spec: str, samples_per_epoch: int, epochs: int, logs: Path,
                        name: str = OPENCLIP_NAME, log_every: int = 10) -> list[str]:
    """open_clip_train.main arguments that mirror run config `cfg`: 1 process, fp32, CPU, resampled shards."""
    o, m, t = cfg.optim, cfg.model, cfg.train
    args = [
        "--train-data", train_spec, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(samples_per_epoch), "--epochs", str(epochs),
        "--model", m.name, "--batch-size", str(t.batch_size), "--precision", "fp32", "--device", "cpu",
        "--workers", str(cfg.data.num_workers), "--seed", str(t.seed),
        "--lr", repr(o.lr), "--wd", repr(o.weight_decay), "--beta1", repr(o.beta1), "--beta2", repr(o.beta2),
        "--eps", repr(o.eps), "--warmup", str(o.warmup_steps), "--lr-scheduler", "cosine",
        "--logs", str(logs), "--name", name, "--log-every-n-steps", str(log_every), "--report-to", "",
        # A checkpoint at every epoch's end (the latest kept), so a run killed at the deadline still has one.
        "--save-frequency", "1", "--save-most-recent", "--delete-previous-checkpoint",
    ]
    if o.grad_clip > 0:
        args += ["--grad-clip-norm", repr(o.grad_clip)]
    if m.force_quick_gelu:
        args.append("--force-quick-gelu")
    if m.patch_dropout is not None:
        args += ["--force-patch-dropout", repr(m.patch_dropout)]
    return args + aug_cfg_args(dict(m.aug))


def differences_from_open_clip(cfg) -> list[str]:
    """Settings of ours that open_clip_train cannot mirror (the comparison then includes them as ours)."""
    notes = []
    if cfg.loss.name != "infonce" or cfg.loss.label_smoothing:
        notes.append(f"loss {cfg.loss.name} (label smoothing {cfg.loss.label_smoothing}) vs open_clip's plain ClipLoss")
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
    return notes


# ---------------------------------------------------------------- probes and plans

_BATCH_T = re.compile(r"Batch \(t\): ([0-9.]+)")


def openclip_step_times(log_text: str) -> list[float]:
    """Seconds per step of each logged window of an open_clip_train out.log (its meters reset per log line)."""
    return [float(x) for x in _BATCH_T.findall(log_text)]


def steady_step_time(window_times: list[float]) -> float:
    """Seconds per step from per-window means: the median after the first two windows (worker start, first
    batch), so one window still filling a shuffle buffer does not inflate it."""
    import statistics

    if not window_times:
        raise RuntimeError("the probe logged no step times")
    steady = window_times[2:] or window_times[1:] or window_times
    return statistics.median(steady)


def our_step_times(metrics_path: Path, batch_size: int) -> list[float]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [batch_size / r["samples_per_s"] for r in rows if r.get("samples_per_s")]


def plan_steps(budget_s: float, *, overhead_s: float, step_s: float) -> int:
    """Steps that fit in the budget after the fixed overhead (at least 1)."""
    return max(1, int((budget_s - max(0.0, overhead_s)) / step_s))


def openclip_epochs(steps: int, chunks: int) -> tuple[int, int]:
    """(batches per epoch, epochs) with about `steps` steps in `chunks` epochs (a checkpoint after each)."""
    per_epoch = max(1, round(steps / max(1, chunks)))
    return per_epoch, max(1, round(steps / per_epoch))


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


def run_ours(cfg, config_path: Path, out: Path, *, budget_s: float, probe_steps: int, steps: int | None,
             grace: float) -> dict:
    import shutil

    from contrastive.config import TrainConfig

    info: dict = {}
    batch = cfg.train.batch_size
    if steps is None:
        log_every = max(1, probe_steps // 4)
        probe_dir = out / "ours_probe"
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe = run_timed(our_cmd(config_path, probe_dir, [f"train.steps={probe_steps}", f"train.log_every={log_every}",
                                                           f"train.checkpoint_every={probe_steps}"]),
                          log=out / "logs" / "ours_probe.log", timeout_s=max(600.0, budget_s))
        _check(probe, "our probe run")
        step_s = steady_step_time(our_step_times(probe_dir / "metrics.jsonl", batch))
        overhead = probe["wall_s"] - probe_steps * step_s
        steps = plan_steps(budget_s, overhead_s=overhead, step_s=step_s)
        info["probe"] = {"steps": probe_steps, "wall_s": round(probe["wall_s"], 1), "step_s": round(step_s, 4),
                         "overhead_s": round(overhead, 1)}
        shutil.rmtree(probe_dir, ignore_errors=True)
    run_dir = out / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={steps}"]
    if "max_time_s" in {f.name for f in dataclasses.fields(TrainConfig)}:
        # Our loop counts from its own start, after imports; the process budget leaves it that much less.
        overhead = info.get("probe", {}).get("overhead_s", 0.0)
        overrides.append(f"train.max_time_s={max(1.0, budget_s - overhead)}")
    result = run_timed(our_cmd(config_path, run_dir, overrides), log=out / "logs" / "ours.log",
                       timeout_s=budget_s * (1 + grace))
    # Stopping at train.max_time_s (with a checkpoint) is how our run meets the budget when the machine slows.
    _check(result, "our training run", ok=(0, _exit_time_limit()))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = max((r["step"] for r in metrics if "loss" in r), default=0)
    info.update(planned_steps=steps, steps_done=done, samples_seen=done * batch, run_dir=str(run_dir),
                wall_s=round(result["wall_s"], 1), killed=result["killed"],
                stopped_at_time_limit=result["returncode"] != 0 and not result["killed"])
    return info


def run_open_clip(cfg, python: Path, out: Path, *, budget_s: float, probe_steps: int, steps: int | None,
                  grace: float, chunks: int, extra: list[str]) -> dict:
    import shutil

    info: dict = {}
    batch = cfg.train.batch_size
    wrapper = [str(python), str(BENCH_DIR / "openclip_train.py")]
    logs = out / "openclip_logs"
    if steps is None:
        log_every = max(1, probe_steps // 4)
        shutil.rmtree(logs / f"{OPENCLIP_NAME}_probe", ignore_errors=True)
        args = openclip_train_args(cfg, train_spec=cfg.data.train, samples_per_epoch=probe_steps * batch, epochs=1,
                                   logs=logs, name=f"{OPENCLIP_NAME}_probe", log_every=log_every)
        probe = run_timed(wrapper + args + extra, log=out / "logs" / "openclip_probe.log",
                          timeout_s=max(600.0, budget_s))
        _check(probe, "open_clip probe run")
        step_s = steady_step_time(openclip_step_times((logs / f"{OPENCLIP_NAME}_probe" / "out.log").read_text()))
        overhead = probe["wall_s"] - probe_steps * step_s
        steps = plan_steps(budget_s, overhead_s=overhead, step_s=step_s)
        info["probe"] = {"steps": probe_steps, "wall_s": round(probe["wall_s"], 1), "step_s": round(step_s, 4),
                         "overhead_s": round(overhead, 1)}
        shutil.rmtree(logs / f"{OPENCLIP_NAME}_probe", ignore_errors=True)
    per_epoch, epochs = openclip_epochs(steps, chunks)
    shutil.rmtree(logs / OPENCLIP_NAME, ignore_errors=True)
    args = openclip_train_args(cfg, train_spec=cfg.data.train, samples_per_epoch=per_epoch * batch, epochs=epochs,
                               logs=logs, log_every=cfg.train.log_every)
    result = run_timed(wrapper + args + extra, log=out / "logs" / "openclip.log", timeout_s=budget_s * (1 + grace))
    _check(result, "open_clip_train run")
    checkpoint = logs / OPENCLIP_NAME / "checkpoints" / "epoch_latest.pt"
    if not checkpoint.is_file():
        raise RuntimeError(f"open_clip_train left no checkpoint ({checkpoint}); see {result['log']}")
    info.update(planned_steps=per_epoch * epochs, batches_per_epoch=per_epoch, epochs=epochs,
                checkpoint=str(checkpoint), wall_s=round(result["wall_s"], 1), killed=result["killed"],
                command="python bench/openclip_train.py " + " ".join(args + extra))
    return info


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


def score_both(cfg, *, ours_run: Path, openclip_ckpt: Path, data: str, label_field: str, templates,
               classes, max_samples: int, batch_size: int) -> dict:
    from contrastive.checkpoint import load_for_inference
    from contrastive.models import build_model
    from eval.zeroshot import LabelledImages, evaluate, load_templates

    templates = load_templates(templates)
    ours, _ = load_for_inference(ours_run)
    theirs = build_model(cfg.model)
    ckpt_info = load_open_clip_checkpoint(theirs.model, openclip_ckpt)
    theirs.model.eval()
    scores = {}
    for name, model in (("ours", ours.model), ("open_clip", theirs.model)):
        images = LabelledImages(data, label_field=label_field, classes=classes, max_samples=max_samples)
        # One preprocessing and one tokenizer for both: ours, rebuilt from the same model config.
        out = evaluate(model, ours.preprocess_val, ours.tokenizer, images, templates, batch_size=batch_size,
                       progress=False)
        scores[name] = {**out["metrics"], "num_images": out["num_images"]}
    scores["open_clip"]["checkpoint_epoch"] = ckpt_info["epoch"]
    return scores


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="our run config (data.train, model, optim, train)")
    parser.add_argument("--budget-s", type=float, default=900.0, help="wall-clock per trainer, seconds")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality_vs_open_clip", help="work folder")
    parser.add_argument("--eval-data", default=None, help="labelled eval set (default: the config's first evaluator)")
    parser.add_argument("--label-field", default=None, help="JSON label field (default: evaluator's, else .cls)")
    parser.add_argument("--templates", default=None, help="template file or built-in set (default: evaluator's)")
    parser.add_argument("--classnames", default=None, help="class names file (default: classnames.txt by the shards)")
    parser.add_argument("--eval-max-samples", type=int, default=0, help="score at most this many images (0: all)")
    parser.add_argument("--probe-steps", type=int, default=20, help="steps of each speed probe (at least 20)")
    parser.add_argument("--ours-steps", type=int, default=None, help="skip our probe and train this many steps")
    parser.add_argument("--openclip-steps", type=int, default=None, help="skip open_clip's probe, train this many")
    parser.add_argument("--openclip-chunks", type=int, default=3, help="open_clip epochs (a checkpoint after each)")
    parser.add_argument("--openclip-python", type=Path, default=None,
                        help="python of an environment with open_clip_train (default: bench/.venv-openclip, "
                             "created on first use)")
    parser.add_argument("--openclip-arg", action="append", default=[],
                        help="extra argument for open_clip_train (repeat), e.g. --openclip-arg=--lr=1e-3")
    parser.add_argument("--grace", type=float, default=0.15, help="kill a run at budget x (1 + grace)")
    parser.add_argument("--only", choices=("ours", "open_clip"), default=None, help="train only one side (debug)")
    parser.add_argument("overrides", nargs="*", help="overrides of our config, key=value")
    args = parser.parse_args(argv)

    from contrastive.config import load_config, save_config

    try:
        cfg = load_config(args.config, args.overrides)
        evaluator = cfg.eval.evaluators[0] if cfg.eval.evaluators else None
        data = args.eval_data or (evaluator.data if evaluator else "")
        if not data:
            raise UserError("no eval data: give --eval-data or an evaluator in the config")
        label_field = args.label_field if args.label_field is not None else (evaluator.label_field if evaluator else "")
        templates = args.templates or (list(evaluator.templates) if evaluator and evaluator.templates else None)
        classes = None
        if args.classnames:
            from eval.zeroshot import read_lines

            classes = read_lines(args.classnames, "classnames")
        elif evaluator and evaluator.classes:
            classes = list(evaluator.classes)
        from contrastive.data import expand_sources

        expand_sources(cfg.data.train)
    except UserError as e:
        print(f"quality_vs_open_clip: error: {e}", file=sys.stderr)
        return 2

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    save_config(cfg, config_path)  # both sides train from this resolved config
    notes = differences_from_open_clip(cfg)
    for note in notes:
        print(f"note: {note}", flush=True)
    result: dict = {"config": str(args.config), "overrides": args.overrides, "budget_s": args.budget_s,
                    "model": cfg.model.name, "batch_size": cfg.train.batch_size, "train_data": cfg.data.train,
                    "eval_data": data, "notes": notes}
    python = None
    if args.only != "ours":  # before any training, so a broken environment fails fast
        from openclip_env import ensure_venv

        python = args.openclip_python or ensure_venv()
    if args.only != "open_clip":
        print(f"[ours] training for {args.budget_s:.0f} s of wall-clock", flush=True)
        result["ours"] = run_ours(cfg, config_path, out, budget_s=args.budget_s, probe_steps=args.probe_steps,
                                  steps=args.ours_steps, grace=args.grace)
        print(f"[ours] {json.dumps(result['ours'])}", flush=True)
    if args.only != "ours":
        print(f"[open_clip] training for {args.budget_s:.0f} s of wall-clock", flush=True)
        result["open_clip"] = run_open_clip(cfg, python, out, budget_s=args.budget_s, probe_steps=args.probe_steps,
                                            steps=args.openclip_steps, grace=args.grace, chunks=args.openclip_chunks,
                                            extra=args.openclip_arg)
        print(f"[open_clip] {json.dumps({k: v for k, v in result['open_clip'].items() if k != 'command'})}",
              flush=True)
    if args.only is None:
        print("[eval] zero-shot, same code for both", flush=True)
        scores = score_both(cfg, ours_run=Path(result["ours"]["run_dir"]),
                            openclip_ckpt=Path(result["open_clip"]["checkpoint"]), data=data, label_field=label_field,
                            templates=templates, classes=classes, max_samples=args.eval_max_samples,
                            batch_size=cfg.eval.batch_size)
        for side in ("ours", "open_clip"):
            result[side]["zeroshot"] = scores[side]
        oc = result["open_clip"]
        oc["steps_done"] = (scores["open_clip"]["checkpoint_epoch"] or 0) * oc["batches_per_epoch"]
        ours_acc, their_acc = scores["ours"]["acc1"], scores["open_clip"]["acc1"]
        result["ratio_acc1"] = ours_acc / their_acc if their_acc > 0 else math.inf
        print(f"ours      acc1={ours_acc:.4f}  ({result['ours']['steps_done']} steps, "
              f"{result['ours']['wall_s']:.0f} s wall-clock{', killed' if result['ours']['killed'] else ''})")
        print(f"open_clip acc1={their_acc:.4f}  ({oc['steps_done']} steps, "
              f"{result['open_clip']['wall_s']:.0f} s wall-clock{', killed' if result['open_clip']['killed'] else ''})")
        print(f"ratio ours/open_clip acc1: {result['ratio_acc1']:.3f}")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"results: {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
