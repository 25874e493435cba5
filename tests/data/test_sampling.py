"""Sample order: every sample once per epoch, reproducible from (seed, epoch), and length grouping
that really cuts padding."""

from __future__ import annotations

import random

import pytest

from peftrun.data.sampling import EpochShuffle, LengthGroupedShuffle


def padded_tokens(order: list[int], lengths: list[int], micro: int) -> int:
    batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.fixture
def lengths() -> list[int]:
    rng = random.Random(0)
    return [int(min(450, max(20, rng.lognormvariate(4.9, 0.7)))) for _ in range(3000)]


def test_every_sample_once_and_reproducible(lengths: list[int]) -> None:
    for sampler in (EpochShuffle(len(lengths), seed=3), LengthGroupedShuffle(lengths, 4, seed=3)):
        sampler.set_epoch(1)
        first = list(sampler)
        assert sorted(first) == list(range(len(lengths)))
        assert list(sampler) == first
        sampler.set_epoch(2)
        assert list(sampler) != first


def test_length_grouping_cuts_padding(lengths: list[int]) -> None:
    real = sum(lengths)
    plain = padded_tokens(list(EpochShuffle(len(lengths), seed=0)), lengths, 4)
    grouped = padded_tokens(list(LengthGroupedShuffle(lengths, 4, seed=0)), lengths, 4)
    # Measured on this spread: random micro-batches of 4 compute 1.75x the real tokens, grouped 1.02x.
    assert plain > 1.5 * real
    assert grouped < 1.05 * real


def test_epochs_are_cut_to_whole_global_batches(lengths: list[int]) -> None:
    for sampler in (
        EpochShuffle(10, seed=0, multiple=4),
        LengthGroupedShuffle(lengths[:10], 2, seed=0, multiple=4),
    ):
        order = list(sampler)
        assert len(order) == len(sampler) == 8 and len(set(order)) == 8
