"""The recipe schema: the single source of truth for every setting peftrun has.

Each field's description is its documentation: `peftrun train --help`, `peftrun keys` and
docs/recipe.md are generated from these models, so a key cannot exist without being described.
Sections forbid unknown keys; `peftrun.recipe.load` turns pydantic's errors into one line each
with the file, the dotted key and a did-you-mean suggestion.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from peftrun.errors import OptionError
from peftrun.model.methods import NON_ADAPTER_KINDS, check_method_options, is_prompt_learning
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


DataFormat = Literal["alpaca", "chat", "text", "classification", "images"]


class DatasetSource(Section):
    """One dataset of `data.datasets`. Unset keys take the top-level data.* value (format, columns, split,
    chat_template)."""

    path: str = Field(
        description="Local .json/.jsonl/.csv/.parquet/.txt file, a folder of such shards or a glob "
        "('data/*.jsonl', all of one type), a folder written by datasets' save_to_disk, or a Hub dataset id."
    )
    format: DataFormat | None = Field(None, description="Its data.format; default: data.format.")
    columns: dict[str, str] | None = Field(None, description="Its data.columns; default: data.columns.")
    split: str | None = Field(
        None, description="Split of a Hub dataset or a saved DatasetDict; default: data.split."
    )
    subset: str | None = Field(None, description="Hub dataset: the configuration (subset) name.")
    data_files: list[str] | None = Field(
        None, description="Hub dataset: only these files of the repository (globs allowed)."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Share of the weighted part of the mixture (the datasets with a weight share as many "
        "samples as they hold together). Each slot's dataset is drawn with train.seed by normalized weight; "
        "rows are taken without replacement, and again once a dataset is used up (oversampling).",
    )
    samples: int | None = Field(
        None,
        gt=0,
        description="Take exactly this many samples: a seeded choice without replacement when it holds "
        "that many, else whole copies plus a seeded remainder. Neither weight nor samples: every sample once.",
    )
    chat_template: str | None = Field(
        None, description="Its data.chat_template; default: data.chat_template."
    )
    val_path: str | None = Field(
        None, description="A separate evaluation file for this dataset (same format and columns)."
    )
    val_split: str | None = Field(
        None, description="Hub dataset or saved DatasetDict: the split to evaluate on (e.g. validation)."
    )

    @model_validator(mode="after")
    def _one_of_each(self) -> DatasetSource:
        if self.weight is not None and self.samples is not None:
            raise OptionError("weight", "give weight or samples, not both")
        if self.val_path is not None and self.val_split is not None:
            raise OptionError("val_split", "give val_path or val_split, not both")
        return self


@dataclass(frozen=True)
class Source:
    """One dataset of the recipe with the top-level defaults filled in (`DataConfig.sources()`)."""

    key: str  # where it is in the recipe, for messages: 'data' or 'data.datasets[1]'
    path: str
    format: str
    columns: dict[str, str]
    split: str
    subset: str | None = None
    data_files: tuple[str, ...] | None = None
    weight: float | None = None
    samples: int | None = None
    chat_template: str | None = None
    val_path: str | None = None
    val_split: str | None = None

    def key_of(self, name: str) -> str:
        """The dotted recipe key of one of its settings: 'data.path', 'data.datasets[1].val_path'."""
        return f"{self.key}.{name}"


class DataConfig(Section):
    """Where the training data comes from and how it becomes tokens."""

    path: str = Field(
        "",
        description="Local .json/.jsonl/.csv/.parquet/.txt file, a folder of such shards or a glob, a folder "
        "written by datasets' save_to_disk, or a Hub dataset id. Give either path or datasets.",
    )
    datasets: list[DatasetSource] | None = Field(
        None,
        description="Several datasets mixed into one training set (instead of path); each entry takes the "
        "keys below data.datasets[].",
    )
    subset: str | None = Field(None, description="Hub dataset: the configuration (subset) name.")
    data_files: list[str] | None = Field(
        None, description="Hub dataset: only these files of the repository (globs allowed)."
    )
    format: DataFormat = Field(
        "alpaca",
        description="alpaca: instruction/input/output rows; chat: a list of {role, content} messages; "
        "text: raw text for continued pre-training; classification: text and label; images: image path "
        "and label, or an image folder with one sub-folder per class. Default: the task's first format "
        "(causal_lm alpaca, masked_lm text, sequence_classification classification, image_classification "
        "images).",
    )
    split: str = Field(
        "train", description="Split to read when `path` is a Hub dataset or a saved DatasetDict."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map peftrun's column names to the file's, e.g. {instruction: question, output: answer}. "
        "peftrun's names: instruction, input, output (alpaca); messages (chat); text (text); text, label "
        "(classification); image, label (images).",
    )
    labels: list[str] | None = Field(
        None,
        description="Classifiers: the class names in id order. Default: the distinct labels of the training "
        "data, sorted (numerically when all are integers). The run's resolved recipe records them.",
    )
    mask_rate: float = Field(
        0.15,
        gt=0.0,
        lt=1.0,
        description="masked_lm: share of tokens masked per sample (of them 80% [MASK], 10% random, 10% kept).",
    )
    augment: bool = Field(
        False, description="image_classification: random horizontal flips and crops of training images."
    )
    prompt_template: Literal["alpaca", "plain"] = Field(
        "alpaca",
        description="How alpaca rows are rendered: the Stanford Alpaca prompt, or instruction+input only.",
    )
    chat_template: str | None = Field(
        None,
        description="Built-in template name (chatml, llama3, zephyr) for tokenizers without a chat template, or "
        "the Jinja itself; default: the tokenizer's own. The run's tokenizer (final/) carries it.",
    )
    train_on: Literal["all", "last"] = Field(
        "all",
        description="chat: train on every assistant turn, or only on the last one of each conversation.",
    )
    train_on_reasoning: bool = Field(
        True,
        description="chat: train on the reasoning the template renders (the <think> block); false trains only "
        "what follows it.",
    )
    tools: list[dict[str, Any]] | None = Field(
        None,
        description="chat: tool definitions (OpenAI JSON schemas) handed to the chat template for every row "
        "that has no `tools` column of its own.",
    )
    max_seq_len: int = Field(1024, gt=0, description="Longest sample in tokens (BOS and EOS included).")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with samples longer than max_seq_len; counts are reported."
    )
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens (alpaca/chat).")
    packing: bool = Field(
        False,
        description="causal_lm: pack several training samples per sequence of up to max_seq_len tokens "
        "(best-fit-decreasing); no attention crosses a sample, positions restart per sample.",
    )
    group_by_length: bool = Field(
        False,
        description="Without packing: build micro-batches of similar lengths (less padding); the order of "
        "the micro-batches stays random.",
    )
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of the training file held out for evaluation."
    )
    val_path: str | None = Field(None, description="A separate evaluation file (same format and columns).")
    max_samples: int | None = Field(
        None, gt=0, description="Use only the first N rows of each dataset (quick experiments)."
    )
    num_proc: int | None = Field(
        None,
        gt=0,
        description="causal_lm: processes that tokenize the data. Default: one per CPU up to 8, one for "
        "small sets (under 40,000 rows). Not part of the tokenized-data cache key.",
    )

    streaming: bool = Field(
        False,
        description="causal_lm: read and tokenize the training data as training consumes it, for sets too big "
        "to tokenize up front; needs train.max_steps. Gives up exact epochs, length grouping, val_fraction "
        "and the token cache; the shuffle is within shuffle_buffer (docs/data.md).",
    )
    shuffle_buffer: int = Field(
        10_000, gt=0, description="data.streaming: samples held in the shuffle buffer (more: better mixed)."
    )

    @model_validator(mode="after")
    def _one_source_form(self) -> DataConfig:
        if bool(self.path) == bool(self.datasets):
            raise ValueError(
                "give data.path (one dataset) or data.datasets (a list of them), "
                + ("not both" if self.path else "one of them is required")
            )
        if self.datasets:
            for name in ("val_path", "subset", "data_files"):
                if getattr(self, name) is not None:
                    raise OptionError(name, f"set it per dataset (data.datasets[].{name}) with data.datasets")
        for source in self.sources():
            if self.val_fraction > 0 and (source.val_path or source.val_split) is not None:
                if source.key == "data":
                    raise ValueError("set either val_fraction or val_path, not both")
                raise OptionError(
                    source.key.removeprefix("data.") + ".val_path",
                    "set either data.val_fraction or a dataset's val_path/val_split, not both",
                )
        if self.streaming and self.val_fraction > 0:
            raise ValueError(
                "data.val_fraction needs the whole set up front; with data.streaming give data.val_path"
            )
        if self.streaming and self.datasets:
            for index, entry in enumerate(self.datasets):
                if entry.samples is not None:
                    raise OptionError(
                        f"datasets[{index}].samples",
                        "a sample count needs the whole dataset up front; with data.streaming use weight",
                    )
            if 0 < sum(entry.weight is not None for entry in self.datasets) < len(self.datasets):
                raise ValueError(
                    "data.streaming interleaves datasets by weight: give every dataset a weight, or none "
                    "(then they take turns)"
                )
        if self.streaming and self.group_by_length:
            raise ValueError(
                "data.group_by_length needs every length up front; leave it off with data.streaming"
            )
        return self

    def sources(self) -> list[Source]:
        """Every dataset of the recipe, one uniform list for both forms (data.path is a list of one)."""
        if not self.datasets:
            short = DatasetSource(
                path=self.path, subset=self.subset, data_files=self.data_files, val_path=self.val_path
            )
            return [self._source("data", short)]
        return [self._source(f"data.datasets[{index}]", entry) for index, entry in enumerate(self.datasets)]

    def _source(self, key: str, entry: DatasetSource) -> Source:
        """`entry` with the top-level defaults filled in."""
        return Source(
            key=key,
            path=entry.path,
            format=entry.format or self.format,
            columns=dict(self.columns if entry.columns is None else entry.columns),
            split=entry.split or self.split,
            subset=entry.subset,
            data_files=tuple(entry.data_files) if entry.data_files is not None else None,
            weight=entry.weight,
            samples=entry.samples,
            chat_template=entry.chat_template or self.chat_template,
            val_path=entry.val_path,
            val_split=entry.val_split,
        )

    def read_paths(self) -> list[str]:
        """Every data path of the recipe, a glob as the files it matches: what output_dir must stay clear
        of (Hub ids are among them; they name nothing on disk)."""
        paths = [path for source in self.sources() for path in (source.path, source.val_path) if path]
        return [
            match
            for path in paths
            for match in (
                sorted(glob.glob(str(Path(path).expanduser()))) if set(path) & set("*?[") else [path]
            )
        ]

    def for_source(self, source: Source) -> DataConfig:
        """These settings for one of `sources()` alone, in the short form: what code that reads one
        dataset (the sample encoder, `peftrun data`) is given."""
        data_files = list(source.data_files) if source.data_files is not None else None
        return self.model_copy(
            update={
                "path": source.path,
                "datasets": None,
                "format": source.format,
                "columns": source.columns,
                "split": source.split,
                "subset": source.subset,
                "data_files": data_files,
                "chat_template": source.chat_template,
                "val_path": source.val_path,
            }
        )


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
