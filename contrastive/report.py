"""`contrastive report RUN_DIR`: PNG plots of a run's metrics.jsonl and a one-page HTML summary linking them.

A record of metrics.jsonl is a training record when it has a `loss`, an evaluation record when it has keys of
the form "<tag>/<metric>" (both may share a step). Wall-clock per record comes from its `time_s` field
(seconds since the run started, across resumes); a record without one gets an estimate: the previous time plus
the samples trained since then divided by the logged samples/s (so it leaves out checkpoint and eval time).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from contrastive.errors import UserError

METRICS_FILE = "metrics.jsonl"
# Training series plotted, one PNG each: (record key, title, log-scale y axis).
TRAIN_SERIES = (
    ("loss", "training loss", False),
    ("lr", "learning rate", False),
    ("logit_scale", "logit scale (exp, the inverse temperature)", False),
    ("samples_per_s", "throughput (samples/s)", False),
)


@dataclass
class RunMetrics:
    """Training and evaluation records of one run, each with a wall-clock `time_s`."""

    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    # Records whose wall-clock was estimated from samples/s rather than logged.
    num_estimated_times: int = 0
    # Lines of metrics.jsonl that were not JSON objects (e.g. the half-written last line of a killed run).
    num_bad_lines: int = 0

    @property
    def eval_keys(self) -> list[str]:
        keys = {k for r in self.evals for k in r if "/" in k and _is_number(r[k])}
        return sorted(keys)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_records(path: Path) -> tuple[list[dict], int]:
    """JSON objects of a metrics.jsonl, in file order, and the count of unreadable lines (skipped)."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            bad += 1
            continue
        records.append(record)
    return records, bad


def load_run_metrics(run_dir: Path, *, batch_size: int | None = None) -> RunMetrics:
    """Split metrics.jsonl into training and eval records and give every record a wall-clock `time_s`.

    `batch_size` (global) converts steps into samples for records that lack `samples_seen`.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: is it a run directory of `contrastive train`?")
    records, bad = read_records(path)
    # A resumed run truncates metrics.jsonl at its checkpoint, so steps rise; sort (stably) all the same.
    records.sort(key=lambda r: r["step"])
    out = RunMetrics(num_bad_lines=bad)
    time_s, samples, time_logged = 0.0, 0.0, False
    for record in records:
        record = dict(record)
        is_train = _is_number(record.get("loss")) or "samples_per_s" in record
        if is_train:
            seen = record.get("samples_seen")
            if not _is_number(seen):
                seen = record["step"] * batch_size if batch_size else None
            time_logged = _is_number(record.get("time_s"))
            if time_logged:
                time_s = float(record["time_s"])
            else:
                speed = record.get("samples_per_s")
                if seen is not None and _is_number(speed) and speed > 0:
                    time_s += max(0.0, seen - samples) / speed
                out.num_estimated_times += 1
            samples = seen if seen is not None else samples
            out.train.append({**record, "time_s": time_s})
        if any("/" in k for k in record):
            # An eval record without its own time is placed at the training record it follows.
            if _is_number(record.get("time_s")) and not is_train:
                time_s = float(record["time_s"])
            elif not (is_train or time_logged):
                out.num_estimated_times += 1
            out.evals.append({**record, "time_s": time_s})
    if not out.train and not out.evals:
        raise UserError(f"{path} holds no metrics records yet ({bad} unreadable lines)")
    return out


# ---------------------------------------------------------------- plots

def _series(records: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    rows = [(r["step"], r["time_s"], r[key]) for r in records if _is_number(r.get(key))]
    return [s for s, _, _ in rows], [t for _, t, _ in rows], [v for _, _, v in rows]


def _figure(title: str, *, estimated: bool):
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    fig.suptitle(title)
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("wall-clock (s)" + (", estimated from samples/s" if estimated else ""))
    for ax in (ax_step, ax_time):
        ax.grid(True, alpha=0.3)
    return fig, ax_step, ax_time


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_train_series(metrics: RunMetrics, key: str, title: str, path: Path, *, log_y: bool = False) -> bool:
    """One PNG with `key` against steps (left) and wall-clock (right); False when the run never logged it."""
    steps, times, values = _series(metrics.train, key)
    if not values:
        return False
    fig, ax_step, ax_time = _figure(title, estimated=metrics.num_estimated_times > 0)
    for ax, x in ((ax_step, steps), (ax_time, times)):
        ax.plot(x, values, marker="." if len(values) < 50 else None)
        if log_y and min(values) > 0:
            ax.set_yscale("log")
    _save(fig, path)
    return True


def plot_evals(metrics: RunMetrics, path: Path) -> bool:
    """Every "<tag>/<metric>" series (zero-shot accuracies, recalls) against steps and wall-clock."""
    keys = metrics.eval_keys
    if not keys:
        return False
    fig, ax_step, ax_time = _figure("evaluation", estimated=metrics.num_estimated_times > 0)
    in_unit_range = True
    for key in keys:
        steps, times, values = _series(metrics.evals, key)
        in_unit_range &= all(0.0 <= v <= 1.0 for v in values)
        for ax, x in ((ax_step, steps), (ax_time, times)):
            ax.plot(x, values, marker="o", label=key)
    for ax in (ax_step, ax_time):
        if in_unit_range:
            ax.set_ylim(0.0, 1.0)
        ax.legend(fontsize="small")
    _save(fig, path)
    return True


# ---------------------------------------------------------------- eval JSON files and summary

def find_eval_results(run_dir: Path) -> list[tuple[str, dict]]:
    """JSON files in the run directory (top level or eval/) holding a results dict with "metrics"."""
    found = []
    for path in sorted([*run_dir.glob("*.json"), *run_dir.glob("eval/*.json")]):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            found.append((str(path.relative_to(run_dir)), data))
    return found


def summarize(metrics: RunMetrics, config: dict) -> dict:
    """The headline numbers of a run."""
    summary: dict = {}
    train = metrics.train
    model = config.get("model", {}) if isinstance(config.get("model"), dict) else {}
    train_cfg = config.get("train", {}) if isinstance(config.get("train"), dict) else {}
    summary["model"] = model.get("name")
    summary["global batch size"] = train_cfg.get("batch_size")
    summary["steps configured"] = train_cfg.get("steps")
    if train:
        last = train[-1]
        summary["last logged step"] = last["step"]
        summary["samples seen"] = last.get("samples_seen")
        summary["final loss"] = last.get("loss")
        summary["training wall-clock (s)"] = round(last["time_s"], 1)
        speeds = [r["samples_per_s"] for r in train if _is_number(r.get("samples_per_s"))]
        if speeds:
            summary["mean samples/s"] = round(sum(speeds) / len(speeds), 1)
        fraction = data_wait_fraction(train)
        if fraction is not None:
            summary["time waiting for data"] = f"{100 * fraction:.1f}%"
        summary["skipped samples"] = last.get("skipped_samples")
    for key in metrics.eval_keys:
        steps, _, values = _series(metrics.evals, key)
        best = max(range(len(values)), key=values.__getitem__)
        summary[f"{key} (final)"] = round(values[-1], 4)
        summary[f"{key} (best, step {steps[best]})"] = round(values[best], 4)
    return {k: v for k, v in summary.items() if v is not None}


def data_wait_fraction(train: list[dict]) -> float | None:
    """Share of training time spent waiting for batches. A record with `compute_s` logs per-step means of
    data_wait_s and compute_s; an older one logs the window's total data_wait_s."""
    wait = total = 0.0
    prev_step, prev_time = 0, 0.0
    for r in train:
        d, c = r.get("data_wait_s"), r.get("compute_s")
        steps, window_s = r["step"] - prev_step, r["time_s"] - prev_time
        prev_step, prev_time = r["step"], r["time_s"]
        if not _is_number(d):
            continue
        if _is_number(c):
            wait, total = wait + d * steps, total + (d + c) * steps
        elif window_s > 0:
            wait, total = wait + d, total + window_s
    return wait / total if total > 0 else None


