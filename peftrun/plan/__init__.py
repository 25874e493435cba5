"""`peftrun plan`: will a recipe fit on N GPUs of M GB, and under which launch config?

Counts the model on the meta device (census.py), sizes its model states and activations per GPU for
every launch config that applies (memory.py), and says the cheapest change that makes it fit
(advice.py). Formulas and their measured error: docs/plan.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftrun.plan.census import Census, count_model
from peftrun.plan.memory import (
    LAUNCHES,
    RUNTIME_OVERHEAD,
    Activations,
    Launch,
    Precision,
    States,
    activations,
    model_states,
)
from peftrun.recipe.schema import Recipe

__all__ = ["Plan", "Row", "make_plan", "plan_recipe", "precision_for"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Row:
    """One launch config's bytes per GPU."""

    launch: Launch
    applies: str | None  # why it does not apply (None: it does)
    states: States
    activations: Activations  # with the recipe's gradient checkpointing setting
    activations_other: Activations  # with it flipped, for comparison
    total: int  # states + activation peak + runtime overhead
    fits: bool


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    census: Census
    gpus: int
    nodes: int
    gpu_bytes: int
    tokens: int
    head_tokens: int
    rows: list[Row]
    advice: str

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


def precision_for(recipe: Recipe, deepspeed: bool, device: str = "cuda") -> Precision:
    """The bytes per element of weights and activations a run of the recipe holds."""
    weight = DTYPE_BYTES[recipe.model.dtype]
    mixed = recipe.train.mixed_precision != "no"
    if recipe.model.quantization is not None:
        # prepare_model_for_kbit_training casts the embeddings and norms to fp32, and bitsandbytes'
        # 4-bit layers return their input's dtype: the whole stream runs in fp32 between matmuls.
        residual = compute = 4
    elif mixed and deepspeed:  # DeepSpeed casts the module itself to bf16/fp16
        residual = compute = 2
    else:  # autocast: matmul outputs in half precision, the residual stream in the weights' dtype
        residual, compute = weight, 2 if mixed else weight
    return Precision(
        deepspeed_half=mixed and deepspeed,
        residual=residual,
        compute=compute,
        mask=1 if device == "cuda" else compute,
    )


def make_plan(
    recipe: Recipe,
    model_config: Any,
    gpus: int,
    gpu_memory_gb: float,
    nodes: int = 1,
    supervised_fraction: float = 1.0,
) -> Plan:
    from peftrun.plan.advice import cheapest_fit

    census = count_model(recipe, model_config)
    gpu_bytes = int(gpu_memory_gb * 1024**3)
    rows = plan_rows(recipe, census, gpus * nodes, gpu_bytes, supervised_fraction)
    tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    advice = cheapest_fit(recipe, model_config, census, rows, gpus * nodes, gpu_bytes, supervised_fraction)
    return Plan(
        recipe=recipe,
        census=census,
        gpus=gpus,
        nodes=nodes,
        gpu_bytes=gpu_bytes,
        tokens=tokens,
        head_tokens=max(1, round(tokens * supervised_fraction)),
        rows=rows,
        advice=advice,
    )


def plan_rows(
    recipe: Recipe, census: Census, world: int, gpu_bytes: int, supervised_fraction: float
) -> list[Row]:
    rows = []
    tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    head_tokens = max(1, round(tokens * supervised_fraction))
    checkpointing = recipe.model.gradient_checkpointing
    # Without packing, padded rows give sdpa a boolean [batch, 1, len, len] mask (flash needs none).
    mask = 0
    if not recipe.data.packing and recipe.model.attn_implementation not in (
        "flash_attention_2",
        "flash_attention_3",
    ):
        mask = recipe.train.micro_batch_size * recipe.data.max_seq_len**2
    for launch in LAUNCHES:
        precision = precision_for(recipe, deepspeed=launch.zero_stage is not None)
        states = model_states(census, launch, world, recipe.train.optimizer, precision)
        acts = activations(census, tokens, head_tokens, checkpointing, precision, mask)
        other = activations(census, tokens, head_tokens, not checkpointing, precision, mask)
        total = states.total + acts.peak + RUNTIME_OVERHEAD
        why = _not_applicable(recipe, launch, world)
        rows.append(Row(launch, why, states, acts, other, total, why is None and total <= gpu_bytes))
    return rows


def _not_applicable(recipe: Recipe, launch: Launch, world: int) -> str | None:
    quant = recipe.model.quantization
    if launch.zero_stage is None or quant is None:
        return None
    if launch.offload:
        return "bitsandbytes' 4/8-bit weights cannot be offloaded by DeepSpeed"
    return None


def plan_recipe(
    recipe: Recipe, gpus: int, gpu_memory_gb: float, nodes: int = 1, supervised_fraction: float = 1.0
) -> Plan:
    """make_plan for a recipe whose model config is read from disk or the Hub (config.json only)."""
    from peftrun.model.load import load_model_config

    return make_plan(recipe, load_model_config(recipe.model), gpus, gpu_memory_gb, nodes, supervised_fraction)
