"""`peftrun export --format gguf`: llama.cpp itself (llama-cpp-python) loads the file and generates the
same greedy tokens as transformers on the merged model; the chat template inside renders the same prompt.

Needs the optional extra `peftrun[gguf]` (gguf, llama-cpp-python); `make test` installs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'peftrun[gguf]'")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install 'peftrun[gguf]' (builds llama.cpp)"
)

from peftrun.cli.main import main  # noqa: E402
from peftrun.merge.gguf import write_gguf  # noqa: E402
from peftrun.use.generate import encode_prompt, stop_token_ids  # noqa: E402

NEW_TOKENS = 12
CONVERSATIONS: list[list[Any]] = [
    [{"role": "user", "content": "Reverse the digits. 90210"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the digits. 7"}],
    [
        {"role": "user", "content": "Reverse the digits. 12"},
        {"role": "assistant", "content": "21"},
        {"role": "user", "content": "Reverse the digits. 4433221"},
    ],
]


def transformers_greedy(model_dir: Path, prompts: list[list[int]], stops: list[int]) -> list[list[int]]:
    """Greedy tokens of the checkpoint with its weights rounded to f16 (what an f16 GGUF holds)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(param.half().float())
    out = []
    for ids in prompts:
        generated = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
        out.append(generated[0, len(ids) :].tolist())
    return out


def llama_cpp_greedy(gguf_file: Path, prompts: list[list[int]], stops: list[int]) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=1, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        tokens: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            tokens.append(token)
            if token in stops or len(tokens) == NEW_TOKENS:
                break
        out.append(tokens)
    return out


def check_against_llama_cpp(model_dir: Path, gguf_file: Path) -> dict[str, Any]:
    """Tokenization, template rendering and greedy tokens agree; returns the figures for the record."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=1, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tokenizer.chat_template
    formatter = Jinja2ChatFormatter(template, tokenizer.eos_token, tokenizer.bos_token or "")
    texts = [
        str(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False))
        for c in CONVERSATIONS
    ]
    for conversation, text in zip(CONVERSATIONS, texts, strict=True):
        assert formatter(messages=conversation).prompt == text  # the template round-trips
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    for text, ids in zip(texts, prompts, strict=True):  # llama.cpp's tokenizer (its pre-tokenizer) agrees
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            or [
                tokenizer.bos_token_id,
                *llm.tokenize(text.encode(), add_bos=False, special=True),
            ]
            == ids
        )
    del llm
    stops = stop_token_ids(tokenizer)
    expected = transformers_greedy(model_dir, prompts, stops)
    got = llama_cpp_greedy(gguf_file, prompts, stops)
    assert got == expected
    return {"prompts": len(prompts), "tokens": sum(map(len, got)), "generations": got}


def test_demo_shaped_lora_run_exports_to_gguf_that_llama_cpp_runs_like_transformers(
    write_recipe: Any, session_cache: Path, tmp_path: Path
) -> None:
    """The demo's Llama (hidden 128, GQA, untied head) with a LoRA trained a few steps: merged, converted."""
    from peftrun.demo.tiny import demo_model_dir
    from peftrun.recipe.load import load_recipe
    from peftrun.train.loop import train

    recipe = write_recipe(model={"name_or_path": str(demo_model_dir())}, train={"max_steps": 3, "lr": 5e-2})
    run = train(load_recipe(recipe)).output_dir
    out, merged = tmp_path / "gguf", tmp_path / "merged"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--model-card"]) == 0
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    files = list(out.glob("*.gguf"))
    assert len(files) == 1 and (out / "Modelfile").read_text().startswith(f"FROM ./{files[0].name}\n")
    assert 'PARAMETER stop "<|end|>"' in (out / "Modelfile").read_text()
    figures = check_against_llama_cpp(merged, files[0])
    print(f"\n[gguf] demo-shaped llama + lora: {figures}")
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: gguf" in card


def _tiny_qwen(out: Path, tokenizer_dir: Path, qwen3: bool) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    classes: tuple[Any, Any] = (Qwen3Config, Qwen3ForCausalLM) if qwen3 else (Qwen2Config, Qwen2ForCausalLM)
    config_class, model_class = classes
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        # Blocks that matter next to the tied embeddings: at the default 0.02 the residual stream is the
        # input token's embedding and greedy decoding repeats it whatever the prompt (a test of nothing).
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = model_class(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("qwen3", [False, True], ids=["qwen2", "qwen3"])
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_qwen_shaped_model_exports_to_gguf(tmp_path: Path, tiny_llama: Path, qwen3: bool, quant: str) -> None:
    model_dir = _tiny_qwen(tmp_path / "qwen", tiny_llama, qwen3)
    out = tmp_path / "gguf"
    assert main(["export", str(model_dir), "--format", "gguf", "--out", str(out), "--quant", quant]) == 0
    (gguf_file,) = out.glob("*.gguf")
    reader = gguf.GGUFReader(gguf_file)
    assert reader.fields["general.architecture"].contents() == ("qwen3" if qwen3 else "qwen2")
    matrices = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    assert matrices == {quant.upper()}
    if quant == "f16":
        figures = check_against_llama_cpp(model_dir, gguf_file)
        print(f"\n[gguf] {'qwen3' if qwen3 else 'qwen2'}: {figures}")


def test_bad_architecture_is_one_line(tmp_path: Path, tiny_gpt2: Path) -> None:
    from peftrun.errors import UserError

    with pytest.raises(UserError, match="GGUF export supports"):
        write_gguf(tiny_gpt2, tmp_path / "x.gguf")
    assert json.loads((tiny_gpt2 / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
