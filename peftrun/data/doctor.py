"""`peftrun data RECIPE`: what the model will be trained on, before any training.

Renders rows with the recipe's template and shows which tokens are trained (colour in a terminal,
[[markers]] otherwise), the length statistics of all samples, a length histogram, and warnings: an
end-of-turn token not trained, a turn or content the template drops, a doubled BOS, rows truncated or
dropped and why. `peftrun validate` runs `validate_lines` so template failures surface there.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftrun.data.sources import RowProblem, column_map, read_rows
from peftrun.data.templates import resolve_chat_template
from peftrun.data.tokenize import IGNORE_INDEX, Sample, SampleEncoder, TokenizeStats, supervised_count
from peftrun.errors import UserError

if TYPE_CHECKING:
    from peftrun.recipe.schema import Recipe

__all__ = ["DataDoctor", "run_doctor", "validate_lines"]

CAUSAL_FORMATS = ("alpaca", "chat", "text")
VALIDATE_RENDER_ROWS = 10_000  # validate renders this many chat rows (a few ms per thousand)
_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


@dataclass
class DataDoctor:
    """The recipe's training rows as the model will see them."""

    recipe: Recipe
    tokenizer: Any
    encoder: SampleEncoder = field(init=False)
    rows: Any = field(init=False)  # datasets.Dataset of the training file's rows

    def __post_init__(self) -> None:
        cfg = self.recipe.data
        if self.recipe.task != "causal_lm" or cfg.format not in CAUSAL_FORMATS:
            raise UserError(
                f"peftrun data shows causal_lm training samples; this recipe is {self.recipe.task}"
            )
        template = resolve_chat_template(self.tokenizer, cfg.chat_template) if cfg.format == "chat" else None
        self.encoder = SampleEncoder(self.tokenizer, cfg, cfg.path, template)
        columns = list(dict.fromkeys(column_map(cfg.format, cfg.columns).values()))
        self.rows = read_rows(
            cfg.path,
            cfg.split,
            cfg.max_samples,
            columns=columns,
            as_json=cfg.format == "chat",
            subset=cfg.subset,
            data_files=cfg.data_files,
        )

    def row(self, index: int) -> dict[str, Any]:
        return dict(self.rows[index])

    def method(self) -> str:
        chat = self.encoder.chat
        return chat.method if chat is not None else f"format {self.recipe.data.format}"

    def notes(self, index: int) -> list[str]:
        if self.encoder.chat is None or not self.encoder.chat.known:
            return []
        rendered = self.encoder.render_chat(self.row(index))
        self.encoder.chat.tokenize([rendered])  # BOS notes come from tokenizing
        return rendered.notes

    def samples(self) -> Iterator[tuple[list[Sample], TokenizeStats]]:
        for start in range(0, len(self.rows), 1000):
            batch = [dict(self.rows[i]) for i in range(start, min(start + 1000, len(self.rows)))]
            yield self.encoder.encode(batch, first_row=start + 1)


def shown(tokenizer: Any, sample: Sample, color: bool) -> str:
    """The sample's text with its trained tokens marked: green in a terminal, [[...]] otherwise."""
    out, trained_run = [], False
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained != trained_run:
            out.append((_GREEN if trained else _RESET) if color else ("[[" if trained else "]]"))
            trained_run = trained
        out.append(tokenizer.decode([token]))
    if trained_run:
        out.append(_RESET if color else "]]")
    return "".join(out)


