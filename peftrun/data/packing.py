"""Packing: several samples per training sequence, with nothing crossing a sample boundary.

Real SFT data has very uneven lengths, so a batch padded to its longest sample is mostly padding.
Packed rows hold several samples each (best-fit-decreasing, up to `max_seq_len` tokens) and carry
`position_ids` that restart at 0 for every sample and no `attention_mask`: transformers then derives
the sample boundaries from the position ids (`masking_utils.find_packed_sequence_indices`, done when
no KV cache is in use, as in training) and lets
each token attend only within its own sample: a block-diagonal causal mask for eager/sdpa attention,
variable-length kernels for flash attention. Positions restart, so each sample sees the rotary/learned
positions it would see alone.

The first label of every sample is ignored: the token before it belongs to the previous sample.
Unpacked, a sample's first label is never a target either (nothing precedes it), so a packed sample
is trained on exactly the tokens it would be trained on alone.

The plan comes from the samples' `length` column and the packed rows are built when the loader asks
for them, so packing a big set costs a few bytes per sample, not a second copy of its tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset as TorchDataset

from peftrun.data.arrow import column
from peftrun.data.tokenize import IGNORE_INDEX, pad

if TYPE_CHECKING:
    import datasets
    import numpy as np
    import torch


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Group sample indices into bins of at most `capacity` tokens, longest samples first, each into
    the fullest bin that still has room (O(n log n)). Deterministic: ties keep index order."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sample is longer than the packing capacity {capacity}")
    order = np.argsort(-lengths, kind="stable").tolist()  # stable: equal lengths keep index order
    sizes = lengths.tolist()
    bins: list[list[int]] = []
    # (room left, bin number), sorted: the first entry with room >= length is the best fit.
    room: list[tuple[int, int]] = []
    for index in order:
        length = sizes[index]
        slot = bisect.bisect_left(room, (length, -1))
        if slot == len(room):
            bins.append([index])
            bisect.insort(room, (capacity - length, len(bins) - 1))
            continue
        left, number = room.pop(slot)
        bins[number].append(index)
        bisect.insort(room, (left - length, number))
    return bins


def packed_row(samples: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """One packed row from its member samples: ids concatenated, each sample's first label ignored,
    positions restarting at 0 for each sample."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for sample in samples:
        row["input_ids"] += sample["input_ids"]
        row["labels"] += [IGNORE_INDEX, *sample["labels"][1:]]
        row["position_ids"] += range(len(sample["input_ids"]))
    return row


def sample_lengths(samples: datasets.Dataset) -> np.ndarray:
    """Each sample's token count, from the `length` column (or the Arrow list lengths), not the tokens."""
    import pyarrow.compute as pc

    if "length" in samples.column_names:
        return column(samples, "length")
    ids = samples.select_columns(["input_ids"]).with_format("arrow")[:].column("input_ids")
    return pc.list_value_length(ids).to_numpy()


class PackedDataset(TorchDataset[dict[str, list[int]]]):
    """Packed rows, built on access: row i concatenates the samples of bin i (in file order).

    Only the plan is held: the bins' members as one array and where each bin starts in it. The tokens
    stay in the (memory-mapped) samples dataset.
    """

    def __init__(self, samples: datasets.Dataset, capacity: int) -> None:
        import numpy as np

        bins = best_fit_decreasing(sample_lengths(samples), capacity)
        # Members in file order inside a row: easier to read when debugging.
        self.members = np.fromiter((i for b in bins for i in sorted(b)), dtype=np.int64)
        self.starts = np.cumsum([0, *(len(b) for b in bins)], dtype=np.int64)
        self.samples = samples.select_columns(["input_ids", "labels"])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < len(self):
            raise IndexError(f"packed row {index} of {len(self)}")
        members = self.members[self.starts[index] : self.starts[index + 1]].tolist()
        found = self.samples[members]
        return packed_row(
            [
                {"input_ids": ids, "labels": labels}
                for ids, labels in zip(found["input_ids"], found["labels"], strict=True)
            ]
        )

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return (self[i] for i in range(len(self)))


def pack_dataset(samples: datasets.Dataset, capacity: int) -> PackedDataset:
    """Packed rows (input_ids, labels, position_ids) of tokenized samples (input_ids, labels[, length])."""
    return PackedDataset(samples, capacity)


def collate_packed(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into input_ids, labels and position_ids (no attention_mask, see above),
    with num_tokens, the real tokens of each row (for throughput; not a model input).

    The padding of a row gets positions 0, 1, ... of its own: to the mask builder it is one more
    sample, which attends only to itself and is never attended to; its labels are ignored.
    """
    import torch

    if not rows:
        raise ValueError("collate_packed needs at least one row")
    input_ids = pad([row["input_ids"] for row in rows], pad_id)
    longest = input_ids.shape[1]
    position_ids = pad([[*row["position_ids"], *range(longest - len(row["input_ids"]))] for row in rows], 0)
    return {
        "input_ids": input_ids,
        "labels": pad([row["labels"] for row in rows], IGNORE_INDEX),
        "position_ids": position_ids,
        "num_tokens": torch.tensor([len(row["input_ids"]) for row in rows]),
    }
