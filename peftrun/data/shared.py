"""One process prepares a cache entry; the others on the machine wait for it without a collective.

A collective (a barrier) around data preparation times out when tokenizing a big set takes longer than
the process group's timeout. Instead the local main process builds the entry (published whole by
`staging.staged_dir`) and the other ranks poll the file system for it, then memory-map the same Arrow
files. If the main process fails, it writes a failure marker beside the entry holding its one-line
error, and the waiting ranks raise the same error instead of waiting forever.

Several machines sharing one cache directory: the local main process of each machine prepares the entry
(the same bytes; the first one renamed into place is kept, the others drop theirs) and its own ranks wait
for it. A main process that dies without a word (killed for memory) leaves no marker; the launcher
(torchrun, accelerate launch) then stops the other ranks, and until it does they keep logging that they
are waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peftrun.data.progress import Log
from peftrun.errors import UserError

__all__ = ["DataSharing", "failure_marker", "recording_failure", "wait_for_entry"]

# A failure marker counts for a waiting rank when written at most this long before the rank began to
# wait: ranks start preparing within seconds of each other (they have just met in the process group's
# rendezvous), and an older marker is a previous run's, which the main process removes when it starts.
_MARKER_SLACK_S = 60.0


@dataclass(frozen=True)
class DataSharing:
    """Whether this process prepares the data or waits for the one that does, and how it reports."""

    main: bool = True  # False: wait for the local main process's cache entry, then map its files
    log: Log | None = None  # None: say nothing (processes other than the main one)
    interval_s: float = 30.0  # between progress lines, and between "waiting" lines
    poll_s: float = 0.2  # between looks at the file system while waiting


def failure_marker(entry: Path) -> Path:
    return entry.parent / f"{entry.name}.failed"


@contextmanager
def recording_failure(entry: Path) -> Iterator[None]:
    """Remove a previous run's failure marker, then write this one's if the block raises."""
    marker = failure_marker(entry)
    marker.unlink(missing_ok=True)
    try:
        yield
    except Exception as exc:
        # UserError's one line as the user sees it; anything else by type, the traceback is the main's.
        line = (
            str(exc)
            if isinstance(exc, UserError)
            else f"data preparation failed: {type(exc).__name__}: {exc}"
        )
        entry.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(line.splitlines()[0] if line else type(exc).__name__)
        raise


def wait_for_entry(
    entry: Path,
    is_complete: Callable[[Path], bool],
    sharing: DataSharing,
    clock: Callable[[], float] = time.time,
) -> None:
    """Return once `entry` is complete; raise the main process's UserError if it failed instead."""
    marker = failure_marker(entry)
    started = last = clock()
    while not is_complete(entry):
        if marker.is_file() and marker.stat().st_mtime >= started - _MARKER_SLACK_S:
            raise UserError(marker.read_text().strip())
        now = clock()
        if sharing.log is not None and now - last >= sharing.interval_s:
            sharing.log(f"data: waiting for the main process to prepare data ({entry})")
            last = now
        time.sleep(sharing.poll_s)
