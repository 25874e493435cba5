"""tune_for_cpu: the cpu: section applied on a CPU, nothing changed on any other device."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peftrun.cpu.fused_lora import FusedLoraLinear
from peftrun.cpu.matmul import resolve
from peftrun.cpu.tune import CpuTuning, tune_for_cpu
from peftrun.recipe.schema import CpuConfig


def _lora_model() -> nn.Module:
    return get_peft_model(nn.Sequential(nn.Linear(16, 16)), LoraConfig(r=2, target_modules=["0"]))


def _layer_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def test_on_a_gpu_nothing_changes() -> None:
    model = _lora_model()
    before = _layer_types(model)
    assert tune_for_cpu(model, CpuConfig(matmul="onednn"), torch.device("cuda")) == CpuTuning()
    assert _layer_types(model) == before


def test_on_the_cpu_the_section_is_applied_and_reported() -> None:
    model = _lora_model()
    tuning = tune_for_cpu(model, CpuConfig(matmul="auto", malloc_cache=False), torch.device("cpu"))
    assert tuning.fused_lora_layers == 1 and not tuning.malloc_cache
    assert tuning.matmul == ("onednn" if resolve("auto") else "torch")
    assert FusedLoraLinear in _layer_types(model)
    plain = _lora_model()
    assert tune_for_cpu(plain, CpuConfig(matmul="torch", fused_lora=False), "cpu").fused_lora_layers == 0
    assert FusedLoraLinear not in _layer_types(plain) and nn.Linear in _layer_types(plain)


def test_a_compiled_model_keeps_its_layer_classes() -> None:
    """train.compile: inductor cannot lower oneDNN's pointwise linear, and fuses LoRA itself."""
    model = _lora_model()
    before = _layer_types(model)
    tuning = tune_for_cpu(model, CpuConfig(matmul="onednn", malloc_cache=False), "cpu", compiled=True)
    assert tuning == CpuTuning(matmul="torch", fused_lora_layers=0, malloc_cache=False)
    assert _layer_types(model) == before
