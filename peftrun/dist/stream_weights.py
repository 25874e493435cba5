"""A full model's weights under ZeRO-3, written to sharded safetensors files one weight at a time and
checked against the live weights the same way, so that no process ever holds the whole model.

Every process calls `write_streamed_weights` and `check_streamed_weights` (each gather is a collective);
only the main process writes and reads files. The writer holds one shard's gathered tensors at most,
the check one tensor; other processes hold one gathered weight at a time. The layout is transformers'
own: `model.safetensors`, or `model-0000i-of-0000n.safetensors` files with `model.safetensors.index.json`,
so `from_pretrained(directory)` loads it as any sharded checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftrun.run.verify import VerificationError, check_one_tensor

SHARD_BYTES = 2 * 1024**3  # what the main process holds while it writes one file
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Weight:
    name: str  # the name in the saved files (the model's state dict name)
    tensor: Any  # a parameter (a ZeRO-3 slice) or a persistent buffer (whole on every process)
    trainable: bool

    @property
    def nbytes(self) -> int:
        numel = int(getattr(self.tensor, "ds_numel", self.tensor.numel()))
        return numel * self.tensor.element_size()


def saved_weights(model: Any) -> list[Weight]:
    """What save_pretrained writes, in the model's order: each parameter once (a tied weight under
    its first name) and the persistent buffers."""
    weights = [Weight(name, param, param.requires_grad) for name, param in model.named_parameters()]
    modules = dict(model.named_modules())
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in modules[owner]._non_persistent_buffers_set:
            weights.append(Weight(name, buffer, False))
    return weights


def plan_shards(weights: list[Weight], max_bytes: int) -> dict[str, list[Weight]]:
    """Weights grouped in order into files of at most `max_bytes` (a larger weight gets a file of its
    own), under transformers' file names."""
    groups: list[list[Weight]] = [[]]
    size = 0
    for weight in weights:
        if groups[-1] and size + weight.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(weight)
        size += weight.nbytes
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    count = len(groups)
    return {f"model-{i:05d}-of-{count:05d}.safetensors": group for i, group in enumerate(groups, 1)}


def _gathered(weights: list[Weight]) -> Iterator[tuple[Weight, torch.Tensor]]:
    """Each weight whole, one at a time, on every process (a collective per parameter)."""
    import deepspeed

    for weight in weights:
        with deepspeed.zero.GatheredParameters([weight.tensor]):
            yield weight, weight.tensor.detach()


def write_streamed_weights(
    main: bool, model: Any, directory: Path, max_bytes: int = SHARD_BYTES
) -> tuple[int, str | None]:
    """Write the weights of `model` (unwrapped, its parameters ZeRO-3 slices) to `directory`; returns
    (the number of files, why writing failed or None). Every process calls this and takes part in
    every gather, even after the main process failed to write (a full disk), so none is left waiting."""
    from safetensors.torch import save_file

    shards = plan_shards(saved_weights(model), max_bytes)
    weight_map: dict[str, str] = {}
    failure: str | None = None
    for file, weights in shards.items():
        tensors: dict[str, torch.Tensor] = {}
        for weight, tensor in _gathered(weights):
            if main and failure is None:  # the others only take part in the gather
                tensors[weight.name] = tensor.cpu().clone()
        if tensors:
            try:
                save_file(tensors, directory / file, metadata={"format": "pt"})
            except OSError as exc:
                failure = f"writing {directory / file}: {exc}"
            weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if main and failure is None and len(shards) > 1:
        total = sum(weight.nbytes for weights in shards.values() for weight in weights)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(shards), failure


def _saved_files(directory: Path) -> dict[str, str]:
    """Saved tensor name -> file, from the index or the single file."""
    from safetensors import safe_open

    index = directory / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    if not (directory / SINGLE_FILE).is_file():
        raise VerificationError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}")
    with safe_open(directory / SINGLE_FILE, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), SINGLE_FILE)


def check_streamed_weights(main: bool, model: Any, directory: Path, each_nonzero: bool) -> tuple[int, str | None]:
    """Compare every saved tensor in `directory` with the live weight gathered again, one at a time;
    returns (tensors checked, the first failure or None). Every process calls this and takes part in
    every gather, whatever the main process finds, so no process is left waiting in a collective."""
    from safetensors import safe_open

    weights = saved_weights(model)
    failure: str | None = None
    saved: dict[str, str] = {}
    if main:
        try:
            saved = _saved_files(directory)
        except (VerificationError, OSError, ValueError, KeyError) as exc:
            failure = str(exc)
        extra = sorted(saved.keys() - {weight.name for weight in weights})
        if failure is None and extra:
            failure = f"{directory}: tensor '{extra[0]}' is not a weight of the trained model"
    handles: dict[str, Any] = {}
    for weight, live in _gathered(weights):
        if not main or failure is not None:
            continue
        file = saved.get(weight.name)
        if file is None:
            failure = f"{directory}: tensor '{weight.name}' is missing from the saved files"
            continue
        if file not in handles:
            handles = {file: safe_open(directory / file, framework="pt")}  # one file open at a time
        try:  # safetensors' own errors too: this process must go on taking part in the gathers
            check_one_tensor(
                directory, weight.name, handles[file].get_tensor(weight.name), live, True, each_nonzero and weight.trainable
            )
        except Exception as exc:
            failure = str(exc) if isinstance(exc, VerificationError) else f"{directory / file}: {exc}"
    return len(weights), failure


def renames_weights_on_save(model: Any) -> bool:
    """True when transformers' `save_pretrained` renames or converts this model's weights (its weight
    conversion mapping: Mixtral's experts, some vision-language models). The streamed save writes the
    names the model holds in memory, which `from_pretrained` of such a model would not read back, so
    it is saved through a gathered copy instead."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # a transformers without conversions saves the names it holds
        return False
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built from a config rather than from_pretrained: transformers' default
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    return any(not isinstance(conversion, PrefixChange) for conversion in conversions)
