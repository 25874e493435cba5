"""fp32 linear layers on CPU through oneDNN, where torch's default BLAS leaves the CPU's vector width unused.

torch's CPU wheels send fp32 matmuls to MKL. MKL picks its kernels by CPU vendor, and on CPUs that are
not Intel's it runs its AVX2 code even where the CPU has AVX-512. oneDNN, which ships inside the same
torch wheel (torch uses it for bf16 matmuls and convolutions), picks kernels by instruction set. On this
project's machines (AMD EPYC, Zen 5, AVX-512, 2 cores), measured with the throughput benchmark's shapes:

    2048 x 512 x 1376 (a base layer)      MKL ~200 GFLOP/s    oneDNN ~460 GFLOP/s
    1150 x 512 x 8000 (the LM head)       MKL ~165            oneDNN ~270
    2048 x 512 x 16   (a LoRA product)    MKL ~145            oneDNN ~280

The values are fp32 products with fp32 accumulation either way; only the order of the sums differs
(differences of a few ulps, as between two BLAS libraries).

`cpu.matmul` decides: `auto` (the default) takes oneDNN on CPUs with AVX-512, the case measured
above, and torch's own path on others; `onednn` and `torch` force one. With oneDNN chosen, every plain
`nn.Linear` of the model changes class to `OneDNNLinear` (names, parameters and state dicts unchanged)
and the fused LoRA layers over such a layer (fused_lora.py) compute their products here. The choice
lives in the model (its layers' classes), not in this module: the product functions below take it as
an argument. A product below `MIN_MACS`
multiply-adds keeps torch's path: oneDNN's fixed cost per call (~10 us) outweighs its speed there.
Anything that is not fp32 on CPU, runs under autocast or has ZeRO-3's partitioned weights goes
through torch unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftrun.errors import UserError

if TYPE_CHECKING:
    from peftrun.recipe.schema import CpuMatmul

MIN_MACS = 1 << 22  # below ~4M multiply-adds per product, torch's path is the faster (measured)
BUCKETED_MIN_MACS = 1 << 31  # token counts off a bucket: only products this large (see linear)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve(choice: CpuMatmul) -> bool:
    """Whether `choice` means oneDNN on this machine."""
    if choice == "torch":
        return False
    if choice == "onednn":
        if not onednn_available():
            raise UserError("cpu.matmul: 'onednn' is not available in this torch build (use auto or torch)")
        return True
    return onednn_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _onednn_fits(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN for this product: fp32 CPU tensors, large enough to gain."""
    return (
        a.dtype == weight.dtype == torch.float32
        and a.device.type == weight.device.type == "cpu"
        and a.numel() * weight.shape[0] >= MIN_MACS
    )


def bucket_step(rows: int) -> int:
    """Token counts are rounded up to a multiple of this: four buckets per power of two (so at most
    25% added rows from 256 rows up), never finer than 64. Measured on the benchmark's packed steps:
    64-row buckets met ~4x the shapes and ran 6% slower, with ~120 MB more peak RSS, than these."""
    return max(64, 1 << max(rows.bit_length() - 3, 0))


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = True
) -> torch.Tensor:
    """x @ weight.T (+ bias), as F.linear; x may have any leading dimensions, the weight either layout.
    `onednn=False` is torch's path for every product.

    oneDNN builds (and keeps) kernels for every shape it meets: tens of ms, and a few MB that stay,
    per product shape. Token counts that fill a bucket (`bucket_step`; packed rows do) run as they
    are. Others change from batch to batch (the supervised positions under the LM head, an unpacked
    batch's length): a product of at least BUCKETED_MIN_MACS is rounded up to its bucket, copying the
    narrower side (the input with zero rows added, or the output with its last rows computed by
    torch); a smaller one goes through torch, where a kernel per bucket and product would cost more
    memory (measured: ~60-90 MB of peak RSS for the benchmark's last-layer MLP) than it saves time.
    """
    if not (onednn and _onednn_fits(x, weight)):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    step = bucket_step(rows)
    tail = rows % step
    if tail == 0:
        out = _onednn(flat, weight, bias)
    elif flat.numel() * weight.shape[0] < BUCKETED_MIN_MACS:
        return F.linear(x, weight, bias)
    elif flat.shape[1] <= weight.shape[0]:
        out = _onednn(F.pad(flat, (0, 0, 0, step - tail)), weight, bias)[:rows]
    else:
        out = torch.cat(
            [_onednn(flat[: rows - tail], weight, bias), F.linear(flat[rows - tail :], weight, bias)]
        )
    return out.view(*x.shape[:-1], weight.shape[0])


def input_grad(grad: torch.Tensor, weight: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """grad @ weight: the input gradient of linear(x, weight) for grad [tokens, out]."""
    return linear(grad, weight.t(), onednn=onednn)


def weight_grad(grad: torch.Tensor, x: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """grad.T @ x: the weight gradient of linear(x, weight), for grad [tokens, out] and x [tokens, in].

    The tokens are the contraction here, so oneDNN takes only token counts that fill their bucket
    (packed rows do); others go through torch. oneDNN copies a strided input while its weight may be
    either layout, so the thinner of the two transposed operands is the one given as the input.
    """
    if not onednn or grad.shape[0] % bucket_step(grad.shape[0]) or not _onednn_fits(grad.t(), x.t()):
        return grad.t() @ x
    if grad.shape[1] <= x.shape[1]:
        return _onednn(grad.t().contiguous(), x.t(), None)
    return _onednn(x.t().contiguous(), grad.t(), None).t()


class _LinearFunction(torch.autograd.Function):
    """F.linear with its three products (output, input gradient, weight gradient) through `linear`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad, weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """nn.Linear whose fp32 CPU products go through oneDNN (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training  # eval's shapes (any batch, full logits) would each cost oneDNN a kernel build
            and _onednn_fits(x, self.weight)
            and not torch.is_autocast_enabled("cpu")
            and not hasattr(self.weight, "ds_id")  # ZeRO-3 frees the gathered weight after the forward
        ):
            return _LinearFunction.apply(x, self.weight, self.bias)
        return super().forward(x)


PLAIN_LINEAR = (nn.Linear, OneDNNLinear)  # the same layer, whichever path its products take


def use_cpu_matmul(model: nn.Module, choice: CpuMatmul) -> bool:
    """Resolve `choice` on this machine; with oneDNN, every plain nn.Linear of `model` uses it."""
    onednn = resolve(choice)
    if onednn:
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDNNLinear
    return onednn
