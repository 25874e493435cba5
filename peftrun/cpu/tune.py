"""The one call that applies the CPU speed-ups of the recipe's `cpu:` section, once, in setup.

On any other device it changes nothing: a GPU user's layers stay peft's and torch's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from peftrun.cpu.fused_lora import fuse_lora_layers
from peftrun.cpu.matmul import use_cpu_matmul
from peftrun.cpu.memory import keep_freed_memory
from peftrun.recipe.schema import CpuConfig


@dataclass(frozen=True)
class CpuTuning:
    """What was applied, for the run's manifest."""

    matmul: Literal["onednn", "torch"] = "torch"  # the path fp32 linear layers take
    fused_lora_layers: int = 0  # peft LoRA Linear layers given the fused training forward
    malloc_cache: bool = False  # glibc keeps freed activation memory in the process
    malloc_map_gathered: bool = False  # ZeRO-3: gathered weights' blocks go back to the OS when freed


def tune_for_cpu(
    model: Any, cfg: CpuConfig, device: Any, compiled: bool = False, gathered_mapped: bool = False
) -> CpuTuning:
    """Apply `cfg` to `model` (layer classes) and this process (malloc) when `device` is the CPU.

    A compiled model (train.compile) keeps its layer classes: inductor cannot lower oneDNN's pointwise
    linear op, and it fuses the LoRA products itself. `gathered_mapped`: map_gathered_weights ran
    (ZeRO-3), and the malloc cache, which would undo it, is left off."""
    if getattr(device, "type", device) != "cpu":
        return CpuTuning()
    malloc_cache = cfg.malloc_cache and not gathered_mapped and keep_freed_memory()
    if compiled:
        return CpuTuning(malloc_cache=malloc_cache, malloc_map_gathered=gathered_mapped)
    return CpuTuning(
        matmul="onednn" if use_cpu_matmul(model, cfg.matmul) else "torch",
        fused_lora_layers=fuse_lora_layers(model) if cfg.fused_lora else 0,
        malloc_cache=malloc_cache,
        malloc_map_gathered=gathered_mapped,
    )
