"""oneDNN's products against torch's: the same values and gradients, and oneDNN really runs them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peftrun.cpu import matmul as cpu_matmul
from peftrun.cpu.fused_lora import FusedLoraLinear, fuse_lora_layers
from peftrun.cpu.matmul import (
    OneDNNLinear,
    bucket_step,
    input_grad,
    linear,
    use_cpu_matmul,
    weight_grad,
)

pytestmark = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="torch built without oneDNN")


def _onednn_inputs(fn: Callable[[], Any]) -> list[list[int]]:
    """The input shapes of the products `fn` ran through oneDNN's linear (from torch's profiler)."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()
    return [list(e.input_shapes[0]) for e in prof.events() if e.name == "mkldnn::_linear_pointwise"]


def _onednn_calls(fn: Callable[[], Any]) -> int:
    return len(_onednn_inputs(fn))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to fp32 rounding: two BLAS libraries sum in different orders (a few ulps of the largest)."""
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-5 * want.abs().max().item())


def _close_to_float64(got: torch.Tensor, want64: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    _close(got.double(), want64)


@pytest.mark.parametrize("rows", [1280, 1150, 1101])  # a full bucket (of 256), and two that are not
def test_products_equal_float64_for_any_token_count(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_matmul, "BUCKETED_MIN_MACS", 0)  # these small products take the bucketed routes
    torch.manual_seed(0)
    x, wide, narrow, bias = torch.randn(rows, 96), torch.randn(300, 96), torch.randn(80, 96), torch.randn(300)
    grad, thin = torch.randn(rows, 300), torch.randn(rows, 8)
    x64, wide64, grad64 = x.double(), wide.double(), grad.double()
    _close_to_float64(linear(x.view(1, rows, 96), wide, bias)[0], x64 @ wide64.t() + bias.double())
    _close_to_float64(linear(x, narrow), x64 @ narrow.double().t())  # wider in than out
    _close_to_float64(input_grad(grad, wide), grad64 @ wide64)
    _close_to_float64(weight_grad(grad, x), grad64.t() @ x64)
    _close_to_float64(weight_grad(grad, thin), grad64.t() @ thin.double())
    _close_to_float64(weight_grad(thin, x), thin.double().t() @ x64)
    # Every product oneDNN ran saw a token count rounded to its bucket (kernels per bucket, not per count).
    shapes = _onednn_inputs(lambda: (linear(x, wide), linear(x, narrow), input_grad(grad, wide)))
    assert len(shapes) == 3
    assert bucket_step(rows) == 256
    assert all(shape[0] % 256 == 0 for shape in shapes), shapes
    # Weight gradients contract over the tokens: oneDNN only takes counts that fill their bucket.
    assert _onednn_calls(lambda: weight_grad(grad, x)) == (1 if rows % 256 == 0 else 0)


def test_off_bucket_token_counts_take_onednn_only_for_large_products() -> None:
    weight = torch.randn(512, 512)
    assert _onednn_calls(lambda: linear(torch.randn(1280, 512), weight)) == 1  # a full bucket
    assert _onednn_calls(lambda: linear(torch.randn(1150, 512), weight)) == 0  # 0.3G multiply-adds
    head = torch.randn(8000, 512)  # an LM head: 4.7G multiply-adds, worth a kernel per bucket
    assert _onednn_inputs(lambda: linear(torch.randn(1150, 512), head)) == [[1280, 512]]


def test_small_products_and_other_dtypes_keep_torchs_path() -> None:
    small, weight = torch.randn(8, 32), torch.randn(16, 32)
    assert _onednn_calls(lambda: linear(small, weight)) == 0
    big = torch.randn(2048, 64, dtype=torch.float64)
    assert _onednn_calls(lambda: linear(big, torch.randn(64, 64, dtype=torch.float64))) == 0
    assert _onednn_calls(lambda: linear(torch.randn(2048, 64), torch.randn(64, 64), onednn=False)) == 0


@pytest.mark.parametrize("trainable_weight", [True, False])
def test_onednn_linear_gives_nn_linears_values_and_gradients(trainable_weight: bool) -> None:
    torch.manual_seed(0)
    reference = nn.Linear(128, 192)
    reference.weight.requires_grad_(trainable_weight)
    layer = copy.deepcopy(reference)
    assert use_cpu_matmul(nn.Sequential(layer), "onednn")
    assert type(layer) is OneDNNLinear
    x, upstream = torch.randn(4, 128, 128), torch.randn(4, 128, 192)  # 512 tokens: a full bucket

    def step(module: nn.Module) -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        out = module(inputs)
        out.backward(upstream)
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        return [out.detach(), inputs.grad, *grads]

    want = step(reference)
    calls = _onednn_calls(lambda: step(layer))
    got = step(layer)
    assert len(got) == (4 if trainable_weight else 3)
    for w, g in zip(want, got, strict=True):
        _close(g, w)
    # forward, input gradient and (when trained) the weight gradient
    assert calls == (3 if trainable_weight else 2)


def test_use_cpu_matmul_changes_plain_linears_only_and_keeps_the_state_dict() -> None:
    class Scaled(nn.Linear):  # a subclass has its own forward: it is left alone
        pass

    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 8), nn.LayerNorm(8))
    keys = list(model.state_dict())
    assert not use_cpu_matmul(model, "torch")
    assert type(model[0]) is nn.Linear
    assert use_cpu_matmul(model, "onednn")
    assert [type(m) for m in model] == [OneDNNLinear, Scaled, nn.LayerNorm]
    assert list(model.state_dict()) == keys


def test_fused_lora_through_onednn_equals_peft() -> None:
    """The fused layer's products through oneDNN (shapes above MIN_MACS, with dropout 0)."""
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["0"])
    reference = get_peft_model(nn.Sequential(nn.Linear(256, 256)), lora)
    for name, param in reference.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    fused: Any = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    assert use_cpu_matmul(fused, "onednn")
    layer = fused.base_model.model[0]
    assert type(layer) is FusedLoraLinear
    assert {type(layer.base_layer), type(layer.lora_A.default), type(layer.lora_B.default)} == {OneDNNLinear}
    x, upstream = torch.randn(4, 256, 256), torch.randn(4, 256, 256)

    def step(model: Any) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        out = model.train()(inputs)
        out.backward(upstream)
        return [out.detach(), inputs.grad, *(p.grad for p in model.parameters() if p.requires_grad)]

    want = step(reference)
    calls = _onednn_calls(lambda: step(fused))
    got = step(fused)
    for w, g in zip(want, got, strict=True):
        _close(g, w)
    # base + A forward; backward: base input gradient, B's input gradient, A's and B's weight gradients
    assert calls == 6


