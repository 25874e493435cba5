"""Checkpoints are usable artefacts: a plain peft/transformers load takes them, and keep_best keeps the best."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftrun.recipe.load import load_recipe
from peftrun.train.checkpoint import best_checkpoint
from peftrun.train.loop import train


def run(recipe_path: Path, *overrides: str) -> Any:
    return train(load_recipe(recipe_path, list(overrides)))


def test_checkpoint_loads_with_plain_peft_and_equals_final(write_recipe: Any, tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run(write_recipe(checkpoint={"every_steps": 2, "keep_last": 2, "at_end": True}))
    step = result.output_dir / "checkpoints" / "step-00000003"
    assert (step / "adapter_config.json").is_file() and (step / "trainer_state.json").is_file()
    batch = torch.tensor([[1, 5, 9, 12, 40]])
    logits = {}
    for directory in (step, result.final_dir):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        logits[directory] = PeftModel.from_pretrained(base, directory).eval()(batch).logits
    torch.testing.assert_close(logits[step], logits[result.final_dir])
    # The tokenizer saved beside the adapter carries the chat template the run used.
    assert (
        AutoTokenizer.from_pretrained(step).chat_template
        == AutoTokenizer.from_pretrained(tiny_llama).chat_template
    )


def test_full_run_checkpoint_is_a_transformers_checkpoint(write_recipe: Any) -> None:
    from transformers import AutoModelForCausalLM

    result = run(write_recipe(method={"kind": "full", "_replace": True}, checkpoint={"at_end": True}))
    step = result.output_dir / "checkpoints" / "step-00000003"
    model = AutoModelForCausalLM.from_pretrained(step)
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), final.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_keep_best_survives_rotation(write_recipe: Any) -> None:
    """lr 0.3 makes the eval loss worsen after the first steps: the best checkpoint is an early one,
    which keep_last=1 alone would delete."""
    result = run(
        write_recipe(
            data={"val_fraction": 0.25},
            train={"max_steps": 6, "lr": 0.3, "scheduler": "constant"},
            eval={"every_steps": 1},
            checkpoint={"every_steps": 1, "keep_last": 1, "keep_best": True, "at_end": True},
        )
    )
    out = result.output_dir
    evals = {
        r["step"]: r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "eval_loss" in r
    }
    best_step = min(evals, key=evals.__getitem__)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert best_step != 6, f"the test needs a best step before the last: {evals}"
    assert kept == [f"step-{best_step:08d}", "step-00000006"]
    assert best_checkpoint(out) == out / "checkpoints" / f"step-{best_step:08d}"
    assert (
        json.loads((out / "manifest.json").read_text())["best_checkpoint"]
        == f"checkpoints/step-{best_step:08d}"
    )
