"""The LoRA family's merge, one base weight at a time, in fp32.

A LoRA adapter changes each weight it targets by `scaling * B @ A` (scaling = alpha / r, or
alpha / sqrt(r) with rsLoRA); DoRA then rescales each output row of the sum to its learned magnitude;
modules_to_save replace a weight outright. Everything else about an adapter (other peft methods, LoRA
variants with biases or extra parameters, tied weights) is left to peft's own merge_and_unload: `plan`
returns the reason instead of a plan, and the caller says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from peftrun.errors import UserError

PEFT_PREFIX = "base_model.model."
# adapter_config options that change what a merged weight is; streaming knows none of them.
VARIANT_OPTIONS = (
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "use_qalora",
    "use_bdlora",
    "monteclora_config",
    "velora_config",
    "kasa_config",
)
# Adapter tensor suffixes -> (part of the update, layer kind)
PARTS = {
    "lora_A.weight": ("A", "linear"),
    "lora_B.weight": ("B", "linear"),
    "lora_magnitude_vector": ("magnitude", "linear"),
    "lora_embedding_A": ("A", "embedding"),
    "lora_embedding_B": ("B", "embedding"),
}


@dataclass
class LoraUpdate:
    """What one adapted module adds to its base weight."""

    module: str
    kind: str  # 'linear' (nn.Linear; GPT-2's Conv1D with fan_in_fan_out) or 'embedding'
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA
    fan_in_fan_out: bool = False  # weight stored [in, out] (Conv1D)

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in the base weight's own layout."""
        product = self.B.float() @ self.A.float()
        if self.kind == "embedding" or self.fan_in_fan_out:
            product = product.T
        return product * self.scaling

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight in fp32 (the caller casts)."""
        merged = weight.float() + self.delta()
        if self.magnitude is None:
            return merged
        # DoRA: each output row of W + dW rescaled to its magnitude (rows are columns under fan_in_fan_out).
        rows = merged.T if self.fan_in_fan_out else merged
        rows = rows * (self.magnitude.float() / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
        return rows.T if self.fan_in_fan_out else rows


@dataclass
class MergePlan:
    """Per base-weight name: the update to apply, or the tensor that replaces it (modules_to_save)."""

    updates: dict[str, LoraUpdate]
    replacements: dict[str, torch.Tensor]

    def base_of(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The weight an update applies to: an adapted embedding saved with its base layer brings its own."""
        return self.replacements.get(name, tensor)

    def touched(self) -> set[str]:
        return set(self.updates) | set(self.replacements)

    def describe(self) -> str:
        kinds = sorted({("DoRA" if u.magnitude is not None else "LoRA") for u in self.updates.values()})
        saved = (
            f", {len(self.replacements)} replaced weight(s) (modules_to_save)" if self.replacements else ""
        )
        return f"{len(self.updates)} {'/'.join(kinds) or 'LoRA'} weight update(s){saved}"


def scaling_for(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling of one module: rank/alpha patterns resolved with peft's own key matcher."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"])
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def plan(config: dict[str, Any], tensors: dict[str, torch.Tensor], skeleton: Any) -> MergePlan | str:
    """The merge of a saved adapter as per-weight updates, or why it cannot be streamed.

    `skeleton` is the base model built on the meta device (no memory): it tells the layer type of every
    module and which weights are tied, and it is where an adapter trained on another base shows.
    """
    if str(config.get("peft_type", "")).upper() != "LORA":
        return f"{config.get('peft_type')} adapters"
    variants = [name for name in VARIANT_OPTIONS if config.get(name)]
    if variants:
        return f"LoRA with {', '.join(variants)}"
    modules = dict(skeleton.named_modules())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        matched = next(((s, p) for s, p in PARTS.items() if name.endswith("." + s)), None)
        if matched is None:
            # The whole new weight: modules_to_save, or an adapted embedding saved with its base layer
            # (peft does so when embeddings are targeted, in case the vocabulary was resized).
            name = name.replace(".base_layer.", ".")
            module, _, param = name.rpartition(".")
            _check_module(modules, module, key, skeleton)
            expected = getattr(modules[module], param, None)
            if not isinstance(expected, torch.Tensor):
                return f"adapter tensor '{key}' that is not a weight of the base"
            _check_shape(key, tuple(tensor.shape), tuple(expected.shape), f"{module}.{param}")
            replacements[name] = tensor
            continue
        suffix, (part, kind) = matched
        module = name[: -len(suffix) - 1]
        _check_module(modules, module, key, skeleton)
        parts.setdefault(module, {})[part] = tensor
        kinds[module] = kind

    from transformers.pytorch_utils import Conv1D

    updates: dict[str, LoraUpdate] = {}
    for module, found in parts.items():
        layer = modules[module]
        if "A" not in found or "B" not in found:
            return f"module '{module}' without both LoRA matrices"
        kind = kinds[module]
        if kind == "embedding":
            if not isinstance(layer, torch.nn.Embedding) or "magnitude" in found:
                return f"{'DoRA on ' if 'magnitude' in found else ''}embedding '{module}'"
            weight_shape = (found["A"].shape[1], found["B"].shape[0])  # [num_embeddings, dim]
        elif isinstance(layer, torch.nn.Linear):
            weight_shape = (found["B"].shape[0], found["A"].shape[1])  # [out, in]
        elif isinstance(layer, Conv1D):
            weight_shape = (found["A"].shape[1], found["B"].shape[0])  # [in, out]
        else:
            return f"LoRA on {type(layer).__name__} layers ('{module}')"
        _check_shape(f"{PEFT_PREFIX}{module}", weight_shape, tuple(layer.weight.shape), f"{module}.weight")
        rank = found["A"].shape[0]
        updates[f"{module}.weight"] = LoraUpdate(
            module=module,
            kind=kind,
            A=found["A"],
            B=found["B"],
            scaling=scaling_for(config, module, rank),
            magnitude=found.get("magnitude"),
            fan_in_fan_out=isinstance(layer, Conv1D),
        )
    tied = _tied_parameter_names(skeleton)
    touched_tied = sorted((set(updates) | set(replacements)) & tied)
    if touched_tied:
        return f"changes to tied weights ({', '.join(touched_tied)})"
    return MergePlan(updates, replacements)


def _check_module(modules: dict[str, Any], module: str, key: str, skeleton: Any) -> None:
    if module not in modules:
        raise UserError(
            f"adapter tensor '{key}' targets module '{module}', which {type(skeleton).__name__} does not have: "
            "the adapter was trained on another base model"
        )


def _check_shape(key: str, adapter_shape: tuple[int, ...], base_shape: tuple[int, ...], weight: str) -> None:
    if adapter_shape != base_shape:
        raise UserError(
            f"adapter tensor '{key}' fits a weight of shape {list(adapter_shape)} but the base's {weight} is "
            f"{list(base_shape)}: the adapter was trained on another base model"
        )


def _tied_parameter_names(model: Any) -> set[str]:
    """Names of parameters that share one tensor with another name (embeddings tied to the LM head)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name for names in by_tensor.values() if len(names) > 1 for name in names}
