"""`peftrun plan`: model states against hand-computed bytes and DeepSpeed's own estimators, verdicts
on a case table, a 70B config in seconds, and a recipe the plan says fits that then trains."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from peftrun.plan import make_plan
from peftrun.recipe.schema import Recipe

GB = 1024**3
# Llama-2-7B's and Llama-3-70B's shapes (untied embeddings).
SHAPES: dict[str, dict[str, Any]] = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip


def llama_params(s: dict[str, int]) -> int:
    """Hand count: embeddings and head, per layer q/o (h x h), k/v (h x kv), three MLP matrices, two norms."""
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    return 2 * v * h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import LlamaConfig

    return {name: LlamaConfig(**shape, tie_word_embeddings=False) for name, shape in SHAPES.items()}


def recipe(method: str = "full", micro: int = 1, seq: int = 2048, **train: Any) -> Recipe:
    model: dict[str, Any] = {"name_or_path": "unused", "dtype": "bf16"}
    spec: dict[str, Any] = {"kind": "full"}
    if method in ("lora", "qlora"):
        spec = {"kind": "lora", "r": 16, "target_modules": "all-linear"}
    if method == "qlora":
        model["quantization"] = {"bits": 4}
    return Recipe.model_validate(
        {
            "output_dir": "unused",
            "model": model,
            "method": spec,
            "data": {"path": "unused.jsonl", "max_seq_len": seq, "packing": True},
            "train": {"micro_batch_size": micro, "mixed_precision": "bf16", **train},
        }
    )


def test_full_bf16_states_by_hand_and_against_deepspeeds_estimators(configs: dict[str, Any]) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p = llama_params(SHAPES["7b"])
    plan = make_plan(recipe(), configs["7b"], gpus=8, gpu_memory_gb=80)
    assert plan.census.params == plan.census.trainable == p
    rows = {row.launch.name: row.states for row in plan.rows}
    # DDP: bf16 weights, bf16 gradients and the reducer's bucketed copy, torch AdamW's bf16 moments.
    assert rows["DDP"].total == 2 * p + 2 * 2 * p + 2 * 2 * p
    # ZeRO-2 on 8 GPUs: DeepSpeed's 2 + 18/N bytes per parameter (+ one reduce bucket of hidden^2).
    _, zero2 = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=8, cpu_offload=False)
    assert rows["ZeRO-2"].total == pytest.approx(zero2, rel=0.01)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        p, plan.census.largest_layer_params, num_gpus_per_node=8, cpu_offload=False
    )
    # ZeRO-3: 9% above DeepSpeed's 18/N, which leaves out the bf16 gradient partition kept beside the
    # fp32 one (2/N); the gathered layer and persistent tensors are the same 4 x largest layer order.
    assert rows["ZeRO-3"].total == pytest.approx(zero3, rel=0.1)
    bucket = 2 * 4096**2  # the reduce bucket (hidden^2 bf16 elements) stays allocated under ZeRO-3
    at_rest = 2 * p / 8 + 2 * p / 8 + 16 * p / 8 + 2 * plan.census.persistent_params + bucket
    assert rows["ZeRO-3"].total - rows["ZeRO-3"].buffers == pytest.approx(at_rest, rel=1e-6)


def test_qlora_weights_are_counted_as_stored(configs: dict[str, Any]) -> None:
    s = SHAPES["7b"]
    plan = make_plan(recipe("qlora"), configs["7b"], gpus=1, gpu_memory_gb=24)
    c = plan.census
    h, v = s["hidden_size"], s["vocab_size"]
    unquantized = (
        2 * v * h + s["num_hidden_layers"] * 2 * h + h
    )  # embeddings, head, norms: fp32 after k-bit prep
    assert c.quantized_params == llama_params(s) - unquantized
    nf4 = c.quantized_params // 2 + c.quantized_params // 64  # packed values + int8 absmax (double quant)
    expected = nf4 + 4 * (unquantized + c.trainable)
    assert c.weight_bytes == pytest.approx(expected, rel=0.001)
    assert c.weight_bytes < 0.35 * 2 * llama_params(s)  # vs the bf16 model (fp32 embeddings and head: 1 GB)


# (shape, method, micro-batch, gradient checkpointing, GPUs, GB) -> verdict of each launch, and advice.
CASES = [
    # 7B full, bf16: DDP holds 10 bytes/param (63 GiB) + ~25 GiB activations of 2 x 2048 tokens: over
    # 80 GiB; ZeRO-1 (6 bytes/param + 12/N) fits.
    ("7b", "full", 2, False, 8, 80, {"DDP": False, "ZeRO-1": True, "ZeRO-3": True}, "fits as is with ZeRO-1"),
    # 7B LoRA on one 24 GiB GPU: 12.6 GiB bf16 weights + even one 2048-token row's activations (~12 GiB,
    # 32 layers x ~190 kB per token) do not fit; gradient checkpointing (one layer's input kept) does.
    ("7b", "lora", 4, False, 1, 24, {"DDP": False}, "fits with model.gradient_checkpointing=true under DDP"),
    # 7B QLoRA with checkpointing on one 24 GB GPU: ~4 GB weights, fits as is.
    ("7b", "qlora", 1, True, 1, 24, {"DDP": True}, "fits as is with DDP"),
    # 70B full on 8 x 80 GB: ZeRO-3's 18 bytes/param / 8 = 158 GB per GPU; only offload is left.
    (
        "70b",
        "full",
        1,
        True,
        8,
        80,
        {"DDP": False, "ZeRO-3": False, "ZeRO-3+offload": True},
        "ZeRO-3+offload",
    ),
    # 70B full on 8 x 80 GB x 4 nodes (32 GPUs): ZeRO-3 puts ~40 GB of states on each.
    ("70b", "full", 1, True, 32, 80, {"ZeRO-2": False, "ZeRO-3": True}, "fits as is with ZeRO-3"),
]


@pytest.mark.parametrize(("shape", "method", "micro", "ckpt", "gpus", "gb", "verdicts", "advice"), CASES)
def test_verdicts_case_table(
    configs: dict[str, Any], shape: str, method: str, micro: int, ckpt: bool, gpus: int, gb: int,
    verdicts: dict[str, bool], advice: str,
) -> None:  # fmt: skip
    r = recipe(method, micro)
    r = r.model_copy(update={"model": r.model.model_copy(update={"gradient_checkpointing": ckpt})})
    plan = make_plan(r, configs[shape], gpus=gpus, gpu_memory_gb=gb)
    got = {row.launch.name: row.fits for row in plan.rows}
    assert {name: got[name] for name in verdicts} == verdicts, [
        (r.launch.name, r.total / GB) for r in plan.rows
    ]
    assert advice in plan.advice


def test_activations_by_hand_for_one_layer(configs: dict[str, Any]) -> None:
    """Full fine-tuning in bf16 (DeepSpeed casts the model): per token and layer a pre-norm SwiGLU
    decoder saves two norms' fp32 inputs and bf16 outputs, q/k/v, the attention output and its
    logsumexp, o_proj's input, the MLP's gate, SiLU, up and down_proj's input."""
    from peftrun.plan import precision_for
    from peftrun.plan.memory import layer_bytes_per_token

    s = SHAPES["7b"]
    h, i = s["hidden_size"], s["intermediate_size"]
    plan = make_plan(recipe(), configs["7b"], gpus=8, gpu_memory_gb=80)
    norms = 2 * (4 * h + 2 * h)  # fp32 input + normalised x (weight trains)
    inputs = 2 * h + 2 * h + 2 * h + 2 * i  # q/k/v share one input, o_proj, gate/up share one, down_proj
    attention = 2 * h + 2 * 2 * h + 2 * h + 4 * s["num_attention_heads"]
    mlp = 3 * 2 * i
    expected = norms + inputs + attention + mlp
    assert layer_bytes_per_token(plan.census, precision_for(plan.recipe, deepspeed=True)) == expected


