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
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftrun.data.tokenize import IGNORE_INDEX, pad

if TYPE_CHECKING:
    import datasets
    import torch


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of at most `capacity` tokens, longest samples first, each into
    the fullest bin that still has room (O(n log n)). Deterministic: ties keep index order."""
    if any(length > capacity for length in lengths):
        raise ValueError(f"a sample is longer than the packing capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (room left, bin number), sorted: the first entry with room >= length is the best fit.
    room: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
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


def pack_dataset(samples: datasets.Dataset, capacity: int) -> datasets.Dataset:
    """Packed rows (input_ids, labels, position_ids) from tokenized samples (input_ids, labels)."""
    import datasets

    input_ids: list[list[int]] = samples["input_ids"]
    labels: list[list[int]] = samples["labels"]
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in best_fit_decreasing([len(ids) for ids in input_ids], capacity):
        # Members in the data file's order inside a row: easier to read when debugging.
        row = packed_row([{"input_ids": input_ids[i], "labels": labels[i]} for i in sorted(members)])
        for name, values in row.items():
            rows[name].append(values)
    return datasets.Dataset.from_dict(rows)


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
