"""Which samples of several datasets make the training set: a deterministic, seeded mixture.

    parts = [MixturePart(source.path, len(samples_i), weight=source.weight, take=source.samples) ...]
    mixture = plan_mixture(parts, seed=recipe.train.seed)
    train = concatenate_datasets(tokenized).select(mixture.indices)
    for line in mixture.lines(): log.info(line)

Per dataset (data.datasets[]):
- `samples: N` takes exactly N samples: a seeded choice without replacement when it has N or more,
  else every sample N // size times plus a seeded choice of the remainder.
- `weight` datasets share the weighted part of the mixture, as large as they are together. Each slot
  of it goes to a dataset drawn by normalized weight (drawn all at once, as multinomial counts), and a
  dataset's slots take its samples without replacement until they are used up, then again.
- neither: every sample once.

The mixture is planned once, on the main process, before any sharding; it depends on the seed and the
datasets only, never on the number of processes. Each dataset draws from its own child of the seed, so
changing one dataset's spec leaves the others' choices as they were. Pure numpy; O(mixture) memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from peftrun.errors import UserError

__all__ = ["Mixture", "MixturePart", "PartReport", "describe", "plan_mixture"]


@dataclass(frozen=True)
class MixturePart:
    """One dataset: how many tokenized samples it has and what the recipe asks of it."""

    name: str  # for the report and errors: its path or recipe key
    samples: int  # tokenized samples it has, after drops
    weight: float | None = None  # data.datasets[].weight
    take: int | None = None  # data.datasets[].samples
    rows: int | None = None  # rows read, for the report
    dropped: int = 0  # rows dropped while tokenizing, for the report
    lengths: np.ndarray | None = field(default=None, compare=False)  # tokens per sample, for the report

    def __post_init__(self) -> None:
        if self.weight is not None and self.take is not None:
            raise ValueError(f"{self.name}: weight and take are exclusive")
        if self.lengths is not None and len(self.lengths) != self.samples:
            raise ValueError(f"{self.name}: {len(self.lengths)} lengths for {self.samples} samples")


@dataclass(frozen=True)
class PartReport:
    name: str
    rows: int | None
    samples: int  # the dataset's samples
    dropped: int
    taken: int  # its samples in the mixture, repeats included
    share: float  # taken / mixture size
    tokens: int | None  # tokens of the samples taken, when lengths were given

    @property
    def passes(self) -> float:
        """How many times over its samples the mixture goes (above 1: oversampled)."""
        return self.taken / self.samples if self.samples else 0.0


@dataclass
class Mixture:
    # Global indices into the concatenation of the parts' samples (in the parts' order), sorted
    # ascending; an oversampled sample appears once per repeat. The training order is the sampler's.
    indices: np.ndarray
    report: list[PartReport]

    def lines(self) -> list[str]:
        """Human-readable summary for the log, one line per dataset."""
        return describe(self.report)


def describe(report: Sequence[PartReport]) -> list[str]:
    """The log's lines for a mixture's per-dataset report (also as read back from a cache entry)."""
    out = [f"data: mixture of {len(report)} datasets, {sum(part.taken for part in report):,} samples"]
    for part in report:
        rows = f"{part.rows:,} rows, " if part.rows is not None else ""
        tokens = f", {part.tokens:,} tokens" if part.tokens is not None else ""
        out.append(
            f"data:   {part.name}: {rows}{part.samples:,} samples ({part.dropped:,} dropped) -> "
            f"{part.taken:,} taken ({100 * part.share:.1f}%, {part.passes:.2f} passes){tokens}"
        )
    return out


def plan_mixture(parts: Sequence[MixturePart], seed: int) -> Mixture:
    """The mixture of `parts` for `seed` (see the module docstring); a UserError when a dataset must give
    samples it does not have, or when the mixture would be empty."""
    # Child i+1 is dataset i's generator, child 0 draws the weighted slots: each is the same whatever
    # the number of datasets.
    children = np.random.SeedSequence(seed).spawn(len(parts) + 1)
    counts = _counts(parts, np.random.default_rng(children[0]))
    offsets = np.concatenate([[0], np.cumsum([part.samples for part in parts], dtype=np.int64)])
    chosen: list[np.ndarray] = []
    for index, (part, count) in enumerate(zip(parts, counts, strict=True)):
        if count and not part.samples:
            raise UserError(f"{part.name}: no samples left to take {count:,} from (all rows were dropped)")
        local = _take(part.samples, count, np.random.default_rng(children[index + 1]))
        chosen.append(offsets[index] + local)
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    if not len(indices):
        raise UserError("data.datasets: the mixture is empty (no dataset has samples left)")
    report = [
        PartReport(
            name=part.name,
            rows=part.rows,
            samples=part.samples,
            dropped=part.dropped,
            taken=len(local),
            share=len(local) / len(indices),
            tokens=int(part.lengths[local - offsets[i]].sum()) if part.lengths is not None else None,
        )
        for i, (part, local) in enumerate(zip(parts, chosen, strict=True))
    ]
    return Mixture(indices.astype(np.int64, copy=False), report)


def _counts(parts: Sequence[MixturePart], rng: np.random.Generator) -> list[int]:
    """Samples each dataset gives: `take`, all of them, or its draw of the weighted part."""
    weighted = [i for i, part in enumerate(parts) if part.weight is not None]
    counts = [part.take if part.take is not None else part.samples for part in parts]
    if weighted:
        size = sum(parts[i].samples for i in weighted)
        weights = np.array([parts[i].weight for i in weighted], dtype=np.float64)
        for i, drawn in zip(weighted, rng.multinomial(size, weights / weights.sum()), strict=True):
            counts[i] = int(drawn)
    return counts


def _take(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` of range(size), sorted: whole passes over all of it, then a seeded choice without
    replacement for the rest (the same as reading seeded permutations one after another)."""
    passes, rest = divmod(count, size) if size else (0, 0)
    whole = np.tile(np.arange(size, dtype=np.int64), passes)
    extra = rng.choice(size, size=rest, replace=False).astype(np.int64) if rest else np.zeros(0, np.int64)
    return np.sort(np.concatenate([whole, extra]))
