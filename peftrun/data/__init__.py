"""Causal-LM data: read the recipe's data, tokenize it with exact loss masks, cache it, batch it.

    data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_root / "data")
    for line in data.report.lines(): log.info(line)
    batch = collate([data.train[i] for i in indices], pad_id_for(tokenizer))

Tokenized data is cached on disk under a hash of everything that shapes the tokens (file bytes,
tokenizer, chat template, the `data` settings, PIPELINE_VERSION), so a changed input is never served
from a stale cache. An entry holds Arrow files written batch by batch (`arrow.py`), which every process
of a run memory-maps: one process per machine tokenizes, the others wait for its entry (`shared.py`).

Building an entry: per dataset of the recipe (data.path, or each of data.datasets), its rows are read
(`source_rows.read_source`) and tokenized into an Arrow dataset with per-row columns (`tokenize_source`);
then `assemble` selects the train/eval samples by index, mixes the datasets (`mixture.py`) and counts
the report from those columns.
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

from peftrun.data.arrow import TokenizedSource, default_num_proc, tokenize_source
from peftrun.data.assemble import Assembled, TokenizedDataset, assemble, is_mixture
from peftrun.data.chat.encode import ChatEncoder
from peftrun.data.progress import Progress
from peftrun.data.report import DataReport, TokenizedData
from peftrun.data.shared import DataSharing, recording_failure, wait_for_entry
from peftrun.data.source_rows import read_source, source_identity
from peftrun.data.sources import check_source, column_map
from peftrun.data.templates import dataset_templates
from peftrun.data.tokenize import IGNORE_INDEX, SampleEncoder, attention_mask, pad
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

# The entry's list of tokenized Arrow files, in the order the splits' indices count rows.
_FILES = "files.json"
# Bump whenever the tokens produced for the same inputs change, so old caches are not reused.
PIPELINE_VERSION = "5"  # 2: chat spans from one rendering; 3: Arrow files from Dataset.map, a length column; 4: data.datasets; 5: entries keep the tokenized files and index them


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
    cfg: DataConfig,
    tokenizer: Any,
    chat_templates: Sequence[str | None],
    seed: int,
    identities: Sequence[str],
) -> str:
    """Hash of every input of the tokenized data: `identities` are the datasets' contents (file hashes,
    Hub fingerprints), `chat_templates` each dataset's resolved template text."""
    # Every DataConfig field shapes the tokens except these: the datasets enter through `identities`,
    # `chat_templates` and `datasets` below; num_proc, streaming and shuffle_buffer decide how samples
    # are made or read, not what they hold. A new field is part of the key by default.
    settings = cfg.model_dump(
        exclude={
            *("path", "val_path", "split", "subset", "data_files", "chat_template", "datasets"),
            *("num_proc", "streaming", "shuffle_buffer"),
        }
    )
    settings["columns"] = column_map(cfg.format, cfg.columns)
    datasets = [
        {
            "format": source.format,
            "columns": column_map(source.format, source.columns),
            "weight": source.weight,
            "samples": source.samples,
        }
        for source in cfg.sources()
    ]
    inputs = {
        "pipeline": PIPELINE_VERSION,
        "sources": list(identities),
        "datasets": datasets,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": list(chat_templates),
        "settings": settings,
        # The seed picks held-out rows and a mixture's samples, nothing else.
        "seed": seed if cfg.val_fraction > 0 or is_mixture(cfg) else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _is_complete(entry: Path) -> bool:
    return (entry / "report.json").is_file()  # written last, inside the staged entry


def _load_cached(entry: Path, cache_hit: bool) -> TokenizedData:
    """The entry's splits, memory-mapped from its Arrow files (every process maps the same pages)."""
    import datasets
    import numpy as np

    report = DataReport(**{**json.loads((entry / "report.json").read_text()), "cache_hit": cache_hit})
    files = json.loads((entry / _FILES).read_text())
    tokenized = datasets.concatenate_datasets([datasets.Dataset.from_file(str(entry / f)) for f in files])
    eval_rows = entry / "eval.npy"
    held_out = np.load(eval_rows) if eval_rows.is_file() else None
    return Assembled(tokenized, np.load(entry / "train.npy"), held_out, report).data()


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


def _write_entry(tmp: Path, assembled: Assembled) -> None:
    """The splits' indices, the list of the tokenized files they index, and, last, the report that marks
    the entry complete. The tokenized files stay where `tokenize_source` wrote them, inside `tmp`."""
    import numpy as np

    root = tmp.resolve()
    files = [str(Path(f["filename"]).resolve().relative_to(root)) for f in assembled.tokenized.cache_files]
    (tmp / _FILES).write_text(json.dumps(files, indent=0))
    np.save(tmp / "train.npy", assembled.train)
    if assembled.eval is not None:
        np.save(tmp / "eval.npy", assembled.eval)
    (tmp / "report.json").write_text(json.dumps(asdict(assembled.report), indent=1))


# -------------------------------------------------------------------------------------------- prepare


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
    sources = cfg.sources()
    templates = dataset_templates(tokenizer, cfg)
    per_source = [source_identity(source) for source in sources]
    identities = [identity for ids in per_source for identity in ids]
    entry = Path(cache_dir) / f"data-{cache_key(cfg, tokenizer, templates, seed, identities)}"
    if _is_complete(entry):
        return _load_cached(entry, cache_hit=True)
    if not sharing.main:
        wait_for_entry(entry, _is_complete, sharing)
        return _load_cached(entry, cache_hit=False)
    with recording_failure(entry):
        _build_entry(entry, _Inputs(cfg, tokenizer, templates, per_source, seed), sharing)
    return _load_cached(entry, cache_hit=False)


@dataclass(frozen=True)
class _Inputs:
    cfg: DataConfig
    tokenizer: Any
    chat_templates: list[str | None]  # per dataset of cfg.sources()
    identities: list[list[str]]  # per dataset: source_identity's, reused when its rows are read
    seed: int


def _build_entry(entry: Path, inputs: _Inputs, sharing: DataSharing) -> None:
    """Read and tokenize each dataset into Arrow files, assemble the splits, and publish the entry whole."""
    cfg = inputs.cfg
    # A concurrent run (another machine on a shared cache) may publish the same entry first: same tokens.
    with staged_dir(entry, is_complete=_is_complete) as tmp, _no_progress_bars():
        rows_dir = tmp / "rows"  # local files' rows as Arrow: read once, deleted once tokenized
        parts = []
        per_dataset = zip(cfg.sources(), inputs.chat_templates, inputs.identities, strict=True)
        for index, (source, template, identity) in enumerate(per_dataset):
            rows = read_source(source, cfg, cache_dir=rows_dir, identity=identity)
            encoder = SampleEncoder(inputs.tokenizer, cfg.for_source(source), source.path, template)
            train = _tokenize(cfg, encoder, source.path, rows.train, tmp / f"train-{index}", sharing)
            held_out = (
                _tokenize(
                    cfg, encoder, source.val_path or source.path, rows.eval, tmp / f"eval-{index}", sharing
                )
                if rows.eval is not None
                else None
            )
            parts.append(TokenizedDataset(source, train, held_out))
        assembled = assemble(cfg, parts, inputs.seed)
        chat_template = next((t for t in inputs.chat_templates if t is not None), None)
        if chat_template is not None:
            assembled.report.chat_masks = ChatEncoder(inputs.tokenizer, chat_template, cfg).method
        _write_entry(tmp, assembled)
        shutil.rmtree(rows_dir, ignore_errors=True)


def _tokenize(
    cfg: DataConfig,
    encoder: SampleEncoder,
    name: str,
    rows: datasets.Dataset,
    work: Path,
    sharing: DataSharing,
) -> TokenizedSource:
    """One dataset's rows -> its tokenized Arrow dataset and counts (`name` in logs)."""
    num_proc = cfg.num_proc or default_num_proc(len(rows))
    progress = Progress(f"tokenizing {name}", len(rows), sharing.log, sharing.interval_s)
    return tokenize_source(encoder, rows, work, num_proc, progress)
