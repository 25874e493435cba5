"""A base model's checkpoint read into a ZeRO-3 model one tensor at a time.

transformers' `from_pretrained` under ZeRO-3 reads every shard of the checkpoint into one state dict
on rank 0 before it copies the values into the partitioned model: rank 0 then holds the whole model
on top of its own slice (0.85B bf16 on 2 CPU ranks: 3.1 GB on rank 0 at the load, 1.4 GB once
loaded, against 2.9 GB per process under DDP). Here the model is built partitioned (inside
`zero.Init`, as transformers builds it) and each checkpoint tensor is read on rank 0 and scattered
into its parameter's slices before the next is read, so no process holds more than one whole
tensor beside its slice.

Only a plain local safetensors checkpoint whose tensor names are the model's own takes this path; any
other (Hub ids, .bin files, names transformers converts, a classifier head of another size, a
quantized base) loads through transformers as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftrun.dist.stream_weights import INDEX_FILE, SINGLE_FILE, saved_weights


def checkpoint_tensor_files(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of a local checkpoint directory; None for anything else."""
    from safetensors import safe_open

    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        with safe_open(directory / SINGLE_FILE, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), directory / SINGLE_FILE)
    return None


def load_streamed(model_class: Any, config: Any, directory: Path, **build: Any) -> Any | None:
    """The model of `config` built under ZeRO-3 with the checkpoint in `directory` read one tensor at a
    time; None (nothing built) when the checkpoint is not a plain local safetensors one. Every process
    calls this."""
    files = checkpoint_tensor_files(directory) if directory.is_dir() else None
    if files is None:
        return None
    model = model_class.from_config(config, **build)
    weights = saved_weights(model)
    if not _same_names_and_shapes(weights, files):
        del model  # names transformers would convert, or a head of another size: its loader knows them
        return None
    _scatter_from_files(weights, files)
    return model


def _same_names_and_shapes(weights: list[Any], files: dict[str, Path]) -> bool:
    from safetensors import safe_open

    if not {weight.name for weight in weights} <= files.keys():
        return False
    shapes: dict[str, list[int]] = {}
    for file in set(files.values()):
        with safe_open(file, framework="pt") as handle:
            shapes.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})  # noqa: SIM118 (not iterable)
    return all(
        list(getattr(weight.tensor, "ds_shape", weight.tensor.shape)) == list(shapes[weight.name])
        for weight in weights
    )


def _scatter_from_files(weights: list[Any], files: dict[str, Path]) -> None:
    import deepspeed
    from safetensors import safe_open

    reader = torch.distributed.get_rank() == 0  # GatheredParameters' modifier_rank
    handles: dict[Path, Any] = {}
    for weight in sorted(weights, key=lambda w: str(files[w.name])):  # one file open at a time
        file = files[weight.name]
        if file not in handles:
            handles = {file: safe_open(file, framework="pt")}
        if not hasattr(weight.tensor, "ds_id"):  # a buffer: whole on every process, each one reads it
            with torch.no_grad():
                weight.tensor.copy_(handles[file].get_tensor(weight.name))
            continue
        with deepspeed.zero.GatheredParameters([weight.tensor], modifier_rank=0), torch.no_grad():
            if reader:
                weight.tensor.copy_(handles[file].get_tensor(weight.name))
