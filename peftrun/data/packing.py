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

# Samples assigned per block in assign_bins: Python ints for a block only.
_BLOCK = 1 << 16

if TYPE_CHECKING:
    import datasets
    import numpy as np
    import torch


def assign_bins(lengths: Sequence[int] | np.ndarray, capacity: int) -> np.ndarray:
    """The bin number of each sample: bins of at most `capacity` tokens, longest samples first, each into
    the fullest bin that still has room (best-fit-decreasing, O(n log n)). Deterministic: ties keep
    index order. Memory: a few int64 arrays of n, plus one (room, bin) pair per open bin; the samples are
    visited a block at a time, so no list of n Python ints is ever built."""
    import numpy as np

    sizes = np.asarray(lengths, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > capacity:
        raise ValueError(f"a sample is longer than the packing capacity {capacity}")
    order = np.argsort(-sizes, kind="stable")  # stable: equal lengths keep index order
    bin_of = np.empty(len(sizes), dtype=np.int64)
    bins = 0
    # (room left, bin number), sorted: the first entry with room >= length is the best fit.
    room: list[tuple[int, int]] = []
    for start in range(0, len(order), _BLOCK):
        block = order[start : start + _BLOCK]
        for index, length in zip(block.tolist(), sizes[block].tolist(), strict=True):
            slot = bisect.bisect_left(room, (length, -1))
            if slot == len(room):
                bin_of[index] = bins
                bisect.insort(room, (capacity - length, bins))
                bins += 1
                continue
            left, number = room.pop(slot)
            bin_of[index] = number
            bisect.insort(room, (left - length, number))
    return bin_of


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """The bins of `assign_bins` as lists of sample indices (in index order), bins in order of opening."""
    bin_of = assign_bins(lengths, capacity)
    bins: list[list[int]] = [[] for _ in range(int(bin_of.max()) + 1 if len(bin_of) else 0)]
    for index, number in enumerate(bin_of.tolist()):
        bins[number].append(index)
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

        bin_of = assign_bins(sample_lengths(samples), capacity)
        # Grouped by bin, members in file order inside a row: easier to read when debugging.
        self.members = np.lexsort((np.arange(len(bin_of)), bin_of))
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(bin_of))]).astype(np.int64)
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
