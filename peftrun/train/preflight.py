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
from peftrun.dist.signals import slurm_restarts
from peftrun.errors import UserError
from peftrun.model.accel_select import check_liger, check_packing_architecture
from peftrun.model.load import check_method_against_architecture, load_model_config
from peftrun.model.methods import NON_ADAPTER_KINDS
from peftrun.model.tasks import TASKS
from peftrun.recipe.schema import Recipe
from peftrun.run.io_checks import check_output_dir, expected_save_bytes
from peftrun.run.owner import check_owner
from peftrun.run.safe_paths import check_output
from peftrun.train.checkpoint import resolve_resume
from peftrun.train.resume_check import check_resume_fits

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
    out = recipe.output_dir
    check_output(out, "output_dir", inputs=_read_paths(recipe))
    resume_from = resolve_resume(out, recipe.train.resume, requeued=slurm_restarts() > 0)
    check_owner(out, resume_from, recipe.train.overwrite)
    if resume_from is not None:
        check_resume_fits(recipe, resume_from)
    resolve_cpu_matmul(recipe.cpu.matmul)  # 'onednn' in a torch without it: said before any load
    check_source(recipe.data)
    world_size = launcher_world_size()
    accumulation = grad_accum_steps(recipe, world_size)
    model_config = load_model_config(recipe.model)
    if recipe.data.packing:
        check_packing_architecture(model_config)
    check_liger(recipe, cuda=torch.cuda.is_available())
    check_task_head(recipe, model_config)
    trainable, total = check_method_against_architecture(recipe, model_config)
    check_against_model(recipe, model_config, trainable)
    check_output_dir(out, expected_save_bytes(trainable, total, recipe.method.kind in NON_ADAPTER_KINDS))
    return Preflight(model_config, trainable, total, accumulation, world_size)


def _read_paths(recipe: Recipe) -> list[str | None]:
    """What training reads from disk (when local): output_dir must stay clear of all of it."""
    return [recipe.model.name_or_path, recipe.model.tokenizer, *recipe.data.read_paths()]


# transformers' registry of the architectures that have each task's head.
_HEAD_REGISTRIES = {
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "image_classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}


def check_task_head(recipe: Recipe, model_config: Any) -> None:
    """The task's head exists for this architecture (a causal model has no masked-LM head)."""
    from transformers.models.auto import modeling_auto

    heads = getattr(modeling_auto, _HEAD_REGISTRIES[recipe.task], None)
    remote = bool(getattr(model_config, "auto_map", None))  # remote code registers its own classes
    if heads is not None and not remote and model_config.model_type not in heads:
        raise UserError(
            f"task: {recipe.task} needs a model with a {TASKS[recipe.task].auto_class} head; "
            f"{recipe.model.name_or_path} is a '{model_config.model_type}' model, which has none"
        )


def check_against_model(recipe: Recipe, model_config: Any, trainable: int) -> None:
    """What training would hit late: too few positions for max_seq_len, nothing to train."""
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(
        model_config, "n_positions", None
    )
    max_len = recipe.data.max_seq_len
    # Learned position tables fail on the first longer sample; rotary positions extend (less well).
    rotary = any(getattr(model_config, a, None) for a in ("rope_theta", "rope_parameters", "rotary_dim"))
    is_text = recipe.task != "image_classification"
    if is_text and isinstance(positions, int) and max_len > positions and not rotary:
        raise UserError(
            f"data.max_seq_len: {max_len} is beyond the {positions} positions of "
            f"{recipe.model.name_or_path}; use at most {positions}"
        )
    if trainable == 0:
        raise UserError(
            f"method: nothing is trainable (kind {recipe.method.kind}, freeze {recipe.method.freeze}); "
            "leave some parameters trainable"
        )
