"""The fused LoRA linear against peft's own layer: same values, same gradients, same dropout law."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peftrun.cpu.fused_lora import FusedLoraLinear, fuse_lora_layers, keep_mask, next_seed


def _lora_pair(dropout: float, **config: Any) -> tuple[Any, Any]:
    """Two identical peft models over one frozen linear layer: peft's as is, and a fused copy."""
    import copy

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], **config)
    reference = get_peft_model(base, lora)
    # Non-zero B, so the LoRA path contributes to values and to the gradient of A.
    for name, param in reference.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    fused = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    return reference.train(), fused.train()


def _step(model: Any, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(upstream)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, *(grads[n] for n in sorted(grads))


def test_without_dropout_values_and_gradients_equal_peft() -> None:
    reference, fused = _lora_pair(0.0)
    assert type(fused.base_model.model[0]) is FusedLoraLinear
    x, upstream = torch.randn(3, 5, 32), torch.randn(3, 5, 24)
    for want, got in zip(_step(reference, x, upstream), _step(fused, x, upstream), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_with_dropout_it_equals_peft_given_the_same_mask() -> None:
    reference, fused = _lora_pair(0.25)
    x, upstream = torch.randn(4, 7, 32), torch.randn(4, 7, 24)
    torch.manual_seed(123)
    got = _step(fused, x, upstream)
    # The same seed draw gives the mask the fused layer used; apply it the way peft's dropout would.
    torch.manual_seed(123)
    keep, scale = keep_mask(torch.Size([28, 32]), 0.25, next_seed())
    layer = reference.base_model.model[0]
    layer.lora_dropout["default"] = _FixedMask(keep.view(4, 7, 32), scale)
    want = _step(reference, x, upstream)
    assert 0 < int((~keep).sum()) < keep.numel()  # the mask dropped something, not everything
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


class _FixedMask(nn.Module):
    def __init__(self, keep: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.keep, self.scale = keep, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep * self.scale


def test_keep_mask_keeps_one_minus_p_and_scales_to_an_exact_mean() -> None:
    keep, scale = keep_mask(torch.Size([1000, 1000]), 0.1, seed=7)
    kept = keep.float().mean().item()
    # 1e6 Bernoulli(0.9) draws: the standard deviation of the mean is 3e-4.
    assert abs(kept - 0.9) < 1.5e-3
    # p is drawn to 16 bits: 6554 / 2**16 = 0.100006, and survivors are scaled by exactly its inverse.
    assert scale == pytest.approx(1 / (1 - 6554 / 2**16), rel=1e-12)
    assert scale == pytest.approx(1 / 0.9, rel=1e-4)
    odd, _ = keep_mask(torch.Size([7, 5]), 0.5, seed=7)  # a count that is not a multiple of 4 words
    assert odd.shape == (7, 5) and 0 < int(odd.sum()) < 35
    other, _ = keep_mask(torch.Size([1000, 1000]), 0.1, seed=8)
    assert (keep != other).any()
    same, _ = keep_mask(torch.Size([1000, 1000]), 0.1, seed=7)
    assert torch.equal(keep, same)


def test_torch_seed_decides_the_masks() -> None:
    _, fused = _lora_pair(0.5)
    x = torch.randn(2, 6, 32)
    torch.manual_seed(5)
    first = fused(x)
    torch.manual_seed(5)
    again = fused(x)
    later = fused(x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(later, first)


def test_eval_and_other_paths_run_peft_forward() -> None:
    reference, fused = _lora_pair(0.5)
    x = torch.randn(2, 3, 32)
    reference.eval(), fused.eval()
    torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)
    # Autocast is peft's business too: the fused path is for plain float CPU training.
    fused.train()
    layer = fused.base_model.model[0]
    assert layer._fusable_adapter(x, (), {}) == "default"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fusable_adapter(x, (), {}) is None
    with fused.disable_adapter():
        assert layer._fusable_adapter(x, (), {}) is None


def test_dora_keeps_peft_forward() -> None:
    _, fused = _lora_pair(0.1, use_dora=True)
    layer = fused.base_model.model[0]
    assert layer._fusable_adapter(torch.randn(2, 32), (), {}) is None


def test_a_fused_model_saves_the_same_adapter(tmp_path: Path) -> None:
    reference, fused = _lora_pair(0.1)
    reference.save_pretrained(tmp_path / "peft")
    fused.save_pretrained(tmp_path / "fused")
    from safetensors.torch import load_file

    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key])
