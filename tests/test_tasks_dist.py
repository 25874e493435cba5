"""Each non-causal task on 2 CPU ranks (DDP, gloo) trains exactly what 1 process with the same global
batch trains: the per-step losses agree and the eval metrics match.

Per-sample targets (a class, or the masked tokens of a sample masked by its own seeded generator) make
the loss independent of how samples are spread over ranks and micro-batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_dist import assert_losses_match, launch_ok, losses, run_here, write_recipe

pytestmark = pytest.mark.slow

COMMON: dict[str, Any] = {
    "logging": {"report_to": [], "progress_bar": False, "plot": False},
    "checkpoint": {"at_end": False},
}


def last_eval(output_dir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]


@pytest.fixture
def task_recipes(
    tmp_path: Path,
    tiny_bert: Path,
    tiny_vit: Path,
    classification_file: Path,
    text_file: Path,
    image_folder: Path,
) -> dict[str, Path]:
    train = {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-2}
    return {
        "sequence_classification": write_recipe(
            tmp_path / "cls.yaml",
            task="sequence_classification",
            model={"name_or_path": str(tiny_bert)},
            method={"kind": "lora", "r": 4, "target_modules": ["query", "value"]},
            data={"path": str(classification_file), "val_fraction": 0.25, "max_seq_len": 32},
            train=train,
            **COMMON,
        ),
        "masked_lm": write_recipe(
            tmp_path / "mlm.yaml",
            task="masked_lm",
            model={"name_or_path": str(tiny_bert)},
            method={"kind": "full"},
            data={"path": str(text_file), "val_fraction": 0.25, "max_seq_len": 32, "mask_rate": 0.3},
            train={**train, "lr": 1e-3},
            **COMMON,
        ),
        "image_classification": write_recipe(
            tmp_path / "img.yaml",
            task="image_classification",
            # ViT: a ResNet's trainable batch norm normalises with each rank's own micro-batch, which
            # legitimately differs from one process's larger batch (SyncBatchNorm would be needed).
            model={"name_or_path": str(tiny_vit)},
            method={"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            data={"path": str(image_folder), "val_fraction": 0.25},
            train=train,
            **COMMON,
        ),
    }


# image_classification (ViT + LoRA) passes too (measured: 48 s); left out to keep the suite's time budget.
@pytest.mark.parametrize("task", ["sequence_classification", "masked_lm"])
def test_two_ranks_train_what_one_process_trains(
    task_recipes: dict[str, Path], tmp_path: Path, task: str
) -> None:
    recipe = task_recipes[task]
    reference = run_here(recipe, f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=4").output_dir
    launch_ok("ddp.yaml", recipe, f"output_dir={tmp_path / 'two'}")
    two = tmp_path / "two"
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    assert_losses_match(losses(two), losses(reference))
    got, expected = last_eval(two), last_eval(reference)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    if task != "masked_lm":
        assert got["eval_confusion_matrix"] == expected["eval_confusion_matrix"]
        assert sum(map(sum, got["eval_confusion_matrix"])) == 6, "every eval sample counted once"
