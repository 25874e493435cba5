"""Everything distributed: the Accelerator and its launch-environment checks.

The training loop only sees an Accelerator; which backend runs underneath (single process, DDP,
DeepSpeed) comes from the launch config, never from the recipe or the loop.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from peftrun.errors import UserError
from peftrun.recipe.schema import Recipe


def launcher_world_size() -> int:
    """Processes the launcher started (torchrun/accelerate set WORLD_SIZE; a plain python run has none)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accum_steps(recipe: Recipe, world_size: int) -> int:
    """Micro-batches per optimizer step on each process, from global_batch_size when the recipe sets it."""
    train = recipe.train
    if train.global_batch_size is None:
        return train.grad_accum_steps
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size: {train.global_batch_size} is not a multiple of micro_batch_size "
            f"({train.micro_batch_size}) x processes ({world_size}) = {per_step}"
        )
    return train.global_batch_size // per_step


def make_accelerator(recipe: Recipe, log_with: list[str]) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    world_size = launcher_world_size()
    handlers = []
    if world_size > 1 and not torch.cuda.is_available():
        # Without an explicit gloo backend, accelerate under DeepSpeed on CPU ranks decides each rank
        # is alone (world size 1) while DeepSpeed sees them all: N unsharded copies training.
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        # The loop groups micro-batches into optimizer steps itself (it needs each step's token count
        # up front), so accumulation follows a plain count, never the dataloader's end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum_steps(recipe, world_size), sync_with_dataloader=False
        ),
        # One scheduler step per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        project_config=ProjectConfiguration(
            project_dir=str(recipe.output_dir), logging_dir=str(recipe.output_dir / "tensorboard")
        ),
        kwargs_handlers=handlers,
    )
    if accelerator.num_processes != world_size:
        raise UserError(
            f"the launcher started {world_size} processes but accelerate sees {accelerator.num_processes}: "
            "each would train alone on all the data. On CPU use `accelerate launch --multi_gpu "
            "--num_processes N` with ACCELERATE_USE_CPU=true (`--cpu` starts one process only)."
        )
    return accelerator


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return bool(accelerator.distributed_type == DistributedType.DEEPSPEED)
