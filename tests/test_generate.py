"""`peftrun generate` / `predict` on causal LMs: batched generation equals one-by-one, and is reproducible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftrun.cli.main import main
from peftrun.errors import UserError
from peftrun.use.generate import (
    GenerationSettings,
    encode_prompt,
    generate_rows,
    load_for_generation,
    read_prompts,
    stop_token_ids,
    turn_end_token_id,
)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversations of different lengths (so batches are left-padded), one with its answer, one raw prompt."""
    from peftrun.demo.run import held_out_rows

    rows: list[dict[str, Any]] = [{"messages": question} for question, _ in held_out_rows()[:6]]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "Reverse the digits. 12"},
                {"role": "assistant", "content": "21"},
            ]
        }
    )
    rows.append({"prompt": "Reverse"})
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stops_at_the_templates_turn_end(demo_run: Path) -> None:
    loaded = load_for_generation(demo_run)
    end = loaded.tokenizer.convert_tokens_to_ids("<|end|>")
    assert turn_end_token_id(loaded.tokenizer) == end
    assert {loaded.tokenizer.eos_token_id, end} <= set(stop_token_ids(loaded.tokenizer, loaded.model))
    # one BOS, as training built the ids
    ids = encode_prompt(
        loaded.tokenizer,
        loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False),
    )
    assert ids[0] == loaded.tokenizer.bos_token_id and ids[1] != loaded.tokenizer.bos_token_id


def test_batched_generation_equals_one_by_one(demo_run: Path, prompts_file: Path) -> None:
    loaded = load_for_generation(demo_run)
    rows = read_prompts(prompts_file)
    batched = generate_rows(loaded, rows, GenerationSettings(max_new_tokens=12, batch_size=4), "p")
    single = generate_rows(loaded, rows, GenerationSettings(max_new_tokens=12, batch_size=1), "p")
    assert batched == single
    from peftrun.demo.run import held_out_rows

    expected = [answer for _, answer in held_out_rows()[:6]]
    right = sum(r["generation"] == e for r, e in zip(batched, expected, strict=False))
    assert right >= 5, [r["generation"] for r in batched[:6]]  # the trained demo answers correctly
    # A conversation that ends with the assistant's answer is asked again without it, and the answer
    # ends at the template's turn end.
    asked = generate_rows(
        loaded, [{"messages": rows[6]["messages"][:1]}], GenerationSettings(max_new_tokens=12), "p"
    )
    assert batched[6]["generation"] == asked[0]["generation"] and batched[6]["finish"] == "stop"


def test_generate_command_is_deterministic_with_a_seed(
    demo_run: Path, prompts_file: Path, tmp_path: Path
) -> None:
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        argv = ["generate", str(demo_run), "--prompts", str(prompts_file), "--out", str(out)]
        assert main([*argv, "--temperature", "1.5", "--seed", "7", "--max-new-tokens", "8"]) == 0
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 8
    assert {"row", "prompt", "generation", "tokens", "finish"} <= set(outs[0][0])


def test_predict_on_a_causal_lm_run_generates(demo_run: Path, tmp_path: Path) -> None:
    from peftrun.demo.tiny import DEMO_DATA_DIR

    out = tmp_path / "preds.jsonl"
    data = tmp_path / "eval.jsonl"
    data.write_text("".join((DEMO_DATA_DIR / "eval.jsonl").read_text().splitlines(keepends=True)[:5]))
    assert main(["predict", str(demo_run), "--data", str(data), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    preds = [json.loads(line)["generation"] for line in out.read_text().splitlines()]
    assert preds == [r["messages"][-1]["content"] for r in rows]


def test_bad_prompts_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: expected a JSON object"):
        read_prompts(bad)
