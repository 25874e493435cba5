"""Every shipped recipe validates, and passes pre-flight against a tiny model of its own architecture.

Pre-flight builds the architecture and applies the method to it, so target_modules, freeze/train
patterns and adapter options are checked against the family (GPT-2 Conv1D blocks `h.N`, Llama
`model.layers.N`); only the model's size differs from the real one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import peft  # noqa: F401  (imported at collection: its one-time import cost is not any test's)
import pytest
from transformers import AutoConfig

from peftrun.recipe.load import load_recipe
from peftrun.train.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
RECIPE_IDS = [p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in RECIPES]
# Which tiny fixture stands in for a recipe's model, by a word in its name; and the config class it gives.
FAMILIES = {
    "gpt": ("tiny_gpt2", "GPT2Config"),
    "llama": ("tiny_llama", "LlamaConfig"),
    "bert": ("tiny_bert", "BertConfig"),
    "minilm": ("tiny_bert", "BertConfig"),  # all-MiniLM-L6-v2 is a BERT
    "resnet": ("tiny_resnet", "ResNetConfig"),
    "vit": ("tiny_vit", "ViTConfig"),
}


def family_of(name_or_path: str) -> str:
    found = [f for f in FAMILIES if f in name_or_path.lower()]
    assert len(found) == 1, f"cannot tell the architecture family of '{name_or_path}'; add it to FAMILIES"
    return found[0]


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 10
    assert len(set(RECIPE_IDS)) == len(RECIPE_IDS)


@pytest.mark.parametrize("path", RECIPES, ids=RECIPE_IDS)
def test_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.model.name_or_path and family_of(recipe.model.name_or_path)
    assert recipe.method.kind


@pytest.mark.parametrize("path", RECIPES, ids=RECIPE_IDS)
def test_recipe_passes_preflight_on_a_tiny_model_of_its_family(
    path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # data paths are relative to the repository root
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    written = load_recipe(path)
    fixture, config_class = FAMILIES[family_of(written.model.name_or_path)]
    overrides = [f"model.name_or_path={request.getfixturevalue(fixture)}"]
    tiny = AutoConfig.from_pretrained(request.getfixturevalue(fixture))
    positions = getattr(tiny, "max_position_embeddings", None) or getattr(tiny, "n_positions", None)
    if fixture != "tiny_llama" and positions and written.data.max_seq_len > positions:
        overrides.append(
            f"data.max_seq_len={positions}"
        )  # the real model has more positions than its stand-in
    if importlib.util.find_spec("bitsandbytes") is None:
        if written.model.quantization is not None:
            overrides.append("model.quantization=null")
        if written.train.optimizer == "adamw_8bit":
            overrides.append("train.optimizer=adamw")
    recipe = load_recipe(path, overrides)
    assert recipe.data.path == written.data.path and Path(recipe.data.path).is_file()

    result = preflight(recipe)

    assert type(result.model_config).__name__ == config_class
    assert 0 < result.trainable_params <= result.total_params
    if recipe.method.kind == "full":
        assert result.trainable_params == result.total_params
    else:
        assert result.trainable_params < result.total_params
    if recipe.train.global_batch_size is not None:
        assert result.grad_accum_steps * recipe.train.micro_batch_size == recipe.train.global_batch_size
