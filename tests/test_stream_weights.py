"""The ZeRO-3 streamed save of a full model (peftrun/dist/stream_weights.py) on 2 real gloo processes:
several shard files and an index that `from_pretrained` loads, holding exactly the trained weights, and a
check that names a corrupted tensor; the base read into the partitioned model one tensor at a time
(peftrun/model/zero3_load.py) is the checkpoint. The whole `peftrun train` path of a full fine-tune under ZeRO-3 is
run by tests/test_dist.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftrun.dist.stream_weights import INDEX_FILE, Weight, plan_shards
from tests.test_dist import free_port

REPO = Path(__file__).resolve().parents[1]


def test_shards_are_planned_in_order_under_the_size_with_transformers_names() -> None:
    weights = [Weight(f"w{i}", torch.zeros(n), True) for i, n in enumerate([10, 10, 30, 5])]  # fp32: 4 bytes
    shards = plan_shards(weights, max_bytes=80)
    assert {file: [w.name for w in group] for file, group in shards.items()} == {
        "model-00001-of-00003.safetensors": ["w0", "w1"],
        "model-00002-of-00003.safetensors": ["w2"],  # larger than the limit: a file of its own
        "model-00003-of-00003.safetensors": ["w3"],
    }
    assert list(plan_shards(weights, max_bytes=1000)) == ["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])  # GPT-2: tied embeddings, saved once
def test_zero3_streams_loadable_shards_and_catches_a_corrupted_tensor(
    request: pytest.FixtureRequest, model: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model_dir: Path = request.getfixturevalue(model)

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        *("--config_file", str(REPO / "accelerate_configs" / "zero3.yaml"), "--num_processes", "2"),
        *("--main_process_port", str(free_port())),
        str(REPO / "tests" / "stream_weights_worker.py"),
        *(str(model_dir), str(tmp_path)),
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["loaded_as_saved"], "the base read one tensor at a time under ZeRO-3 is not the checkpoint"
    assert result["failure"] is None
    assert result["files"] > 1
    saved = tmp_path / "saved"
    assert len(json.loads((saved / INDEX_FILE).read_text())["weight_map"]) == result["checked"]
    assert len(list(saved.glob("model-*-of-*.safetensors"))) == result["files"]
    victim = result["victim"]
    assert (
        result["corrupted"] == f"{tmp_path / 'corrupted'}: tensor '{victim}' differs from the trained values"
    )

    loaded = AutoModelForCausalLM.from_pretrained(saved).state_dict()
    trained = torch.load(tmp_path / "trained.pt")
    before = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert set(trained) <= set(loaded)
    for name, tensor in trained.items():
        assert torch.equal(loaded[name], tensor), name
    assert not torch.equal(loaded[victim], before[victim])


def test_a_model_that_renames_its_weights_on_save_is_not_streamed(tiny_llama: Path) -> None:
    """Mixtral's experts are fused in memory and split again by save_pretrained: its streamed names
    would not load, so it is saved through a gathered copy; Llama's names are its saved names."""
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from peftrun.dist.stream_weights import renames_weights_on_save

    assert not renames_weights_on_save(AutoModelForCausalLM.from_pretrained(tiny_llama))
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
        num_local_experts=2,
    )
    assert renames_weights_on_save(MixtralForCausalLM(config))
