"""Everything beside the weights that makes a merged checkpoint deployable as is: config.json in the
output dtype, generation_config.json with the tokenizer's EOS and pad, the tokenizer and its chat template,
and any modelling code a trust_remote_code base ships."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from peftrun.merge.sources import MergeInputs

# What a saved tokenizer consists of; the first three are the ones it can be loaded from.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
TOKENIZER_LOADABLE_FROM = TOKENIZER_FILES[:3]


def write_model_files(inputs: MergeInputs, out_dir: Path, dtype: torch.dtype) -> list[str]:
    """Write them; returns notes for the user (e.g. no tokenizer to ship)."""
    from transformers import AutoConfig, AutoTokenizer

    # peft's merge (save_pretrained) already wrote the merged model's own config (a classifier's head
    # and class names); a streamed merge keeps the base's.
    written = out_dir / "config.json"
    config = (
        AutoConfig.from_pretrained(out_dir, trust_remote_code=inputs.trust_remote_code)
        if written.is_file()
        else inputs.base_config()
    )
    config.dtype = dtype
    config.use_cache = True  # peftrun trains with the cache off; generation wants it
    config.save_pretrained(out_dir)
    for code in inputs.base_dir.glob("*.py"):
        shutil.copy(code, out_dir / code.name)
    if not any((inputs.tokenizer_source / name).is_file() for name in TOKENIZER_LOADABLE_FROM):
        generation_config(inputs.base_dir, config, None).save_pretrained(out_dir)
        return [f"no tokenizer in {inputs.tokenizer_source}: the merged checkpoint ships without one"]
    tokenizer = AutoTokenizer.from_pretrained(
        inputs.tokenizer_source, trust_remote_code=inputs.trust_remote_code
    )
    if inputs.chat_template:
        # The run rendered chats with the recipe's template; inference must render them the same way.
        tokenizer.chat_template = inputs.chat_template
    tokenizer.save_pretrained(out_dir)
    generation_config(inputs.base_dir, config, tokenizer).save_pretrained(out_dir)
    return []


def generation_config(base_dir: Path, config: Any, tokenizer: Any) -> Any:
    """The base's generation settings, with the EOS the model was trained to emit and a real pad id."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    if tokenizer is None:
        return generation
    eos = generation.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.insert(0, tokenizer.eos_token_id)
    generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    return generation
