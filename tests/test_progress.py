"""Progress: tqdm's redrawn bar on a terminal, plain lines every few percent in a log file (Slurm's output)."""
import io
import re

from tqdm import tqdm

from contrastive import progress as progress_module
from contrastive.progress import LINE_EVERY_PERCENT, LINE_EVERY_S, PlainProgress, progress_bar
from tests.conftest import REPO


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdms_bar():
    out = _Terminal()
    bar = progress_bar(total=10, desc="train", unit="step", file=out)
    assert isinstance(bar, tqdm)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "\r" in out.getvalue() and "10/10" in out.getvalue()


def test_a_log_file_gets_a_line_every_few_percent():
    out = io.StringIO()
    bar = progress_bar(total=200, desc="train", unit="step", file=out, smoothing=0.05)  # tqdm options are let through
    assert isinstance(bar, PlainProgress)
    for i in range(200):
        bar.update(1)
        if i == 99:
            bar.set_postfix(loss="0.123")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    percents = [int(re.match(r"train:\s+(\d+)%", line).group(1)) for line in lines]
    assert percents == list(range(LINE_EVERY_PERCENT, 101, LINE_EVERY_PERCENT))  # and no repeat at close
    assert lines[-1].split()[2] == "200/200" and "loss=0.123" in lines[-1] and "loss" not in lines[0]


def test_a_resumed_or_replanned_run_counts_from_where_it_is():
    out = io.StringIO()
    bar = progress_bar(total=100, initial=50, desc="train", unit="step", file=out)
    bar.update(3)  # 53%: no new 5% mark passed since 50
    assert out.getvalue() == ""
    bar.update(2)
    bar.total = 1000  # train.fit_steps_to_time planned more steps: 55 of 1000 is 5%, no line until 10%
    bar.refresh()
    bar.update(44)
    assert len(out.getvalue().splitlines()) == 1
    bar.update(1)
    bar.write("a note")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and re.match(r"train:\s+10% 100/1000", lines[1]) and lines[2] == "a note"


def test_without_a_total_a_line_every_minute():
    out, now = io.StringIO(), [0.0]
    bar = PlainProgress(desc="embed", unit="img", file=out, clock=lambda: now[0])
    for _ in range(10):
        now[0] += LINE_EVERY_S / 4
        bar.update(64)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["256img", "512img", "640img"]  # at 60 s, 120 s, and the close


def test_iterating_a_sized_iterable_and_the_with_statement():
    out = io.StringIO()
    with progress_bar(total=4, desc="a", unit="x", file=out) as bar:
        bar.update(4)
    assert [line.split()[1:3] for line in out.getvalue().splitlines()] == [["100%", "4/4"]]
    out = io.StringIO()
    assert list(progress_bar(range(20), desc="b", file=out)) == list(range(20))
    assert len(out.getvalue().splitlines()) == 100 // LINE_EVERY_PERCENT


def test_commands_write_plain_lines_to_a_log(tmp_path, capsys):
    from contrastive.data_prep.synthetic import generate

    generate(tmp_path, num_samples=40, num_val=0, seed=0, image_size=16, samples_per_shard=20, num_procs=1)
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    assert "\r" not in err and re.search(r"synthetic: 100% 40/40", err)


def test_every_progress_bar_goes_through_the_helper():
    """One place decides between bars and lines: no other module reaches for tqdm itself."""
    offenders = [str(path.relative_to(REPO)) for folder in ("contrastive", "eval", "data_prep", "bench")
                 for path in (REPO / folder).rglob("*.py")
                 if re.search(r"^\s*(from tqdm|import tqdm)", path.read_text(), re.M)
                 and path != REPO / "contrastive" / "progress.py"]
    assert offenders == [] and progress_module.__file__.endswith("progress.py")
