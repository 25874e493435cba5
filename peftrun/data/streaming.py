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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.utils.data

from peftrun.data.packing import best_fit_decreasing, packed_row
from peftrun.data.rows import TaskData
from peftrun.data.shared import DataSharing
from peftrun.data.sources import ROW_JSON, is_hub_id, iter_local_rows, load_hub_stream
from peftrun.data.templates import adopt_chat_template
from peftrun.data.tokenize import SampleEncoder
from peftrun.errors import UserError

if TYPE_CHECKING:
    import datasets

    from peftrun.recipe.schema import DataConfig

__all__ = ["StreamReport", "StreamingSamples", "prepare_stream"]

# Rows tokenized per tokenizer call.
_ENCODE_ROWS = 256
# Rows tokenized before training starts, so that a wrong column or format fails before the model loads
# (sources.check_source parses as many).
CHECK_ROWS = 1000


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


def _rows(path: str, split: str, key: str, as_json: bool) -> Iterator[dict[str, Any]]:
    """The rows of a local file (checked as they are read) or a Hub dataset, in their own order."""
    if is_hub_id(path):
        yield from load_hub_stream(path, split, key)
        return
    for record in iter_local_rows(path, key):
        yield {ROW_JSON: json.dumps(record, ensure_ascii=False)} if as_json else record


def encoded_samples(
    encoder: SampleEncoder, rows: Iterator[dict[str, Any]], limit: int | None = None
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
    make_encoder: Callable[[], SampleEncoder], path: str, split: str, as_json: bool, max_rows: int | None
) -> Iterator[dict[str, list[int]]]:
    yield from encoded_samples(make_encoder(), _rows(path, split, "data.path", as_json), max_rows)


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


def stream_samples(cfg: DataConfig, tokenizer: Any, chat_template: str | None, seed: int) -> StreamingSamples:
    """The training stream of `cfg` (data.streaming); its first rows are tokenized now, as a check."""
    import datasets

    as_json = cfg.format == "chat"

    def make_encoder() -> SampleEncoder:
        return SampleEncoder(tokenizer, cfg, cfg.path, chat_template)

    # Fails now, naming the row, when the columns or the format do not fit the data.
    check_rows = min(CHECK_ROWS, cfg.max_samples or CHECK_ROWS)
    first_rows = _rows(cfg.path, cfg.split, "data.path", as_json)
    if not any(True for _ in encoded_samples(make_encoder(), first_rows, check_rows)):
        raise UserError(
            f"{cfg.path}: no training samples in the first {check_rows:,} rows (all over-long or with "
            "nothing to learn); check data.max_seq_len and the columns"
        )
    samples = datasets.IterableDataset.from_generator(
        _sample_stream,
        gen_kwargs={
            "make_encoder": make_encoder,
            "path": cfg.path,
            "split": cfg.split,
            "as_json": as_json,
            "max_rows": cfg.max_samples,
        },
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

    chat_template = adopt_chat_template(tokenizer, cfg.format, cfg.chat_template)
    train = stream_samples(cfg, tokenizer, chat_template, seed)
    eval_set = None
    if cfg.val_path is not None:
        eval_cfg = cfg.model_copy(
            update={"path": cfg.val_path, "val_path": None, "streaming": False, "max_samples": None}
        )
        eval_set = prepare_data(eval_cfg, tokenizer, seed, cache_dir, sharing).train
    source = cfg.path if is_hub_id(cfg.path) else str(Path(cfg.path).expanduser())
    report = StreamReport([source], cfg.shuffle_buffer, cfg.packing, len(eval_set) if eval_set else 0)
    return TaskData(train, eval_set, report)
