"""The recipe's `data` section: one dataset (`data.path`) or several (`data.datasets`), and how rows
become tokens. Part of the recipe schema (`peftrun.recipe.schema` re-exports it)."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from peftrun.errors import OptionError
from peftrun.recipe.section import Section

__all__ = ["DataConfig", "DataFormat", "DatasetSource", "Source"]


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
