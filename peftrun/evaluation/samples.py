"""`eval.generate`: sample answers to fixed prompts at every evaluation, so a user sees the model learn
(not only the loss). Written to metrics.jsonl (`eval_samples`) and TensorBoard (text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftrun.errors import UserError
from peftrun.recipe.schema import Recipe

MAX_NEW_TOKENS = 64


class EvalSamples:
    """The prompts, tokenized once the way training tokenizes, and how to answer them."""

    def __init__(self, recipe: Recipe, tokenizer: Any) -> None:
        from peftrun.run.artefact import trained_chat_template
        from peftrun.use.generate import encode_prompt, prompt_text, read_prompts

        spec = recipe.eval.generate
        rows = read_prompts(spec) if isinstance(spec, str) else [_row(p, recipe) for p in spec or []]
        previous = getattr(tokenizer, "chat_template", None)
        tokenizer.chat_template = trained_chat_template(tokenizer, recipe)
        try:
            self.texts = [
                prompt_text(r, tokenizer, recipe, f"eval.generate[{i}]") for i, r in enumerate(rows)
            ]
        finally:
            tokenizer.chat_template = previous
        self.prompts = [encode_prompt(tokenizer, text) for text in self.texts]
        self.tokenizer = tokenizer
        self.chat_template = trained_chat_template(tokenizer, recipe)

    def answers(self, model: Any) -> list[dict[str, str]]:
        """Greedy answers of `model` (unwrapped), restoring its train/eval mode afterwards."""
        from peftrun.use.generate import GenerationSettings, generate_ids

        was_training = model.training
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        use_cache, config.use_cache = config.use_cache, True
        previous, self.tokenizer.chat_template = self.tokenizer.chat_template, self.chat_template
        model.eval()
        try:
            settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=len(self.prompts))
            outputs = generate_ids(model, self.tokenizer, self.prompts, settings)
        finally:
            model.train(was_training)
            config.use_cache = use_cache
            self.tokenizer.chat_template = previous
        return [
            {"prompt": text, "generation": self.tokenizer.decode(ids, skip_special_tokens=True)}
            for text, (ids, _) in zip(self.texts, outputs, strict=True)
        ]


def _row(prompt: str, recipe: Recipe) -> dict[str, Any]:
    if recipe.data.format == "chat":
        return {"messages": [{"role": "user", "content": prompt}]}
    if recipe.data.format == "alpaca":
        return {"instruction": prompt}
    return {"prompt": prompt}


def eval_samples_for(recipe: Recipe, tokenizer: Any, accelerator: Any) -> EvalSamples | None:
    """The sampler when the recipe asks for one and this process can generate (the main one, with whole
    weights: not under ZeRO-3)."""
    from peftrun.dist.accelerator import zero_stage

    if not recipe.eval.generate:
        return None
    if recipe.task != "causal_lm":
        raise UserError(f"eval.generate: only for causal_lm runs (this run's task is {recipe.task})")
    if isinstance(recipe.eval.generate, str) and not Path(recipe.eval.generate).is_file():
        raise UserError(f"eval.generate: file not found: {Path(recipe.eval.generate).resolve()}")
    if zero_stage(accelerator) == 3:
        accelerator.print("[peftrun] eval.generate: skipped under ZeRO-3 (no process holds whole weights)")
        return None
    return EvalSamples(recipe, tokenizer) if accelerator.is_main_process else None


def log_samples(accelerator: Any, samples: list[dict[str, str]], step: int) -> None:
    """TensorBoard text: one markdown table per evaluation."""
    if "tensorboard" not in [t.name for t in accelerator.trackers]:
        return
    rows = "\n".join(f"| {s['prompt']!r} | {s['generation']!r} |".replace("\n", " ") for s in samples)
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    writer.add_text("eval/samples", f"| prompt | generation |\n|---|---|\n{rows}", global_step=step)
