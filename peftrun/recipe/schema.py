"""The recipe schema: the single source of truth for every setting peftrun has.

Each field's description is its documentation: `peftrun train --help`, `peftrun keys` and
docs/recipe.md are generated from these models, so a key cannot exist without being described.
Sections forbid unknown keys; `peftrun.recipe.load` turns pydantic's errors into one line each
with the file, the dotted key and a did-you-mean suggestion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from peftrun.errors import OptionError
from peftrun.model.methods import NON_ADAPTER_KINDS, check_method_options, is_prompt_learning
from peftrun.recipe.data import DataConfig
from peftrun.recipe.section import Section
from peftrun.recipe.slurm import SlurmConfig

Dtype = Literal["fp32", "bf16", "fp16"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
CpuMatmul = Literal["auto", "onednn", "torch"]  # cpu.matmul; peftrun/cpu/matmul.py resolves it

TaskName = Literal["causal_lm", "masked_lm", "sequence_classification", "image_classification"]


@dataclass(frozen=True)
class TaskTraits:
    """What the recipe knows of a task; peftrun.model.tasks adds how it is trained."""

    formats: tuple[str, ...]  # data formats it reads; the first is the default
    classifier: bool = False  # labels named by the data, a new head, classification metrics
    predicts: Literal["label", "masked_tokens"] | None = None  # what `peftrun predict` writes per row


TASK_TRAITS: dict[str, TaskTraits] = {
    "causal_lm": TaskTraits(("alpaca", "chat", "text")),
    "masked_lm": TaskTraits(("text",), predicts="masked_tokens"),
    "sequence_classification": TaskTraits(("classification",), classifier=True, predicts="label"),
    "image_classification": TaskTraits(("images",), classifier=True, predicts="label"),
}
CLASSIFIER_TASKS = frozenset(name for name, traits in TASK_TRAITS.items() if traits.classifier)


class QuantizationConfig(Section):
    """Load the base model quantized through bitsandbytes (QLoRA when combined with `method.kind: lora`)."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4/FP4, QLoRA) or 8 (LLM.int8) bit base weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA default.")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Dtype = Field("bf16", description="dtype the 4-bit matmuls compute in.")
    storage_dtype: Dtype | None = Field(
        None,
        description="bnb_4bit_quant_storage; set it to the model dtype to shard 4-bit weights under ZeRO-3/FSDP.",
    )


class ModelConfig(Section):
    """The base model and how to load it."""

    name_or_path: str = Field(description="Local directory or Hugging Face Hub id of the base model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    tokenizer: str | None = Field(None, description="Tokenizer path or id, when it differs from the model's.")
    dtype: Dtype = Field("fp32", description="dtype the base weights are loaded in (fp32, bf16, fp16).")
    quantization: QuantizationConfig | None = Field(
        None, description="bitsandbytes quantization of the base."
    )
    attn_implementation: str | None = Field(
        None,
        description="Attention kernel: any name transformers registers (eager, sdpa, flex_attention, "
        "flash_attention_2/3, ...) or a Hub kernel 'org/repo'. Default: transformers' choice; with packing, "
        "flash-attn's variable-length kernel on CUDA where installed (else sdpa with a block mask), "
        "per-sample sdpa on CPU.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    trust_remote_code: bool = Field(
        False, description="Run modelling code shipped with the model (off: safety)."
    )
    random_init: bool = Field(
        False,
        description="Start from randomly initialised weights of the model's architecture (its config) "
        "instead of its trained weights: the from-scratch baseline a fine-tune is compared with.",
    )

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str | None) -> str | None:
        from peftrun.model.accel_select import check_attn_implementation

        return value if value is None else check_attn_implementation(value)


class MethodConfig(Section):
    """What is trained.

    `kind` picks the method: `full` (every weight), `frozen` (freeze what `freeze` names, train the rest),
    or any peft adapter by name (`lora`, `ia3`, `prefix_tuning`, `prompt_tuning`, `loha`, `lokr`, `oft`,
    `vera`, `adalora`, ...). An adapter's own options sit beside `kind` and are checked against peft's
    config class for that adapter (e.g. `r`, `alpha`, `dropout`, `target_modules`, `use_dora`,
    `use_rslora`, `init_lora_weights: pissa` for LoRA). `alpha` and `dropout` are short for peft's
    `lora_alpha`/`lora_dropout`. QLoRA is `kind: lora` with `model.quantization`.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    kind: str = Field(
        "lora", description="full | frozen | a peft adapter name (lora, ia3, prefix_tuning, ...)."
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="frozen only: parameters to freeze, as name globs ('model.embed_tokens.*'), layer ranges "
        "('layers[0:4]', 'layers[:-2]') or 'all'.",
    )
    train: list[str] = Field(
        default_factory=list,
        description="frozen only: parameters to keep trainable even if `freeze` matches them (e.g. 'lm_head.*').",
    )

    @model_validator(mode="after")
    def _check_options(self) -> MethodConfig:
        check_method_options(self.kind, self.options, has_freeze=bool(self.freeze or self.train))
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The adapter's own options (everything beside kind/freeze/train)."""
        return dict(self.model_extra or {})


