"""Outputs never touch inputs, and `--overwrite` replaces only what peftrun wrote.

Every command that writes (train, merge, export, eval, predict) asks `check_output` before any work:
the output may not be, contain or sit inside one of the command's inputs (a run directory, an adapter,
a base model, a data file). Inside a run directory, outputs may go to names the run does not own
(RUN/merged, RUN/eval/...), never to its own entries (final/, checkpoints/, metrics.jsonl, ...).

A directory output is built under a temporary name with a marker file in it (`staged_output`) and
renamed into place only when complete; an existing output is replaced only when it carries that marker,
so `--overwrite` can never delete a user's directory or a run. A predictions file is replaced only when
it reads as peftrun's predictions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from peftrun.errors import UserError
from peftrun.staging import staged_dir

OUTPUT_MARKER = ".peftrun-output"
# What a run directory holds for its run: an output there would replace part of the run.
RUN_OWNED = (
    "final",
    "checkpoints",
    "initial_adapter",
    "metrics.jsonl",
    "manifest.json",
    "resolved_recipe.yaml",
    "loss.png",
    "run.json",
    "slurm",
    "runs",
)


def _relation(out: Path, other: Path) -> str | None:
    """How `out` relates to `other` ('is', 'contains', 'sits inside'), or None when apart."""
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "sits inside"
    return None


def check_output(
    out: str | Path, flag: str, inputs: Iterable[str | Path | None] = (), run_dirs: Iterable[str | Path] = ()
) -> Path:
    """The resolved output path; a UserError when it is, contains or sits inside an input.

    `run_dirs` are inputs that may hold new outputs beside the run's own entries (RUN_OWNED).
    """
    if str(out).strip() == "":
        raise UserError(f"{flag}: empty path")
    resolved = Path(out).expanduser().resolve()
    protected = [
        (Path(p).expanduser().resolve(), "which this command reads")
        for p in inputs
        if p is not None and str(p)
    ]
    for run in run_dirs:
        run_path = Path(run).expanduser().resolve()
        relation = _relation(resolved, run_path)
        if relation in ("is", "contains"):
            raise UserError(
                f"{flag}: {out} {relation} the run directory {run}; writing there would replace the run. "
                "Choose another path"
            )
        protected += [
            (run_path / name, f"part of the run {run}") for name in RUN_OWNED if (run_path / name).exists()
        ]
    for path, what in protected:
        relation = _relation(resolved, path)
        if relation is not None and path.exists():
            raise UserError(
                f"{flag}: {out} {'is inside' if relation == 'sits inside' else relation} {path}, {what}; "
                "an output must not touch what the command reads. Choose another path"
            )
    return resolved


def check_replaceable_dir(out: Path, flag: str, overwrite: bool) -> None:
    """A directory output may go where nothing is, into an empty directory, or (with --overwrite) over
    a directory peftrun wrote."""
    if not out.exists():
        if any(parent.exists() and not parent.is_dir() for parent in out.parents):
            raise UserError(f"{flag}: {out} is under a file, not a directory")
        return
    if not out.is_dir():
        raise UserError(f"{flag}: {out} is a file, not a directory; remove it or choose another path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{flag}: {out} exists and is not empty; remove it or pass --overwrite")
    if not (out / OUTPUT_MARKER).is_file():
        raise UserError(
            f"{flag}: {out} was not written by peftrun (no {OUTPUT_MARKER}); --overwrite only replaces "
            "peftrun's own outputs. Remove it yourself or choose another path"
        )


def check_replaceable_file(out: Path, flag: str, overwrite: bool) -> None:
    """A predictions file: only where nothing is, or (with --overwrite) over peftrun's predictions."""
    if out.is_dir():
        raise UserError(f"{flag}: {out} is a directory; give a file path")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise UserError(f"{flag}: {out} is under a file, not a directory")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{flag}: {out} exists; remove it or pass --overwrite")
    if not _reads_as_predictions(out):
        raise UserError(
            f"{flag}: {out} does not read as peftrun predictions; --overwrite only replaces peftrun's own "
            "outputs. Remove it yourself or choose another path"
        )


def _reads_as_predictions(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            first = handle.readline()
        return first == "" or (isinstance(record := json.loads(first), dict) and "row" in record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


@contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """A temporary directory beside `target`, marked as peftrun's, published whole at `target` when the
    block ends without an error (the previous output survives until then); removed in every case."""
    with staged_dir(target) as tmp:
        (tmp / OUTPUT_MARKER).write_text("written by peftrun; `--overwrite` may replace this directory\n")
        yield tmp
