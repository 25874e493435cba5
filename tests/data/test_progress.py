"""Progress lines: rate and time left, at most one per interval, none without a log."""

from __future__ import annotations

from peftrun.data.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_carry_rate_and_time_left_once_per_interval() -> None:
    clock, lines = Clock(), list[str]()
    progress = Progress("tokenizing a.jsonl", 10_000, lines.append, interval_s=30.0, clock=clock)
    clock.now += 10
    progress.update(1_000)  # within the interval: nothing
    clock.now += 30
    progress.update(4_000)
    clock.now += 90
    progress.update(10_000)
    assert lines == [
        "data: tokenizing a.jsonl: 4,000 of 10,000 rows (100 rows/s, about 1 min 00 s left)",
        "data: tokenizing a.jsonl: 10,000 of 10,000 rows (77 rows/s)",
    ]


def test_no_log_no_lines_and_hours() -> None:
    clock = Clock()
    Progress("x", 10, None, interval_s=0.0, clock=clock).update(5)  # nothing to call
    lines: list[str] = []
    progress = Progress("x", 1_000_000, lines.append, interval_s=0.0, clock=clock)
    clock.now += 100
    progress.update(10_000)
    assert lines == ["data: x: 10,000 of 1,000,000 rows (100 rows/s, about 2 h 45 min left)"]
