"""Resumable checkpoints, written atomically: a crash or a signal always leaves the last good one.

A checkpoint is accelerate's state (optimizer, scheduler, RNG of every process) plus only the
trainable weights (a LoRA checkpoint of a 7B model is megabytes, not 14 GB) and `trainer_state.json`
(step, epoch, data position). It is written to `.tmp-step-N` and renamed to `step-N` only when
complete; `latest_checkpoint` never returns a partial one.

Under DeepSpeed the engine writes the weights and optimizer state itself (`pytorch_model/`, one
optimizer shard per process), frozen weights left out; `trainable_names.json` records what it holds
so that a resume into a different model or method fails clearly instead of loading non-strictly.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from peftrun.dist.accelerator import checkpoint_load_kwargs, checkpoint_save_kwargs, is_deepspeed
from peftrun.errors import UserError
from peftrun.staging import publish

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
TRAINABLE_NAMES = "trainable_names.json"  # DeepSpeed checkpoints: the trainable weights they hold


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next step belongs to
    batches_in_epoch: int = 0  # micro-batches of that epoch already consumed (per process)
    tokens_seen: int = 0  # supervised tokens over all processes
    last_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    eval_loss: float | None = None  # the latest evaluation's loss, taken at eval_step
    eval_step: int | None = None


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def resolve_resume(output_dir: Path, resume: str | None, requeued: bool = False) -> Path | None:
    """The checkpoint to resume from: 'auto' = newest complete one (or none), else an explicit path.

    A requeued Slurm job continues from its own newest checkpoint, whatever `resume` says: that
    was where its first run started.
    """
    if requeued and complete_checkpoints(output_dir):
        resume = "auto"
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
        if not weights:  # DeepSpeed: the engine saved the weights itself; record which
            if accelerator.is_main_process:
                names = sorted(set().union(*(trainable_names(m) for m in models)))
                with open(os.path.join(output_dir, TRAINABLE_NAMES), "w") as handle:
                    json.dump(names, handle)
            return
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


def best_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest eval loss measured at its own step (None if none has one)."""
    scored = []
    for path in complete_checkpoints(output_dir):
        saved = json.loads((path / STATE_FILE).read_text())
        if saved.get("eval_loss") is not None and saved.get("eval_step") == saved["step"]:
            scored.append((saved["eval_loss"], saved["step"], path))
    return min(scored)[2] if scored else None


def save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    state: TrainerState,
    keep_last: int,
    keep_best: bool = False,
    write_artefact: Callable[[Path], None] | None = None,
) -> Path:
    """Every process calls this (DeepSpeed saves its shards from each); the main process publishes it.

    `write_artefact(directory)`, called on the main process, adds the loadable model (adapter or
    transformers checkpoint) beside the resume state. With `keep_best` the rotation to the newest
    `keep_last` spares the checkpoint with the best eval loss.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True, **checkpoint_save_kwargs(accelerator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_artefact is not None:
            write_artefact(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        _fsync_tree(tmp)
        publish(tmp, final)  # over a same-step checkpoint when a signal comes right after a periodic save
        best = best_checkpoint(output_dir) if keep_best else None
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> TrainerState:
    names_file = path / TRAINABLE_NAMES
    if names_file.is_file() != is_deepspeed(accelerator):
        written, now = ("with", "without") if names_file.is_file() else ("without", "with")
        raise UserError(
            f"checkpoint {path} was written {written} DeepSpeed and this run is {now} it: resume with the "
            "launch config (and number of processes) that wrote it"
        )
    if names_file.is_file():  # a DeepSpeed checkpoint: it loads non-strictly, so check the names here
        saved = set(json.loads(names_file.read_text()))
        expected = {
            n
            for model in accelerator._models
            for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad
        }
        if saved != expected:
            missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
            raise UserError(
                f"checkpoint {path} does not fit this model/method (missing {missing}, unexpected {extra})"
            )
    accelerator.load_state(str(path), **checkpoint_load_kwargs(accelerator))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
