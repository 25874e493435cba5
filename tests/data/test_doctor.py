"""`peftrun data`: the samples as the model sees them, from a real recipe file and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftrun.cli.main import main
from peftrun.data.doctor import run_doctor
from peftrun.errors import UserError
from peftrun.model.load import load_tokenizer
from peftrun.recipe.load import load_recipe
from tests.data.chat.corpus import CONVERSATIONS, build_tokenizer
from tests.data.chat.corpus import FAMILIES as CHAT_FAMILIES
from tests.test_recipes import FAMILIES, RECIPES, REPO, family_of


def _recipe(tmp_path: Path, family: str, rows: list[dict[str, Any]], **data: Any) -> Path:
    tokenizer = build_tokenizer(next(f for f in CHAT_FAMILIES if f.name == family))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tmp_path / "tok")},
        "data": {"path": str(path), "format": "chat", "max_seq_len": 400, **data},
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    return tmp_path / "recipe.yaml"


def test_data_shows_trained_tokens_stats_and_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [CONVERSATIONS["tool_call"], CONVERSATIONS["three_turns"], CONVERSATIONS["reasoning_field"]] * 3
    recipe = _recipe(tmp_path, "qwen3", rows, max_seq_len=1000)
    assert main(["data", str(recipe), "--rows", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "9 rows, masks from chatml turn markers" in out
    # Only the model's turns are marked, each with its end-of-turn token.
    assert (
        '<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>"
    ) in out
    assert "<|im_start|>assistant\n[[<think>\n\n</think>\n\nIt is 21 C in Paris.<|im_end|>]]\n" in out
    assert "tokens: 9 samples" in out
    assert "warnings: none" in out
    assert main(["data", str(recipe), "data.max_seq_len=300", "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "tokens: 6 samples" in out
    assert "warning: 3 samples dropped: longer than data.max_seq_len=300 (data.overlong=truncate)" in out
    assert (tmp_path / "run" / "data_lengths.png").stat().st_size > 0


def test_a_template_that_cannot_render_a_row_names_the_file_and_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tmp_path, "gemma2", [CONVERSATIONS["single"], CONVERSATIONS["system"]])
    assert main(["data", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"peftrun: error: {tmp_path / 'train.jsonl'}: row 2: the chat template cannot render this conversation: "
        "System role not supported\n"
    )


CAUSAL_RECIPES = [p for p in RECIPES if load_recipe(p).task == "causal_lm"]


@pytest.mark.parametrize("path", CAUSAL_RECIPES, ids=[p.stem for p in CAUSAL_RECIPES])
def test_data_doctor_on_every_shipped_recipe(
    path: Path, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's recipes, with a tiny model of their family's tokenizer: every sample renders."""
    monkeypatch.chdir(REPO)
    fixture, _ = FAMILIES[family_of(load_recipe(path).model.name_or_path)]
    recipe = load_recipe(path, [f"model.name_or_path={request.getfixturevalue(fixture)}"])
    lines = run_doctor(recipe, load_tokenizer(recipe.model), 1, tmp_path / "lengths.png", color=False)
    assert lines[0].startswith(f"data: {recipe.data.path}: ")
    assert any(line.startswith("tokens: ") for line in lines)
    assert (tmp_path / "lengths.png").is_file()


def test_validate_renders_the_rows_with_the_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row the template cannot render fails `validate`, not training; row 1 is shown masked."""
    from peftrun.data.doctor import validate_lines

    recipe = _recipe(tmp_path, "gemma2", [CONVERSATIONS["single"], CONVERSATIONS["three_turns"]])
    lines = validate_lines(load_recipe(recipe))
    assert lines == [
        "data: 2 rows rendered with the chat template (masks from gemma turn markers)",
        "data: row 1 is 60 tokens, 22 trained; `peftrun data RECIPE` shows them",
    ]
    bad = _recipe(tmp_path, "gemma2", [CONVERSATIONS["single"], CONVERSATIONS["system"]])
    with pytest.raises(
        UserError, match=r"train.jsonl: row 2: the chat template cannot render this conversation: System role"
    ):
        validate_lines(load_recipe(bad))


def test_data_shows_each_dataset_of_data_datasets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, "qwen3", [CONVERSATIONS["three_turns"]] * 2, max_seq_len=1000)
    data = json.loads(recipe.read_text())
    (tmp_path / "more.jsonl").write_text(json.dumps(CONVERSATIONS["tool_call"]) + "\n")
    data["data"]["datasets"] = [{"path": data["data"].pop("path")}, {"path": str(tmp_path / "more.jsonl")}]
    recipe.write_text(json.dumps(data))
    assert main(["data", str(recipe), "--rows", "0", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert f"data: {tmp_path / 'train.jsonl'}: 2 rows" in out
    assert f"data: {tmp_path / 'more.jsonl'}: 1 rows" in out
    assert (tmp_path / "run" / "data_lengths-0.png").is_file()
    assert (tmp_path / "run" / "data_lengths-1.png").is_file()
