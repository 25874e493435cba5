"""Does the merged checkpoint behave like base + adapter? Measured, never assumed.

Full, layer by layer (the default): base + adapter through peft's own layers and the merged checkpoint,
run by the model's own forward one block of weights at a time (walk.py) on a fixed batch: every block of
the merged model against the reference's on the same hidden states (a wrong layer is named), then the two
models' logits end to end. Full, whole model (architectures the walk cannot run): the same batch through
base + adapter and the merged checkpoint loaded like a user would, one model in memory at a time. Both
report the max absolute and relative differences against a tolerance for the output dtype. Light: a
sample of merged layers against peft's own LoRA layer forward on the base weight, every replaced weight,
a sample of untouched tensors and the tensor names.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from peftrun.merge.lora import LoraUpdate, MergePlan
from peftrun.merge.stream import base_weight_map
from peftrun.merge.walk import AdapterLayers, BlockDiff, Source, run_blocks
from peftrun.run.verify import LogitDiff, logit_diff, logits_on

LIGHT_SAMPLE = 8  # merged layers (and untouched tensors) checked by the light verdict
LIGHT_ROWS = 256  # rows of each sampled untouched tensor compared


class MergeVerificationError(RuntimeError):
    """The merged checkpoint does not reproduce base + adapter."""


@dataclass
class Verdict:
    kind: str  # 'logits' (whole models, or layer by layer when `blocks` is set) or 'per-layer sample'
    max_abs: float
    max_rel: float
    tolerance: float  # on max_rel
    reference: str  # what the merged model was compared with
    notes: list[str] = field(default_factory=list)
    blocks: list[BlockDiff] = field(default_factory=list)  # layer by layer: each block, in forward order

    def line(self) -> str:
        checked, kind = "", self.kind
        if self.blocks:
            kind = "layer by layer"
            worst = max(self.blocks, key=lambda b: b.max_rel)
            checked = (
                f"{len(self.blocks)} blocks on the same hidden states, worst {worst.block} max rel diff "
                f"{worst.max_rel:.2e}; end-to-end logits: "
            )
        return (
            f"verdict ({kind}, vs {self.reference}): {checked}max |diff| {self.max_abs:.2e}, max rel diff "
            f"{self.max_rel:.2e} (tolerance {self.tolerance:.0e}): OK"
        )

    def check(self) -> Verdict:
        wrong = [b for b in self.blocks if not b.max_rel <= self.tolerance]
        if wrong:
            # Each block ran on the reference's hidden states: the first wrong one is where the merge went wrong.
            raise MergeVerificationError(
                f"block {wrong[0].block} of the merged model differs from {self.reference} on the same hidden "
                f"states: max |diff| {wrong[0].max_abs:.3e}, max rel diff {wrong[0].max_rel:.3e} > tolerance "
                f"{self.tolerance:.0e}" + (f" ({len(wrong)} blocks differ)" if len(wrong) > 1 else "")
            )
        if not self.max_rel <= self.tolerance:
            raise MergeVerificationError(
                f"the merged model differs from {self.reference}: max |diff| {self.max_abs:.3e}, max rel diff "
                f"{self.max_rel:.3e} > tolerance {self.tolerance:.0e} ({self.kind})"
            )
        return self


def probe_batch(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of random tokens, the second one left-padded: padding masks are part of what is compared."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def probe_logits(load: Callable[[], Any], vocab_size: int) -> torch.Tensor:
    """The logits of the model `load` builds on the probe batch; the model is freed before returning,
    so models are compared one at a time in memory."""
    return _logits_then_free(load(), probe_batch(vocab_size))


def compare_logits(expected: torch.Tensor, got: torch.Tensor, tolerance: float, label: str) -> Verdict:
    """The merged model's probe logits (`got`) against the reference's; padding positions are zero in
    both (see verify.logits_on)."""
    diff = logit_diff(expected, got, ("the merged model", label), MergeVerificationError)
    return Verdict("logits", diff.max_abs, diff.max_rel, tolerance, label)


def layer_by_layer(
    skeleton: Any,
    reference: Source,
    merged: Source,
    tolerance: float,
    vocab_size: int,
    also: Source | None = None,
) -> tuple[Verdict, LogitDiff | None]:
    """The merged model against the reference, one block of weights in memory at a time (walk.py);
    `skeleton`: the architecture with meta parameters and real buffers (it is consumed). With `also`,
    how far the merged model's logits are from that third model's (e.g. the trained 4-bit one)."""
    sources = [reference, merged] if also is None else [reference, merged, also]
    result = run_blocks(skeleton, sources, probe_batch(vocab_size))
    names = ("the merged model", reference.label)
    diff = logit_diff(result.logits[0], result.logits[1], names, MergeVerificationError)
    verdict = Verdict(
        "logits", diff.max_abs, diff.max_rel, tolerance, reference.label, blocks=result.blocks[0]
    )
    verdict.notes.append(
        f"full verdict layer by layer: one block in memory at a time (the largest built whole: "
        f"{result.largest_block_bytes / 2**20:.1f} MiB in fp32)"
    )
    extra = logit_diff(result.logits[2], result.logits[1], names) if also is not None else None
    return verdict, extra


def adapter_layers(adapter_dir: Path) -> AdapterLayers:
    """The adapter as peft's own layers, put on one block at a time (the walk's reference)."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    from peftrun.run.verify import ADAPTER_WEIGHTS

    return AdapterLayers(
        PeftConfig.from_pretrained(str(adapter_dir)), load_file(adapter_dir / ADAPTER_WEIGHTS)
    )