def test_training_through_onednn_gives_torchs_losses(
    write_recipe: Any, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packed LoRA run (dropout on) with every product above MIN_MACS through oneDNN: the losses of the
    same run through torch's BLAS, and the saved adapter passes peftrun's own verification."""
    from transformers import AutoTokenizer

    from peftrun.demo.tiny import build_llama
    from peftrun.recipe.load import load_recipe
    from peftrun.train.loop import train

    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_llama)
    wide = build_llama(tmp_path / "wide", tokenizer, hidden_size=256)
    monkeypatch.setattr(cpu_matmul, "BUCKETED_MIN_MACS", 0)  # any token count: the rows are not full
    calls = []
    real = cpu_matmul._onednn

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, weight, bias)

    monkeypatch.setattr(cpu_matmul, "_onednn", counting)
    losses = {}
    for choice in ("onednn", "torch"):
        recipe = write_recipe(
            output_dir=str(tmp_path / choice),
            model={"name_or_path": str(wide)},
            method={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
            data={"packing": True, "max_seq_len": 256},
            train={"max_steps": 3, "micro_batch_size": 4},
            cpu={"matmul": choice},
        )
        result = train(load_recipe(recipe, []))
        assert result.final_dir is not None  # saved and verified (tensors, reload logits)
        losses[choice] = result.losses
        if choice == "onednn":
            assert calls, "no product ran through oneDNN"
            calls_with_onednn = len(calls)
    assert len(calls) == calls_with_onednn  # torch's run made none
    torch.testing.assert_close(losses["onednn"], losses["torch"], rtol=1e-5, atol=0)
