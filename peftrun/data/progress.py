"""Log lines for long data work: how far, how fast, how long to go; and for the ranks that wait on it.

Lines, not a progress bar: they go to the run's log (and a Slurm job's output file) readably.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Progress"]

Log = Callable[[str], None]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Reports `done` of `total` rows when `interval_s` seconds passed since the last report (0: at every
    update), so work shorter than the interval says nothing. `log=None` reports nothing.
    """

    def __init__(
        self,
        what: str,
        total: int,
        log: Log | None,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.total = total
        self.log = log
        self.interval_s = interval_s
        self.clock = clock
        self.started = self.last = clock()

    def update(self, done: int) -> None:
        now = self.clock()
        if self.log is None or now - self.last < self.interval_s:
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", about {_duration((self.total - done) / rate)} left" if rate and done < self.total else ""
        self.log(f"data: {self.what}: {done:,} of {self.total:,} rows ({rate:,.0f} rows/s{eta})")
