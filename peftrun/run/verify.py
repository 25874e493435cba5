"""Every saved artefact is checked before it is reported: a failed check is an error, never a warning.

Three checks, each catching a failure users of other tools have met:
1. every tensor the trained model says it should save is in the files, with its shape and values
   (the 40-byte empty adapter under ZeRO-3; only rank 0's shard saved);
2. no trained tensor is all zeros (an adapter saved before training, or a LoRA B never updated);
3. what a user's load builds from the files gives the trained model's logits on a fixed batch (wrong
   base, wrong target modules recorded, dtype drift).

Check 3 runs without a second copy of the base (docs/verify.md says how each guarantee is proven):
the saved adapter is loaded into a second adapter slot of the model in memory (peft's own loading
code, from the saved config and tensors) and its logits are compared with the trained adapter's,
through the same kernels, in the same mode and dtypes; so the tolerance is a few units in the last
place of the logits' dtype at the logits' scale, not a margin for two different computations. A
full or frozen fine-tune's files are compared tensor by tensor (one shard in memory at a time) and
its saved config must build the same architecture.
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


def saved_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a peft adapter dir or a (possibly sharded) transformers checkpoint."""
    if (directory / ADAPTER_WEIGHTS).is_file():
        return [directory / ADAPTER_WEIGHTS]
    index = directory / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    for shard in shards:
        if not (directory / shard).is_file():
            raise VerificationError(f"{directory}: missing weights file {shard}")
    return [directory / shard for shard in shards]


def read_saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a peft adapter dir or a (possibly sharded) transformers safetensors checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for file in saved_weight_files(directory):
        tensors.update(load_file(file))
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


def check_tensors(
    directory: Path,
    model: Any,
    compare_values: bool = True,
    each_nonzero: bool = True,
    expected: tuple[dict[str, torch.Tensor], set[str]] | None = None,
) -> int:
    """Check the saved tensors against the model; returns how many. `each_nonzero=False` (for adapters
    that prune, e.g. AdaLoRA) only requires the trained tensors as a whole to be non-zero. `expected`
    (what should be saved, and which of it was trained) replaces the model's own state dict where the
    model holds only a slice of each weight (ZeRO-3). The files are read one at a time: a full
    fine-tune's check holds one shard beside the model, not a second model."""
    wanted, trained = expected if expected is not None else expected_tensors(model)
    tied = _tied_names(model) if expected is None else set()
    found: set[str] = set()
    any_trained_nonzero = False
    for file in saved_weight_files(directory):
        saved = load_file(file)
        for name in saved.keys() & wanted.keys():
            check_one_tensor(
                directory, name, saved[name], wanted[name], compare_values, each_nonzero and name in trained
            )
            any_trained_nonzero = any_trained_nonzero or (name in trained and bool(saved[name].any()))
        found.update(saved)
        del saved
    missing = [name for name in wanted if name not in found and name not in tied]
    if missing:  # save_pretrained writes one copy of tied weights
        raise VerificationError(f"{directory}: tensor '{missing[0]}' is missing from the saved files")
    if trained and not any_trained_nonzero:
        raise VerificationError(f"{directory}: every trained tensor is all zeros")
    return len(wanted)


def check_one_tensor(
    directory: Path,
    name: str,
    saved: torch.Tensor,
    trained: torch.Tensor,
    compare_values: bool,
    nonzero: bool,
) -> None:
    if compare_values and tuple(saved.shape) != tuple(trained.shape):
        raise VerificationError(
            f"{directory}: tensor '{name}' saved with shape {tuple(saved.shape)}, trained shape {tuple(trained.shape)}"
        )
    if compare_values and not torch.equal(saved.to(trained.dtype), trained.detach().cpu()):
        raise VerificationError(f"{directory}: tensor '{name}' differs from the trained values")
    if nonzero and not bool(saved.any()):
        raise VerificationError(f"{directory}: trained tensor '{name}' is all zeros")


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


