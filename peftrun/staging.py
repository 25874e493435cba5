"""Outputs that appear whole or not at all.

Everything peftrun writes for keeps (checkpoints, the final artefact, merged models, exports,
evaluations, predictions, caches) is built under a temporary name beside its target and renamed into
place, so a crash or a signal leaves the previous output (or nothing), never half of a new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def publish(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`; a previous `target` survives until the new one is in place."""
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    if target.exists():
        target.replace(old)
    tmp.replace(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(target: Path, is_complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """An empty temporary directory beside `target` to fill; published at `target` if the block ends
    without an error, removed in every case.

    `is_complete` marks `target` as a cache entry that concurrent processes may build at once with the
    same content: the first one in place stays (a reader may be using it) and the others drop theirs.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if is_complete is None:
            publish(tmp, target)
            return
        try:
            os.replace(tmp, target)  # atomic, and refused where a non-empty directory is already in place
        except OSError:
            if not is_complete(target):
                publish(tmp, target)  # a damaged leftover, not a concurrent build: replace it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(target: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `target` to write; synced and renamed to `target` if the block ends without
    an error (with permissions `mode` when given), removed otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".tmp-{target.name}-", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
