"""Tiny, hub-free models: the base model of `peftrun demo` (tests build theirs from it too).

Everything here is built locally from scratch (a BPE tokenizer trained on a small corpus and a randomly
initialised Llama), so the demo and the test-suite run on a laptop without network access.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from peftrun.staging import staged_dir

__all__ = [
    "BUILDER_VERSION",
    "CHAT_TEMPLATE",
    "DEMO_DATA_DIR",
    "build_llama",
    "build_tokenizer",
    "demo_model_dir",
]

# Bump when anything that shapes the demo model changes, so cached copies are rebuilt, not reused.
BUILDER_VERSION = "2"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Each message renders independently of what follows it, so rendering messages[:k] with a generation
# prompt is a string prefix of rendering messages[:k+1] (the property chat masking relies on).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEMO_DATA_DIR = Path(__file__).parent / "data"
# The demo model's shape; part of the cache key.
DEMO_SETTINGS = {"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "seed": 0}


def build_tokenizer(
    out_dir: str | Path, corpus: Iterable[str], vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus`, save it to `out_dir` and return it.

    Byte-level, so any text round-trips through encode/decode. Special tokens: `<unk>` 0, `<s>` (bos) 1,
    `</s>` (eos) 2, `<pad>` 3 (distinct from eos, so padding masks never hide a real EOS), then the chat
    markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`. Calling the tokenizer adds NO BOS/EOS:
    the training pipeline adds exactly one BOS and the EOS itself, which keeps prompt/answer masks exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [UNK, BOS, EOS, PAD, *CHAT_MARKERS]
    backend = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # One token per digit (as in Llama): number tasks then see the same 10 symbols in every position.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # Only offset trimming; no template, so no special tokens are added on encode.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(CHAT_MARKERS),
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_llama(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a seeded, randomly initialised Llama-shaped causal LM (and `tokenizer`) to `out_dir`.

    Same architecture family as real Llama checkpoints (GQA: 4 heads, 2 kv heads; untied embeddings),
    so code paths that work here (LoRA target modules, saving, merging) work on real models too.

    Weights use transformers' default init (std 0.02), which keeps the random blocks small next to the
    embeddings so token identity survives to the top for an adapter to use; only `lm_head` gets std
    1/sqrt(hidden_size): at 0.02 a frozen head caps logits near 0.02 * hidden_size (~2.6 at width 128),
    too flat for an adapter that cannot train the head to ever answer confidently.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=hidden_size**-0.5)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def _demo_corpus() -> Iterator[str]:
    """Texts the demo tokenizer learns its merges from: the demo rows, in whichever format they are.

    Alpaca rows are rendered with the Alpaca scaffolding so that it merges into few tokens; chat rows
    contribute their message texts (the chat markers are special tokens already).
    """
    preamble = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n"
    )
    for path in sorted(DEMO_DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                yield from (str(m.get("content", "")) for m in row["messages"])
                continue
            text = f"{preamble}### Instruction:\n{row.get('instruction', '')}\n\n"
            if row.get("input"):
                text += f"### Input:\n{row['input']}\n\n"
            yield f"{text}### Response:\n{row.get('output', '')}"


def _demo_key() -> str:
    """Hash of everything the demo build depends on: builder version, model shape and the corpus."""
    h = hashlib.sha256(BUILDER_VERSION.encode())
    h.update(json.dumps(DEMO_SETTINGS, sort_keys=True).encode())
    for path in sorted(DEMO_DATA_DIR.glob("*.jsonl")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _complete(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def demo_model_dir(cache_root: str | Path | None = None) -> Path:
    """Return the directory of the demo's tokenizer+model, building it on first use.

    The cache root is `cache_root`, else $PEFTRUN_CACHE, else ~/.cache/peftrun; the model lives in
    `demo-<hash>` below it, the hash covering the builder version and inputs, so a stale cache is never
    reused. The build happens in a temporary sibling directory that is renamed into place, so an
    interrupted build (or a concurrent one) never leaves a half-written model behind.
    """
    root = Path(cache_root or os.environ.get("PEFTRUN_CACHE") or Path.home() / ".cache" / "peftrun")
    target = root / f"demo-{_demo_key()}"
    if _complete(target):
        return target
    with staged_dir(target, is_complete=_complete) as tmp:
        tokenizer = build_tokenizer(tmp, _demo_corpus(), vocab_size=DEMO_SETTINGS["vocab_size"])
        build_llama(
            tmp,
            tokenizer,
            hidden_size=DEMO_SETTINGS["hidden_size"],
            num_layers=DEMO_SETTINGS["num_layers"],
            seed=DEMO_SETTINGS["seed"],
        )
    return target
