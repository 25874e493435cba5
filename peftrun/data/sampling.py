"""Sample order per epoch: a plain permutation, or one that groups similar lengths into micro-batches.

Both are functions of (seed, epoch) only, so a resumed run sees exactly the order it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

# Samples sorted by length together: large enough that neighbours have similar lengths, small enough
# that the order stays random at the scale of the epoch (transformers' LengthGroupedSampler uses 50).
MEGABATCH_MICRO_BATCHES = 64


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class EpochShuffle(Sampler[int]):
    """A permutation per epoch from (seed, epoch), cut to a whole number of global batches.

    `multiple` is the samples of one optimizer step over all processes. Without the cut, an epoch's
    tail would be split differently by different process counts (accelerate even pads the processes'
    shares with repeated samples), so 2 processes would not train what 1 process trains.
    """

    def __init__(self, size: int, seed: int, multiple: int = 1) -> None:
        self.size, self.seed, self.epoch, self.multiple = size, seed, 0, multiple

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=_generator(self.seed, self.epoch))
        return iter(order[: len(self)].tolist())

    def __len__(self) -> int:
        return self.size - self.size % self.multiple


class LengthGroupedShuffle(EpochShuffle):
    """Like EpochShuffle, but each run of `micro_batch_size` consecutive indices holds samples of
    similar length, so a micro-batch padded to its longest sample wastes little.

    The epoch's permutation is cut into megabatches of MEGABATCH_MICRO_BATCHES micro-batches, each
    sorted by length, cut into micro-batches, whose order is then shuffled: every micro-batch is
    homogeneous, and which lengths come when stays random.
    """

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, seed: int, multiple: int = 1) -> None:
        super().__init__(len(lengths), seed, multiple)
        self.lengths = torch.as_tensor(list(lengths))
        self.micro = micro_batch_size

    def __iter__(self) -> Iterator[int]:
        generator = _generator(self.seed, self.epoch)
        order = torch.randperm(self.size, generator=generator)
        span = self.micro * MEGABATCH_MICRO_BATCHES
        micro_batches: list[torch.Tensor] = []
        for start in range(0, self.size, span):
            mega = order[start : start + span]
            mega = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            micro_batches += list(mega.split(self.micro))
        shuffled = torch.randperm(len(micro_batches), generator=generator).tolist()
        return iter(torch.cat([micro_batches[i] for i in shuffled])[: len(self)].tolist())
