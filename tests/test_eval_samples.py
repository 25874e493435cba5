"""`eval.generate`: sample answers at each evaluation, in metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftrun.errors import UserError
from peftrun.recipe.load import load_recipe
from peftrun.train.loop import train


def test_samples_are_logged_at_each_eval(write_recipe: Any, chat_file: Path) -> None:
    recipe = write_recipe(
        data={"path": str(chat_file), "format": "chat", "val_fraction": 0.25},
        eval={"every_steps": 2, "generate": ["Say apple.", "Say river."]},
        train={"max_steps": 4},
        logging={"report_to": ["tensorboard"]},
    )
    out = train(load_recipe(recipe)).output_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sampled = [r for r in records if "eval_samples" in r]
    assert [r["step"] for r in sampled] == [2, 4]
    first = sampled[0]["eval_samples"]
    assert [s["prompt"] for s in first] == [
        "<s><|user|>Say apple.<|end|><|assistant|>",
        "<s><|user|>Say river.<|end|><|assistant|>",
    ]
    assert all(isinstance(s["generation"], str) for s in first)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for events in {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents*")}:
        accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        tags += accumulator.Tags()["tensors"]
    assert any("eval/samples" in tag for tag in tags), tags


def test_samples_need_a_causal_lm(write_recipe: Any, classification_file: Path) -> None:
    recipe = write_recipe(
        task="sequence_classification",
        data={"path": str(classification_file), "format": "classification"},
        eval={"generate": ["x"]},
    )
    with pytest.raises(UserError, match=r"eval\.generate: only for causal_lm"):
        train(load_recipe(recipe))
