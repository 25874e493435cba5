"""data.streaming: training samples read, tokenized and shuffled as training consumes them.

For sets too big to tokenize up front. Each source is read in its own order and tokenized in batches
(so an error still names the file and the row), then `datasets` shuffles the samples through a buffer
of `data.shuffle_buffer` samples and, with several sources, interleaves them by weight. Packing fills
sequences from windows of samples as they arrive.

What streaming gives up, against the prepared (Arrow) path:
- no epoch length: `train.max_steps` decides the run; when a source runs out a new pass starts, with
  the buffer reshuffled from the seed and the pass number (`set_epoch`);
- no length grouping, no held-out fraction (`data.val_path` still gives an eval set), no token cache,
  no per-row counts in the report;
- the shuffle is local (within the buffer), and mixture shares hold only within sampling error;
- a bad row is found when the stream reaches it (the first rows are checked before training starts).

Every process reads the whole stream and keeps its slice of each global batch (accelerate's
`IterableDatasetShard`): all processes see the same number of batches, so none waits for a collective
that the others have left, and a resumed run skips the batches it already trained on, in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.utils.data

from peftrun.data.packing import best_fit_decreasing, packed_row
from peftrun.data.rows import TaskData
from peftrun.data.shared import DataSharing
from peftrun.data.sources import ROW_JSON, RowRules, hub_offline, load_hub, load_saved, local_rows, locate
from peftrun.data.sources.checks import STREAM_CHECK_ROWS
from peftrun.data.templates import dataset_templates
from peftrun.data.tokenize import SampleEncoder
from peftrun.errors import UserError

if TYPE_CHECKING:
    import datasets

    from peftrun.recipe.data import DataConfig, Source

__all__ = ["StreamReport", "StreamingSamples", "prepare_stream"]

# Rows tokenized per tokenizer call.
_ENCODE_ROWS = 256
# Rows tokenized before training starts, so that a wrong column or format fails before the model loads
# (sources.check_source parses as many).
CHECK_ROWS = STREAM_CHECK_ROWS


@dataclass
class StreamReport:
    """What the log and the manifest say about a streamed training set: no counts, nothing is read up front."""

    sources: list[str]
    shuffle_buffer: int
    packing: bool
    eval_samples: int
    streaming: bool = True

    def lines(self) -> list[str]:
        return [
            f"data: streaming {', '.join(self.sources)}: rows are tokenized as training reads them "
            f"(shuffle buffer {self.shuffle_buffer:,} samples{', packed' if self.packing else ''}); "
            "train.max_steps sets the length",
            *([f"data: {self.eval_samples:,} eval samples from data.val_path"] if self.eval_samples else []),
        ]


def _rows(source: Source, cfg: DataConfig) -> Iterator[Mapping[str, Any]]:
    """The rows of one dataset in their own order: local files checked as they are read, Hub datasets
    streamed (or read from the local cache offline), saved datasets memory-mapped."""
    key = source.key_of("path")
    located = locate(source.path, key, source.format)
    if located.kind == "hub":
        options = {"subset": source.subset, "data_files": source.data_files}
        yield from load_hub(source.path, source.split, key, streaming=not hub_offline(), **options)
    elif located.kind == "saved":
        yield from load_saved(located.files[0], source.split, key)
    else:
        rules = RowRules.of(source.format, source.columns, cfg.tools, source.key_of("columns"))
        for record, _ in local_rows(located, key, rules):
            yield {ROW_JSON: json.dumps(record, ensure_ascii=False)} if source.format == "chat" else record


def encoded_samples(
    encoder: SampleEncoder, rows: Iterator[Mapping[str, Any]], limit: int | None = None
) -> Iterator[dict[str, list[int]]]:
    """Samples (input_ids, labels) of the rows, tokenized `_ENCODE_ROWS` at a time, rows numbered in order."""
    first_row = 1
    rows = islice(rows, limit)
    while batch := list(islice(rows, _ENCODE_ROWS)):
        samples, _ = encoder.encode(batch, first_row=first_row)
        first_row += len(batch)
        for sample in samples:
            yield {"input_ids": sample.input_ids, "labels": sample.labels}


def _sample_stream(
    make_encoder: Callable[[], SampleEncoder], source: Source, cfg: DataConfig
) -> Iterator[dict[str, list[int]]]:
    yield from encoded_samples(make_encoder(), _rows(source, cfg), cfg.max_samples)


class StreamingSamples(torch.utils.data.IterableDataset[dict[str, list[int]]]):
    """Shuffled (and optionally packed) samples of a `datasets` stream; `set_epoch` starts a new pass."""

    def __init__(
        self, samples: datasets.IterableDataset, pack_capacity: int | None, pack_window: int
    ) -> None:
        self.samples = samples
        self.pack_capacity = pack_capacity
        self.pack_window = pack_window

    def set_epoch(self, epoch: int) -> None:
        self.samples.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        if self.pack_capacity is None:
            yield from iter(self.samples)
            return
        samples = iter(self.samples)
        while window := list(islice(samples, self.pack_window)):
            lengths = [len(sample["input_ids"]) for sample in window]
            for members in best_fit_decreasing(lengths, self.pack_capacity):
                yield packed_row([window[i] for i in sorted(members)])


def _source_stream(cfg: DataConfig, source: Source, tokenizer: Any, template: str | None) -> Any:
    """One dataset's samples as a `datasets` stream; its first rows are tokenized now, as a check."""
    import datasets

    def make_encoder() -> SampleEncoder:
        return SampleEncoder(tokenizer, cfg.for_source(source), source.path, template)

    # Fails now, naming the row, when the columns or the format do not fit the data.
    check_rows = min(CHECK_ROWS, cfg.max_samples or CHECK_ROWS)
    if not any(True for _ in encoded_samples(make_encoder(), _rows(source, cfg), check_rows)):
        raise UserError(
            f"{source.path}: no training samples in the first {check_rows:,} rows (all over-long or with "
            "nothing to learn); check data.max_seq_len and the columns"
        )
    return datasets.IterableDataset.from_generator(
        _sample_stream, gen_kwargs={"make_encoder": make_encoder, "source": source, "cfg": cfg}
    )


