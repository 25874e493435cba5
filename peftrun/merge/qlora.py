"""QLoRA: the adapter was trained on NF4 weights, so merging into the original weights gives a model that
differs from the trained one by the quantization error. The default merges into what the 4-bit base
really held: each weight transformers quantizes goes through bitsandbytes' quantize/dequantize round trip
(the same blocks and constants as at load), then the LoRA delta is added in fp32."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import torch

from peftrun.merge.spec import QloraBase
from peftrun.model.load import DTYPES
from peftrun.recipe.schema import QuantizationConfig

QLORA_BASES: tuple[QloraBase, ...] = typing.get_args(QloraBase)


def quantized_weight_names(skeleton: Any) -> set[str]:
    """The weights transformers' bitsandbytes integration stores in 4 bits, by its own rules."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = get_keys_to_not_convert(skeleton)
    return {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, keep)
    }


def nf4_round_trip(
    names: frozenset[str], quant: QuantizationConfig, model_dtype: str
) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A function giving each base tensor as the 4-bit model held it (dequantized, in the model dtype);
    `names` are the weights it stored in 4 bits (`quantized_weight_names`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def base_weight(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in names:
            return tensor
        import bitsandbytes as bnb

        param: Any = bnb.nn.Params4bit(
            tensor.to(DTYPES[model_dtype]),
            requires_grad=False,
            compress_statistics=quant.double_quant,
            quant_type=quant.quant_type,
            quant_storage=DTYPES[quant.storage_dtype or model_dtype],
        )
        param = param.to(device)  # quantizes, as transformers' loader does
        return bnb.functional.dequantize_4bit(param.data, param.quant_state).cpu()

    return base_weight