def _table(rows: list[tuple[str, object]]) -> str:
    def text(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(text(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def write_html(path: Path, *, run_dir: Path, summary: dict, plots: list[tuple[str, str]],
               eval_results: list[tuple[str, dict]], config_text: str, notes: list[str]) -> None:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>run report: {html.escape(run_dir.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1150px;margin:1em auto}"
        "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%}pre{background:#f4f4f4;padding:.5em;overflow:auto;font-size:small}</style>",
        "</head><body>",
        f"<h1>Run report: {html.escape(str(run_dir))}</h1>",
        "<h2>Summary</h2>", _table(list(summary.items())),
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if eval_results:
        parts.append("<h2>Evaluation results</h2>")
        for name, data in eval_results:
            rows = [("file", name)] + [(k, data[k]) for k in ("dataset", "model", "num_images") if k in data]
            rows += [(k, round(v, 4) if _is_number(v) else v) for k, v in data["metrics"].items()]
            parts.append(_table(rows))
    parts.append("<h2>Plots</h2>")
    for file, title in plots:
        parts.append(f"<h3>{html.escape(title)}</h3><a href='{html.escape(file)}'>"
                     f"<img src='{html.escape(file)}' alt='{html.escape(title)}'></a>")
    if config_text:
        parts.append(f"<h2>Resolved config</h2><pre>{html.escape(config_text)}</pre>")
    parts.append("</body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Render the PNGs and report.html for `run_dir` into `out_dir` (default RUN_DIR/report).

    Returns {"html": path, "plots": [paths], "summary": {...}}.
    """
    import matplotlib
    import yaml

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    config = config if isinstance(config, dict) else {}
    batch_size = (config.get("train") or {}).get("batch_size") if isinstance(config.get("train"), dict) else None
    metrics = load_run_metrics(run_dir, batch_size=batch_size if isinstance(batch_size, int) else None)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {out_dir}: {e.strerror}") from None

    plots: list[tuple[str, str]] = []
    for key, title, log_y in TRAIN_SERIES:
        if plot_train_series(metrics, key, title, out_dir / f"{key}.png", log_y=log_y):
            plots.append((f"{key}.png", title))
    if plot_evals(metrics, out_dir / "eval.png"):
        plots.insert(1, ("eval.png", "evaluation (zero-shot accuracy and other eval metrics)"))

    notes = []
    if metrics.num_estimated_times:
        notes.append(f"{metrics.num_estimated_times} records carry no time_s: their wall-clock is estimated from "
                     "samples/s and leaves out checkpoint and evaluation time.")
    if metrics.num_bad_lines:
        notes.append(f"{metrics.num_bad_lines} unreadable lines of {METRICS_FILE} were skipped.")
    if not config_text:
        notes.append("the run directory has no config.yaml.")
    summary = summarize(metrics, config)
    html_path = out_dir / "report.html"
    write_html(html_path, run_dir=run_dir, summary=summary, plots=plots, eval_results=find_eval_results(run_dir),
               config_text=config_text, notes=notes)
    return {"html": str(html_path), "plots": [str(out_dir / f) for f, _ in plots], "summary": summary,
            "notes": notes}
