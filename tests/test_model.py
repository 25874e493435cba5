"""The method against the real architecture, pre-flight errors, and loading a quantized base."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import peft  # imported at collection: its one-time import cost is not any test's
import pytest
import torch

from peftrun.errors import UserError
from peftrun.model.hub import hub_unreachable_reason
from peftrun.model.load import check_method_against_architecture, load_model, load_model_config
from peftrun.model.methods import build_peft_config, count_parameters
from peftrun.recipe.load import load_recipe
from peftrun.recipe.schema import Recipe
from peftrun.train.preflight import preflight

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


def recipe_for(write_recipe: Any, method: dict[str, Any] | None = None, **sections: Any) -> Recipe:
    if method is not None:
        sections["method"] = {**method, "_replace": True}
    return load_recipe(write_recipe(**sections))


def check(recipe: Recipe) -> tuple[int, int]:
    return check_method_against_architecture(recipe, load_model_config(recipe.model))


def real_counts(model_dir: Path, kind: str, options: dict[str, Any]) -> tuple[int, int]:
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), build_peft_config(kind, options, "CAUSAL_LM")
    )
    return model.get_nb_trainable_parameters()


# --- check_method_against_architecture ----------------------------------------------------------------


def test_target_module_typo_names_the_entry_and_lists_linear_layers(write_recipe: Any) -> None:
    recipe = recipe_for(write_recipe, {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_prj"]})
    with pytest.raises(UserError) as info:
        check(recipe)
    message = str(info.value)
    assert message.startswith("method.target_modules[1]: 'v_prj' matches no module of LlamaForCausalLM")
    assert f"(linear layers here: {', '.join(LLAMA_LINEAR)})" in message
    assert "\n" not in message


def test_target_module_regex_matching_nothing(write_recipe: Any) -> None:
    recipe = recipe_for(write_recipe, {"kind": "lora", "r": 4, "target_modules": r".*\.(q|v)_prj"})
    with pytest.raises(
        UserError, match=r"^method\.target_modules: regex '.*' matches no module name of LlamaForCausalLM"
    ):
        check(recipe)


def test_target_module_regex_that_matches_is_accepted(write_recipe: Any, tiny_llama: Path) -> None:
    options = {"r": 4, "target_modules": r".*\.(q|v)_proj"}
    assert check(recipe_for(write_recipe, {"kind": "lora", **options})) == real_counts(
        tiny_llama, "lora", options
    )


def test_modules_to_save_typo(write_recipe: Any) -> None:
    recipe = recipe_for(
        write_recipe, {"kind": "lora", "r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_haed"]}
    )
    with pytest.raises(UserError, match=r"^method\.modules_to_save\[0\]: 'lm_haed' matches no module"):
        check(recipe)


def test_exclude_modules_typo(write_recipe: Any) -> None:
    method = {"kind": "lora", "r": 4, "target_modules": "all-linear", "exclude_modules": ["lm_haed"]}
    with pytest.raises(UserError, match=r"^method\.exclude_modules\[0\]: 'lm_haed' matches no module"):
        check(recipe_for(write_recipe, method))


@pytest.mark.parametrize(
    ("freeze", "train", "key"),
    [
        (["layers[7]"], [], "method.freeze[0]"),
        (["model.embed_token.*"], [], "method.freeze[0]"),
        (["all"], ["h[-1:]"], "method.train[0]"),  # a GPT-2 pattern on a Llama
        (["all"], ["lm_head.*", "model.nrm.*"], "method.train[1]"),
    ],
)
def test_frozen_pattern_matching_nothing(
    write_recipe: Any, freeze: list[str], train: list[str], key: str
) -> None:
    recipe = recipe_for(write_recipe, {"kind": "frozen", "freeze": freeze, "train": train})
    with pytest.raises(UserError) as info:
        check(recipe)
    assert str(info.value).startswith(f"{key}: '")
    assert "matches no parameter (names look like 'model.embed_tokens.weight')" in str(info.value)


def test_frozen_counts(write_recipe: Any, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    recipe = recipe_for(
        write_recipe, {"kind": "frozen", "freeze": ["all"], "train": ["layers[-1:]", "lm_head.*"]}
    )
    trainable = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("model.layers.1.", "lm_head."))
    )
    assert check(recipe) == (trainable, sum(p.numel() for p in model.parameters()))


def test_full_counts(write_recipe: Any, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    assert check(recipe_for(write_recipe, {"kind": "full"})) == (total, total)


@pytest.mark.parametrize(
    ("family", "kind", "options"),
    [
        ("llama", "lora", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
        (
            "llama",
            "lora",
            {
                "r": 4,
                "use_dora": True,
                "target_modules": ["q_proj", "v_proj"],
                "modules_to_save": ["lm_head"],
            },
        ),
        ("llama", "prefix_tuning", {"num_virtual_tokens": 4}),
        ("gpt2", "lora", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),  # Conv1D layers
        ("gpt2", "lora", {"r": 4, "target_modules": ["c_attn", "c_fc"]}),
        ("gpt2", "ia3", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}),
    ],
    ids=[
        "llama-lora-all-linear",
        "llama-dora",
        "llama-prefix",
        "gpt2-lora-all-linear",
        "gpt2-lora",
        "gpt2-ia3",
    ],
)
def test_counts_match_a_real_peft_model(
    request: pytest.FixtureRequest, write_recipe: Any, family: str, kind: str, options: dict[str, Any]
) -> None:
    model_dir = request.getfixturevalue({"llama": "tiny_llama", "gpt2": "tiny_gpt2"}[family])
    recipe = recipe_for(write_recipe, {"kind": kind, **options}, model={"name_or_path": str(model_dir)})
    trainable, total = check(recipe)
    assert 0 < trainable < total
    assert (trainable, total) == real_counts(model_dir, kind, options)


def test_pissa_init_is_checked_structurally(write_recipe: Any, tiny_llama: Path) -> None:
    """The SVD needs real weights; the meta-device check swaps the init, not the recipe."""
    options = {"r": 4, "init_lora_weights": "pissa_niter_2", "target_modules": ["q_proj", "v_proj"]}
    recipe = recipe_for(write_recipe, {"kind": "lora", **options})
    assert check(recipe) == real_counts(tiny_llama, "lora", {**options, "init_lora_weights": True})
    assert recipe.method.options["init_lora_weights"] == "pissa_niter_2"


def test_gpt2_target_module_typo_lists_its_conv1d_layers(write_recipe: Any, tiny_gpt2: Path) -> None:
    recipe = recipe_for(
        write_recipe,
        {"kind": "lora", "r": 4, "target_modules": ["c_atn"]},
        model={"name_or_path": str(tiny_gpt2)},
    )
    with pytest.raises(UserError, match=r"^method\.target_modules\[0\]: 'c_atn'") as info:
        check(recipe)
    assert "c_attn" in str(info.value) and "c_fc" in str(info.value)


# --- preflight -----------------------------------------------------------------------------------------


def test_preflight_passes_on_a_good_recipe(write_recipe: Any) -> None:
    result = preflight(recipe_for(write_recipe))
    assert type(result.model_config).__name__ == "LlamaConfig"
    assert 0 < result.trainable_params < result.total_params
    assert result.grad_accum_steps == 1 and result.world_size == 1
    assert result.lines()[0].startswith("model: Llama (")


def test_preflight_missing_data_file(write_recipe: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(UserError) as info:
        preflight(recipe_for(write_recipe, data={"path": str(missing)}))
    assert "train.jsonl" in str(info.value) and "not found" in str(info.value).lower()


def test_preflight_model_dir_that_does_not_exist(write_recipe: Any, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "llama-7b"
    with pytest.raises(UserError) as info:
        preflight(recipe_for(write_recipe, model={"name_or_path": str(missing)}))
    assert str(info.value) == f"model.name_or_path: no such directory: {missing.resolve()}"


def test_preflight_hub_id_while_offline_is_fast_and_one_line(
    write_recipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_unreachable_reason.cache_clear()
    try:
        recipe = recipe_for(write_recipe, model={"name_or_path": "peftrun-tests/no-such-model-xyz"})
        start = time.monotonic()
        with pytest.raises(UserError) as info:
            preflight(recipe)
        elapsed = time.monotonic() - start
    finally:
        hub_unreachable_reason.cache_clear()
    message = str(info.value)
    assert elapsed < 5, f"took {elapsed:.1f}s"
    assert "\n" not in message
    assert message.startswith("model.name_or_path: 'peftrun-tests/no-such-model-xyz'")
    assert "Hugging Face cache" in message and "Hub cannot be reached" in message
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_preflight_wandb_not_installed(write_recipe: Any) -> None:
    with pytest.raises(
        UserError, match=r"^logging\.report_to: 'wandb' is not installed \(pip install wandb\)$"
    ):
        preflight(recipe_for(write_recipe, logging={"report_to": ["wandb"]}))


def test_preflight_global_batch_not_divisible(write_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_for(write_recipe, train={"micro_batch_size": 2, "global_batch_size": 6})
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert preflight(recipe).grad_accum_steps == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as info:
        preflight(recipe)
    assert (
        str(info.value)
        == "train.global_batch_size: 6 is not a multiple of micro_batch_size (2) x processes (2) = 4"
    )
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="not a multiple"):
        preflight(recipe_for(write_recipe, train={"micro_batch_size": 4, "global_batch_size": 6}))


def test_preflight_resume_from_a_non_checkpoint(write_recipe: Any, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^train\.resume: .* is not a complete peftrun checkpoint"):
        preflight(recipe_for(write_recipe, train={"resume": str(tmp_path)}))


# --- load_model ------------------------------------------------------------------------------------------


NF4 = {"bits": 4, "quant_type": "nf4", "compute_dtype": "fp32"}


@pytest.fixture
def nf4_model(write_recipe: Any) -> Any:
    pytest.importorskip("bitsandbytes")
    return load_model(recipe_for(write_recipe, model={"quantization": NF4}).model, "causal_lm")


def test_load_model_4bit_nf4_on_cpu(nf4_model: Any) -> None:
    import bitsandbytes as bnb

    linear = {
        n: m for n, m in nf4_model.named_modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))
    }
    blocks = {n: m for n, m in linear.items() if n.startswith("model.layers.")}
    assert len(blocks) == 2 * 7
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in blocks.values())
    q_proj = nf4_model.model.layers[0].self_attn.q_proj
    assert type(q_proj.weight).__name__ == "Params4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert nf4_model.config.use_cache is False
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        logits = nf4_model(input_ids=ids).logits
    assert logits.shape == (1, 4, nf4_model.config.vocab_size) and torch.isfinite(logits).all()


def test_4bit_model_computes_in_its_compute_dtype_in_eval_as_in_training(nf4_model: Any) -> None:
    """bitsandbytes' bf16 inference kernel (AVX512-BF16 CPUs) is off, so eval measures the trained model."""
    import bitsandbytes as bnb

    layers = [m for m in nf4_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        training = nf4_model.train()(input_ids=ids).logits
        evaluating = nf4_model.eval()(input_ids=ids).logits
    # The bf16 path moved these by ~1e-3 relative; two fp32 paths agree to rounding.
    torch.testing.assert_close(evaluating, training, rtol=1e-5, atol=1e-5)


def test_count_parameters_of_a_4bit_model_is_its_logical_size(nf4_model: Any, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    assert count_parameters(nf4_model)[1] == total
    wrapped = peft.get_peft_model(nf4_model, peft.LoraConfig(r=4, target_modules="all-linear"))
    assert count_parameters(wrapped) == wrapped.get_nb_trainable_parameters()


def test_4bit_model_with_bf16_compute_runs_the_training_kernels_in_eval(write_recipe: Any) -> None:
    """With bf16 compute too, eval runs the training path: bitsandbytes' fused AVX512-BF16 kernel moved
    a 1B QLoRA model's logits by ~1% of their scale, and save_pretrained unpacks what it packed."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    quantization = {**NF4, "compute_dtype": "bf16"}
    model = load_model(recipe_for(write_recipe, model={"quantization": quantization}).model, "causal_lm")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        training = model.train()(input_ids=ids).logits
        evaluating = model.eval()(input_ids=ids).logits
    assert torch.equal(evaluating, training)
