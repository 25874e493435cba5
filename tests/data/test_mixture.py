"""The mixture of several datasets: shares by weight, exact sample counts, oversampling, determinism."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from peftrun.data.mixture import MixturePart, plan_mixture
from peftrun.errors import UserError


def _per_part(indices: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """The local indices of each part, from global ones."""
    edges = np.cumsum([0, *sizes])
    return [indices[(indices >= lo) & (indices < hi)] - lo for lo, hi in pairwise(edges)]


def test_weights_give_their_shares_within_sampling_error() -> None:
    parts = [MixturePart("a", 6000, weight=0.75), MixturePart("b", 6000, weight=0.25)]
    mixture = plan_mixture(parts, seed=0)
    assert len(mixture.indices) == 12000  # the weighted part is as large as its datasets together
    a, b = _per_part(mixture.indices, [6000, 6000])
    # Binomial(12000, 0.75): standard deviation ~47 samples; 4 of them is 0.016 of the share.
    assert abs(len(a) / 12000 - 0.75) < 0.016
    assert len(a) + len(b) == 12000
    assert [round(r.share, 2) for r in mixture.report] == [round(len(a) / 12000, 2), round(len(b) / 12000, 2)]
    # a (9000 slots of 6000 samples) is oversampled: every sample once, the rest without repeats
    assert np.bincount(a, minlength=6000).min() == 1 and np.bincount(a).max() == 2
    # b (about 3000 slots) is taken without replacement
    assert np.bincount(b).max() == 1


def test_same_seed_same_indices_other_seed_other_indices() -> None:
    parts = [MixturePart("a", 500, weight=2.0), MixturePart("b", 300, take=400), MixturePart("c", 50)]
    first = plan_mixture(parts, seed=7).indices
    assert first.dtype == np.int64
    assert np.array_equal(first, plan_mixture(parts, seed=7).indices)
    assert not np.array_equal(first, plan_mixture(parts, seed=8).indices)
    assert np.all(np.diff(first) >= 0), "indices come sorted"


def test_one_datasets_spec_leaves_the_others_choices() -> None:
    base = plan_mixture([MixturePart("a", 100, take=30), MixturePart("b", 100, take=40)], seed=1)
    changed = plan_mixture([MixturePart("a", 100, take=60), MixturePart("b", 100, take=40)], seed=1)
    assert np.array_equal(base.indices[base.indices >= 100], changed.indices[changed.indices >= 100])


def test_sample_counts_are_exact() -> None:
    mixture = plan_mixture([MixturePart("a", 100, take=37), MixturePart("b", 10, take=3)], seed=0)
    a, b = _per_part(mixture.indices, [100, 10])
    assert (len(a), len(b)) == (37, 3)
    assert len(set(a.tolist())) == 37 and len(set(b.tolist())) == 3  # no repeats when it has enough
    assert [r.taken for r in mixture.report] == [37, 3]


def test_oversampling_is_whole_copies_plus_a_seeded_remainder() -> None:
    mixture = plan_mixture([MixturePart("small", 10, take=25)], seed=3)
    counts = np.bincount(mixture.indices, minlength=10)
    assert counts.sum() == 25
    assert sorted(counts.tolist()) == [2] * 5 + [3] * 5  # two whole passes, then 5 distinct samples
    assert mixture.report[0].passes == 2.5


def test_neither_weight_nor_samples_takes_every_sample_once() -> None:
    lengths = np.arange(1, 21, dtype=np.int64)
    mixture = plan_mixture(
        [MixturePart("all", 20, rows=22, dropped=2, lengths=lengths), MixturePart("w", 5, weight=1.0)], seed=0
    )
    all_part, weighted = _per_part(mixture.indices, [20, 5])
    assert all_part.tolist() == list(range(20))
    assert len(weighted) == 5  # a single weighted dataset fills the weighted part alone
    report = mixture.report[0]
    assert (report.rows, report.samples, report.dropped, report.taken, report.tokens) == (22, 20, 2, 20, 210)
    assert "all: 22 rows, 20 samples (2 dropped) -> 20 taken (80.0%, 1.00 passes), 210 tokens" in "\n".join(
        mixture.lines()
    )


def test_taking_from_a_dataset_with_no_samples_is_one_clear_line() -> None:
    with pytest.raises(UserError, match=r"^b.jsonl: no samples left to take 5 from"):
        plan_mixture([MixturePart("a.jsonl", 3), MixturePart("b.jsonl", 0, take=5)], seed=0)
    with pytest.raises(UserError, match="the mixture is empty"):
        plan_mixture([MixturePart("a.jsonl", 0)], seed=0)


def test_millions_of_samples_plan_quickly_in_int64() -> None:
    parts = [MixturePart("a", 3_000_000, weight=0.5), MixturePart("b", 1_000_000, weight=0.5)]
    mixture = plan_mixture(parts, seed=0)
    assert len(mixture.indices) == 4_000_000
    assert mixture.indices.max() < 4_000_000
