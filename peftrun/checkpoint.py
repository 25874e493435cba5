"""Resumable checkpoints, written atomically: a crash or a signal always leaves the last good one.

A checkpoint is accelerate's state (optimizer, scheduler, RNG of every process) plus only the
trainable weights (a LoRA checkpoint of a 7B model is megabytes, not 14 GB) and `trainer_state.json`
(step, epoch, data position). It is written to `.tmp-step-N` and renamed to `step-N` only when
complete; `latest_checkpoint` never returns a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from peftrun.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next step belongs to
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed (per process)
    tokens_seen: int = 0  # supervised tokens over all processes
    last_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: 'auto' = newest complete one (or none), else an explicit path."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume: '{resume}' is not a complete peftrun checkpoint (no {STATE_FILE})")
    return path


def register_trainable_only_hooks(accelerator: Any) -> None:
    """Make accelerate's save_state/load_state store only trainable weights (not the frozen base)."""

    def trainable_names(model: Any) -> set[str]:
        return {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def save_hook(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for model, state in zip(models, weights, strict=True):
            keep = trainable_names(model)
            save_file(
                {k: v.contiguous() for k, v in state.items() if k in keep},
                os.path.join(output_dir, TRAINABLE_FILE),
            )
        weights.clear()  # accelerate must not write the full model as well

    def load_hook(models: list[Any], input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            saved = load_file(os.path.join(input_dir, TRAINABLE_FILE))
            expected = trainable_names(model)
            if set(saved) != expected:
                missing, extra = sorted(expected - set(saved))[:3], sorted(set(saved) - expected)[:3]
                raise UserError(
                    f"checkpoint {input_dir} does not fit this model/method (missing {missing}, unexpected {extra})"
                )
            model.load_state_dict(saved, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainerState, keep_last: int) -> Path:
    """Every process calls this (DeepSpeed saves its shards from each); the main process publishes it."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
