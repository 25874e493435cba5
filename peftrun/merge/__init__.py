"""peftrun merge: an adapter folded into its base, as a plain transformers checkpoint, verified.

The flow, top to bottom: check everything the user gave (dtype, shard size, output, base files, adapter
against the base's architecture) before reading a weight; merge shard by shard when the adapter is in the
LoRA family (else through peft's merge_and_unload, said out loud); write config, generation config and
tokenizer; compare with base + adapter through peft; publish by renaming the temporary directory.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftrun.errors import UserError, did_you_mean
from peftrun.merge.files import write_model_files
from peftrun.merge.lora import MergePlan, plan
from peftrun.merge.qlora import nf4_round_trip, quantized_weight_names
from peftrun.merge.sources import MergeInputs, read_base_config
from peftrun.merge.spec import DEFAULT_MAX_SHARD_SIZE, Check, QloraBase
from peftrun.merge.stream import base_weight_map, largest_file_bytes, write_merged_shards
from peftrun.merge.verdict import (
    MergedFiles,
    MergeVerificationError,
    Verdict,
    light_verdict,
)
from peftrun.model.load import DTYPES, load_model
from peftrun.recipe.schema import ModelConfig
from peftrun.run.io_checks import reading
from peftrun.run.safe_paths import check_replaceable_dir, staged_output
from peftrun.run.verify import ADAPTER_WEIGHTS, logit_tolerance

CHECKS: tuple[Check, ...] = typing.get_args(Check)


@dataclass
class MergeOptions:
    dtype: str | None = None  # None: the dtype the adapter was trained on
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    check: Check = "full"
    qlora_base: QloraBase = "dequantized"
    overwrite: bool = False


@dataclass
class MergeResult:
    out_dir: Path
    streamed: bool  # False: peft's merge_and_unload did it
    shards: int
    verdict: Verdict
    seconds: float


def merge(
    inputs: MergeInputs, out_dir: Path, options: MergeOptions, say: Callable[[str], None] = print
) -> MergeResult:
    start = time.perf_counter()
    dtype = resolve_dtype(options.dtype or inputs.base_dtype)
    max_shard_bytes = parse_size(options.max_shard_size)  # a bad size is said before any weight is read
    check_replaceable_dir(out_dir, "--out", options.overwrite)
    if not (inputs.adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{inputs.adapter_dir}: no {ADAPTER_WEIGHTS} (peftrun merges safetensors adapters)")
    weight_map = base_weight_map(inputs.base_dir)
    skeleton = meta_model(inputs)
    round_tripped, base_weight = _base_reader(inputs, options, skeleton)
    merge_plan, classifier = _merge_plan(inputs, skeleton, weight_map)
    out_dir = out_dir.resolve()
    with staged_output(out_dir) as tmp:
        shards = _write_weights(
            inputs,
            tmp,
            dtype,
            options,
            max_shard_bytes,
            merge_plan,
            weight_map,
            skeleton,
            base_weight,
            classifier,
            say,
        )
        notes = write_model_files(inputs, tmp, dtype)
        if classifier and isinstance(merge_plan, MergePlan):
            _name_architecture(tmp, type(skeleton).__name__)
        try:
            verdict = judge(
                inputs, tmp, dtype, options.check, merge_plan, weight_map, base_weight, round_tripped
            )
        except MergeVerificationError as exc:
            raise UserError(
                f"the merged checkpoint failed verification and was not published: {exc}"
            ) from None
    for note in [*notes, *verdict.notes]:
        say(f"[peftrun] {note}")
    say(f"[peftrun] {verdict.line()}")
    seconds = time.perf_counter() - start
    say(f"[peftrun] saved {out_dir}: {shards} shard(s), {_name(dtype)}, in {seconds:.1f} s")
    return MergeResult(out_dir, isinstance(merge_plan, MergePlan), shards, verdict, seconds)


def _base_reader(
    inputs: MergeInputs, options: MergeOptions, skeleton: Any
) -> tuple[frozenset[str] | None, Callable[[str, torch.Tensor], torch.Tensor]]:
    """(the weights a 4-bit round trip changes, or None; how each base weight is read).

    What the adapter was trained on: QLoRA's 4-bit weights, dequantized, unless the user asks otherwise.
    The round-tripped weights are read through it, and checked by the light verdict."""
    round_trip = (
        inputs.quantization is not None
        and inputs.quantization.bits == 4
        and options.qlora_base == "dequantized"
    )
    round_tripped = frozenset(quantized_weight_names(skeleton)) if round_trip else None
    if round_tripped is not None and inputs.quantization is not None:
        return round_tripped, nf4_round_trip(round_tripped, inputs.quantization, inputs.base_dtype)
    return round_tripped, _unchanged


def _merge_plan(
    inputs: MergeInputs, skeleton: Any, weight_map: dict[str, str] | None
) -> tuple[MergePlan | str, bool]:
    """The streamed merge's plan, or why streaming does not cover this adapter; and whether the run is a
    classifier merged by streaming (its new head comes from the adapter)."""
    from safetensors.torch import load_file

    with reading(inputs.adapter_dir / ADAPTER_WEIGHTS):  # a damaged file: one line naming it
        adapter_weights = load_file(inputs.adapter_dir / ADAPTER_WEIGHTS)
    merge_plan = plan(inputs.adapter_config, adapter_weights, skeleton)
    classifier = inputs.task.classifier and isinstance(merge_plan, MergePlan) and weight_map is not None
    if classifier and isinstance(merge_plan, MergePlan) and weight_map is not None:
        from peftrun.merge.classifier import unstreamable

        # The head comes from the adapter, not the base's files; everything else must be in them.
        merge_plan = unstreamable(merge_plan, weight_map, skeleton) or merge_plan
    elif isinstance(merge_plan, MergePlan) and weight_map is None:
        merge_plan = "bases without safetensors weights"
    elif (
        isinstance(merge_plan, MergePlan)
        and weight_map is not None
        and merge_plan.touched() - set(weight_map)
    ):
        merge_plan = "checkpoints whose tensor names differ from the model's module names"
    return merge_plan, classifier


def _write_weights(
    inputs: MergeInputs,
    tmp: Path,
    dtype: torch.dtype,
    options: MergeOptions,
    max_shard_bytes: int,
    merge_plan: MergePlan | str,
    weight_map: dict[str, str] | None,
    skeleton: Any,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
    classifier: bool,
    say: Callable[[str], None],
) -> int:
    """The merged weights into `tmp`, shard by shard where streaming covers the adapter; returns the
    number of shards written."""
    if not isinstance(merge_plan, MergePlan) or weight_map is None:
        say(
            f"[peftrun] streaming covers the LoRA family, not {merge_plan}: merging with peft's "
            "merge_and_unload, which holds the whole model in memory"
        )
        return peft_merge(inputs, tmp, dtype, options.max_shard_size, base_weight)
    say(
        f"[peftrun] merging {merge_plan.describe()} into {inputs.base} shard by shard "
        f"({len(set(weight_map.values()))} base file(s), largest "
        f"{largest_file_bytes(inputs.base_dir, weight_map) / 2**20:.1f} MiB) in fp32, saved as {_name(dtype)}"
    )
    if classifier:
        from peftrun.merge.classifier import write_classifier_shards

        return write_classifier_shards(
            inputs.base_dir, weight_map, merge_plan, skeleton, dtype, tmp, max_shard_bytes, base_weight
        )
    return write_merged_shards(
        inputs.base_dir, weight_map, merge_plan, dtype, tmp, max_shard_bytes, base_weight
    )


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(
            f"--dtype: unknown dtype '{name}'{did_you_mean(name, DTYPES)} (choose from {', '.join(DTYPES)})"
        )
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError(
            "--dtype: bf16 is not supported by this GPU (it cannot run the verdict); use fp16 or fp32"
        )
    return dtype


def parse_size(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = int(convert_file_size_to_int(text))
    except (ValueError, TypeError):
        size = 0
    if size <= 0:
        raise UserError(f"--max-shard-size: '{text}' is not a size (e.g. 2GB, 500MB)")
    return size


def meta_model(inputs: MergeInputs) -> Any:
    """The base's architecture with no memory behind it: module types, names, shapes and tied weights."""
    read_base_config(inputs.base_dir)
    config = inputs.base_config()
    with torch.device("meta"):
        return inputs.task.model_class().from_config(config, trust_remote_code=inputs.trust_remote_code)