def probe_rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The probe batch one sample at a time: a batch's float32 logits (times two models, plus their
    difference) would be the largest tensors of the run, [batch, length, vocabulary], and set its peak
    memory at the save."""
    rows = len(batch["input_ids" if "input_ids" in batch else next(iter(batch))])
    return [
        {k: v[row : row + 1] if v.dim() and len(v) == rows else v for k, v in batch.items()}
        for row in range(rows)
    ]


def check_reload(reloaded: Any, trained: Any, batch: dict[str, torch.Tensor], tolerance: float) -> float:
    found = LogitDiff(0.0, 0.0)
    for sample in probe_rows(batch):
        found = found.worst(logit_diff(logits_on(trained, sample), logits_on(reloaded, sample)))
    return _within(found, tolerance)


def _within(found: LogitDiff, tolerance: float) -> float:
    diff = found.max_rel
    if not diff <= tolerance:
        raise VerificationError(
            f"reloaded model's logits differ from the trained model's by {diff:.3e} (> {tolerance:.0e})"
        )
    return diff


def same_kernels_tolerance(logits_dtype: torch.dtype) -> float:
    """Two units in the last place of the logits' dtype, relative to the logits' scale (max |logit|).

    For two forwards through the same kernels, in the same mode and dtypes, that differ only in where
    equal weights came from: they agree bit for bit, and the margin only absorbs reductions whose
    order a threaded kernel may change. It grows with the model through the logits' scale, not with a
    constant fitted on tiny models (bf16: 1.6e-2 of max |logit|; fp32: 2.4e-7).
    """
    return 2 * torch.finfo(logits_dtype).eps


SAVED_SLOT = "peftrun_saved"  # the adapter name the saved adapter is loaded under for its check


def check_adapter_in_memory(
    directory: Path, model: Any, batch: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """Load the saved adapter into a second slot of the trained PeftModel and compare its logits on
    `batch` with the trained adapter's; returns (max relative difference, tolerance).

    peft's own loader reads the saved adapter_config.json and tensors, as a user's
    `PeftModel.from_pretrained(base, directory)` does; the base is the one in memory, so no second
    base is loaded, and both forwards run through the same kernels in eval mode.
    """
    trained_slot, was_training = model.active_adapter, model.training
    samples = probe_rows(batch)
    expected = [logits_on(model, sample) for sample in samples]
    dtype = logits_dtype(model)
    model.load_adapter(str(directory), adapter_name=SAVED_SLOT)
    try:
        model.set_adapter(SAVED_SLOT)
        found = LogitDiff(0.0, 0.0)
        for sample, trained_logits in zip(samples, expected, strict=True):
            found = found.worst(logit_diff(trained_logits, logits_on(model, sample)))
    finally:
        model.set_adapter(trained_slot)  # also makes the trained adapter trainable again
        model.delete_adapter(SAVED_SLOT)
        model.train(was_training)  # peft's load_adapter puts the whole model in eval mode
    tolerance = same_kernels_tolerance(dtype)
    return _within(found, tolerance), tolerance


def logits_dtype(model: Any) -> torch.dtype:
    """The dtype the model's head writes its logits in (what their resolution is set by)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return torch.float32


ADAPTER_CONFIG = "adapter_config.json"
# Fields of a saved adapter config that do not change what a load builds.
_RUNTIME_FIELDS = {"inference_mode", "runtime_config", "auto_mapping"}


def check_adapter_config(directory: Path, model: Any) -> None:
    """The saved adapter_config.json describes the trained adapter, on the base it was trained on."""
    from peft import PeftConfig

    saved = PeftConfig.from_pretrained(str(directory)).to_dict()
    trained = model.peft_config[model.active_adapter].to_dict()
    for key in sorted((saved.keys() | trained.keys()) - _RUNTIME_FIELDS):
        if _comparable(saved.get(key)) != _comparable(trained.get(key)):
            raise VerificationError(
                f"{directory / ADAPTER_CONFIG}: '{key}' is {saved.get(key)!r}, the trained adapter's is {trained.get(key)!r}"
            )


def _comparable(value: Any) -> Any:
    """JSON round trips turn sets and tuples into lists (peft turns some lists back into sets)."""
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted((_comparable(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


# config.json fields that do not change what a load of a full model builds.
_MODEL_RUNTIME_FIELDS = {"use_cache", "dtype", "torch_dtype", "transformers_version", "_name_or_path"}


def check_model_config(directory: Path, model: Any) -> None:
    """A full or frozen fine-tune's saved config.json builds the trained architecture.

    With every saved tensor equal to the trained one (check_tensors), the same config means
    `from_pretrained(directory)` builds the trained model's function: its logits are the trained
    model's without loading a second copy to run them.
    """
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(str(directory)).to_dict()
    trained = model.config.to_dict()
    for key in sorted((saved.keys() | trained.keys()) - _MODEL_RUNTIME_FIELDS):
        if _comparable(saved.get(key)) != _comparable(trained.get(key)):
            raise VerificationError(
                f"{directory / 'config.json'}: '{key}' is {saved.get(key)!r}, the trained model's is {trained.get(key)!r}"
            )
