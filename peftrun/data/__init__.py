"""Causal-LM data: read the recipe's data, tokenize it with exact loss masks, cache it, batch it.

    data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_root / "data")
    for line in data.report.lines(): log.info(line)
    batch = collate([data.train[i] for i in indices], pad_id_for(tokenizer))

Tokenized data is cached on disk under a hash of everything that shapes the tokens (file bytes,
tokenizer, chat template, the `data` settings, PIPELINE_VERSION), so a changed input is never served
from a stale cache. An entry holds Arrow files written batch by batch (`arrow.py`), which every process
of a run memory-maps: one process per machine tokenizes, the others wait for its entry (`shared.py`).

Building an entry is two steps, so that more sources slot in: per source, rows -> a tokenized Arrow
dataset with per-row columns (`tokenize_source`); then `_assemble` selects the train/eval samples by
index and counts the report from those columns.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftrun.data.arrow import SAMPLE_COLUMNS, TokenizedSource, column, default_num_proc, tokenize_source
from peftrun.data.chat.encode import ChatEncoder
from peftrun.data.progress import Progress
from peftrun.data.rows import holdout_rows
from peftrun.data.shared import DataSharing, recording_failure, wait_for_entry
from peftrun.data.sources import check_file, check_source, column_map, digest_file, is_hub_id, read_rows
from peftrun.data.templates import adopt_chat_template
from peftrun.data.tokenize import IGNORE_INDEX, SampleEncoder, TokenizeStats, attention_mask, pad
from peftrun.errors import UserError
from peftrun.staging import staged_dir

if TYPE_CHECKING:
    import datasets
    import torch

    from peftrun.recipe.schema import DataConfig

__all__ = [
    "IGNORE_INDEX",
    "PIPELINE_VERSION",
    "DataReport",
    "DataSharing",
    "TokenizedData",
    "check_source",
    "collate",
    "pad_id_for",
    "prepare_data",
]

# Bump whenever the tokens produced for the same inputs change, so old caches are not reused.
PIPELINE_VERSION = "3"  # 2: chat spans from one rendering; 3: Arrow files from Dataset.map, a length column


@dataclass
class DataReport:
    rows: int  # rows read: the training file's (after max_samples) plus val_path's
    kept: int  # samples kept, train + eval
    truncated: int  # kept, but cut to max_seq_len
    dropped_overlong: int  # over max_seq_len with overlong=drop, or nothing trainable left after truncation
    dropped_empty: int  # nothing to learn: empty output/text, or no assistant turn
    train_samples: int
    eval_samples: int
    supervised_tokens: int  # train split: tokens with a label (the loss is computed on them)
    total_tokens: int  # train split: all tokens
    cache_hit: bool
    template_warnings: int = 0  # chat rows with a template warning (`peftrun data` lists them)
    chat_masks: str | None = None  # chat: where the trained spans come from
    packed_rows: int | None = None  # data.packing: training sequences the samples were packed into
    packed_capacity: int | None = None  # their maximum length (max_seq_len)

    def lines(self) -> list[str]:
        """Human-readable summary for the log."""
        share = 100 * self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0
        return (
            [
                f"data: {self.rows:,} rows -> {self.kept:,} samples ({self.train_samples:,} train, "
                f"{self.eval_samples:,} eval)",
                f"data: {self.truncated:,} truncated to max_seq_len, {self.dropped_overlong:,} dropped as over-long, "
                f"{self.dropped_empty:,} dropped with nothing to learn",
                f"data: {self.total_tokens:,} train tokens per epoch, {self.supervised_tokens:,} supervised ({share:.1f}%)",
                f"data: tokenized data {'loaded from the cache' if self.cache_hit else 'tokenized and cached'}",
            ]
            + ([f"data: chat masks from {self.chat_masks}"] if self.chat_masks else [])
            + (
                [
                    f"data: {self.template_warnings:,} rows with template warnings; `peftrun data RECIPE` shows them"
                ]
                if self.template_warnings
                else []
            )
            + (
                [
                    f"data: packed {self.train_samples:,} train samples into {self.packed_rows:,} sequences of up to "
                    f"{self.packed_capacity:,} tokens ({100 * self.total_tokens / (self.packed_rows * self.packed_capacity):.1f}% full)"
                ]
                if self.packed_rows and self.packed_capacity
                else []
            )
        )


@dataclass
class TokenizedData:
    train: datasets.Dataset  # columns input_ids, labels (lists of int32), length
    eval: datasets.Dataset | None
    report: DataReport


# ------------------------------------------------------------------------------------------- batching


def pad_id_for(tokenizer: Any) -> int:
    """The id to pad batches with: pad, else unk, else eos.

    The tokenizer is never changed to gain a pad token (the saved artefact keeps the base's tokenizer).
    Which id pads does not matter for training: padding is excluded by attention_mask and by labels of
    IGNORE_INDEX set from each sample's length, never by comparing ids with the pad id, so pad == eos
    cannot mask the real EOS label.
    """
    for pad_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if pad_id is not None:
            return int(pad_id)
    raise UserError("the tokenizer has no pad, unk or eos token to pad batches with")


def collate(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into input_ids, attention_mask and labels (IGNORE_INDEX on padding)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    ids = [sample["input_ids"] for sample in samples]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": attention_mask(ids),
        "labels": pad([sample["labels"] for sample in samples], IGNORE_INDEX),
    }


# ---------------------------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the tokenizer's ids: vocab, merges, normalisation, special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.special_tokens_map, tokenizer.bos_token_id, tokenizer.eos_token_id]
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(
    cfg: DataConfig, tokenizer: Any, chat_template: str | None, seed: int, sources: Sequence[str]
) -> str:
    """Hash of every input of the tokenized data; `sources` identify the data (content hashes)."""
    # Every DataConfig field shapes the tokens except these, which enter through `sources` and
    # `chat_template` (the resolved template text, not its name). A new field is part of the key by default.
    # num_proc, streaming and shuffle_buffer decide how samples are made or read, not what they hold.
    settings = cfg.model_dump(
        exclude={"path", "val_path", "split", "chat_template", "num_proc", "streaming", "shuffle_buffer"}
    )
    settings["columns"] = column_map(cfg.format, cfg.columns)
    inputs = {
        "pipeline": PIPELINE_VERSION,
        "sources": list(sources),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": chat_template,
        "settings": settings,
        "seed": seed if cfg.val_fraction > 0 else None,  # the seed only picks the held-out rows
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _is_complete(entry: Path) -> bool:
    return (entry / "report.json").is_file()  # written last, inside the staged entry


def _load_cached(entry: Path, cache_hit: bool) -> TokenizedData:
    """The entry's datasets, memory-mapped from its Arrow files (every process maps the same pages)."""
    import datasets

    report = DataReport(**{**json.loads((entry / "report.json").read_text()), "cache_hit": cache_hit})
    eval_dir = entry / "eval"
    return TokenizedData(
        train=datasets.load_from_disk(str(entry / "train")),
        eval=datasets.load_from_disk(str(eval_dir)) if eval_dir.is_dir() else None,
        report=report,
    )


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence datasets' bars (peftrun logs its own progress lines); restores the caller's setting."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _write_entry(tmp: Path, data: TokenizedData) -> None:
    """The datasets (index selections written out in batches) and, last, the report that marks it complete."""
    data.train.save_to_disk(str(tmp / "train"))
    if data.eval is not None:
        data.eval.save_to_disk(str(tmp / "eval"))
    (tmp / "report.json").write_text(json.dumps(asdict(data.report), indent=1))


# -------------------------------------------------------------------------------------------- prepare


def _read_local(path: str, cfg: DataConfig, key: str, columns: list[str]) -> datasets.Dataset:
    """Check a local file (for errors naming the row), then read it; max_samples applies to data.path only."""
    max_rows = cfg.max_samples if key == "data.path" else None
    check_file(path, cfg, key, max_rows)
    return read_rows(path, max_samples=max_rows, columns=columns, key=key, as_json=cfg.format == "chat")


def _source_ids(cfg: DataConfig, train_rows: datasets.Dataset | None) -> list[str]:
    """Content identities of the data: file hashes, or a Hub dataset's id, split and datasets fingerprint."""
    if train_rows is not None:  # a Hub dataset, already loaded
        # datasets derives the fingerprint from the builder config, data files and revision.
        ids = [f"hub:{cfg.path}:{cfg.split}:{train_rows._fingerprint}"]
    else:
        ids = [f"sha256:{digest_file(cfg.path)}"]
    if cfg.val_path is not None:
        ids.append(f"sha256:{digest_file(cfg.val_path, 'data.val_path')}")
    return ids


def prepare_data(
    cfg: DataConfig, tokenizer: Any, seed: int, cache_dir: Path, sharing: DataSharing | None = None
) -> TokenizedData:
    """Tokenized train (and eval) data for `cfg`, from the cache when nothing it depends on changed.

    The datasets are memory-mapped from the cache entry. With `sharing.main` False this process does not
    tokenize: it waits for the main process to write the entry (see `shared.py`), then maps it too.
    The tokenizer is not modified, except that it adopts data.chat_template when the recipe sets one.
    Raises UserError for bad data, naming the file and the row.
    """
    sharing = sharing or DataSharing()
    chat_template = adopt_chat_template(tokenizer, cfg.format, cfg.chat_template)
    columns = list(dict.fromkeys(column_map(cfg.format, cfg.columns).values()))
    # A Hub dataset is loaded first (from the HF cache when downloaded): its fingerprint is its identity.
    hub_rows = (
        read_rows(cfg.path, cfg.split, cfg.max_samples, columns=columns) if is_hub_id(cfg.path) else None
    )
    key = cache_key(cfg, tokenizer, chat_template, seed, _source_ids(cfg, hub_rows))
    entry = Path(cache_dir) / f"data-{key}"
    if _is_complete(entry):
        return _load_cached(entry, cache_hit=True)
    if not sharing.main:
        wait_for_entry(entry, _is_complete, sharing)
        return _load_cached(entry, cache_hit=False)
    with recording_failure(entry):
        train_rows = hub_rows if hub_rows is not None else _read_local(cfg.path, cfg, "data.path", columns)
        val_rows = (
            _read_local(cfg.val_path, cfg, "data.val_path", columns)
            if cfg.val_path is not None and cfg.val_fraction == 0
            else None
        )
        _build_entry(entry, _Inputs(cfg, tokenizer, chat_template, seed), train_rows, val_rows, sharing)
    return _load_cached(entry, cache_hit=False)


@dataclass(frozen=True)
class _Inputs:
    cfg: DataConfig
    tokenizer: Any
    chat_template: str | None
    seed: int


def _build_entry(
    entry: Path,
    inputs: _Inputs,
    train_rows: datasets.Dataset,
    val_rows: datasets.Dataset | None,
    sharing: DataSharing,
) -> None:
    """Tokenize each source into Arrow files, assemble the splits, and publish the entry whole."""
    # A concurrent run (another machine on a shared cache) may publish the same entry first: same tokens.
    with staged_dir(entry, is_complete=_is_complete) as tmp, _no_progress_bars():
        work = tmp / "work"  # the per-source map outputs; the entry keeps only the assembled splits
        train = _tokenize(inputs, inputs.cfg.path, train_rows, work / "train", sharing)
        val_path = inputs.cfg.val_path
        val = (
            _tokenize(inputs, val_path, val_rows, work / "val", sharing)
            if val_path is not None and val_rows is not None
            else None
        )
        data = _assemble(inputs.cfg, train, val, inputs.seed)
        if inputs.cfg.format == "chat" and inputs.chat_template is not None:
            data.report.chat_masks = ChatEncoder(inputs.tokenizer, inputs.chat_template, inputs.cfg).method
        _write_entry(tmp, data)
        shutil.rmtree(work)


def _tokenize(
    inputs: _Inputs, path: str, rows: datasets.Dataset, work: Path, sharing: DataSharing
) -> TokenizedSource:
    """One source's rows -> its tokenized Arrow dataset and counts (`path` names it in errors and logs)."""
    encoder = SampleEncoder(inputs.tokenizer, inputs.cfg, path, inputs.chat_template)
    num_proc = inputs.cfg.num_proc or default_num_proc(len(rows))
    progress = Progress(f"tokenizing {path}", len(rows), sharing.log, sharing.interval_s)
    return tokenize_source(encoder, rows, work, num_proc, progress)


def _assemble(
    cfg: DataConfig, train: TokenizedSource, val: TokenizedSource | None, seed: int
) -> TokenizedData:
    """The splits (index selections of the tokenized sources, nothing copied) and the report; an empty
    split is a UserError (training or evaluating on nothing)."""
    import numpy as np

    kept = column(train.dataset, "dropped") == 0
    held_out: datasets.Dataset | None = None
    if cfg.val_fraction > 0:
        chosen = np.fromiter(holdout_rows(len(train.dataset), cfg.val_fraction, seed), dtype=np.int64)
        held = np.isin(column(train.dataset, "row"), chosen)
        train_split = train.dataset.select((kept & ~held).nonzero()[0])
        held_out = train.dataset.select((kept & held).nonzero()[0])
    else:
        train_split = train.dataset.select(kept.nonzero()[0])
        if val is not None:
            held_out = val.dataset.select(val.kept_indices())
    stats = TokenizeStats()
    for source in (train, val):
        if source is not None:
            stats += source.stats
    report = DataReport(
        rows=stats.rows,
        kept=stats.kept,
        truncated=stats.truncated,
        template_warnings=stats.template_warnings,
        dropped_overlong=stats.dropped_overlong,
        dropped_empty=stats.dropped_empty,
        train_samples=len(train_split),
        eval_samples=len(held_out) if held_out is not None else 0,
        supervised_tokens=int(column(train_split, "supervised").sum(dtype=np.int64)),
        total_tokens=int(column(train_split, "length").sum(dtype=np.int64)),
        cache_hit=False,
    )
    counts = "; ".join(report.lines()[:2])
    if not len(train_split):
        raise UserError(f"{cfg.path}: no training samples left ({counts})")
    if held_out is not None and not len(held_out):
        raise UserError(f"{cfg.val_path or cfg.path}: no evaluation samples left ({counts})")
    return TokenizedData(
        train=train_split.select_columns(SAMPLE_COLUMNS),
        eval=held_out.select_columns(SAMPLE_COLUMNS) if held_out is not None else None,
        report=report,
    )
