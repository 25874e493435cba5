"""Which checkpoints the ZeRO-3 loader (peftrun/model/zero3_load.py) reads one tensor at a time: a local
safetensors checkpoint, single-file or sharded with an index; anything else is left to transformers
before a model is built. Its load on 2 real gloo processes is checked in tests/test_stream_weights.py."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from peftrun.model.zero3_load import checkpoint_tensor_files, load_streamed


def test_a_single_file_and_a_sharded_checkpoint_name_their_tensors(tiny_llama: Path, tmp_path: Path) -> None:
    single = checkpoint_tensor_files(tiny_llama)
    assert single is not None and "model.embed_tokens.weight" in single
    assert set(single.values()) == {tiny_llama / "model.safetensors"}

    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(tmp_path, max_shard_size="100KB")
    sharded = checkpoint_tensor_files(tmp_path)
    assert sharded is not None and sharded.keys() == single.keys()
    assert len(set(sharded.values())) > 1 and all(file.is_file() for file in sharded.values())


def test_other_checkpoints_are_left_to_transformers_before_anything_is_built(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert checkpoint_tensor_files(tmp_path) is None
    # model_class is never called: a load that cannot stream builds nothing.
    assert load_streamed(None, None, tmp_path) is None
    assert load_streamed(None, None, tmp_path / "org--hub-id") is None


def test_a_single_file_lists_its_tensors_from_the_header(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, tmp_path / "model.safetensors")
    assert checkpoint_tensor_files(tmp_path) == {
        "a": tmp_path / "model.safetensors",
        "b": tmp_path / "model.safetensors",
    }
