"""`peftrun demo` end to end, shortened: the built-in model builds offline, trains and improves."""

from __future__ import annotations

from pathlib import Path

from peftrun.demo.run import demo_recipe, run_demo
from peftrun.demo.tiny import DEMO_DATA_DIR
from peftrun.recipe.load import load_recipe


def test_demo_recipe_validates_and_points_at_packaged_data(session_cache: Path) -> None:
    recipe = demo_recipe([])
    assert Path(recipe.data.path).is_file() and recipe.data.val_path and Path(recipe.data.val_path).is_file()
    assert (Path(recipe.model.name_or_path) / "config.json").is_file()
    assert load_recipe(DEMO_DATA_DIR / "recipe.yaml").method.kind == "lora"


def test_short_demo_trains_and_the_loss_falls(session_cache: Path, tmp_path: Path) -> None:
    summary = run_demo(
        [
            "train.max_steps=40",
            "train.warmup_steps=5",
            f"output_dir={tmp_path / 'demo'}",
            "logging.every_steps=5",
        ]
    )
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
    assert summary["total"] == 100
    assert (tmp_path / "demo" / "final" / "adapter_model.safetensors").is_file()