class TrainConfig(Section):
    """The optimisation loop."""

    epochs: int = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(
        None,
        gt=0,
        description="Train exactly this many optimizer steps, cycling the data as needed (overrides epochs).",
    )
    micro_batch_size: int = Field(4, gt=0, description="Samples per forward pass on each process.")
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Samples per optimizer step over all processes; accumulation is derived from it "
        "(must be a multiple of micro_batch_size x processes). Default: micro_batch_size x processes "
        "x grad_accum_steps.",
    )
    grad_accum_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step (if no global_batch_size)."
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch) or adamw_8bit (bitsandbytes paged-free 8-bit AdamW)."
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm (null: no clipping).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast precision for compute."
    )
    liger: bool = Field(
        False,
        description="CUDA: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) in the model (needs liger-kernel).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (regional compilation); CPU and GPU. The first steps "
        "compile (seconds to a minute); new sequence lengths may recompile once.",
    )
    seed: int = Field(0, description="Seeds weights init of adapters, dropout and data order.")
    resume: str | None = Field(
        None, description="'auto' (newest checkpoint in output_dir, if any) or a checkpoint directory."
    )
    overwrite: bool = Field(
        False,
        description="Start fresh in an output_dir that holds another run (`peftrun train --fresh`): the old "
        "run's files are moved to OUTPUT_DIR.old-<time> beside it, never deleted. Without it such a "
        "directory is refused unless train.resume resumes that run.",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError("each beta must be in [0, 1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.overwrite and self.resume is not None:
            raise ValueError("train.overwrite (--fresh) and train.resume both given: resume or start fresh")
        # Warmup starts at lr 0: a warmup longer than the run never reaches train.lr, and a one-step run
        # with any warmup takes its only step at lr 0. (Equal lengths are fine: the last step ends it.)
        if self.max_steps is not None and (
            self.warmup_steps > self.max_steps or (self.max_steps == 1 and self.warmup_steps)
        ):
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) does not fit in train.max_steps ({self.max_steps}): "
                "the learning rate would never reach train.lr; shorten the warmup"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _cpu_keys_moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in MOVED_TO_CPU.items():
                if old in data:
                    raise OptionError(old, f"moved to {new} (the cpu: section)")
        return data


MOVED_TO_CPU = {
    "cpu_matmul": "cpu.matmul",
    "fused_lora": "cpu.fused_lora",
    "cpu_malloc_cache": "cpu.malloc_cache",
}


class CpuConfig(Section):
    """CPU training speed-ups (peftrun/cpu/). None of them applies on a GPU; the run's manifest records
    what was applied."""

    matmul: CpuMatmul = Field(
        "auto",
        description="fp32 linear layers through oneDNN (torch's MKL runs AVX2 kernels on non-Intel "
        "CPUs; ~2.2x the matmul rate on AMD Zen 5). auto: oneDNN where the CPU has AVX-512; torch: torch's own path.",
    )
    fused_lora: bool = Field(
        True,
        description="Plain LoRA linear layers run as one function (fast dropout masks, "
        "LoRA output added in place, no per-layer dropped copies kept); same values and law as peft's.",
    )
    malloc_cache: bool = Field(
        True,
        description="On Linux (glibc): freed activation memory stays in the process instead of "
        "going back to the OS and page-faulting in anew every step (~1.07x a step, ~40 MB more peak RSS). "
        "Not applied under ZeRO-3, where the blocks of gathered weights go back to the OS instead.",
    )


class EvalConfig(Section):
    """Evaluation on the validation data (loss and perplexity)."""

    every_steps: int | None = Field(None, gt=0, description="Evaluate every N optimizer steps.")
    at_end: bool = Field(True, description="Evaluate after the last step.")
    batch_size: int | None = Field(
        None, gt=0, description="Eval micro-batch size (default: train.micro_batch_size)."
    )
    max_batches: int | None = Field(None, gt=0, description="Cap the number of eval batches.")
    generate: list[str] | str | None = Field(
        None,
        description="causal_lm: prompts (a list, or a .jsonl file as `peftrun generate` reads) answered "
        "greedily at every evaluation; logged to metrics.jsonl (eval_samples) and TensorBoard.",
    )


class CheckpointConfig(Section):
    """Resumable checkpoints (atomic: a crash or signal leaves the last good one)."""

    every_steps: int | None = Field(None, gt=0, description="Write a checkpoint every N optimizer steps.")
    keep_last: int = Field(2, gt=0, description="Keep only the newest K checkpoints.")
    at_end: bool = Field(
        True, description="Write a checkpoint after the last step (so `resume` can extend it)."
    )
    keep_best: bool = Field(
        False,
        description="Also keep the checkpoint with the lowest eval loss (measured at its step) through "
        "the keep_last rotation; manifest.json names it as best_checkpoint.",
    )


class LoggingConfig(Section):
    """Where metrics go."""

    every_steps: int = Field(1, gt=0, description="Log train metrics every N optimizer steps.")
    report_to: list[Tracker] = Field(
        default_factory=lambda: list[Tracker](["tensorboard"]),
        description="Trackers (wandb/mlflow only if installed).",
    )
    project: str = Field("peftrun", description="Project/experiment name for the trackers.")
    plot: bool = Field(True, description="Write loss.png at the end.")
    progress_bar: bool = Field(True, description="Show a tqdm bar on the main process.")


class Recipe(Section):
    """A peftrun recipe."""

    output_dir: Path = Field(
        description="Run directory: checkpoints, the final artefact, metrics, the resolved recipe."
    )
    task: TaskName = Field(
        "causal_lm",
        description="What the model learns to do: causal_lm (SFT, continued pre-training of decoders), "
        "masked_lm (continued pre-training of BERT-like encoders), sequence_classification (a new head "
        "on an encoder), image_classification (a new head on a ResNet/ViT-like model).",
    )
    model: ModelConfig
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(kind="lora"))
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    cpu: CpuConfig = Field(default_factory=CpuConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_given(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(
                "empty: give the run directory (an empty value would train into the current one)"
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        formats = TASK_TRAITS[self.task].formats
        if "format" not in self.data.model_fields_set:
            self.data.format = formats[0]  # type: ignore[assignment]  # validated on assignment
        for key, fmt in [("data.format", self.data.format)] + [
            (f"data.datasets[{i}].format", entry.format) for i, entry in enumerate(self.data.datasets or [])
        ]:
            if fmt is not None and fmt not in formats:
                raise ValueError(f"{key} '{fmt}' does not fit task {self.task} (use {' or '.join(formats)})")
        if self.data.datasets and self.task != "causal_lm":
            raise ValueError(f"data.datasets is for causal_lm; {self.task} reads one dataset: give data.path")
        if self.data.labels is not None and self.task not in CLASSIFIER_TASKS:
            raise ValueError(f"data.labels is for classification tasks, not {self.task}")
        if self.data.labels is not None and len(set(self.data.labels)) != len(self.data.labels):
            raise ValueError("data.labels: the class names must be distinct")
        if self.data.packing and self.task != "causal_lm":
            raise ValueError(f"data.packing is for causal_lm, not {self.task}")
        if self.data.packing and is_prompt_learning(self.method.kind):
            raise ValueError(
                f"data.packing cannot be used with method.kind={self.method.kind}: its virtual tokens would "
                "be shared by every sample of a packed sequence"
            )
        if self.data.streaming and self.task != "causal_lm":
            raise ValueError(f"data.streaming is for causal_lm, not {self.task}")
        if self.data.streaming and self.train.max_steps is None:
            raise ValueError(
                "data.streaming: a stream has no length, so set train.max_steps (epochs cannot be counted)"
            )
        if self.data.group_by_length and self.task == "image_classification":
            raise ValueError("data.group_by_length: images have no length; leave it off")
        if self.model.quantization is not None and self.method.kind in NON_ADAPTER_KINDS:
            raise ValueError(
                f"method.kind={self.method.kind} cannot train quantized weights; use an adapter (e.g. lora) "
                "or remove model.quantization"
            )
        return self
