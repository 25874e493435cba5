"""A classifier run's merge, streamed: the base's tensors the classifier has, merged one at a time, plus
the head the run trained, from the adapter (peft saves a classifier's new head whole, as modules_to_save).

The base's own head (an LM head, or a classifier head of another size) is left out; a weight that is in
neither the base's files nor the adapter (one the run initialised itself) cannot be streamed, and the
caller falls back to peft's merge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from peftrun.merge.lora import MergePlan
from peftrun.merge.stream import (
    SAFE_INDEX,
    SAFE_SINGLE,
    SAFETENSORS_DTYPES,
    SAFETENSORS_ITEMSIZE,
    plan_shards,
    write_safetensors,
)

ADAPTER_SOURCE = ""  # the output shard of tensors that come from the adapter


def unstreamable(merge_plan: MergePlan, weight_map: dict[str, str], skeleton: Any) -> str | None:
    """Why the classifier cannot be streamed (a weight in neither the base nor the adapter), or None."""
    missing = sorted(set(_saved_names(skeleton)) - set(weight_map) - set(merge_plan.replacements))
    if missing:
        return (
            f"classifiers with weights that are neither in the base's files nor in the adapter ({missing[0]})"
        )
    return None


def write_classifier_shards(
    base_dir: Path,
    weight_map: dict[str, str],
    merge_plan: MergePlan,
    skeleton: Any,
    dtype: torch.dtype,
    out_dir: Path,
    max_shard_bytes: int,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
) -> int:
    """Write the classifier's merged weights as safetensors shards (+ index when several)."""
    wanted = set(_saved_names(skeleton))
    shards: list[tuple[str, dict[str, tuple[str, list[int]]]]] = []
    for shard in plan_shards(base_dir, weight_map, dtype, max_shard_bytes)[0]:
        headers = {
            name: _header(merge_plan.replacements.get(name), header, dtype)
            for name, header in shard.headers.items()
            if name in wanted
        }
        if headers:
            shards.append((shard.source, headers))
    added = sorted(wanted - set(weight_map))
    if added:
        shards.append(
            (ADAPTER_SOURCE, {n: _header(merge_plan.replacements[n], ("F32", []), dtype) for n in added})
        )
    count = len(shards)
    index: dict[str, str] = {}
    total = 0
    for i, (source, headers) in enumerate(shards, start=1):
        filename = SAFE_SINGLE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"

        def produce(name: str, source: str = source) -> torch.Tensor:
            if source == ADAPTER_SOURCE:
                tensor = merge_plan.replacements[name]
            else:
                with safe_open(base_dir / source, framework="pt") as handle:
                    tensor = _merged(name, handle.get_tensor(name), merge_plan, base_weight)
            return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()

        write_safetensors(out_dir / filename, headers, produce)
        index.update(dict.fromkeys(headers, filename))
        total += sum(_nbytes(code, shape) for code, shape in headers.values())
    if count > 1:
        (out_dir / SAFE_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2, sort_keys=True)
        )
    return count


def _merged(
    name: str,
    tensor: torch.Tensor,
    merge_plan: MergePlan,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    if name in merge_plan.updates:
        return merge_plan.updates[name].merged(base_weight(name, merge_plan.base_of(name, tensor)))
    if name in merge_plan.replacements:
        return merge_plan.replacements[name]
    return base_weight(name, tensor)


def _header(
    replacement: torch.Tensor | None, planned: tuple[str, list[int]], dtype: torch.dtype
) -> tuple[str, list[int]]:
    """A replaced weight is written with the adapter's shape (the base's head may have another size)."""
    if replacement is None:
        return planned
    code = SAFETENSORS_DTYPES[dtype] if replacement.is_floating_point() else planned[0]
    return code, list(replacement.shape)


def _nbytes(code: str, shape: list[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * SAFETENSORS_ITEMSIZE[code]


def _saved_names(skeleton: Any) -> list[str]:
    """The tensors a checkpoint of the classifier holds: its state dict, a tied weight saved once."""
    seen: set[int] = set()
    names = []
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names.append(name)
    non_persistent = {
        f"{module_name}.{buffer}" if module_name else buffer
        for module_name, module in skeleton.named_modules()
        for buffer in getattr(module, "_non_persistent_buffers_set", ())
    }
    return [name for name in names if name not in non_persistent]
