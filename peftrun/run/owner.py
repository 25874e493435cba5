"""A run directory belongs to one run.

A run writes `run.json` (its id, when it started, the recipe keys that shape its weights) into its
output_dir. Training into a directory that holds another run's results (a final artefact, checkpoints,
logged metrics) is refused before anything is written there, unless the recipe resumes that run
(`train.resume`, or a requeued Slurm job) or asks for a fresh start (`--fresh` / `train.overwrite`),
which moves the old run's entries to a sibling directory `OUTPUT_DIR.old-<time>`, never deletes them.
So checkpoints, metrics and `resume=auto` only ever see the files of the run that owns the directory.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftrun.dist.signals import slurm_restarts
from peftrun.errors import UserError
from peftrun.run.outputs import MANIFEST_FILE, METRICS_FILE, PLOT_FILE, RESOLVED_RECIPE
from peftrun.train.checkpoint import CHECKPOINTS, complete_checkpoints

RUN_FILE = "run.json"
# What a run writes into its directory; a fresh start moves all of them aside together.
RUN_ENTRIES = (
    "final",
    CHECKPOINTS,
    "initial_adapter",
    METRICS_FILE,
    MANIFEST_FILE,
    RESOLVED_RECIPE,
    PLOT_FILE,
    "tensorboard",
    "eval",
    "merged",
    RUN_FILE,
)


def held_results(out: Path) -> list[str]:
    """What in `out` another run produced and a new run would replace or mix with."""
    held = []
    if (out / "final").exists():
        held.append("final/")
    if complete_checkpoints(out):
        held.append(f"{len(complete_checkpoints(out))} checkpoint(s)")
    metrics = out / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append(METRICS_FILE)
    return held


def resumes_here(out: Path, resume_from: Path | None) -> bool:
    return resume_from is not None and out.resolve() in resume_from.resolve().parents


def check_owner(out: Path, resume_from: Path | None, overwrite: bool) -> None:
    """Refuse (before any load, on every process) a run that would write over another run's results."""
    if overwrite and resume_from is not None and resumes_here(out, resume_from):
        raise UserError(
            "train.overwrite (--fresh) and train.resume both given: resume the run in output_dir, or start "
            "a fresh one, not both"
        )
    if not out.is_dir() or resumes_here(out, resume_from) or overwrite:
        return
    if _requeued_job_of(read_run_file(out)):
        return  # this Slurm job's own first attempt, stopped before its first checkpoint
    held = held_results(out)
    if held:
        owner = read_run_file(out).get("run_id", "without a run id")
        raise UserError(
            f"output_dir: {out} holds another run ({owner}: {', '.join(held)}). Resume it with "
            "train.resume=auto, start fresh with --fresh (train.overwrite=true; the old run is moved to "
            f"{out.name}.old-<time> beside it, not deleted), or choose another output_dir"
        )


def claim(out: Path, resume_from: Path | None, shape: dict[str, Any], say: Callable[[str], None]) -> str:
    """Make `out` this run's (main process only, after check_owner); returns the run id.

    A resumed run keeps the directory's id; a fresh one first moves any previous run aside.
    """
    out.mkdir(parents=True, exist_ok=True)
    previous = read_run_file(out)
    if (resumes_here(out, resume_from) or _requeued_job_of(previous)) and previous.get("run_id"):
        return str(previous["run_id"])
    if held_results(out):
        moved = move_aside(out)
        say(f"[peftrun] fresh start: the previous run in {out} was moved to {moved}")
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    record = {
        "run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "recipe": shape,
    }
    tmp = out / f".tmp-{RUN_FILE}"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / RUN_FILE)
    return run_id


def _requeued_job_of(record: dict[str, Any]) -> bool:
    """Whether this process is a requeued Slurm job whose earlier attempt started the run in `record`."""
    job = os.environ.get("SLURM_JOB_ID")
    return slurm_restarts() > 0 and job is not None and record.get("slurm_job") == job


def move_aside(out: Path) -> Path:
    """Move the run's own entries into a new sibling directory; other files (a Slurm job's log) stay."""
    target = out.parent / f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        target = out.parent / f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
        suffix += 1
    target.mkdir()
    for name in RUN_ENTRIES:
        if (out / name).exists():
            (out / name).rename(target / name)
    return target


def read_run_file(out: Path) -> dict[str, Any]:
    path = out / RUN_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); move it away if the run is not needed") from None
    return record if isinstance(record, dict) else {}
