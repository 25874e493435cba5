"""The cheapest change that makes a recipe fit, searched in order of what it costs in speed.

Order (cheapest first): a higher ZeRO stage at the same recipe (ZeRO-1/2 add no communication over
DDP's all-reduce; ZeRO-3 gathers weights every layer), a smaller micro-batch with more accumulation
(same result, lower GPU utilisation), gradient checkpointing (~1/3 more compute), 8-bit AdamW
(tiny numeric change), a 4-bit base (QLoRA; a LoRA recipe only: another model), and last ZeRO-3 with
offload to host RAM (2-5x slower steps).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from peftrun.plan.census import Census, count_model
from peftrun.recipe.schema import QuantizationConfig, Recipe

if TYPE_CHECKING:
    from peftrun.plan import Row

GB = 1024**3


def cheapest_fit(
    recipe: Recipe,
    model_config: Any,
    census: Census,
    rows: list[Row],
    world: int,
    gpu_bytes: int,
    supervised_fraction: float,
) -> str:
    from peftrun.plan import plan_rows

    for change, variant in _variants(recipe):
        variant_census = census if variant.model.quantization == recipe.model.quantization else None
        if variant_census is None:
            variant_census = count_model(variant, model_config)
        candidates = (
            rows if not change else plan_rows(variant, variant_census, world, gpu_bytes, supervised_fraction)
        )
        for row in candidates:
            if row.fits and not row.launch.offload:
                return _sentence(change, row, gpu_bytes)
    offload = [r for r in rows if r.launch.offload and r.fits]
    if offload:
        return _sentence([], offload[0], gpu_bytes)
    best = min((r for r in rows if r.applies is None), key=lambda r: r.total)
    return (
        f"does not fit: the smallest config ({best.launch.name}) needs {best.total / GB:.1f} GB per GPU "
        f"of {gpu_bytes / GB:.0f}; more GPUs (ZeRO-3 shards states over them) or larger ones"
    )


def _sentence(change: list[str], row: Row, gpu_bytes: int) -> str:
    how = f"--config_file accelerate_configs/{row.launch.config_file}"
    used = f"{row.total / GB:.1f} of {gpu_bytes / GB:.0f} GB"
    if not change:
        return f"fits as is with {row.launch.name} ({used}): accelerate launch {how} -m peftrun RECIPE"
    return f"fits with {' + '.join(change)} under {row.launch.name} ({used}): {how}"


def _variants(recipe: Recipe) -> Iterator[tuple[list[str], Recipe]]:
    """(the changes, the changed recipe), cheapest first; the recipe itself comes first."""
    yield [], recipe
    micro = recipe.train.micro_batch_size
    for smaller in _halvings(micro):
        yield [f"train.micro_batch_size={smaller}"], _with(recipe, "train", micro_batch_size=smaller)
    changes: list[str] = []
    current = recipe
    if not recipe.model.gradient_checkpointing:
        changes.append("model.gradient_checkpointing=true")
        current = _with(current, "model", gradient_checkpointing=True)
        yield list(changes), current
    if current.train.optimizer != "adamw_8bit":
        changes.append("train.optimizer=adamw_8bit")
        current = _with(current, "train", optimizer="adamw_8bit")
        yield list(changes), current
    if current.method.kind == "lora" and current.model.quantization is None:
        changes.append("model.quantization={bits: 4} (QLoRA)")
        current = _with(current, "model", quantization=QuantizationConfig(storage_dtype=current.model.dtype))
        yield list(changes), current
    for smaller in _halvings(micro):
        yield (
            [*changes, f"train.micro_batch_size={smaller}"],
            _with(current, "train", micro_batch_size=smaller),
        )


def _halvings(micro: int) -> list[int]:
    out = []
    while micro > 1:
        micro //= 2
        out.append(micro)
    return out


def _with(recipe: Recipe, section: str, **values: Any) -> Recipe:
    part = getattr(recipe, section).model_copy(update=values)
    return recipe.model_copy(update={section: part})