def _percentile(sorted_values: Sequence[int], share: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def length_histogram(lengths: Sequence[int], max_len: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))))
    ax.axvline(max_len, color="red", linestyle="--", label=f"data.max_seq_len = {max_len}")
    ax.set_xlabel("tokens per sample (after truncation)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _warnings(doctor: DataDoctor, stats: TokenizeStats, notes: Counter[str]) -> list[str]:
    cfg = doctor.recipe.data
    found = [f"{count:,} rows: {note}" for note, count in notes.most_common()]
    if stats.truncated:
        found.append(
            f"{stats.truncated:,} samples truncated to data.max_seq_len={cfg.max_seq_len} (data.overlong)"
        )
    if stats.dropped_overlong:
        found.append(
            f"{stats.dropped_overlong:,} samples dropped: longer than data.max_seq_len={cfg.max_seq_len} "
            f"(data.overlong={cfg.overlong}), or nothing trainable left after truncation"
        )
    if stats.dropped_empty:
        found.append(
            f"{stats.dropped_empty:,} rows dropped: nothing to train on (no assistant turn, empty output)"
        )
    chat = doctor.encoder.chat
    if chat is not None and not chat.known:
        found.append(
            "the chat template is of no family peftrun knows: assistant turns are cut out by comparing "
            "renderings of shorter conversations, and EOS is appended"
        )
    return found


def each_dataset(recipe: Recipe) -> list[Recipe]:
    """The recipe once per dataset of data.datasets, each in the short form (data.path: itself)."""
    if not recipe.data.datasets:
        return [recipe]
    return [recipe.model_copy(update={"data": recipe.data.for_source(s)}) for s in recipe.data.sources()]


def run_doctor(recipe: Recipe, tokenizer: Any, show: int, png: Path, color: bool) -> list[str]:
    """The doctor's report as lines, a section per dataset; writes the length histogram to `png`
    (`png` with -0, -1, ... before its suffix, one per dataset, for data.datasets)."""
    recipes = each_dataset(recipe)
    lines: list[str] = []
    for index, one in enumerate(recipes):
        target = png if len(recipes) == 1 else png.with_stem(f"{png.stem}-{index}")
        lines += _doctor_lines(one, tokenizer, show, target, color)
    return lines


def _doctor_lines(recipe: Recipe, tokenizer: Any, show: int, png: Path, color: bool) -> list[str]:
    doctor = DataDoctor(recipe, tokenizer)
    lines = [f"data: {recipe.data.path}: {len(doctor.rows):,} rows, masks from {doctor.method()}"]
    stats, lengths, notes = TokenizeStats(), [], Counter[str]()
    first: list[Sample] = []
    for samples, batch_stats in doctor.samples():
        stats += batch_stats
        lengths += [len(s.input_ids) for s in samples]
        first += samples[: max(0, show - len(first))]
    for index in range(len(doctor.rows)):
        notes.update(set(doctor.notes(index)))
    for sample in first:
        label = "trained tokens in green" if color else "trained tokens in [[ ]]"
        lines += [
            "",
            f"--- row {sample.row} ({len(sample.input_ids)} tokens, {supervised_count(sample.labels)} trained; {label})",
        ]
        lines.append(shown(tokenizer, sample, color))
    lines.append("")
    if lengths:
        ordered = sorted(lengths)
        share = 100 * stats.supervised_tokens / max(stats.total_tokens, 1)
        lines.append(
            f"tokens: {stats.kept:,} samples, {stats.total_tokens:,} tokens, {stats.supervised_tokens:,} trained "
            f"({share:.1f}%); length min {ordered[0]}, median {int(statistics.median(ordered))}, "
            f"p95 {_percentile(ordered, 0.95)}, max {ordered[-1]} (data.max_seq_len {recipe.data.max_seq_len})"
        )
        length_histogram(lengths, recipe.data.max_seq_len, png)
        lines.append(f"histogram: {png}")
    warnings = _warnings(doctor, stats, notes)
    lines += [f"warning: {w}" for w in warnings] or ["warnings: none"]
    return lines


def validate_lines(recipe: Recipe, render_rows: int = VALIDATE_RENDER_ROWS) -> list[str]:
    """Lines for `validate`, per dataset: the first `render_rows` chat rows rendered with the template (a
    row it cannot render is a UserError naming it), and row 1 rendered, masked and tokenized."""
    return [line for one in each_dataset(recipe) for line in _validate_lines(one, render_rows)]


def _validate_lines(recipe: Recipe, render_rows: int) -> list[str]:
    if recipe.task != "causal_lm" or recipe.data.format not in CAUSAL_FORMATS:
        return []
    from peftrun.model.load import load_tokenizer

    limited = recipe.data.model_copy(
        update={"max_samples": min(recipe.data.max_samples or render_rows, render_rows)}
    )
    doctor = DataDoctor(recipe.model_copy(update={"data": limited}), load_tokenizer(recipe.model))
    lines = []
    if doctor.encoder.chat is not None:
        for index in range(len(doctor.rows)):
            try:
                if doctor.encoder.chat.known:
                    doctor.encoder.render_chat(doctor.row(index))
                else:
                    doctor.encoder.segments(doctor.row(index))
            except RowProblem as exc:
                raise UserError(f"{recipe.data.path}: row {index + 1}: {exc}") from None
        lines.append(
            f"data: {len(doctor.rows):,} rows rendered with the chat template (masks from {doctor.method()})"
        )
    (samples, stats), notes = doctor.encoder.encode([doctor.row(0)]), doctor.notes(0)
    if stats.dropped_overlong:
        return [*lines, f"data: row 1 is dropped: longer than data.max_seq_len={recipe.data.max_seq_len}"]
    if not samples:
        return [*lines, "data: row 1 has nothing to train on"]
    sample = samples[0]
    extra = f"; {'; '.join(notes)}" if notes else ""
    return [
        *lines,
        f"data: row 1 is {len(sample.input_ids)} tokens, {supervised_count(sample.labels)} trained{extra}; "
        "`peftrun data RECIPE` shows them",
    ]
