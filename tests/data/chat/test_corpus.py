"""Every family x conversation of the corpus: exactly the model's text is trained, and nothing is added.

The expected trained runs (tests/data/chat/golden.json) were read and checked by hand; regenerate them
with `python -m tests.data.chat.test_corpus` after a deliberate change and review the diff.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from peftrun.data.tokenize import IGNORE_INDEX, SampleEncoder
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig
from tests.data.chat.corpus import CONVERSATIONS, FAMILIES, PROMPT_TEXTS, Family, build_tokenizer

GOLDEN = Path(__file__).with_name("golden.json")
CASES = [(f, c) for f in FAMILIES for c in CONVERSATIONS]


@pytest.fixture(scope="session")
def tokenizers() -> dict[str, Any]:
    return {family.name: build_tokenizer(family) for family in FAMILIES}


def trained_runs(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        assert label in (token, IGNORE_INDEX)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def outcome(family: Family, conversation: str, tokenizer: Any, **settings: Any) -> dict[str, Any]:
    """What peftrun makes of one corpus conversation: the trained runs, or the one-line error."""
    cfg = DataConfig(path="corpus.jsonl", format="chat", **settings)
    encoder = SampleEncoder(tokenizer, cfg, "corpus.jsonl", tokenizer.chat_template)
    row = CONVERSATIONS[conversation]
    try:
        samples, _ = encoder.encode([row])
    except UserError as exc:
        return {"error": str(exc)}
    (sample,) = samples
    rendered = encoder.render_chat(row)
    return {
        "trained": trained_runs(tokenizer, sample.input_ids, sample.labels),
        "notes": rendered.notes,
        "text": tokenizer.decode(sample.input_ids),
        "rendered": rendered.text,
    }


@pytest.mark.parametrize(("family", "conversation"), CASES, ids=[f"{f.name}-{c}" for f, c in CASES])
def test_trained_tokens_are_the_models_text(
    family: Family, conversation: str, tokenizers: dict[str, Any]
) -> None:
    tokenizer = tokenizers[family.name]
    found = outcome(family, conversation, tokenizer)
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))[f"{family.name}/{conversation}"]
    if "error" in expected:
        assert found == {"error": expected["error"]}
        return
    assert found["trained"] == expected["trained"]
    assert found["notes"] == expected["notes"]
    # Nothing added, nothing lost: the tokens are the rendering (with BOS where the tokenizer adds it).
    bos = family.bos if family.adds_bos and not found["rendered"].startswith(family.bos or "") else ""
    assert found["text"] == bos + found["rendered"]
    assert found["text"].count(family.bos or "\0") <= 1
    messages = CONVERSATIONS[conversation]["messages"]
    answers = [m for m in messages if m["role"] == "assistant"]
    trained = "".join(found["trained"])
    for message in answers:  # each answer, as the template renders it, is trained
        assert (message["content"] or "").split("</think>")[-1].strip() in trained
    for prompt in PROMPT_TEXTS:  # nothing the user, the system prompt or a tool wrote is
        assert prompt not in trained
    unended = [n for n in found["notes"] if "no end-of-turn token" in n]
    assert sum(run.endswith(family.end_of_turn) for run in found["trained"]) == len(found["trained"]) - len(
        unended
    )


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_train_on_last_and_without_reasoning(family: Family, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[family.name]
    everything = outcome(family, "three_turns", tokenizer)["trained"]
    assert outcome(family, "three_turns", tokenizer, train_on="last")["trained"] == everything[-1:]
    with_reasoning = outcome(family, "reasoning_inline", tokenizer)["trained"]
    without = outcome(family, "reasoning_inline", tokenizer, train_on_reasoning=False)["trained"]
    assert without[-1].endswith(family.end_of_turn)
    assert "</think>" not in "".join(without)
    assert "Yes, 7 is prime." in without[-1]
    assert ("</think>" in "".join(with_reasoning)) == (without != with_reasoning)


def test_generation_tags_are_the_spans_when_the_template_has_them(tokenizers: dict[str, Any]) -> None:
    """A template that marks the model's output itself is taken at its word, whatever its markers."""
    tagged = (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
        "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    tokenizer = tokenizers["qwen2_5"]
    cfg = DataConfig(path="x.jsonl", format="chat")
    encoder = SampleEncoder(tokenizer, cfg, "x.jsonl", tagged)
    assert encoder.chat is not None and encoder.chat.method == "the template's {% generation %} blocks"
    samples, _ = encoder.encode([CONVERSATIONS["three_turns"]])
    assert trained_runs(tokenizer, samples[0].input_ids, samples[0].labels) == [
        "Blue.<|im_end|>",
        "Green.<|im_end|>",
        "Red.<|im_end|>",
    ]


def regenerate() -> None:
    golden = {}
    for family, conversation in CASES:
        found = outcome(family, conversation, build_tokenizer(family))
        golden[f"{family.name}/{conversation}"] = {
            k: found[k] for k in ("error", "trained", "notes") if k in found
        }
    GOLDEN.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    regenerate()
