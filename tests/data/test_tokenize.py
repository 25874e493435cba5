"""Loss masks, checked token by token: only the answer (and EOS) is trained, BOS once, EOS always."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from peftrun.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, CHAT_TEMPLATES, resolve_chat_template
from peftrun.data.tokenize import IGNORE_INDEX, Sample, SampleEncoder, TokenizeStats
from peftrun.errors import UserError
from peftrun.recipe.schema import DataConfig

WORDS = "the quick brown fox jumps over a lazy dog hello world answer question sum add two three five"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "add two and three"},
    {"role": "assistant", "content": "five"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from peftrun.demo.tiny import build_tokenizer

    corpus = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT, WORDS] * 4
    return build_tokenizer(tmp_path_factory.mktemp("tok"), corpus, vocab_size=400)


def encode(tok: Any, rows: list[dict[str, Any]], **fields: Any) -> tuple[list[Sample], TokenizeStats]:
    cfg = DataConfig(path="x.jsonl", **fields)
    template = resolve_chat_template(tok, cfg.chat_template) if cfg.format == "chat" else None
    return SampleEncoder(tok, cfg, "x.jsonl", template).encode(rows)


def one(tok: Any, row: dict[str, Any], **fields: Any) -> Sample:
    samples, _ = encode(tok, [row], **fields)
    assert len(samples) == 1
    return samples[0]


def ids_of(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def runs(tok: Any, sample: Sample, trainable: bool = True) -> list[str]:
    """Decoded maximal runs of trainable (or of masked) tokens; each label must equal its token or be masked."""
    found, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        assert label in (token, IGNORE_INDEX)
        if (label != IGNORE_INDEX) == trainable:
            current.append(token)
        elif current:
            found.append(tok.decode(current))
            current = []
    if current:
        found.append(tok.decode(current))
    return found


# --------------------------------------------------------------------------------------------- alpaca


@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_masks_the_prompt_token_by_token(tok: Any, with_input: bool) -> None:
    row = {"instruction": "add two and three", "input": "two three" if with_input else "", "output": "five"}
    sample = one(tok, row)
    template = ALPACA_WITH_INPUT if with_input else ALPACA_NO_INPUT
    prompt_ids = ids_of(tok, template.format(**row))
    answer_ids = ids_of(tok, "five")
    assert sample.input_ids == [tok.bos_token_id, *prompt_ids, *answer_ids, tok.eos_token_id]
    assert sample.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*answer_ids, tok.eos_token_id]
    assert runs(tok, sample) == ["five</s>"]
    assert ("### Input:" in tok.decode(sample.input_ids)) is with_input


def test_alpaca_plain_prompt(tok: Any) -> None:
    sample = one(tok, {"instruction": "add", "input": "two three", "output": "five"}, prompt_template="plain")
    assert runs(tok, sample, trainable=False) == ["<s>add\n\ntwo three\n"]
    assert runs(tok, sample) == ["five</s>"]
    sample = one(tok, {"instruction": "add", "input": "", "output": "five"}, prompt_template="plain")
    assert runs(tok, sample, trainable=False) == ["<s>add\n"]


def test_train_on_prompt_trains_every_token_after_bos(tok: Any) -> None:
    sample = one(tok, {"instruction": "add two", "input": "", "output": "five"}, train_on_prompt=True)
    assert sample.labels[0] == IGNORE_INDEX  # BOS: no token before it predicts it
    assert sample.labels[1:] == sample.input_ids[1:]
    chat = one(tok, {"messages": CONVERSATION}, format="chat", train_on_prompt=True)
    assert chat.labels[1:] == chat.input_ids[1:]


# ----------------------------------------------------------------------------------------------- chat


def test_chat_trains_only_assistant_turns(tok: Any) -> None:
    sample = one(tok, {"messages": CONVERSATION}, format="chat")  # the tokenizer's own template
    assert runs(tok, sample) == ["hello world<|end|>", "five<|end|></s>"]
    assert runs(tok, sample, trainable=False) == [
        "<s><|system|>Be brief.<|end|><|user|>hello<|end|><|assistant|>",
        "<|user|>add two and three<|end|><|assistant|>",
    ]
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(sample.input_ids) == rendered + "</s>"
    assert sample.input_ids.count(tok.bos_token_id) == 1  # the template renders <s> itself


@pytest.mark.parametrize(
    ("name", "trained", "ends_with", "bos"),
    [
        # Each turn's end-of-turn token is trained; no EOS the template does not render is added, and BOS
        # only where the template renders it (this tokenizer adds none itself).
        ("chatml", ["hello world<|im_end|>", "five<|im_end|>"], "five<|im_end|>\n", 0),
        ("llama3", ["hello world<|eot_id|>", "five<|eot_id|>"], "five<|eot_id|>", 1),
        ("zephyr", ["hello world</s>", "five</s>"], "five</s>\n", 0),
    ],
)
def test_builtin_chat_templates(tok: Any, name: str, trained: list[str], ends_with: str, bos: int) -> None:
    sample = one(tok, {"messages": CONVERSATION}, format="chat", chat_template=name)
    assert runs(tok, sample) == trained
    assert sample.input_ids.count(tok.bos_token_id) == bos
    text = tok.decode(sample.input_ids)
    assert text.endswith(ends_with)
    rendered = tok.apply_chat_template(CONVERSATION, chat_template=CHAT_TEMPLATES[name], tokenize=False)
    assert text == rendered  # exactly the template's text: nothing added, nothing lost


def test_builtin_templates_are_prefix_consistent(tok: Any) -> None:
    for template in CHAT_TEMPLATES.values():
        for i in range(len(CONVERSATION)):
            shorter = tok.apply_chat_template(CONVERSATION[: i + 1], chat_template=template, tokenize=False)
            prompt = tok.apply_chat_template(
                CONVERSATION[: i + 1], chat_template=template, tokenize=False, add_generation_prompt=True
            )
            longer = tok.apply_chat_template(CONVERSATION[: i + 2], chat_template=template, tokenize=False)
            assert prompt.startswith(shorter)
            assert longer.startswith(shorter)


def test_messages_after_the_last_assistant_turn_are_left_out(tok: Any) -> None:
    sample = one(tok, {"messages": [*CONVERSATION, {"role": "user", "content": "thanks"}]}, format="chat")
    assert "thanks" not in tok.decode(sample.input_ids)
    assert sample.input_ids[-1] == tok.eos_token_id


def test_conversation_opening_with_the_assistant(tok: Any) -> None:
    sample = one(tok, {"messages": [{"role": "assistant", "content": "hello"}]}, format="chat")
    assert runs(tok, sample) == ["hello<|end|></s>"]
    assert runs(tok, sample, trainable=False) == ["<s><|assistant|>"]


def test_not_prefix_consistent_template_names_the_row(tok: Any) -> None:
    # Marks the last message: rendering 3 messages is not the start of rendering 5.
    template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}]
    with pytest.raises(UserError) as caught:
        encode(tok, rows, format="chat", chat_template=template)
    assert str(caught.value) == (
        "x.jsonl: row 1: the chat template is of no family peftrun knows and is not prefix-consistent at "
        "message 1 (rendering messages[:1] is not the start of rendering messages[:2]), so the assistant turns "
        "cannot be cut out; mark the assistant output with {% generation %}...{% endgeneration %} in the "
        "template (data.chat_template may hold the Jinja)"
    )


def test_template_errors_name_the_row(tok: Any) -> None:
    template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(
        UserError, match=r"^x.jsonl: row 2: the chat template cannot render this conversation: no system"
    ):
        encode(
            tok,
            [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}],
            format="chat",
            chat_template=template,
        )


def test_chat_template_resolution(tok: Any) -> None:
    assert resolve_chat_template(tok, None) == tok.chat_template
    assert resolve_chat_template(tok, "zephyr") == CHAT_TEMPLATES["zephyr"]
    assert resolve_chat_template(tok, "{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    with pytest.raises(UserError) as caught:
        resolve_chat_template(tok, "chatlm")
    assert str(caught.value) == (
        "data.chat_template: unknown template 'chatlm'; did you mean 'chatml'? (built-in: chatml, llama3, zephyr)"
    )
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(UserError) as caught:
        resolve_chat_template(bare, None)
    assert str(caught.value) == (
        "the tokenizer has no chat template; set data.chat_template to one of chatml, llama3, zephyr"
    )


# ----------------------------------------------------------------------------------------------- text


def test_text_is_trained_whole(tok: Any) -> None:
    sample = one(tok, {"text": "the quick brown fox"}, format="text")
    assert sample.input_ids == [tok.bos_token_id, *ids_of(tok, "the quick brown fox"), tok.eos_token_id]
    assert runs(tok, sample) == ["the quick brown fox</s>"]
    assert runs(tok, sample, trainable=False) == ["<s>"]


def test_tokenizer_without_bos_gets_none(tok: Any) -> None:
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    sample = one(no_bos, {"text": "hello world"}, format="text")
    assert sample.input_ids == [*ids_of(tok, "hello world"), tok.eos_token_id]
    assert sample.labels == sample.input_ids


def test_rows_with_nothing_to_learn_are_dropped_and_counted(tok: Any) -> None:
    _, stats = encode(tok, [{"text": "hello"}, {"text": "  \n"}], format="text")
    assert (stats.rows, stats.kept, stats.dropped_empty) == (2, 1, 1)
    _, stats = encode(tok, [{"instruction": "add", "output": ""}, {"instruction": "add", "output": "two"}])
    assert (stats.kept, stats.dropped_empty) == (1, 1)
    _, stats = encode(tok, [{"messages": CONVERSATION[:2]}], format="chat")
    assert (stats.kept, stats.dropped_empty) == (0, 1)


# --------------------------------------------------------------------------------------------- overlong


@pytest.fixture(scope="module")
def overlong_rows(tok: Any) -> tuple[list[dict[str, str]], int]:
    """Rows that fit, need truncation, and have a prompt alone longer than the limit; and that limit."""
    short = {"instruction": "add two and three", "input": "", "output": "five"}
    long_answer = {**short, "output": " ".join(["five"] * 200)}
    long_prompt = {**short, "instruction": " ".join(["add two"] * 200)}
    (fits,), _ = encode(tok, [short])
    return [short, long_answer, long_prompt], len(fits.input_ids) + 3


def test_overlong_truncate(tok: Any, overlong_rows: tuple[list[dict[str, str]], int]) -> None:
    rows, limit = overlong_rows
    samples, stats = encode(tok, rows, max_seq_len=limit, overlong="truncate")
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_overlong) == (3, 2, 1, 1)
    assert [s.row for s in samples] == [1, 2]
    truncated = samples[1]
    assert len(truncated.input_ids) == limit
    assert truncated.input_ids[-1] != tok.eos_token_id  # cut text does not end, so no EOS
    prompt_len = 1 + len(ids_of(tok, ALPACA_NO_INPUT.format(**rows[1])))
    assert runs(tok, truncated) == [tok.decode(ids_of(tok, rows[1]["output"])[: limit - prompt_len])]
    assert stats.total_tokens == sum(len(s.input_ids) for s in samples)
    assert stats.supervised_tokens == sum(sum(x != IGNORE_INDEX for x in s.labels) for s in samples)


def test_overlong_drop(tok: Any, overlong_rows: tuple[list[dict[str, str]], int]) -> None:
    rows, limit = overlong_rows
    samples, stats = encode(tok, rows, max_seq_len=limit, overlong="drop")
    assert (stats.kept, stats.truncated, stats.dropped_overlong) == (1, 0, 2)
    assert samples[0].input_ids[-1] == tok.eos_token_id


def test_overlong_error_names_file_row_and_length(
    tok: Any, overlong_rows: tuple[list[dict[str, str]], int]
) -> None:
    rows, limit = overlong_rows
    (full,), _ = encode(tok, rows[1:2])
    with pytest.raises(UserError) as caught:
        encode(tok, rows, max_seq_len=limit, overlong="error")
    assert str(caught.value) == (
        f"x.jsonl: row 2: sample is {len(full.input_ids)} tokens, longer than data.max_seq_len={limit}; "
        "raise it, or set data.overlong to truncate or drop"
    )


def test_row_numbers_continue_across_batches(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(path="x.jsonl")
    encoder = SampleEncoder(tok, cfg, "x.jsonl")
    samples, _ = encoder.encode([{"instruction": "a", "output": "b"}], first_row=1001)
    assert samples[0].row == 1001
    with pytest.raises(UserError, match=r"^x.jsonl: row 1002: missing 'output'"):
        encoder.encode([{"instruction": "a", "output": "b"}, {"instruction": "a"}], first_row=1001)
