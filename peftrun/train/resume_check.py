"""Honest resume: the checkpoint fits the recipe, and a damaged checkpoint is not the end of a run.

`recipe_shape` is everything in a recipe that shapes the trained state: the model, the method and its
options, the data (with the data files' sizes), the batch geometry and the optimizer and schedule. A
resume compares it with the shape the run started with (`run.json`, or the run's resolved recipe) and
names every key that changed. Extending a run (`train.max_steps`, `train.epochs`) is allowed: the schedule
is rebuilt for the new length and continues from the checkpoint's step.

`readable_checkpoint` checks a checkpoint's files (trainer state JSON, safetensors headers and sizes,
pickled optimizer/scheduler/RNG files) before any model loads; when the newest one is damaged, the
previous complete one is used, and the run says so.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftrun.errors import UserError
from peftrun.recipe.schema import Recipe
from peftrun.run.outputs import RESOLVED_RECIPE
from peftrun.train.checkpoint import STATE_FILE, complete_checkpoints

# Keys that change where or how a run is written or watched, not the weights it trains.
NOT_SHAPING = (
    "output_dir",
    "train.resume",
    "train.overwrite",
    "train.max_steps",  # extending a run: see the module docstring
    "train.epochs",
    "train.cpu_matmul",
    "train.cpu_malloc_cache",
    "train.fused_lora",
    "eval.",
    "checkpoint.",
    "logging.",
    "slurm.",
)


def recipe_shape(recipe: Recipe) -> dict[str, Any]:
    """Dotted key -> value for every key that shapes the trained state, plus the data files' sizes."""
    flat: dict[str, Any] = {}
    _flatten(recipe.model_dump(mode="json"), "", flat)
    shape = {k: v for k, v in flat.items() if not any(k == s or k.startswith(s) for s in NOT_SHAPING)}
    for source in recipe.data.sources():
        for name, value in (("path", source.path), ("val_path", source.val_path)):
            if value is not None and Path(value).expanduser().is_file():
                shape[f"{source.key_of(name)} (bytes)"] = Path(value).expanduser().stat().st_size
    return shape


def _flatten(value: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", into)
    else:
        into[prefix.removesuffix(".")] = value


def check_resume_fits(recipe: Recipe, checkpoint: Path) -> None:
    """A UserError naming every shaping key that differs from the run the checkpoint belongs to."""
    run_dir = checkpoint.parent.parent
    started = _started_shape(run_dir)
    if started is None:
        return  # a checkpoint from outside a run directory: the weights' names are still checked on load
    now = recipe_shape(recipe)
    changed = sorted(
        key
        for key in set(started) | set(now)
        if started.get(key) != now.get(key) and not (key == "data.labels" and now.get(key) is None)
    )
    if changed:
        shown = ", ".join(f"{k} ({started.get(k)!r} -> {now.get(k)!r})" for k in changed[:6])
        raise UserError(
            f"train.resume: the recipe differs from the run that wrote {checkpoint} in {shown}"
            f"{' and more' if len(changed) > 6 else ''}. Resuming would continue another run's state "
            "under these settings; restore them, or start fresh (--fresh) or in another output_dir"
        )


def _started_shape(run_dir: Path) -> dict[str, Any] | None:
    from peftrun.run.owner import read_run_file

    recorded = read_run_file(run_dir).get("recipe")
    if isinstance(recorded, dict):
        return recorded
    if (run_dir / RESOLVED_RECIPE).is_file():  # a run from before run.json
        from peftrun.recipe.load import load_run_recipe

        return recipe_shape(load_run_recipe(run_dir / RESOLVED_RECIPE))
    return None


def pick_resume(checkpoint: Path, auto: bool, say: Callable[[str], None]) -> Path:
    """`checkpoint` when its files read; for `resume=auto`, else the newest older one that does."""
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return checkpoint
    if not auto:
        raise UserError(f"train.resume: checkpoint {checkpoint} is damaged: {problem}")
    older = [c for c in complete_checkpoints(checkpoint.parent.parent) if c.name < checkpoint.name]
    for candidate in reversed(older):
        if checkpoint_problem(candidate) is None:
            say(f"[peftrun] checkpoint {checkpoint} is damaged ({problem}); resuming from {candidate}")
            return candidate
    raise UserError(
        f"train.resume: checkpoint {checkpoint} is damaged ({problem}) and no older complete checkpoint "
        "reads; start fresh (--fresh)"
    )


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint's files (one line naming the file), or None when they read."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{STATE_FILE} has no step"
        files = [p for p in path.rglob("*") if p.is_file()]
        if not any(p.name.startswith("optimizer") or p.suffix == ".pt" for p in files):
            return "no optimizer state"
        for file in files:
            if file.suffix == ".safetensors":
                _check_safetensors(file)
            elif file.suffix in (".bin", ".pt", ".pkl") and file.stat().st_size == 0:
                return f"{file.name} is empty"
            elif file.suffix in (".bin", ".pt", ".pkl"):
                _check_pickle(file)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{exc}"
    return None


def _check_safetensors(file: Path) -> None:
    """Header parses and the data it describes fits in the file (a truncated write does not)."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file.name}: truncated safetensors file")
        header_len = struct.unpack("<Q", raw)[0]
        if header_len > size - 8:
            raise ValueError(f"{file.name}: truncated safetensors header")
        header = json.loads(handle.read(header_len))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{file.name}: {size} bytes, its header describes {8 + header_len + end}")


def _check_pickle(file: Path) -> None:
    """torch's zip container ends with its directory, which a truncated write lacks."""
    import zipfile

    if not zipfile.is_zipfile(file) and file.read_bytes()[:1] != b"\x80":  # \x80: torch's legacy pickle
        raise ValueError(f"{file.name}: truncated or not a torch file")
