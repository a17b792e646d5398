"""Progress for long loops: a rich bar with images/s and ETA on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

log = logging.getLogger(__name__)


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:7.1f} {self.unit}/s")  # task.speed is None until two updates


class Progress:
    """`with Progress(total, "extract") as p: p.advance(n)`; rate and ETA in both display modes."""

    def __init__(self, total: int, description: str, unit: str = "images", every_s: float = 10.0):
        self.total, self.description, self.unit, self.every_s = total, description, unit, every_s
        self.done, self._bar, self._task = 0, None, None
        self._start = self._last_log = time.perf_counter()

    def __enter__(self) -> "Progress":
        if sys.stderr.isatty():
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     _RateColumn(self.unit), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.every_s or self.done == self.total:
            self._last_log = now
            rate = self.done / max(now - self._start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%s: %d/%d %s, %.1f %s/s, ETA %.0f s", self.description, self.done, self.total, self.unit,
                     rate, self.unit, eta)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