def _logits_then_free(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = logits_on(model, batch)
    del model
    gc.collect()
    return logits


class MergedFiles:
    """Read tensors back from a written checkpoint, one at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.weight_map: dict[str, str] = base_weight_map(directory) or {}

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.directory / self.weight_map[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def rows(self, name: str, index: list[int] | slice) -> torch.Tensor | None:
        """Rows of a 2-D tensor, read without the rest; None if the checkpoint has no such tensor."""
        if name not in self.weight_map:
            return None
        with safe_open(self.directory / self.weight_map[name], framework="pt") as handle:
            view = handle.get_slice(name)
            if isinstance(index, slice):
                return view[index]
            return torch.cat([view[i : i + 1] for i in index])

    def head(self, name: str, rows: int = LIGHT_ROWS) -> torch.Tensor:
        """The first rows of a tensor (an embedding's full matrix is not needed to spot a wrong copy)."""
        with safe_open(self.directory / self.weight_map[name], framework="pt") as handle:
            view = handle.get_slice(name)
            return view[:rows] if view.get_shape() else handle.get_tensor(name)


def light_verdict(
    merge_plan: MergePlan,
    adapter_config: Any,
    base: MergedFiles,
    merged: MergedFiles,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    tolerance: float,
    transformed: frozenset[str] = frozenset(),
) -> Verdict:
    """Per-layer checks that hold one weight at a time. `transformed`: names `base_weight` changes (NF4
    round trip), compared whole since a quantization block's constants depend on the whole tensor."""
    missing = sorted(set(base.weight_map) - set(merged.weight_map))
    if missing:
        raise MergeVerificationError(
            f"the merged checkpoint lacks {len(missing)} base tensor(s), e.g. {missing[0]}"
        )
    worst_abs = worst_rel = 0.0
    for name in _spread(sorted(merge_plan.updates), LIGHT_SAMPLE):
        update = merge_plan.updates[name]
        expected, got = _layer_outputs(
            update,
            adapter_config,
            base_weight(name, merge_plan.base_of(name, base.get(name))),
            merged.get(name),
        )
        diff = float((got - expected).abs().max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(1.0, float(expected.abs().max())))
    for name, tensor in merge_plan.replacements.items():
        if name not in merge_plan.updates and not torch.equal(merged.get(name), tensor.to(dtype)):
            raise MergeVerificationError(
                f"merged tensor '{name}' is not the adapter's saved module (modules_to_save)"
            )
    untouched = sorted(set(base.weight_map) - merge_plan.touched())
    for name in _spread(untouched, LIGHT_SAMPLE):
        expected_tensor = base_weight(name, base.get(name) if name in transformed else base.head(name))
        if expected_tensor.is_floating_point():
            expected_tensor = expected_tensor.to(dtype)
        got = merged.get(name) if name in transformed else merged.head(name)
        if not torch.equal(got, expected_tensor):
            raise MergeVerificationError(f"merged tensor '{name}' should be the base's, cast to {dtype}")
    checked = min(LIGHT_SAMPLE, len(merge_plan.updates))
    return Verdict(
        "per-layer sample",
        worst_abs,
        worst_rel,
        tolerance,
        f"peft's LoRA layers on the base weights ({checked} of {len(merge_plan.updates)} merged layers)",
    )


def _spread(names: list[str], count: int) -> list[str]:
    """`count` names spread evenly over the list (first and last included)."""
    if len(names) <= count:
        return names
    step = (len(names) - 1) / (count - 1)
    return [names[round(i * step)] for i in range(count)]


@torch.no_grad()
def _layer_outputs(
    update: LoraUpdate, adapter_config: Any, base_weight: torch.Tensor, merged_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(peft's LoRA layer on the base weight, the plain layer with the merged weight) on random inputs."""
    import copy

    from peft.tuners import lora
    from peft.utils.other import get_pattern_key
    from transformers.pytorch_utils import Conv1D

    rank = update.A.shape[0]
    alpha = adapter_config.alpha_pattern.get(
        get_pattern_key(list(adapter_config.alpha_pattern), update.module), adapter_config.lora_alpha
    )
    config = copy.copy(adapter_config)
    config.fan_in_fan_out = update.fan_in_fan_out
    generator = torch.Generator().manual_seed(0)
    plain: torch.nn.Module
    if update.kind == "embedding":
        plain = torch.nn.Embedding(*base_weight.shape)
        inputs = torch.randint(0, base_weight.shape[0], (4, 8), generator=generator)
        layer_cls: Any = lora.Embedding
    else:
        out_features, in_features = base_weight.shape[:: -1 if update.fan_in_fan_out else 1]
        plain = (
            Conv1D(out_features, in_features)
            if update.fan_in_fan_out
            else torch.nn.Linear(in_features, out_features, bias=False)
        )
        if update.fan_in_fan_out:
            plain.bias.zero_()
        inputs = torch.randn(4, in_features, generator=generator)
        layer_cls = lora.Linear
    plain.weight.data = base_weight.float()
    peft_layer = layer_cls(copy.deepcopy(plain), "default", config=config, r=rank, lora_alpha=alpha)
    ab = (peft_layer.lora_embedding_A, peft_layer.lora_embedding_B) if update.kind == "embedding" else None
    if ab is not None:
        ab[0]["default"].data = update.A.float()
        ab[1]["default"].data = update.B.float()
    else:
        peft_layer.lora_A["default"].weight.data = update.A.float()
        peft_layer.lora_B["default"].weight.data = update.B.float()
    if update.magnitude is not None:
        peft_layer.lora_magnitude_vector["default"].weight.data = update.magnitude.float()
    peft_layer.eval()
    expected = peft_layer(inputs)
    plain.weight.data = merged_weight.float()
    return expected, plain(inputs)
