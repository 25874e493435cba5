"""What a recipe's model holds, counted on the meta device: parameters by role and the shapes that
size its activations. No weights are loaded; a 70B config is counted in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftrun.recipe.schema import QuantizationConfig, Recipe

# bitsandbytes' AdamW8bit keeps 32-bit state for tensors smaller than this (its min_8bit_size).
MIN_8BIT_SIZE = 4096
BNB_BLOCK = 2048  # AdamW8bit's quantisation block: one fp32 absmax per block and moment


@dataclass(frozen=True)
class Census:
    """Parameter counts and bytes of the model as it trains, and its decoder's dimensions."""

    architecture: str
    params: int
    trainable: int
    weight_bytes: int  # every parameter as stored (4/8-bit weights as packed, with their constants)
    float_params: int  # parameters in a float dtype (DeepSpeed's bf16/fp16 cast reaches these)
    weight_bytes_float: int  # their bytes
    quantized_params: int
    trainable_bytes: int  # the trainable parameters' own bytes (their dtype)
    trainable_small: int  # trainable elements in tensors under MIN_8BIT_SIZE (8-bit AdamW keeps fp32)
    trainable_tensors: int
    largest_layer_params: int  # DeepSpeed's largest_layer_params: the biggest module's own parameters
    persistent_params: int  # under ZeRO-3, tensors below its persistence threshold stay whole
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_rank: int
    lora_dropout: float
    lora_targets: frozenset[str]  # leaf names of the decoder's linear layers with an adapter
    trained_linears: frozenset[str]  # leaf names of the decoder's linear layers whose weight trains
    norms_train: bool
    head_trains: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def count_model(recipe: Recipe, model_config: Any) -> Census:
    """Build the recipe's model on the meta device, apply its method, and count what it holds."""
    from peftrun.model.load import DTYPES, apply_method_checked, meta_model

    model = meta_model(recipe, model_config, dtype=DTYPES[recipe.model.dtype])
    quant = recipe.model.quantization
    quantized = _quantized_weights(model) if quant is not None else set()
    model = apply_method_checked(model, recipe)
    head = model.get_output_embeddings()
    seen: set[int] = set()
    params = trainable = weight_bytes = float_params = float_bytes = quantized_params = 0
    trainable_bytes = trainable_small = tensors = persistent = 0
    threshold = 10 * _dim(model_config, "hidden_size", "d_model", "n_embd")  # accelerate's "auto"
    for param in model.parameters():
        if id(param) in seen:  # tied embeddings are one tensor
            continue
        seen.add(id(param))
        n = param.numel()
        params += n
        if id(param) in quantized:
            quantized_params += n
            weight_bytes += _quantized_bytes(param, quant)  # type: ignore[arg-type]
            continue
        # peft's prepare_model_for_kbit_training casts every other half-precision parameter to fp32.
        size = 4 if quant is not None else param.element_size()
        weight_bytes += n * size
        float_params += n
        float_bytes += n * size
        persistent += n if n < threshold else 0
        if param.requires_grad:
            trainable += n
            trainable_bytes += n * size
            tensors += 1
            trainable_small += n if n < MIN_8BIT_SIZE else 0
    return Census(
        architecture=type(model_config).__name__.removesuffix("Config"),
        params=params,
        trainable=trainable,
        weight_bytes=weight_bytes,
        float_params=float_params,
        weight_bytes_float=float_bytes,
        quantized_params=quantized_params,
        trainable_bytes=trainable_bytes,
        trainable_small=trainable_small,
        trainable_tensors=tensors,
        largest_layer_params=max(
            sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
        ),
        persistent_params=persistent,
        **_dimensions(model_config),
        **_adapter_layout(model, recipe),
        norms_train=any(p.requires_grad for n, p in model.named_parameters() if "norm" in n),
        head_trains=head is not None and any(p.requires_grad for p in head.parameters()),
    )


def _quantized_weights(model: Any) -> set[int]:
    """The weights bitsandbytes quantizes: every linear layer's but the output head's (transformers
    keeps the head, and so tied embeddings, in full precision)."""
    head = model.get_output_embeddings()
    return {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def _quantized_bytes(param: torch.Tensor, quant: QuantizationConfig) -> int:
    """Bytes of one weight as bitsandbytes stores it."""
    n = param.numel()
    if quant.bits == 8:  # int8 values and one fp32 scale per output row (LLM.int8's SCB)
        return n + 4 * param.shape[0]
    blocks = -(-n // 64)  # NF4/FP4: two values per byte, one absmax per block of 64
    if quant.double_quant:  # absmax as int8, with one fp32 constant per 256 of them
        return n // 2 + blocks + 4 * -(-blocks // 256)
    return n // 2 + 4 * blocks


def _dim(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def _dimensions(config: Any) -> dict[str, Any]:
    text = getattr(config, "text_config", None) or config  # multimodal configs nest the decoder's
    hidden = _dim(text, "hidden_size", "d_model", "n_embd")
    heads = _dim(text, "num_attention_heads", "n_head") or 1
    return {
        "layers": _dim(text, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden": hidden,
        "intermediate": _dim(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        "heads": heads,
        "kv_heads": _dim(text, "num_key_value_heads") or heads,
        "head_dim": _dim(text, "head_dim") or hidden // heads,
        "vocab": _dim(text, "vocab_size"),
    }


def _adapter_layout(model: Any, recipe: Recipe) -> dict[str, Any]:
    """Which of the decoder's linear layers carry a LoRA adapter, and which train their own weight."""
    targets: set[str] = set()
    trained: set[str] = set()
    rank = 0
    for name, module in model.named_modules():
        if ".lora_" in name:  # the adapter's own A/B layers
            continue
        leaf = name.rsplit(".", 1)[-1]
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and len(lora_a):
            targets.add(leaf)
            rank = max([rank, *(int(getattr(m, "out_features", 0)) for m in lora_a.values())])
        elif isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            trained.add(leaf)
    options = recipe.method.options
    dropout = float(options.get("lora_dropout", options.get("dropout", 0.0)) or 0.0) if targets else 0.0
    return {
        "lora_rank": rank,
        "lora_dropout": dropout,
        "lora_targets": frozenset(targets),
        "trained_linears": frozenset(trained),
    }
