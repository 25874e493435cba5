"""`peftrun demo`: the whole product in a couple of minutes, offline.

Builds (once, cached) a tiny Llama-shaped model and tokenizer, shows its answers to a few prompts,
trains a LoRA adapter on the task shipped in peftrun/demo/data through the normal `train` path
(recipe, checkpoints, verified save), then shows the trained answers next to the expected ones.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from peftrun.demo.tiny import DEMO_DATA_DIR, demo_model_dir
from peftrun.model.load import load_model, load_tokenizer
from peftrun.recipe.load import load_recipe
from peftrun.recipe.schema import Recipe
from peftrun.run.outputs import METRICS_FILE, read_metrics
from peftrun.train.loop import train

DEMO_RECIPE = DEMO_DATA_DIR / "recipe.yaml"
SHOWN_PROMPTS = 6


def demo_recipe(overrides: list[str]) -> Recipe:
    """The shipped demo recipe, pointed at the locally built model and the packaged data."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network
    model_dir = demo_model_dir()
    return load_recipe(
        DEMO_RECIPE,
        [
            f"model.name_or_path={model_dir}",
            f"data.path={DEMO_DATA_DIR / 'train.jsonl'}",
            f"data.val_path={DEMO_DATA_DIR / 'eval.jsonl'}",
            "train.overwrite=true",  # a second demo moves the first aside (runs/demo.old-<time>)
            *overrides,
        ],
    )


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation so far exactly as training rendered it, ending where the assistant answers."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]  # one BOS, as in training


@torch.no_grad()
def answer(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 24) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def held_out_rows() -> list[tuple[list[dict[str, str]], str]]:
    """(question so far, expected answer) for each held-out conversation."""
    rows = [
        json.loads(line) for line in (DEMO_DATA_DIR / "eval.jsonl").read_text().splitlines() if line.strip()
    ]
    return [(row["messages"][:-1], row["messages"][-1]["content"]) for row in rows]


def run_demo(overrides: list[str]) -> dict[str, Any]:
    from peft import PeftModel

    recipe = demo_recipe(overrides)
    tokenizer = load_tokenizer(recipe.model)
    rows = held_out_rows()
    print(f"[demo] base model: {recipe.model.name_or_path}")
    base = load_model(recipe.model, recipe.task)
    before = [answer(base, tokenizer, question) for question, _ in rows]

    result = train(recipe)
    if result.final_dir is None:
        return {"stopped": True}
    tuned = PeftModel.from_pretrained(load_model(recipe.model, recipe.task), result.final_dir)
    after = [answer(tuned, tokenizer, question) for question, _ in rows]

    losses = [(r["step"], r["loss"]) for r in read_metrics(recipe.output_dir / METRICS_FILE) if "loss" in r]
    correct_before = sum(b == expected for b, (_, expected) in zip(before, rows, strict=True))
    correct_after = sum(a == expected for a, (_, expected) in zip(after, rows, strict=True))
    print("\n[demo] held-out prompts (not in the training data):")
    for (question, expected), b, a in list(zip(rows, before, after, strict=True))[:SHOWN_PROMPTS]:
        print(
            f"  user:     {question[-1]['content']}\n  expected: {expected}\n  before:   {b!r}\n  after:    {a!r}\n"
        )
    (first_step, first_loss), (last_step, last_loss) = losses[0], losses[-1]
    print(f"[demo] train loss: {first_loss:.3f} at step {first_step} -> {last_loss:.3f} at step {last_step}")
    print(
        f"[demo] exact answers on {len(rows)} held-out prompts: {correct_before} before, {correct_after} after training"
    )
    print(f"[demo] run directory: {recipe.output_dir} (adapter in {result.final_dir}, loss plot in loss.png)")
    return {
        "first_loss": first_loss,
        "last_loss": last_loss,
        "correct_before": correct_before,
        "correct_after": correct_after,
        "total": len(rows),
    }
