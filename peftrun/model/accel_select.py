"""Which attention kernel, Liger kernels and compilation a run gets, by device and recipe.

Packed rows (data/packing.py) carry restarting position_ids and no attention mask. transformers turns
that into sample boundaries itself: variable-length kernels for flash attention (cu_seqlens from the
position ids), a block-diagonal mask for sdpa/eager/flex. On a GPU that is the fast path. On a CPU
sdpa's masked path costs the whole row squared, so there peftrun's per-sample attention
(attention.py) runs instead. Layers that are not attention (linear attention, state-space, recurrent
blocks) never see position_ids: packing them would let samples leak into each other, so it is refused.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftrun.errors import UserError, did_you_mean
from peftrun.recipe.schema import Recipe

# transformers' layer_types values for layers that attend through the attention interface.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# Families whose blocks (all or some) are state-space or recurrent: no position_ids reach them.
RECURRENT_FAMILIES = {
    "mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba", "nemotron_h", "falcon_h1",
    "granitemoehybrid", "recurrent_gemma", "rwkv", "xlstm", "lfm2", "qwen3_next", "minimax", "plamo2",
}  # fmt: skip
FLASH_PACKAGES = (("flash_attention_2", "flash_attn"), ("flash_attention_3", "flash_attn_interface"))
VARLEN_KERNELS = {"flash_attention_2", "flash_attention_3", "flash_attention_4"}


def attention_names() -> list[str]:
    """Every attention implementation name transformers accepts (its registry, plus eager)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return sorted({"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()})


def check_attn_implementation(name: str) -> str:
    """`model.attn_implementation`: a registered name, or a Hub kernel ('org/repo[@rev][:fn]')."""
    if "/" in name.split("|")[-1]:  # transformers loads these through the `kernels` package
        return name
    names = attention_names()
    if name not in names:
        raise ValueError(f"'{name}' is not an attention implementation transformers knows "
                         f"({', '.join(names)}, or a Hub kernel 'org/repo'){did_you_mean(name, names)}")  # fmt: skip
    return name


def check_packing_architecture(model_config: Any) -> None:
    """Refuse packing for models with layers that position_ids cannot separate samples in."""
    model_type = getattr(model_config, "model_type", "")
    text = getattr(model_config, "text_config", None) or model_config
    other = sorted(set(getattr(text, "layer_types", None) or []) - ATTENTION_LAYER_TYPES)
    if other or model_type in RECURRENT_FAMILIES:
        what = f"its {', '.join(other)} layers" if other else f"{model_type}'s recurrent/state-space blocks"
        raise UserError(
            f"data.packing: {what} do not see sample boundaries (they carry state across the whole "
            "row), so packed samples would leak into each other; set data.packing: false"
        )


@dataclass(frozen=True)
class AttentionChoice:
    name: str | None  # None: transformers' default
    reason: str


def choose_attention(
    recipe: Recipe, device_type: str, installed: Callable[[str], bool] | None = None
) -> AttentionChoice:
    """The attention implementation for this recipe on this device (see the module doc)."""
    installed = installed or _installed
    chosen = recipe.model.attn_implementation
    if not recipe.data.packing:
        return AttentionChoice(chosen, "model.attn_implementation" if chosen else "transformers' default")
    if device_type != "cuda":
        if chosen in (None, "sdpa"):
            return AttentionChoice("peftrun_packed_sdpa", "packing on CPU: sdpa's causal kernel per sample")
        return AttentionChoice(chosen, "model.attn_implementation")
    if chosen is not None:
        kind = "variable-length kernel" if chosen in VARLEN_KERNELS else "block-diagonal mask"
        return AttentionChoice(chosen, f"model.attn_implementation ({kind} from position_ids)")
    for name, package in FLASH_PACKAGES:
        if installed(package):
            return AttentionChoice(name, f"packing on CUDA: {package}'s variable-length kernel")
    return AttentionChoice("sdpa", "packing on CUDA without flash-attn: sdpa with a block-diagonal mask")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_liger(recipe: Recipe, cuda: bool, installed: Callable[[str], bool] | None = None) -> None:
    """train.liger needs a CUDA GPU and the liger-kernel package (its kernels are Triton)."""
    if not recipe.train.liger:
        return
    installed = installed or _installed
    if not cuda:
        raise UserError("train.liger: Liger's kernels are Triton kernels for CUDA GPUs; none is visible here")
    if not installed("liger_kernel"):
        raise UserError("train.liger: liger-kernel is not installed (pip install liger-kernel)")


def apply_liger(model: Any) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU kernels patched into the model instance, as its docs say
    (`_apply_liger_kernel_to_instance`); peft adapters on the MLP's projections still run."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


def compile_layers(model: Any) -> int:
    """torch.compile each decoder layer in place (regional compilation, as torch's recipe advises):
    every layer has the same code, so one compiled graph serves all and compiling takes seconds.
    Returns the number of layers compiled."""
    import torch

    blocks = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) and _is_decoder_stack(module)
    ]
    for stack in blocks:
        for layer in stack:
            layer.compile(dynamic=None)
    return sum(len(stack) for stack in blocks)


def _is_decoder_stack(modules: Any) -> bool:
    first = type(modules[0]).__name__
    return first.endswith(("DecoderLayer", "Block", "Layer")) and all(
        type(m).__name__ == first for m in modules
    )