def test_a_70b_config_plans_in_seconds(configs: dict[str, Any]) -> None:
    start = time.process_time()  # CPU seconds: the wall clock of shared CI cores says little
    plan = make_plan(recipe("lora"), configs["70b"], gpus=8, gpu_memory_gb=80)
    assert time.process_time() - start < 30  # ~8 s here, with the advice's QLoRA variant counted too
    assert plan.census.params - plan.census.trainable == llama_params(SHAPES["70b"])  # + LoRA's own


def test_plan_command_prints_a_table_and_json(write_recipe: Any) -> None:
    import json

    from tests.test_cli import peftrun

    path = str(write_recipe())
    text = peftrun("plan", path, "--gpus", "2", "--gpu-memory", "16")
    assert text.returncode == 0, text.stderr
    assert "ZeRO-3+offload" in text.stdout and "fits as is with DDP" in text.stdout
    data = json.loads(peftrun("plan", path, "--gpus", "2", "--gpu-memory", "16", "--json").stdout)
    assert [row["launch"] for row in data["rows"]][:2] == ["DDP", "ZeRO-1"] and data["rows"][0]["fits"]
    bad = peftrun("plan", path, "--gpus", "0", "--gpu-memory", "16", timeout=600)
    assert bad.returncode == 2 and "--gpus: must be positive" in bad.stderr


def test_a_recipe_the_plan_says_fits_trains(write_recipe: Any, tmp_path: Path) -> None:
    """The tiny recipe fits one 'GPU' of 2 GB by the plan; the same recipe then trains (CPU)."""
    from peftrun.plan import plan_recipe
    from peftrun.recipe.load import load_recipe
    from peftrun.train.loop import train

    r = load_recipe(write_recipe(), ["train.max_steps=2", "logging.report_to=[]", "logging.plot=false"])
    plan = plan_recipe(r, gpus=1, gpu_memory_gb=2)
    assert plan.rows[0].fits and "fits as is with DDP" in plan.advice
    assert len(train(r).losses) == 2