def peft_merge(
    inputs: MergeInputs,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_size: str,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
) -> int:
    """peft's own merge of the whole model in memory (fp32), for adapters streaming does not cover."""
    from peft import PeftModel

    from peftrun.merge.full import check_whole_model_fits

    check_whole_model_fits(inputs, "peft's merge_and_unload")
    model = load_adapter_base(inputs, torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = base_weight(name, param.data).float()
    merged = PeftModel.from_pretrained(model, inputs.adapter_dir).merge_and_unload(safe_merge=True)
    merged.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    return len(list(out_dir.glob("*.safetensors")))


def load_adapter_base(inputs: MergeInputs, dtype: torch.dtype, quantized: bool = False) -> Any:
    """The base the adapter goes on (`quantized`: in the 4-bit form a QLoRA run trained on), through
    peftrun's one loader: it quantizes as training did and builds the head the run trained from (its
    size, names, seeded init)."""
    quantize = quantized and inputs.quantization is not None
    cfg = ModelConfig(name_or_path=str(inputs.base_dir), trust_remote_code=inputs.trust_remote_code)
    if quantize:
        cfg = cfg.model_copy(update={"dtype": inputs.base_dtype, "quantization": inputs.quantization})
    model = load_model(cfg, inputs.task.name, labels=inputs.labels)
    return model if quantize else model.to(dtype)


def judge(
    inputs: MergeInputs,
    merged_dir: Path,
    dtype: torch.dtype,
    check: str,
    merge_plan: MergePlan | str,
    weight_map: dict[str, str] | None,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor],
    round_tripped: frozenset[str] | None,
) -> Verdict:
    def light() -> Verdict:
        from peft import PeftConfig

        assert isinstance(merge_plan, MergePlan)
        return light_verdict(
            merge_plan,
            PeftConfig.from_pretrained(str(inputs.adapter_dir)),
            MergedFiles(inputs.base_dir),
            MergedFiles(merged_dir),
            base_weight,
            dtype,
            logit_tolerance(dtype, quantized=False),
            round_tripped or frozenset(),
        )

    # The light check compares the base's tensors one for one; a classifier has another head.
    streamed = isinstance(merge_plan, MergePlan) and weight_map is not None and not inputs.task.classifier
    if check == "light" and streamed:
        return light().check()
    from peftrun.merge.full import full_verdict

    verdict = full_verdict(inputs, merged_dir, dtype, base_weight, round_tripped, light if streamed else None)
    if check == "light":
        verdict.notes.append("light check needs a streamed LoRA merge; ran the full logits verdict instead")
    return verdict.check()


def _name_architecture(out_dir: Path, architecture: str) -> None:
    """config.json names the classifier's class (serving stacks read it), not the base's."""
    import json

    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [architecture]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _task_name(inputs: MergeInputs) -> str:
    from peftrun.model.tasks import TASKS

    return next(name for name, task in TASKS.items() if task is inputs.task)


def _unchanged(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
