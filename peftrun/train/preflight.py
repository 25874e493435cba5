"""Every check that can fail because of the user, run before any weights or data are loaded.

`peftrun validate` is exactly this; `peftrun train` runs it first, so a typo costs seconds.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from peftrun.cpu.matmul import resolve as resolve_cpu_matmul
from peftrun.data.sources import check_source
from peftrun.dist.accelerator import grad_accum_steps, launcher_world_size
from peftrun.errors import UserError
from peftrun.model.accel_select import check_liger, check_packing_architecture
from peftrun.model.load import check_method_against_architecture, load_model_config
from peftrun.recipe.schema import Recipe
from peftrun.train.checkpoint import resolve_resume

_OPTIONAL_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class Preflight:
    model_config: Any
    trainable_params: int
    total_params: int
    grad_accum_steps: int
    world_size: int

    def lines(self) -> list[str]:
        share = 100 * self.trainable_params / max(self.total_params, 1)
        return [
            f"model: {type(self.model_config).__name__.removesuffix('Config')} "
            f"({self.total_params:,} parameters, {self.trainable_params:,} trainable = {share:.2f}%)",
            f"batch: {self.world_size} process(es) x grad_accum {self.grad_accum_steps}",
        ]


def preflight(recipe: Recipe) -> Preflight:
    for tracker in recipe.logging.report_to:
        module = _OPTIONAL_PACKAGES.get(tracker)
        if module and importlib.util.find_spec(module) is None:
            raise UserError(f"logging.report_to: '{tracker}' is not installed (pip install {module})")
    needs_bnb = recipe.model.quantization is not None or recipe.train.optimizer == "adamw_8bit"
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "model.quantization / train.optimizer=adamw_8bit need bitsandbytes (pip install bitsandbytes)"
        )
    resolve_resume(recipe.output_dir, recipe.train.resume)
    resolve_cpu_matmul(recipe.cpu.matmul)  # 'onednn' in a torch without it: said before any load
    check_source(recipe.data)
    world_size = launcher_world_size()
    accumulation = grad_accum_steps(recipe, world_size)
    model_config = load_model_config(recipe.model)
    if recipe.data.packing:
        check_packing_architecture(model_config)
    check_liger(recipe, cuda=torch.cuda.is_available())
    trainable, total = check_method_against_architecture(recipe, model_config)
    return Preflight(model_config, trainable, total, accumulation, world_size)
