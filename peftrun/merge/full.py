"""The full verdict: layer by layer where the architecture allows (one block of weights in memory), else
the whole model, one copy at a time, after checking that it fits.

The reference is what was trained: base + adapter through peft's own layers, in fp32; for a QLoRA merge
into the dequantized weights (the default), the base as the 4-bit model held it (bitsandbytes' own
quantize/dequantize round trip of every 4-bit weight).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peftrun.errors import UserError
from peftrun.merge.sources import MergeInputs, read_base_config
from peftrun.merge.verdict import (
    MergedFiles,
    MergeVerificationError,
    Verdict,
    adapter_layers,
    compare_logits,
    layer_by_layer,
    probe_logits,
)
from peftrun.merge.walk import Source, WalkUnsupported
from peftrun.model.load import DTYPES
from peftrun.run.verify import logit_tolerance

# The whole-model verdict holds the fp32 reference (and, briefly, what loading it copies): parameters x
# 4 bytes x this, checked against the memory available before loading.
WHOLE_MODEL_OVERHEAD = 1.3


def full_verdict(
    inputs: MergeInputs,
    merged_dir: Path,
    dtype: torch.dtype,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
    round_tripped: frozenset[str] | None,
    light: Callable[[], Verdict] | None,
) -> Verdict:
    """The verdict (not yet checked against its tolerance). `light`: the light check, where the merge
    was streamed (the fallback when the whole model does not fit)."""
    quant = inputs.quantization
    # The reference is what was trained: the 4-bit base for a round-trip QLoRA merge, else the fp32 base.
    reference_quantized = round_tripped is not None and quant is not None
    tolerance = logit_tolerance(dtype, quantized=False)
    if reference_quantized and quant is not None:
        tolerance = max(tolerance, logit_tolerance(DTYPES[quant.compute_dtype], quantized=True))
    try:
        return _layer_by_layer(inputs, merged_dir, base_weight, round_tripped, tolerance)
    except WalkUnsupported as exc:
        why = f"the full verdict cannot run {inputs.base} layer by layer ({exc})"
    needed, available = whole_model_bytes(inputs), available_bytes()
    if available is not None and needed > available:
        shortfall = f"{why}; the whole model needs about {_size(needed)}, {_size(available)} are available"
        if light is None:
            raise UserError(f"{shortfall}: not verified, nothing published (free memory and rerun)")
        verdict = light()
        verdict.notes.append(f"{shortfall}: ran the light check instead")
        return verdict
    verdict = _whole_model(inputs, merged_dir, dtype, reference_quantized, tolerance)
    verdict.notes.append(f"{why}: compared the whole models, one at a time")
    return verdict


def _layer_by_layer(
    inputs: MergeInputs,
    merged_dir: Path,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
    round_tripped: frozenset[str] | None,
    tolerance: float,
) -> Verdict:
    from peftrun.merge.qlora import nf4_round_trip, quantized_weight_names
    from peftrun.merge.walk import weightless_model

    base, merged = MergedFiles(inputs.base_dir), MergedFiles(merged_dir)
    if not base.weight_map:
        raise WalkUnsupported("its weights are not in safetensors")
    quant = inputs.quantization
    adapter = adapter_layers(inputs.adapter_dir)
    label = "base + adapter through peft's layers (fp32)"
    if round_tripped is not None and quant is not None:
        label = f"the trained model: {quant.bits}-bit {quant.quant_type} base + adapter through peft's layers"
    unchanged = frozenset() if round_tripped is None else round_tripped

    def base_rows(transformed: frozenset[str]) -> Callable[[str, list[int] | slice], torch.Tensor | None]:
        # Rows as saved, for the weights the reference does not transform (a 4-bit round trip needs them whole).
        return lambda name, index: None if name in transformed else base.rows(name, index)

    reference = Source(
        label, lambda name: base_weight(name, _read(base, name)), adapter, base_rows(unchanged)
    )
    trained = None
    if quant is not None and round_tripped is None:
        # Merged into the original weights: also measure how far that is from the trained 4-bit model.
        skeleton = weightless_model(inputs)
        quantized = frozenset(quantized_weight_names(skeleton))
        to_4bit = nf4_round_trip(quantized, quant, inputs.base_dtype)
        trained = Source(
            "the trained model", lambda name: to_4bit(name, _read(base, name)), adapter, base_rows(quantized)
        )
    merged_source = Source("the merged checkpoint", lambda name: _read_merged(merged, name), rows=merged.rows)
    vocab_size = int(read_base_config(inputs.base_dir).get("vocab_size") or 2)
    verdict, from_trained = layer_by_layer(
        weightless_model(inputs), reference, merged_source, tolerance, vocab_size, trained
    )
    if from_trained is not None and quant is not None:
        verdict.notes.append(_quantization_note(quant.bits, from_trained.max_rel))
    return verdict


def _read(files: MergedFiles, name: str) -> torch.Tensor:
    if name not in files.weight_map:
        raise WalkUnsupported(f"{files.directory} has no tensor '{name}'")
    return files.get(name)


def _read_merged(files: MergedFiles, name: str) -> torch.Tensor:
    if name not in files.weight_map:
        raise MergeVerificationError(f"the merged checkpoint lacks tensor '{name}'")
    return files.get(name)


def _whole_model(
    inputs: MergeInputs, merged_dir: Path, dtype: torch.dtype, reference_quantized: bool, tolerance: float
) -> Verdict:
    from peft import PeftModel

    from peftrun.merge import load_adapter_base

    quant = inputs.quantization
    vocab_size = int(read_base_config(inputs.base_dir).get("vocab_size") or 2)
    label = "base + adapter through peft (fp32)"
    if reference_quantized and quant is not None:
        label = f"the trained model: {quant.bits}-bit {quant.quant_type} base + adapter through peft"

    def reference(quantized: bool) -> Callable[[], Any]:
        return lambda: PeftModel.from_pretrained(
            load_adapter_base(inputs, torch.float32, quantized=quantized), inputs.adapter_dir
        )

    def merged() -> Any:
        return inputs.task.model_class().from_pretrained(
            merged_dir, dtype=dtype, trust_remote_code=inputs.trust_remote_code
        )

    merged_logits = probe_logits(merged, vocab_size)  # compared with one or two references below
    verdict = compare_logits(
        probe_logits(reference(reference_quantized), vocab_size), merged_logits, tolerance, label
    )
    if quant is not None and not reference_quantized:
        trained = compare_logits(probe_logits(reference(True), vocab_size), merged_logits, float("inf"), "")
        verdict.notes.append(_quantization_note(quant.bits, trained.max_rel))
    return verdict


def _quantization_note(bits: int, max_rel: float) -> str:
    return (
        f"merged into the original (unquantized) weights: vs the trained {bits}-bit model the logits differ "
        f"by max rel {max_rel:.2e} (the quantization error; --qlora-base dequantized removes it)"
    )


def check_whole_model_fits(inputs: MergeInputs, what: str) -> None:
    """A clear error before loading, rather than the process being killed halfway."""
    needed, available = whole_model_bytes(inputs), available_bytes()
    if available is not None and needed > available:
        raise UserError(
            f"{what} holds the whole model in fp32: about {_size(needed)}, and {_size(available)} are "
            "available; nothing was written"
        )


def whole_model_bytes(inputs: MergeInputs) -> int:
    """What the whole-model verdict holds at its peak: the fp32 reference with its adapter."""
    from peftrun.merge.walk import weightless_model

    params = sum(p.numel() for p in weightless_model(inputs).parameters())
    adapter = sum(f.stat().st_size for f in inputs.adapter_dir.glob("*.safetensors"))
    return int(params * 4 * WHOLE_MODEL_OVERHEAD) + adapter


def available_bytes() -> int | None:
    """Memory the process can still take (Linux's MemAvailable); None where it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
