"""The recipe reference is generated from the schema; the checked-in copy must match it."""

from __future__ import annotations

from pathlib import Path

from peftrun.recipe.docs import key_docs, reference_markdown

REPO = Path(__file__).resolve().parents[2]


def test_docs_recipe_md_is_up_to_date() -> None:
    assert (REPO / "docs" / "recipe.md").read_text() == reference_markdown(), (
        "run: peftrun keys --markdown > docs/recipe.md"
    )


def test_every_key_is_described() -> None:
    undocumented = [d.key for d in key_docs() if len(d.description) < 10]
    assert not undocumented
    keys = {d.key for d in key_docs()}
    assert {"output_dir", "train.max_steps", "train.lr", "method.kind", "data.path"} <= keys
