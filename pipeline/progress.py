"""Progress for long loops: a rich bar with the rate and the time left on a terminal, periodic log lines otherwise.

The rate is counted from the first unit done, not from the start: what comes before it (a model warming up, a
sweep loading its data and fitting the first, hardest C of a path) says nothing about the units after it, and
counted in it made a 67 s sweep open with "ETA 2772 s". So there is no rate and no time left until two units
are done; then the time left is the units left at the rate since the first.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

log = logging.getLogger(__name__)


class Rate:
    """Units per second since the first unit was done; None until a second one is."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self._first: tuple[float, int] | None = None  # (when, units done) at the first advance

    def advance(self, n: int, now: float) -> None:
        self.done += n
        if self._first is None:
            self._first = (now, self.done)
        self._now = now

    @property
    def per_second(self) -> float | None:
        if self._first is None or self.done == self._first[1] or self._now <= self._first[0]:
            return None
        return (self.done - self._first[1]) / (self._now - self._first[0])

    @property
    def seconds_left(self) -> float | None:
        rate = self.per_second
        return None if rate is None else (self.total - self.done) / rate

    def describe(self, unit: str) -> str:
        """'12.5 images/s, ETA 40 s', or 'rate not known yet' before there is one."""
        rate, left = self.per_second, self.seconds_left
        if rate is None:
            return "rate not known yet"
        return f"{rate:.1f} {unit}/s, ETA {left:.0f} s"


class _RateColumn(ProgressColumn):
    def __init__(self, rate: Rate, unit: str):
        super().__init__()
        self.rate, self.unit = rate, unit

    def render(self, task) -> Text:
        per_second, left = self.rate.per_second, self.rate.seconds_left
        if per_second is None:
            return Text(f"{'?':>7} {self.unit}/s, time left ?")
        minutes, seconds = divmod(int(round(left)), 60)
        return Text(f"{per_second:7.1f} {self.unit}/s, time left {minutes}:{seconds:02d}")


class Progress:
    """`with Progress(total, "extract") as p: p.advance(n)`; the rate and the time left in both display modes."""

    def __init__(self, total: int, description: str, unit: str = "images", every_s: float = 10.0):
        self.total, self.description, self.unit, self.every_s = total, description, unit, every_s
        self.rate = Rate(total)
        self._bar, self._task = None, None
        self._last_log = time.perf_counter()

    @property
    def done(self) -> int:
        return self.rate.done

    def __enter__(self) -> "Progress":
        if sys.stderr.isatty():
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     _RateColumn(self.rate, self.unit), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        now = time.perf_counter()
        self.rate.advance(n, now)
        if self._bar is not None:
            self._bar.update(self._task, advance=n)
            return
        if now - self._last_log >= self.every_s or self.done == self.total:
            self._last_log = now
            log.info("%s: %d/%d %s, %s", self.description, self.done, self.total, self.unit,
                     self.rate.describe(self.unit))

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
