"""Write a merged checkpoint one base tensor at a time: peak memory is one output shard plus the adapter.

The base's safetensors are memory-mapped and read tensor by tensor; the output shards are planned up
front from the headers alone (shapes and dtypes), so their names (model-0000i-of-0000N) are known before
any weight is read. An output shard never spans two input shards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peftrun.errors import UserError
from peftrun.merge.lora import MergePlan

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
}


def base_weight_map(base_dir: Path) -> dict[str, str] | None:
    """Weight name -> safetensors file of the base; None when the base has no safetensors weights."""
    index = base_dir / SAFE_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (base_dir / f).is_file()})
        if missing:
            raise UserError(
                f"{base_dir}: {len(missing)} weight file(s) listed in {SAFE_INDEX} are missing "
                f"({', '.join(missing[:3])}); the base checkpoint is incomplete"
            )
        return weight_map
    if (base_dir / SAFE_SINGLE).is_file():
        with safe_open(base_dir / SAFE_SINGLE, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SAFE_SINGLE)
    return None


def largest_file_bytes(base_dir: Path, weight_map: dict[str, str]) -> int:
    return max((base_dir / f).stat().st_size for f in set(weight_map.values()))


@dataclass
class OutputShard:
    source: str  # the base file its tensors are read from
    names: list[str]


def plan_shards(
    base_dir: Path, weight_map: dict[str, str], dtype: torch.dtype, max_shard_bytes: int
) -> tuple[list[OutputShard], int]:
    """Group the base's tensors (in file order) into output shards of at most max_shard_bytes at `dtype`."""
    out_itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[OutputShard] = []
    total = 0
    for source in sorted(set(weight_map.values())):
        with safe_open(base_dir / source, framework="pt") as handle:
            current: OutputShard | None = None
            size = 0
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                view = handle.get_slice(name)
                numel = 1
                for dim in view.get_shape():
                    numel *= dim
                stored = view.get_dtype()
                nbytes = numel * (
                    out_itemsize if stored.startswith(("F", "BF")) else SAFETENSORS_ITEMSIZE[stored]
                )
                if current is None or (size + nbytes > max_shard_bytes and current.names):
                    current, size = OutputShard(source, []), 0
                    shards.append(current)
                current.names.append(name)
                size += nbytes
                total += nbytes
    return shards, total


def write_merged_shards(
    base_dir: Path,
    weight_map: dict[str, str],
    merge_plan: MergePlan,
    dtype: torch.dtype,
    out_dir: Path,
    max_shard_bytes: int,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, tensor: tensor,
) -> int:
    """Write the merged weights as safetensors shards (+ index when several); returns how many shards.

    `base_weight` maps a base tensor to the one the adapter was trained on (QLoRA: the NF4 round trip).
    """
    missing = sorted(merge_plan.touched() - set(weight_map))
    if missing:
        raise RuntimeError(f"internal: weights {missing[:3]} are not in the base checkpoint")
    shards, total = plan_shards(base_dir, weight_map, dtype, max_shard_bytes)
    count = len(shards)
    index: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        filename = SAFE_SINGLE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(base_dir / shard.source, framework="pt") as handle:
            for name in shard.names:
                tensors[name] = _merged_tensor(name, handle.get_tensor(name), merge_plan, dtype, base_weight)
                index[name] = filename
        save_file(tensors, out_dir / filename, metadata={"format": "pt"})
        del tensors
    if count > 1:
        (out_dir / SAFE_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2, sort_keys=True)
        )
    return count


def _merged_tensor(
    name: str,
    tensor: torch.Tensor,
    merge_plan: MergePlan,
    dtype: torch.dtype,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    if name in merge_plan.updates:
        tensor = merge_plan.updates[name].merged(base_weight(name, merge_plan.base_of(name, tensor)))
    elif name in merge_plan.replacements:
        tensor = merge_plan.replacements[name]
    else:
        tensor = base_weight(name, tensor)
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
