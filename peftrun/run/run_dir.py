"""Where things live in and around a run directory, and how its final artefact is loaded back.

Every command that reads or writes a run (train, eval, predict, merge, export, the demo) takes the
names from here, so the layout is defined once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftrun.model.load import load_base, load_model
from peftrun.model.methods import NON_ADAPTER_KINDS
from peftrun.recipe.schema import Recipe

FINAL_DIR = "final"  # output_dir/final: the verified, deployable artefact


def final_dir(output_dir: Path) -> Path:
    return output_dir / FINAL_DIR


def tokenized_cache_dir() -> Path:
    """Where tokenized datasets are cached across runs ($PEFTRUN_CACHE, default ~/.cache/peftrun)."""
    return Path(os.environ.get("PEFTRUN_CACHE", Path.home() / ".cache" / "peftrun")) / "tokenized"


def reload_artefact(directory: Path, recipe: Recipe) -> Any:
    """Load a saved artefact the way a user would: base + PeftModel.from_pretrained, or from_pretrained."""
    if recipe.method.kind in NON_ADAPTER_KINDS:
        # The whole model was saved: load it as the base, from the artefact's own weights and config.
        saved = recipe.model.model_copy(
            update={"name_or_path": str(directory), "revision": None, "random_init": False}
        )
        return load_model(saved, recipe.task, labels=recipe.data.labels)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(recipe), directory)
