"""Progress of long work: a tqdm bar on a terminal, one plain line every few percent elsewhere (Slurm logs)."""
from __future__ import annotations

import sys
import time
from typing import IO, Any, Iterable, Iterator

# A line at least every this many percent of a known total; every this many seconds when the total is unknown.
LINE_EVERY_PERCENT = 5
LINE_EVERY_S = 60.0


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str = "it", total: float | None = None,
             initial: int = 0, disable: bool = False, file: IO[str] | None = None, **tqdm_kwargs) -> Any:
    """tqdm(iterable, ...) where `file` (default stderr) is a terminal; else a PlainProgress, which writes
    whole lines (no carriage returns that fill a log file with every redraw) and has the tqdm methods the
    project calls: update, set_postfix, write, refresh, close, iteration, `with`, and a settable total."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if disable or _is_terminal(stream):
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, file=stream,
                    **tqdm_kwargs)
    return PlainProgress(iterable, desc=desc, unit=unit, total=total, initial=initial, file=stream)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class PlainProgress:
    """Progress as plain lines, tqdm's format (count, rate, time left): one each time the count crosses another
    LINE_EVERY_PERCENT of the total (every LINE_EVERY_S without a total), and at close where the count
    moved since."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, unit: str = "it", total: float | None = None,
                 initial: int = 0, file: IO[str], clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.n, self.file, self._clock = initial, file, clock
        self._start = self._last_line_at = clock()
        self._initial = initial
        self._bucket = self._bucket_of(initial)
        self._postfix = ""
        self._closed = False
        self._last_line_n: float | None = None

    def _bucket_of(self, n: float) -> int:
        return int(100 * n / self.total // LINE_EVERY_PERCENT) if self.total else 0

    def _line(self) -> str:
        from tqdm import tqdm

        elapsed = self._clock() - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else None
        meter = tqdm.format_meter(self.n, self.total, elapsed, ncols=0, prefix=self.desc, unit=self.unit,
                                  rate=rate, postfix=self._postfix or None, initial=self._initial)
        return meter.strip()

    def _emit(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self._last_line_at, self._last_line_n = self._clock(), self.n

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.total:
            bucket = self._bucket_of(self.n)
            if bucket > self._bucket:
                self._bucket = bucket
                self._emit()
        elif self._clock() - self._last_line_at >= LINE_EVERY_S:
            self._emit()

    def set_postfix(self, **kwargs) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def refresh(self) -> None:
        """A changed total (train.fit_steps_to_time) moves the percent a line was last written at."""
        self._bucket = self._bucket_of(self.n)

    def write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._last_line_n != self.n:  # the summary line, unless the last line already says it
                self._emit()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
