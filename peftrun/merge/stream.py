"""Write a merged checkpoint one base tensor at a time: peak memory is one output shard plus the adapter.

The base's safetensors are memory-mapped and read tensor by tensor; the output shards are planned up
front from the headers alone (shapes and dtypes), so their names (model-0000i-of-0000N) are known before
any weight is read. An output shard never spans two input shards.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from peftrun.errors import UserError
from peftrun.merge.lora import MergePlan

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
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
    """Weight name -> safetensors file of a checkpoint (the base, or a merged one read back); None
    when it has no safetensors weights."""
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
    headers: dict[str, tuple[str, list[int]]]  # name -> (safetensors dtype written, shape)


def plan_shards(
    base_dir: Path, weight_map: dict[str, str], dtype: torch.dtype, max_shard_bytes: int
) -> tuple[list[OutputShard], int]:
    """Group the base's tensors (in file order) into output shards of at most max_shard_bytes at `dtype`."""
    out_code = SAFETENSORS_DTYPES[dtype]
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
                written = out_code if stored.startswith(("F", "BF")) else stored
                nbytes = numel * SAFETENSORS_ITEMSIZE[written]
                if current is None or (size + nbytes > max_shard_bytes and current.names):
                    current, size = OutputShard(source, [], {}), 0
                    shards.append(current)
                current.names.append(name)
                current.headers[name] = (written, list(view.get_shape()))
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

        # One mapping per tensor: the input's pages leave the process as soon as the tensor is read.
        def produce(name: str, source: str = shard.source) -> torch.Tensor:
            with safe_open(base_dir / source, framework="pt") as handle:
                tensor = handle.get_tensor(name)
            return _merged_tensor(name, tensor, merge_plan, dtype, base_weight)

        write_safetensors(out_dir / filename, shard.headers, produce)
        index.update(dict.fromkeys(shard.names, filename))
    if count > 1:
        (out_dir / SAFE_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2, sort_keys=True)
        )
    return count


def write_safetensors(
    path: Path, headers: dict[str, tuple[str, list[int]]], produce: Callable[[str], torch.Tensor]
) -> None:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is known
    from the plan, so no more than one tensor is ever held (safetensors' save_file needs them all, and
    copies them once more while serializing)."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (code, shape) in headers.items():
        numel = 1
        for dim in shape:
            numel *= dim
        entries[name] = {
            "dtype": code,
            "shape": shape,
            "data_offsets": [offset, offset + numel * SAFETENSORS_ITEMSIZE[code]],
        }
        offset += numel * SAFETENSORS_ITEMSIZE[code]
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format's 8-byte alignment of the data
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for name, (code, shape) in headers.items():
            tensor = produce(name)
            if list(tensor.shape) != shape or SAFETENSORS_DTYPES.get(tensor.dtype, code) != code:
                raise RuntimeError(
                    f"internal: {name} came out as {tensor.dtype} {list(tensor.shape)}, planned {code} {shape}"
                )
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # a view: no copy
            del tensor


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
