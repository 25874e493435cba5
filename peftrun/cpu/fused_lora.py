"""Plain LoRA linear layers computed as one autograd function in CPU training.

peft computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`. On a CPU the step
is bound by memory traffic wherever it is not in the base's matmuls, and that expression spends it:
- torch draws dropout masks one element at a time (about 15 ms for a 2048 x 512 input on this
  project's 2-core machines, against 8 ms for the 2048 x 512 x 512 matmul beside it), once per
  adapted layer (q, k and v draw three masks for one input);
- every layer stores its dropped input (a float copy) and its mask for backward;
- the LoRA output is scaled and added to the base output in two more passes over [tokens, out],
  forward and backward.

Here the layer is one function: the base matmul, then the rank-r path added in place (`addmm_`).
Backward keeps the input itself (one reference, shared by q, k and v), the boolean mask and the
[tokens, r] intermediate, and recomputes the dropped input. The keep mask comes from numpy's SFC64
generator seeded by one draw from torch's generator (so `torch.manual_seed` and accelerate's
checkpointed RNG states still decide every mask), 16 random bits per element: p is rounded to a
multiple of 2**-16 and survivors are scaled by 1 / (1 - that p), so the expectation is exact. The mask
stays boolean: survivors' scale is applied to the [tokens, r] products, never to a [tokens, in] one.

It applies to peft's `lora.Linear` over a frozen `nn.Linear` with one active plain adapter (no DoRA or
other variant, no LoRA bias) whose weights share the input's dtype, on CPU tensors, in training,
without autocast and outside ZeRO-3 (whose hooks gather weights per module call). Anything else runs
peft's own forward, unchanged. Parameters, names and state dicts are peft's: the layer only changes
class. `cpu.fused_lora: false` leaves peft's layers alone, and so does any device but the CPU (see
tune.py). Its products go through oneDNN when the base layer does (`OneDNNLinear`, matmul.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from peftrun.cpu.matmul import PLAIN_LINEAR, OneDNNLinear, input_grad, linear, weight_grad


def keep_mask(shape: torch.Size, p: float, seed: int) -> tuple[torch.Tensor, float]:
    """A boolean keep mask (each element kept with probability 1 - p) and the survivors' scale."""
    count = int(np.prod(shape))
    # 16 random bits per element: half the generator's work of 32, and p within 2**-17 of the recipe's.
    words = np.random.SFC64(seed).random_raw((count + 3) // 4).view(np.int16)[:count]
    # The int16 view of uniform 16-bit words is uniform on [-2**15, 2**15): drop below a threshold.
    dropped_words = round(p * 2**16)
    keep = torch.from_numpy(words).view(shape) >= dropped_words - 2**15
    return keep, 1.0 / (1.0 - dropped_words / 2**16)


def next_seed() -> int:
    """One draw from torch's default generator, so torch's seeding decides the masks."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


class _LoraLinearFunction(torch.autograd.Function):
    """x W^T + b + scaling * dropout(x) A^T B^T, gradients for x, A and B only (the base is frozen)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        p: float,
        onednn: bool,
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = linear(flat, weight, bias, onednn)  # oneDNN where cpu.matmul chose it (matmul.py)
        keep, scale = None, 1.0
        dropped = flat
        if p > 0:
            keep, scale = keep_mask(flat.shape, p, next_seed())
            # where(), not flat * keep: a bool operand of mul is first copied to a float tensor.
            dropped = torch.where(keep, flat, 0.0)  # the survivors' scale goes on the r-wide side
        hidden = linear(dropped, lora_a, onednn=onednn).mul_(scale)  # [tokens, r]
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, hidden, keep)
        ctx.scaling, ctx.scale, ctx.x_shape, ctx.onednn = scaling, scale, x.shape, onednn
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, lora_a, lora_b, hidden, keep = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        onednn = ctx.onednn
        grad_hidden = input_grad(grad, lora_b, onednn).mul_(ctx.scaling)  # [tokens, r]
        grad_b = weight_grad(grad, hidden, onednn).mul_(ctx.scaling)
        # The dropped input is recomputed rather than kept: one pass, against a float copy per layer.
        dropped = flat if keep is None else torch.where(keep, flat, 0.0)
        grad_a = weight_grad(grad_hidden, dropped, onednn).mul_(ctx.scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if keep is None:
                grad_x = input_grad(grad, weight, onednn).addmm_(grad_hidden, lora_a)
            else:
                grad_x = input_grad(grad, weight, onednn).addcmul_(
                    input_grad(grad_hidden, lora_a, onednn), keep, value=ctx.scale
                )
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


class FusedLoraLinear(LoraLinear):
    """peft's LoRA Linear, with the training forward of a plain adapter as one function on CPU."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[adapter]
        base = self.get_base_layer()
        return _LoraLinearFunction.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            float(self.scaling[adapter]),
            float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
            type(base) is OneDNNLinear,
        )

    def _fusable_adapter(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The one active plain adapter when this call can run fused, else None (peft's forward)."""
        if not self.training or args or kwargs or self.disable_adapters or self.merged:
            return None
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        adapter = active[0]
        base = self.get_base_layer()
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        frozen_base = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        plain = (
            adapter not in self.lora_variant
            and type(base) in PLAIN_LINEAR
            and not self.fan_in_fan_out
            and type(lora_a) in PLAIN_LINEAR
            and type(lora_b) in PLAIN_LINEAR
            and lora_a.bias is None
            and lora_b.bias is None
            and isinstance(self.lora_dropout[adapter], nn.Dropout | nn.Identity)
        )
        same_dtype = base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype == x.dtype
        zero3 = hasattr(base.weight, "ds_id") or hasattr(lora_a.weight, "ds_id")
        return adapter if frozen_base and plain and same_dtype and not zero3 else None


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every peft LoRA Linear the fused training forward; returns how many layers changed."""
    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused
