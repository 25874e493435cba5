"""Training methods: name patterns and layer ranges, freezing, peft configs from recipe options, counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft  # imported at collection: its one-time import cost is not any test's
import pytest

from peftrun.errors import OptionError
from peftrun.model.methods import (
    build_peft_config,
    count_parameters,
    frozen_parameter_names,
    select_parameters,
)

LLAMA_LAYER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
GPT2_LAYER = tuple(
    f"{module}.{kind}"
    for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    for kind in ("weight", "bias")
)
# 12 blocks, so 'layers[1]' must not also pick up layers 10 and 11.
LLAMA = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.{p}" for i in range(12) for p in LLAMA_LAYER),
    "model.norm.weight",
    "lm_head.weight",
]
GPT2 = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    *(f"transformer.h.{i}.{p}" for i in range(12) for p in GPT2_LAYER),
    "transformer.ln_f.weight",
    "transformer.ln_f.bias",
]
NAMES = {"llama": LLAMA, "gpt2": GPT2}


def blocks(family: str, *layers: int) -> set[str]:
    """Every parameter of the given blocks, written out independently of the code under test."""
    prefix = {"llama": "model.layers", "gpt2": "transformer.h"}[family]
    return {n for n in NAMES[family] for i in layers if n.startswith(f"{prefix}.{i}.")}


SELECT_CASES: list[tuple[str, str, set[str]]] = [
    ("llama", "all", set(LLAMA)),
    ("gpt2", "all", set(GPT2)),
    ("llama", "model.embed_tokens.*", {"model.embed_tokens.weight"}),
    ("gpt2", "*.bias", {n for n in GPT2 if n.endswith(".bias")}),
    ("llama", "*.bias", set()),
    ("gpt2", "transformer.ln_f.*", {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    ("llama", "*.self_attn.q_proj.*", {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(12)}),
    ("llama", "layers[:1]", blocks("llama", 0)),
    ("llama", "layers[-1:]", blocks("llama", 11)),
    ("llama", "layers[0:2]", blocks("llama", 0, 1)),
    ("llama", "layers[1]", blocks("llama", 1)),
    ("llama", "layers[:-10]", blocks("llama", 0, 1)),
    ("llama", "layers[10:]", blocks("llama", 10, 11)),
    ("llama", "layers[0:100]", blocks("llama", *range(12))),
    ("llama", "model.layers[1:]", blocks("llama", *range(1, 12))),
    ("llama", "layers[-2]", blocks("llama", 10)),
    ("gpt2", "h[1]", blocks("gpt2", 1)),
    ("gpt2", "h[-1]", blocks("gpt2", 11)),
    ("gpt2", "h[-2:]", blocks("gpt2", 10, 11)),
    ("gpt2", "transformer.h[3:5]", blocks("gpt2", 3, 4)),
    # nothing matches: an index past the end, another family's block list, a glob typo
    ("llama", "layers[12]", set()),
    ("llama", "layers[-13]", set()),
    ("llama", "h[0]", set()),
    ("gpt2", "layers[:2]", set()),
    ("llama", "model.embed_token.*", set()),
    ("gpt2", "lm_head.*", set()),
]


@pytest.mark.parametrize(
    ("family", "pattern", "expected"), SELECT_CASES, ids=[f"{f}:{p}" for f, p, _ in SELECT_CASES]
)
def test_select_parameters(family: str, pattern: str, expected: set[str]) -> None:
    assert select_parameters(NAMES[family], pattern) == expected


def test_select_parameters_accepts_a_generator() -> None:
    assert select_parameters((n for n in GPT2), "h[0]") == blocks("gpt2", 0)


def test_freeze_all_train_lm_head_leaves_only_lm_head_trainable() -> None:
    frozen = frozen_parameter_names(LLAMA, ["all"], ["lm_head.*"])
    assert set(LLAMA) - frozen == {"lm_head.weight"}


def test_freeze_ranges_then_train_overrides() -> None:
    frozen = frozen_parameter_names(
        GPT2, ["transformer.wte.*", "transformer.wpe.*", "h[:-2]"], ["*.ln_1.*", "*.ln_2.*"]
    )
    layer_norms = {n for n in GPT2 if ".ln_1." in n or ".ln_2." in n}
    assert (
        frozen
        == ({"transformer.wte.weight", "transformer.wpe.weight"} | blocks("gpt2", *range(10))) - layer_norms
    )
    assert "transformer.h.10.attn.c_attn.weight" not in frozen
    assert "transformer.ln_f.weight" not in frozen


def test_freeze_nothing_is_frozen_without_patterns() -> None:
    assert frozen_parameter_names(LLAMA, [], []) == set()


@pytest.mark.parametrize(
    ("freeze", "train", "key", "pattern"),
    [
        (["all", "layers[40]"], [], "freeze[1]", "layers[40]"),
        (["model.embed_token.*"], [], "freeze[0]", "model.embed_token.*"),
        (["all"], ["lm_head.*", "h[-1:]"], "train[1]", "h[-1:]"),
    ],
)
def test_a_pattern_matching_nothing_is_an_error_naming_it(
    freeze: list[str], train: list[str], key: str, pattern: str
) -> None:
    with pytest.raises(OptionError) as info:
        frozen_parameter_names(LLAMA, freeze, train)
    assert info.value.key == key
    assert f"'{pattern}' matches no parameter" in info.value.message
    assert "model.embed_tokens.weight" in info.value.message  # what names look like here
    assert str(info.value).startswith(f"{key}: ")


# --- peft configs from recipe options ------------------------------------------------------------------


def _peft_classes() -> dict[str, type]:
    return {
        "lora": peft.LoraConfig,
        "ia3": peft.IA3Config,
        "prefix_tuning": peft.PrefixTuningConfig,
        "prompt_tuning": peft.PromptTuningConfig,
        "loha": peft.LoHaConfig,
        "lokr": peft.LoKrConfig,
        "oft": peft.OFTConfig,
        "vera": peft.VeraConfig,
        "adalora": peft.AdaLoraConfig,
    }


CONFIG_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "lora",
        {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
        {
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
            "target_modules": {"q_proj", "v_proj"},
            "use_rslora": True,
        },
    ),
    (
        "lora",
        {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", "use_dora": True},
        {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", "use_dora": True},
    ),
    (
        "ia3",
        {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        {"target_modules": {"k_proj", "down_proj"}, "feedforward_modules": {"down_proj"}},
    ),
    ("prefix_tuning", {"num_virtual_tokens": 4}, {"num_virtual_tokens": 4}),
    ("prompt_tuning", {"num_virtual_tokens": 20}, {"num_virtual_tokens": 20}),
    (
        "loha",
        {"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        {"r": 4, "alpha": 8, "target_modules": {"q_proj"}},
    ),
    (
        "lokr",
        {"r": 4, "alpha": 4, "target_modules": ["v_proj"]},
        {"r": 4, "alpha": 4, "target_modules": {"v_proj"}},
    ),
    ("oft", {"r": 0, "oft_block_size": 8, "target_modules": ["q_proj"]}, {"r": 0, "oft_block_size": 8}),
    (
        "vera",
        {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        {"r": 8, "target_modules": {"q_proj", "v_proj"}},
    ),
    # AdaLoRA follows the schedule: total_step is a placeholder until the run's step count is known.
    ("adalora", {"init_r": 6, "target_r": 2}, {"init_r": 6, "target_r": 2, "total_step": 1_000_000}),
]


@pytest.mark.parametrize(
    ("kind", "options", "expected"),
    CONFIG_CASES,
    ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CONFIG_CASES)],
)
def test_build_peft_config(kind: str, options: dict[str, Any], expected: dict[str, Any]) -> None:
    config: Any = build_peft_config(kind, options, task_type="CAUSAL_LM")
    assert config.task_type == "CAUSAL_LM"  # before the type check, which narrows config to object
    assert type(config) is _peft_classes()[kind]
    for key, value in expected.items():
        got = getattr(config, key)
        assert (set(got) if isinstance(value, set) else got) == value, key


def test_build_peft_config_does_not_mutate_options() -> None:
    options = {"r": 4, "alpha": 8}
    build_peft_config("lora", options, task_type=None)
    assert options == {"r": 4, "alpha": 8}


@pytest.mark.parametrize(
    ("kind", "options", "key", "message"),
    [
        (
            "lora",
            {"alpah": 8},
            "alpah",
            "unknown option of method 'lora' (LoraConfig); did you mean 'alpha'?",
        ),
        ("lora", {"target_module": ["q_proj"]}, "target_module", "did you mean 'target_modules'?"),
        ("lora", {"zzz_qqq": 1}, "zzz_qqq", "unknown option of method 'lora' (LoraConfig)"),
        # 'dropout' is short for lora_dropout only where the adapter has one
        ("ia3", {"dropout": 0.1}, "dropout", "unknown option of method 'ia3' (IA3Config)"),
        (
            "prompt_tuning",
            {"num_virtual_token": 4},
            "num_virtual_token",
            "did you mean 'num_virtual_tokens'?",
        ),
        ("lora", {"r": "big"}, "r", "Input should be a valid integer"),
        ("lora", {"use_dora": "perhaps"}, "use_dora", "(got 'perhaps')"),
        ("lora", {"target_modules": 5}, "target_modules", "(got 5)"),
        ("lora", {"r": 0}, "r", "must be a positive integer (got 0)"),
        ("vera", {"r": -1}, "r", "must be a positive integer"),
        ("lora", {"dropout": 1.0}, "dropout", "must be in [0, 1)"),
        ("prefix_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens", "must be a positive integer"),
        ("lora", {"task_type": "SEQ_CLS"}, "task_type", "is set by peftrun"),
        ("lora", {"base_model_name_or_path": "x"}, "base_model_name_or_path", "is set by peftrun"),
        ("lora", {"init_lora_weights": "pisa"}, "init_lora_weights", "(got 'pisa')"),
    ],
)
def test_bad_options_name_the_key(kind: str, options: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        build_peft_config(kind, options, task_type=None)
    assert info.value.key == key
    assert message in info.value.message


def test_options_peft_itself_rejects_are_a_value_error() -> None:
    # peft's __post_init__: layers_to_transform needs a list of target modules, not a regex
    with pytest.raises(ValueError, match="LoraConfig rejects these options") as info:
        build_peft_config("lora", {"target_modules": ".*q_proj", "layers_to_transform": [0]}, task_type=None)
    assert not isinstance(info.value, OptionError)


@pytest.mark.parametrize("init", ["pissa_niter_4", "pissa", "olora", "gaussian", True, False])
def test_init_lora_weights_accepts_peft_values(init: Any) -> None:
    assert build_peft_config("lora", {"init_lora_weights": init}, task_type=None).init_lora_weights == init


@pytest.mark.parametrize("init", ["pissa_niter_x", "pissa_niter_"])
def test_init_lora_weights_rejects_a_malformed_pissa_niter(init: str) -> None:
    with pytest.raises(OptionError):
        build_peft_config("lora", {"init_lora_weights": init}, task_type=None)


# --- parameter counts ------------------------------------------------------------------------------------


def _peft_model(model_dir: Path, config: Any) -> Any:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)


@pytest.mark.parametrize(
    ("family", "kind", "options"),
    [
        ("llama", "lora", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
        ("llama", "lora", {"r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
        ("llama", "ia3", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
        ("llama", "prompt_tuning", {"num_virtual_tokens": 4}),
        ("gpt2", "lora", {"r": 4, "target_modules": ["c_attn", "c_fc"]}),
    ],
    ids=["llama-lora", "llama-lora-modules_to_save", "llama-ia3", "llama-prompt_tuning", "gpt2-lora"],
)
def test_count_parameters_matches_peft(
    request: pytest.FixtureRequest, family: str, kind: str, options: dict[str, Any]
) -> None:
    model_dir = request.getfixturevalue({"llama": "tiny_llama", "gpt2": "tiny_gpt2"}[family])
    model = _peft_model(model_dir, build_peft_config(kind, options, task_type="CAUSAL_LM"))
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert (trainable, total) == model.get_nb_trainable_parameters()


def test_count_parameters_of_a_partly_frozen_model(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.model.embed_tokens.requires_grad_(False)
    trainable, total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == total - model.model.embed_tokens.weight.numel()
