"""Every saved artefact is checked before it is reported: a failed check is an error, never a warning.

Three checks, each catching a failure users of other tools have met:
1. every tensor the trained model says it should save is in the files, with its shape and values
   (the 40-byte empty adapter under ZeRO-3; only rank 0's shard saved);
2. no trained tensor is all zeros (an adapter saved before training, or a LoRA B never updated);
3. a fresh load from disk gives the trained model's logits on a fixed batch (wrong base, wrong
   target modules recorded, dtype drift).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from peftrun.model.tasks import model_inputs

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class VerificationError(RuntimeError):
    """A saved artefact does not match what was trained."""


@dataclass
class VerifyReport:
    tensors: int
    max_logit_diff: float
    tolerance: float

    def line(self) -> str:
        return (
            f"verified: {self.tensors} tensors present and trained, reload logits max |diff| "
            f"{self.max_logit_diff:.2e} (tolerance {self.tolerance:.0e})"
        )


def read_saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a peft adapter dir or a (possibly sharded) transformers safetensors checkpoint."""
    if (directory / ADAPTER_WEIGHTS).is_file():
        return load_file(directory / ADAPTER_WEIGHTS)
    index = directory / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (directory / shard).is_file():
            raise VerificationError(f"{directory}: missing weights file {shard}")
        tensors.update(load_file(directory / shard))
    return tensors


def expected_tensors(model: Any) -> tuple[dict[str, torch.Tensor], set[str]]:
    """What `save_pretrained` should have written, and which of those names were trained."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        # An adapter file holds only what training changes (LoRA B starts at zero, so an untrained
        # save is caught); every tensor in it must have moved away from zero.
        expected = get_peft_model_state_dict(model)
        return expected, set(expected)
    expected = dict(model.state_dict())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return expected, trained


def check_tensors(directory: Path, model: Any, compare_values: bool = True, each_nonzero: bool = True) -> int:
    """Check the saved tensors against the model; returns how many. `each_nonzero=False` (for adapters
    that prune, e.g. AdaLoRA) only requires the trained tensors as a whole to be non-zero."""
    saved = read_saved_tensors(directory)
    expected, trained = expected_tensors(model)
    tied = _tied_names(model)
    for name, tensor in expected.items():
        if name not in saved:
            if name in tied:
                continue  # save_pretrained writes one copy of tied weights
            raise VerificationError(f"{directory}: tensor '{name}' is missing from the saved files")
        if compare_values and tuple(saved[name].shape) != tuple(tensor.shape):
            raise VerificationError(
                f"{directory}: tensor '{name}' saved with shape {tuple(saved[name].shape)}, trained shape {tuple(tensor.shape)}"
            )
        if compare_values and not torch.equal(saved[name].to(tensor.dtype), tensor.detach().cpu()):
            raise VerificationError(f"{directory}: tensor '{name}' differs from the trained values")
        if each_nonzero and name in trained and not bool(saved[name].any()):
            raise VerificationError(f"{directory}: trained tensor '{name}' is all zeros")
    if trained and not any(bool(saved[name].any()) for name in trained if name in saved):
        raise VerificationError(f"{directory}: every trained tensor is all zeros")
    return len(expected)


def _tied_names(model: Any) -> set[str]:
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            tied.add(name)
        seen.setdefault(key, name)
    return tied


@torch.no_grad()
def logits_on(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Every input of the batch (token ids and mask, or pixel values), none of its targets.
    out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits
    model.train(was_training)
    out = out.float().cpu()
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2 and out.dim() == 3 and out.shape[1] == mask.shape[1]:
        # Padding positions' logits mean nothing and depend on the attention kernel: compare real tokens.
        out.mul_(mask[..., None].to(out.dtype))
    return out


def logit_tolerance(dtype: torch.dtype, quantized: bool) -> float:
    if quantized:
        return 1e-2  # 4-bit matmuls dequantize per call; re-quantizing the same weights is deterministic
    return 1e-4 if dtype == torch.float32 else 5e-2


@dataclass(frozen=True)
class LogitDiff:
    max_abs: float
    scale: float  # max |expected|

    @property
    def max_rel(self) -> float:
        """max_abs over max(1, max |expected|): relative to the scale of the logits, not to each one."""
        return self.max_abs / max(1.0, self.scale)

    def worst(self, other: LogitDiff) -> LogitDiff:
        """The difference over both probes (as if their logits were compared in one tensor)."""
        return LogitDiff(max(self.max_abs, other.max_abs), max(self.scale, other.scale))


def logit_diff(
    expected: torch.Tensor,
    got: torch.Tensor,
    names: tuple[str, str] = ("reloaded model", "trained"),
    error: type[Exception] = VerificationError,
) -> LogitDiff:
    """How far one model's probe logits are from another's; `error` (naming the two) if shapes differ."""
    if got.shape != expected.shape:
        raise error(
            f"{names[0]} gives logits of shape {tuple(got.shape)}, {names[1]} {tuple(expected.shape)}"
        )
    return LogitDiff(float((got - expected).abs_().max()), float(expected.abs().max()))


def check_reload(reloaded: Any, trained: Any, batch: dict[str, torch.Tensor], tolerance: float) -> float:
    # One sample at a time: a batch's float32 logits (times two models, plus their difference) would be
    # the largest tensors of the run, [batch, length, vocabulary], and set its peak memory at the save.
    rows = len(batch["input_ids" if "input_ids" in batch else next(iter(batch))])
    found = LogitDiff(0.0, 0.0)
    for row in range(rows):
        sample = {k: v[row : row + 1] if v.dim() and len(v) == rows else v for k, v in batch.items()}
        found = found.worst(logit_diff(logits_on(trained, sample), logits_on(reloaded, sample)))
    diff = found.max_rel
    if not diff <= tolerance:
        raise VerificationError(
            f"reloaded model's logits differ from the trained model's by {diff:.3e} (> {tolerance:.0e})"
        )
    return diff
