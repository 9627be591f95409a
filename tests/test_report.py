"""`contrastive report`: plots render from a run's metrics.jsonl and the HTML page links every one of them."""
import json
import re

import pytest

from contrastive.cli import main
from contrastive.report import load_run_metrics, render_report

BATCH = 64


def _write_run(run_dir, *, with_time: bool, resumed_tail: bool = False, bad_tail: bool = True):
    """40 steps logged every 4, eval every 20, at a known constant speed of 128 samples/s."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"model:\n  name: tiny-vit-32\ntrain:\n  steps: 40\n  batch_size: {BATCH}\n")
    lines = []
    for step in range(4, 41, 4):
        record = {"step": step, "loss": 4.0 / step, "lr": 1e-3 * step / 40, "logit_scale": 10.0 + step / 4,
                  "samples_per_s": 128.0, "data_wait_s": 0.1, "samples_seen": step * BATCH, "skipped_samples": 0}
        if with_time:
            record["time_s"] = 3.0 + step * BATCH / 128.0
        lines.append(json.dumps(record))
        if step % 20 == 0:
            lines.append(json.dumps({"step": step, "zeroshot_cls/acc1": step / 50, "zeroshot_cls/acc5": 0.9,
                                     "zeroshot_shape/acc1": None}))
    if bad_tail:
        lines.append('{"step": 44, "loss": 0.0')  # half-written by a killed run
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "zeroshot_cifar.json").write_text(json.dumps(
        {"dataset": "val", "model": str(run_dir), "task": "zeroshot_classification",
         "metrics": {"acc1": 0.8125, "acc5": 0.99}, "num_images": 5000}))
    (run_dir / "unrelated.json").write_text("[1, 2, 3]")


def test_wall_clock_is_estimated_from_samples_per_second(tmp_path):
    _write_run(tmp_path / "run", with_time=False)
    metrics = load_run_metrics(tmp_path / "run", batch_size=BATCH)
    # 4 steps of 64 samples at 128 samples/s = 2 s between records.
    assert [r["time_s"] for r in metrics.train] == pytest.approx([2.0 * i for i in range(1, 11)])
    assert [r["step"] for r in metrics.evals] == [20, 40]
    assert [r["time_s"] for r in metrics.evals] == pytest.approx([10.0, 20.0])
    assert metrics.eval_keys == ["zeroshot_cls/acc1", "zeroshot_cls/acc5"]  # the all-null series is dropped
    assert metrics.num_bad_lines == 1 and metrics.num_estimated_times == 12


def test_logged_time_s_wins_over_the_estimate(tmp_path):
    _write_run(tmp_path / "run", with_time=True)
    metrics = load_run_metrics(tmp_path / "run")
    assert [r["time_s"] for r in metrics.train] == pytest.approx([3.0 + 0.5 * s for s in range(4, 41, 4)])
    assert metrics.evals[-1]["time_s"] == pytest.approx(23.0)
    assert metrics.num_estimated_times == 0


def test_time_continues_from_the_last_logged_time_when_later_records_lack_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10, "loss": 1.0, "samples_per_s": 100.0, "samples_seen": 1000, "time_s": 50.0},
            {"step": 20, "loss": 0.9, "samples_per_s": 50.0, "samples_seen": 2000}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = load_run_metrics(run)
    assert [r["time_s"] for r in metrics.train] == pytest.approx([50.0, 70.0])


@pytest.mark.parametrize("with_time", [False, True])
def test_report_renders_pngs_and_html_links_them(tmp_path, with_time):
    from PIL import Image

    _write_run(tmp_path / "run", with_time=with_time)
    result = render_report(tmp_path / "run")
    names = sorted(p.rsplit("/", 1)[-1] for p in result["plots"])
    assert names == ["eval.png", "logit_scale.png", "loss.png", "lr.png", "samples_per_s.png"]
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    for path in result["plots"]:
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and img.width > 400 and img.height > 200
            # A real plot, not a blank canvas: many distinct colours (lines, text, grid).
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
        name = path.rsplit("/", 1)[-1]
        assert f"src='{name}'" in page and f"href='{name}'" in page
    linked = set(re.findall(r"src='([^']+)'", page))
    assert linked == set(names)
    # The summary carries the final and best eval figures and the eval JSON file's numbers.
    assert "zeroshot_cls/acc1 (final)" in page and "0.8" in page
    assert "zeroshot_cifar.json" in page and "0.8125" in page and "unrelated.json" not in page
    assert ("estimated from samples/s" in page) == (not with_time)
    assert "unreadable lines" in page
    assert result["summary"]["last logged step"] == 40
    assert result["summary"]["training wall-clock (s)"] == pytest.approx(20.0 if not with_time else 23.0)


def test_report_without_eval_records_omits_the_eval_plot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-4}) + "\n")
    result = render_report(run, tmp_path / "out")
    assert sorted(p.rsplit("/", 1)[-1] for p in result["plots"]) == ["loss.png", "lr.png"]
    assert (tmp_path / "out" / "report.html").is_file()
    assert any("no config.yaml" in n for n in result["notes"])


@pytest.mark.parametrize("setup,message", [
    ("missing", "does not exist"),
    ("no_metrics", "has no metrics.jsonl"),
    ("empty_metrics", "holds no metrics records"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "empty_metrics":
        (run / "metrics.jsonl").write_text("garbage\n")
    code = main(["report", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_cli_renders(tmp_path, capsys):
    _write_run(tmp_path / "run", with_time=True)
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "5 plots" in out and str(tmp_path / "rep" / "report.html") in out


def test_data_wait_share_reads_both_record_layouts():
    from contrastive.report import data_wait_fraction

    # Window totals (older loop): 1 s of waiting in each 4 s window.
    old = [{"step": 10, "time_s": 4.0, "data_wait_s": 1.0}, {"step": 20, "time_s": 8.0, "data_wait_s": 1.0}]
    assert data_wait_fraction(old) == pytest.approx(0.25)
    # Per-step means: 10 steps of (0.1 wait + 0.3 compute), then 10 of (0.3 + 0.3).
    new = [{"step": 10, "time_s": 4.0, "data_wait_s": 0.1, "compute_s": 0.3},
           {"step": 20, "time_s": 10.0, "data_wait_s": 0.3, "compute_s": 0.3}]
    assert data_wait_fraction(new) == pytest.approx((1.0 + 3.0) / (4.0 + 6.0))
    assert data_wait_fraction([{"step": 1, "time_s": 1.0}]) is None
