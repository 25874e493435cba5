"""`peftrun export TARGET --format gguf`: a merged model as one GGUF file that llama.cpp and Ollama load,
with its tokenizer and chat template inside.

The file is written with the `gguf` package (llama.cpp's own Python library: GGUFWriter, TensorNameMap,
SpecialVocab), following what llama.cpp's convert_hf_to_gguf.py does for these families:

- Llama and Mistral (`llama` in GGUF): q_proj/k_proj rows are permuted back from the Hugging Face rotary
  layout to the interleaved one llama.cpp's rope expects.
- Qwen2 and Qwen3 (`qwen2`, `qwen3`): weights as they are (NeoX rope); Qwen3's q/k norms map by name.
- Gemma (`gemma`): RMSNorm weights get +1 (Hugging Face's Gemma norm multiplies by 1 + w).

Tokenizers: byte-level BPE (GPT-2 style `tokenizer.json`: Llama 3, Qwen, the demo's). llama.cpp picks its
pre-tokenizer regex by name (`tokenizer.ggml.pre`), read here from the tokenizer's own pre-tokenizer.
Weights: 1-D tensors (norms, biases) stay f32, matrices become f16 or q8_0. Tensors are read one at a
time from the safetensors shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftrun.errors import UserError

QUANTS = ("f16", "q8_0", "f32")


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture becomes a GGUF architecture."""

    gguf_arch: str  # name in gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_plus_one: bool = False


