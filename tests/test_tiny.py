"""The hub-free tiny tokenizer/model builders that the demo and other tests stand on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# Importing the model class here puts transformers' (slow, one-off) modelling import in collection,
# not in whichever test happens to build the first model.
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from peftrun.demo import tiny

CORPUS = [
    "Below is an instruction that describes a task.\n\n### Instruction:\nReverse the digits.\n\n### Response:\n",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello world! How are you today?",
] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer(out, CORPUS, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Any:
    # Always test the reloaded tokenizer: that is what training code sees.
    return AutoTokenizer.from_pretrained(tok_dir)


def test_special_tokens_distinct(tok: Any) -> None:
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    ids = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    ids += tok.convert_tokens_to_ids(list(tiny.CHAT_MARKERS))
    assert len(set(ids)) == len(ids)
    assert tok.pad_token_id != tok.eos_token_id
    assert all(i is not None and i < len(tok) for i in ids)
    # Markers are single, special tokens: never split, dropped by skip_special_tokens.
    for marker in tiny.CHAT_MARKERS:
        assert tok(marker)["input_ids"] == [tok.convert_tokens_to_ids(marker)]
        assert marker in tok.all_special_tokens


def test_no_automatic_bos_eos(tok: Any) -> None:
    ids = tok("Hello world")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok("")["input_ids"] == []
    assert tok.decode(ids) == "Hello world"


@pytest.mark.parametrize(
    "text",
    [
        "Hello world!",
        "  leading and trailing spaces  ",
        "tabs\tand\nnew\n\nlines",
        "digits 0042 and 3.14",
        "~`!@#$%^&*()",
    ],
)
def test_round_trip(tok: Any, text: str) -> None:
    assert tok.decode(tok(text)["input_ids"]) == text


def test_round_trip_unseen_bytes(tok: Any) -> None:
    text = "naïve café, 日本語, emoji 🙂"  # never in the corpus: byte-level still covers it
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok: Any) -> None:
    assert len(tok("9081726354")["input_ids"]) == 10


def test_chat_template_prefix_consistent(tok: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Reverse 123"},
        {"role": "assistant", "content": "321"},
    ]
    for k in range(1, len(messages)):
        head = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages[: k + 1], tokenize=False)
        assert isinstance(head, str) and isinstance(full, str)
        if messages[k]["role"] == "assistant":
            assert full.startswith(head), (head, full)
        without = tok.apply_chat_template(messages[:k], tokenize=False)
        assert full.startswith(without)
    rendered = tok.apply_chat_template(messages[:3], tokenize=False)
    assert rendered == "<s><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>"
    # Token level: the template's BOS and markers come out as their single ids.
    ids = tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_build_llama_loads_back(tok: Any, tmp_path: Path) -> None:
    out = tiny.build_llama(tmp_path / "m", tok, hidden_size=64, num_layers=2, seed=0)
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert not cfg.tie_word_embeddings
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    # The tokenizer travels with the model.
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == tok("abc")["input_ids"]


def test_build_llama_is_seeded(tok: Any, tmp_path: Path) -> None:
    a = tiny.build_llama(tmp_path / "a", tok, hidden_size=64, num_layers=1, seed=3)
    b = tiny.build_llama(tmp_path / "b", tok, hidden_size=64, num_layers=1, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_demo_model_dir_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny.demo_model_dir(tmp_path)
    assert first.parent == tmp_path and first.name.startswith("demo-")
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    # A second call (here via $PEFTRUN_CACHE) reuses the build instead of rewriting it.
    monkeypatch.setenv("PEFTRUN_CACHE", str(tmp_path))
    second = tiny.demo_model_dir()
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left behind

    config = json.loads((first / "config.json").read_text())
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(first))