def stream_samples(
    cfg: DataConfig, tokenizer: Any, templates: list[str | None], seed: int
) -> StreamingSamples:
    """The training stream of `cfg` (data.streaming): its datasets interleaved by weight (in turn when
    none has one), shuffled through the buffer, packed when asked."""
    import datasets

    sources = cfg.sources()
    streams = [
        _source_stream(cfg, source, tokenizer, template)
        for source, template in zip(sources, templates, strict=True)
    ]
    samples = streams[0]
    if len(streams) > 1:
        weights = [source.weight for source in sources if source.weight is not None]
        probabilities = [w / sum(weights) for w in weights] if len(weights) == len(sources) else None
        # all_exhausted: a pass ends when every dataset has given all its samples, the small ones again.
        samples = datasets.interleave_datasets(
            streams, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted"
        )
    shuffled = samples.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    return StreamingSamples(
        shuffled, cfg.max_seq_len if cfg.packing else None, pack_window=max(cfg.shuffle_buffer // 8, 64)
    )


def prepare_stream(
    cfg: DataConfig, tokenizer: Any, seed: int, cache_dir: Path, sharing: DataSharing | None = None
) -> TaskData:
    """Training samples streamed from `cfg.path`; the eval set (data.val_path) prepared as usual, by the
    main process while the others wait for it (`sharing`)."""
    from peftrun.data import prepare_data

    sources = cfg.sources()
    templates = dataset_templates(tokenizer, cfg)
    train = stream_samples(cfg, tokenizer, templates, seed)
    eval_cfg = _eval_config(cfg)
    eval_set = prepare_data(eval_cfg, tokenizer, seed, cache_dir, sharing).train if eval_cfg else None
    names = [source.path for source in sources]
    report = StreamReport(names, cfg.shuffle_buffer, cfg.packing, len(eval_set) if eval_set else 0)
    return TaskData(train, eval_set, report)


def _eval_config(cfg: DataConfig) -> DataConfig | None:
    """The datasets' own eval rows (val_path, val_split) as a prepared (not streamed) set, or None."""
    from peftrun.recipe.data import DatasetSource

    entries = [
        DatasetSource(
            path=source.val_path or source.path,
            split=source.val_split or source.split,
            subset=None if source.val_path else source.subset,
            data_files=None if source.val_path or source.data_files is None else list(source.data_files),
            format=source.format,
            columns=source.columns,
            chat_template=source.chat_template,
        )
        for source in cfg.sources()
        if source.val_path is not None or source.val_split is not None
    ]
    if not entries:
        return None
    return cfg.model_copy(
        update={
            **{"path": "", "datasets": entries, "val_path": None, "subset": None, "data_files": None},
            **{"streaming": False, "max_samples": None, "val_fraction": 0.0},
        }
    )
