"""Text generation from whatever training left: `peftrun generate`, `peftrun chat`, eval samples.

A TARGET is a run directory (its final/), a checkpoint (`checkpoints/step-N`), a merged directory or an
adapter directory (its base from --base, the resolved recipe beside it, or adapter_config.json). Prompts
are tokenized exactly as training tokenized them: the run's chat template, one BOS in front, and
generation stops at EOS or at the token the template closes an assistant turn with (`<|end|>`,
`<|im_end|>`, `<end_of_turn>`), which many templates emit instead of EOS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftrun.errors import UserError
from peftrun.recipe.schema import Recipe
from peftrun.run.outputs import MANIFEST_FILE, RESOLVED_RECIPE

ADAPTER_CONFIG = "adapter_config.json"
TURN_PROBE = "\u2063peftrun-turn-probe\u2063"  # text no template alters, to find what follows an answer


@dataclass
class Loaded:
    """A model ready to generate, with the tokenizer (and chat template) it was trained with."""

    model: Any
    tokenizer: Any
    directory: Path  # where the weights (or adapter) were read from
    recipe: Recipe | None  # the run's resolved recipe, when the directory carries one


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8


def artefact_dir(target: str | Path) -> Path:
    """The directory holding weights: a run directory's final/, else `target` itself."""
    path = Path(target)
    if not path.is_dir():
        raise UserError(
            f"{target}: no such directory (expected a run, checkpoint, merged or adapter directory)"
        )
    if (path / RESOLVED_RECIPE).is_file() and (path / MANIFEST_FILE).is_file():
        from peftrun.run.run_dir import FINAL_DIR

        manifest = json.loads((path / MANIFEST_FILE).read_text())
        return path / manifest.get("final", FINAL_DIR)
    if not (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise UserError(
            f"{target}: holds neither a model (config.json) nor an adapter ({ADAPTER_CONFIG}); "
            "a checkpoint written before peftrun made checkpoints loadable cannot be used directly"
        )
    return path


def load_for_generation(target: str | Path, base: str | None = None) -> Loaded:
    """Load TARGET for generation on CPU/GPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    directory = artefact_dir(target)
    recipe = _recipe_beside(directory)
    if recipe is not None and recipe.task != "causal_lm":
        raise UserError(f"{target}: a {recipe.task} run; generation needs a causal_lm run")
    if (directory / ADAPTER_CONFIG).is_file():
        model, tokenizer_dir = _load_adapter(directory, base, recipe)
    else:
        if base is not None:
            raise UserError(f"--base: {target} is a whole model, not an adapter; drop --base")
        dtype = _dtype(recipe)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer_dir = directory
    tokenizer = _load_tokenizer(tokenizer_dir, recipe)
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, directory=directory, recipe=recipe)


def _recipe_beside(directory: Path) -> Recipe | None:
    from peftrun.recipe.load import load_run_recipe

    path = directory / RESOLVED_RECIPE
    return load_run_recipe(path) if path.is_file() else None


def _dtype(recipe: Recipe | None) -> Any:
    from peftrun.model.load import DTYPES

    return DTYPES[recipe.model.dtype] if recipe is not None else "auto"


def _load_adapter(directory: Path, base: str | None, recipe: Recipe | None) -> tuple[Any, Path]:
    from peft import PeftModel

    if base is None and recipe is not None:  # the run's own base, quantization and dtype
        from peftrun.model.load import load_base

        base_model = load_base(recipe)
    else:
        from transformers import AutoModelForCausalLM

        base = base or json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{directory}: the adapter records no base model; pass --base PATH_OR_HUB_ID")
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=_dtype(recipe))
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    tokenizer_dir = (
        directory if has_tokenizer else Path(base or (recipe.model.name_or_path if recipe else ""))
    )
    return PeftModel.from_pretrained(base_model, directory), tokenizer_dir


def _load_tokenizer(directory: Path, recipe: Recipe | None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if recipe is not None:
        from peftrun.run.artefact import trained_chat_template

        tokenizer.chat_template = trained_chat_template(tokenizer, recipe)
    return tokenizer


# ---- prompts --------------------------------------------------------------------------------------------


def prompt_text(row: Mapping[str, Any], tokenizer: Any, recipe: Recipe | None, where: str) -> str:
    """The text the model continues: `messages` through the chat template (with the generation prompt),
    `instruction` (+ `input`) through the run's alpaca/plain prompt, or `prompt` as is."""
    if "messages" in row:
        messages = list(row["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a training row: answer its last question
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError(f"{where}: 'messages' given but the model's tokenizer has no chat template")
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    if "instruction" in row:
        from peftrun.data.templates import PROMPT_RENDERERS

        style = recipe.data.prompt_template if recipe is not None else "alpaca"
        return PROMPT_RENDERERS[style](str(row["instruction"]), str(row.get("input", "")))
    if "prompt" in row:
        return str(row["prompt"])
    raise UserError(f"{where}: a row needs 'messages', 'prompt' or 'instruction' (found {sorted(row)})")


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids as training built them: exactly one BOS (when the tokenizer has one), then the text."""
    bos_id, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos_text and text.startswith(bos_text):
        text = text[len(bos_text) :]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [bos_id, *ids] if bos_id is not None else ids


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """EOS, the model's generation_config EOS ids, and the special token that closes an assistant turn."""
    stops: list[int] = []
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops += configured if isinstance(configured, list) else [configured] if configured is not None else []
    turn_end = turn_end_token_id(tokenizer)
    if turn_end is not None:
        stops.append(turn_end)
    return list(dict.fromkeys(stops))


def turn_end_token_id(tokenizer: Any) -> int | None:
    """The first token the chat template writes after an assistant answer, if it is a special token."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TURN_PROBE}]
    try:
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    except Exception:  # a template that rejects this conversation shape: no turn marker to learn
        return None
    after = text.split(TURN_PROBE, 1)[-1] if TURN_PROBE in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return int(ids[0]) if ids and ids[0] in special else None


# ---- generation -----------------------------------------------------------------------------------------


def sampling_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    if settings.temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": None}


@torch.no_grad()
def generate_ids(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], settings: GenerationSettings
) -> list[tuple[list[int], str]]:
    """(new token ids, finish reason 'stop' | 'length') per prompt, in batches left-padded to the longest."""
    from transformers import set_seed

    set_seed(settings.seed)
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    results: list[tuple[list[int], str]] = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad_id,
            **sampling_kwargs(settings),
        )
        for row in out[:, width:].tolist():
            results.append(_until_stop(row, stops, settings.max_new_tokens))
    return results


def _until_stop(row: list[int], stops: list[int], limit: int) -> tuple[list[int], str]:
    for i, token in enumerate(row):
        if token in stops:
            return row[:i], "stop"
    return row[:limit], "length"


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL prompts file; each must be a JSON object."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts: file not found: {file.resolve()}")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{file}:{number}: expected a JSON object with 'prompt' or 'messages'")
        rows.append(row)
    if not rows:
        raise UserError(f"--prompts: {file} holds no rows")
    return rows


def generate_rows(
    loaded: Loaded, rows: Sequence[Mapping[str, Any]], settings: GenerationSettings, source: str
) -> list[dict[str, Any]]:
    """One output record per input row: the row number, the prompt text and the generation."""
    texts = [
        prompt_text(row, loaded.tokenizer, loaded.recipe, f"{source}:row {i}") for i, row in enumerate(rows)
    ]
    prompts = [encode_prompt(loaded.tokenizer, text) for text in texts]
    outputs = generate_ids(loaded.model, loaded.tokenizer, prompts, settings)
    return [
        {
            "row": i,
            "prompt": text,
            "generation": loaded.tokenizer.decode(ids, skip_special_tokens=True),
            "tokens": len(ids),
            "finish": finish,
        }
        for i, (text, (ids, finish)) in enumerate(zip(texts, outputs, strict=True))
    ]


def generate_file(
    target: str, prompts_path: str, out_path: str, settings: GenerationSettings, base: str | None = None
) -> int:
    """`peftrun generate`: JSONL in, JSONL out (written atomically). Returns the rows written."""
    from peftrun.staging import staged_file

    rows = read_prompts(prompts_path)  # before the model loads: a bad file costs nothing
    loaded = load_for_generation(target, base)
    records = generate_rows(loaded, rows, settings, prompts_path)
    with staged_file(Path(out_path)) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)
