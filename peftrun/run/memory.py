"""Per-phase memory of a process, for benchmarks: with PEFTRUN_MEMORY_LOG set to a file, each call of
`note_memory` appends one JSON line (rank, phase, current and peak resident memory so far). The peak
after each phase shows which phase raised it; unset, it costs nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

MEMORY_LOG_ENV = "PEFTRUN_MEMORY_LOG"


def note_memory(phase: str) -> None:
    target = os.environ.get(MEMORY_LOG_ENV)
    if not target:
        return
    status = _proc_status()
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "phase": phase,
        "rss_bytes": status.get("VmRSS", 0),
        "peak_rss_bytes": status.get("VmHWM", 0),
        "file_rss_bytes": status.get("RssFile", 0),  # mapped files (safetensors) count in the RSS too
    }
    with Path(target).open("a") as handle:  # one short line per call: appends do not interleave
        handle.write(json.dumps(record) + "\n")


def _proc_status() -> dict[str, int]:
    """VmRSS/VmHWM/RssFile in bytes from /proc/self/status (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssFile"):
            found[key] = int(value.split()[0]) * 1024
    return found