FAMILIES = {
    "LlamaForCausalLM": Family("LLAMA", permute_qk=True),
    "MistralForCausalLM": Family("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": Family("QWEN2"),
    "Qwen3ForCausalLM": Family("QWEN3"),
    "GemmaForCausalLM": Family("GEMMA", norm_plus_one=True),
}


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError(
            "--format gguf needs the 'gguf' package: pip install 'peftrun[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def family_of(config: dict[str, Any], model_dir: Path) -> Family:
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in FAMILIES:
            return FAMILIES[name]
    raise UserError(
        f"{model_dir}: GGUF export supports {', '.join(sorted(FAMILIES))}; this model is {architectures}. "
        "llama.cpp's convert_hf_to_gguf.py may convert the merged directory (peftrun export --format merged)"
    )


def write_gguf(model_dir: Path, out_file: Path, quant: str = "f16") -> Path:
    """Convert the transformers checkpoint in `model_dir` (a merged model) to `out_file`."""
    gguf = require_gguf()
    if quant not in QUANTS:
        raise UserError(f"--quant: '{quant}' is not one of {', '.join(QUANTS)}")
    config = json.loads((model_dir / "config.json").read_text())
    config = {**config, **config.get("text_config", {})}
    family = family_of(config, model_dir)
    arch = gguf.MODEL_ARCH[family.gguf_arch]
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    _add_hyperparameters(gguf, writer, config, quant)
    _add_tokenizer(gguf, writer, model_dir, config)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for hf_name, tensor in _tensors(model_dir):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{model_dir}: no GGUF name for tensor {hf_name} ({family.gguf_arch})")
        data = _transform(hf_name, tensor, family, config)
        _add_tensor(gguf, writer, name, data, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _add_hyperparameters(gguf: Any, writer: Any, config: dict[str, Any], quant: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"GGUF export: rope scaling '{rope.get('rope_type')}' is not supported yet")
    writer.add_vocab_size(config["vocab_size"])
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[quant])


def _tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, fp32 tensor) over every safetensors shard, one tensor in memory at a time."""
    from safetensors import safe_open

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{model_dir}: no *.safetensors weights to convert")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, handle.get_tensor(name).float()


def _transform(hf_name: str, tensor: Any, family: Family, config: dict[str, Any]) -> np.ndarray:
    """The tensor as llama.cpp's graph expects it for this family."""
    heads = config["num_attention_heads"]
    if family.permute_qk and hf_name.endswith("q_proj.weight"):
        tensor = _unpermute(tensor, heads)
    elif family.permute_qk and hf_name.endswith("k_proj.weight"):
        tensor = _unpermute(tensor, config.get("num_key_value_heads") or heads)
    if family.norm_plus_one and hf_name.endswith("norm.weight"):
        tensor = tensor + 1
    return np.ascontiguousarray(tensor.numpy())


def _unpermute(weight: Any, heads: int) -> Any:
    """Hugging Face's Llama checkpoints store each head's rotary pairs as two halves; llama.cpp's rope
    pairs neighbours. Undo the permutation the HF conversion script applied."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _add_tensor(gguf: Any, writer: Any, name: str, data: np.ndarray, quant: str) -> None:
    kind = gguf.GGMLQuantizationType
    if data.ndim <= 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, kind.Q8_0), raw_dtype=kind.Q8_0)


# ---- tokenizer ------------------------------------------------------------------------------------------


def _add_tokenizer(gguf: Any, writer: Any, model_dir: Path, config: dict[str, Any]) -> None:
    """Tokens with their types, merges, special ids, the add-BOS flag and the chat template."""
    from transformers import AutoTokenizer

    tokenizer_json = model_dir / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text()) if tokenizer_json.is_file() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            f"{model_dir}: GGUF export supports byte-level BPE tokenizers (tokenizer.json); this one is "
            f"{model.get('type') or 'not a tokenizer.json'} (SentencePiece models: convert the merged "
            "directory with llama.cpp's convert_hf_to_gguf.py)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, types = _token_table(gguf, tokenizer, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer"), model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template  # a chat_template.jinja beside the tokenizer
    special.add_to_gguf(writer, quiet=True)


def _token_table(gguf: Any, tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and type: CONTROL for special tokens (parsed as one token in templates),
    USER_DEFINED for other added tokens, UNUSED padding up to the model's embedding rows."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer_name(pre: dict[str, Any] | None, model_dir: Path) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE.

    Recognised from the tokenizer's own pre-tokenizer: Llama 3's split pattern (numbers in runs of up to
    three digits), Qwen2's (one digit per piece; also what Digits(individual) + ByteLevel does), plain
    GPT-2 ByteLevel.
    """
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    patterns = [
        str((step.get("pattern") or {}).get("Regex", "")) for step in steps if step.get("type") == "Split"
    ]
    if any("\\p{N}{1,3}" in p for p in patterns):
        return "llama-bpe"
    if any("\\p{N}|" in p for p in patterns):
        return "qwen2"
    individual_digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    if individual_digits and kinds[-1:] == ["ByteLevel"]:
        return "qwen2"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    raise UserError(f"{model_dir}: GGUF export does not recognise this tokenizer's pre-tokenizer ({kinds})")


def modelfile(gguf_name: str, stops: list[str]) -> str:
    """An Ollama Modelfile for the exported file (`ollama create NAME -f Modelfile`). Ollama reads the
    chat template from the GGUF; the stop strings are the template's turn end and EOS."""
    lines = [f"FROM ./{gguf_name}", *(f'PARAMETER stop "{s}"' for s in stops)]
    return "\n".join(lines) + "\n"


def export_gguf(args: Any) -> str:
    """`peftrun export TARGET --format gguf --out DIR`: merge (unless TARGET is already a merged model),
    convert, and write DIR/<name>-<quant>.gguf with an Ollama Modelfile. Returns the base model's name."""
    import tempfile

    from peftrun.staging import staged_dir

    require_gguf()  # before a merge that could take minutes
    source, out = Path(args.run), Path(args.out).resolve()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out: {out} exists and is not empty; remove it or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix=".gguf-merge-", dir=out.parent) as scratch:
        model_dir, base = _merged_model(args, source, Path(scratch) / "merged")
        name = (
            f"{(source.name if source.name not in ('final', '') else source.parent.name)}-{args.quant}.gguf"
        )
        with staged_dir(out) as tmp:
            write_gguf(model_dir, tmp / name, args.quant)
            (tmp / "Modelfile").write_text(modelfile(name, _stop_strings(model_dir)))
    print(f"[peftrun] wrote {out / name} ({args.quant}) and {out / 'Modelfile'}")
    return base


def _merged_model(args: Any, source: Path, scratch: Path) -> tuple[Path, str]:
    """A transformers checkpoint to convert: TARGET itself when it is one, else TARGET merged."""
    from peftrun.merge import merge
    from peftrun.merge.export import inputs_for, merge_options
    from peftrun.merge.sources import is_run_dir
    from peftrun.use.generate import ADAPTER_CONFIG

    if (
        (source / "config.json").is_file()
        and not (source / ADAPTER_CONFIG).is_file()
        and not is_run_dir(source)
    ):
        return source, str(json.loads((source / "config.json").read_text()).get("_name_or_path") or source)
    inputs = inputs_for(str(source), args.base)
    merge(inputs, scratch, merge_options(args))
    return scratch, inputs.base


def _stop_strings(model_dir: Path) -> list[str]:
    from transformers import AutoTokenizer

    from peftrun.use.generate import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [str(tokenizer.convert_ids_to_tokens(i)) for i in stop_token_ids(tokenizer)]
