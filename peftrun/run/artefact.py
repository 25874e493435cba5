"""What makes a directory a usable model: weights a plain transformers/peft load takes, the tokenizer with
the chat template training rendered with, and the resolved recipe.

`final/` and every `checkpoints/step-N/` are written through `write_artefact`, so `peftrun chat`, `merge`,
`export`, `generate` and a plain `PeftModel.from_pretrained(base, "runs/x/checkpoints/step-N")` take any of
them. A checkpoint holds the artefact beside accelerate's resume state; they share no file names.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftrun.recipe.schema import Recipe
from peftrun.run.outputs import RESOLVED_RECIPE


def trained_chat_template(processor: Any, recipe: Recipe) -> str | None:
    """The Jinja chat template the run's data was rendered with (None for non-chat data)."""
    if recipe.data.format != "chat" or not hasattr(processor, "apply_chat_template"):
        return getattr(processor, "chat_template", None)
    from peftrun.data.templates import resolve_chat_template

    return resolve_chat_template(processor, recipe.data.chat_template)


def save_processor(processor: Any, recipe: Recipe, directory: Path) -> None:
    """Save the tokenizer (or image processor) carrying the template training used, so vLLM,
    transformers and llama.cpp render prompts the way training did."""
    template = trained_chat_template(processor, recipe)
    if template is not None and getattr(processor, "chat_template", None) != template:
        previous = processor.chat_template
        processor.chat_template = template
        try:
            processor.save_pretrained(str(directory))
        finally:
            processor.chat_template = previous
        return
    processor.save_pretrained(str(directory))


def write_artefact(
    model: Any,
    processor: Any,
    recipe: Recipe,
    directory: Path,
    initial_adapter: Path | None = None,
    **save: Any,
) -> None:
    """`model` (unwrapped: a PeftModel or a transformers model) as a loadable directory at `directory`;
    `save` goes to save_pretrained (e.g. the gathered trainable tensors under ZeRO-3)."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    use_cache = config.use_cache
    config.use_cache = True  # off for training only; generation wants it
    # PiSSA/OLoRA/CorDA moved base weights at init: convert to a plain LoRA that loads on the original base.
    if initial_adapter is not None:
        save["path_initial_model_for_weight_conversion"] = str(initial_adapter)
    try:
        model.save_pretrained(str(directory), safe_serialization=True, **save)
    finally:
        config.use_cache = use_cache
    write_companions(processor, recipe, directory)


def write_companions(processor: Any, recipe: Recipe, directory: Path) -> None:
    """What a loadable directory holds beside the weights and their config: the processor and the
    resolved recipe."""
    save_processor(processor, recipe, directory)
    source = recipe.output_dir / RESOLVED_RECIPE
    if source.is_file():
        shutil.copy(source, directory / RESOLVED_RECIPE)


def write_model_config(model: Any, directory: Path) -> None:
    """config.json (and generation_config.json) of a transformers model as its save_pretrained writes
    them, for weights written by another writer (the ZeRO-3 stream, train/save_zero3.py)."""
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    use_cache = config.use_cache
    config.use_cache = True  # off for training only; generation wants it
    try:
        config.save_pretrained(str(directory))
    finally:
        config.use_cache = use_cache
    if model.can_generate():
        model.generation_config.save_pretrained(str(directory))


def checkpoint_writer(
    accelerator: Any, model: Any, processor: Any, recipe: Recipe, initial_adapter: Path | None
) -> Callable[[Path], None] | None:
    """What `save_checkpoint` calls to make a checkpoint loadable; None under ZeRO-3, where no process
    holds whole weights between steps (gathering them at every checkpoint would cost a collective)."""
    from peftrun.dist.accelerator import zero_stage

    if zero_stage(accelerator) == 3:
        return None

    def write(directory: Path) -> None:
        unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        write_artefact(unwrapped, processor, recipe, directory, initial_adapter)

    return write
