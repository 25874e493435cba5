"""`peftrun export ... --model-card` and `--push-to-hub REPO`: a Hub README.md that says what the model
is and how it was made, and the upload of the exported directory.

The card's YAML front matter is the Hub's model-card metadata (base_model, library_name, tags, datasets,
license); its body states the run's facts from manifest.json and the resolved recipe, and how to use
the model. The license is a placeholder: only the user knows what the base model and data allow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from peftrun.data.sources import is_hub_id
from peftrun.errors import UserError
from peftrun.run.outputs import MANIFEST_FILE, METRICS_FILE, RESOLVED_RECIPE, read_metrics

CARD_FILE = "README.md"
LICENSE_PLACEHOLDER = "other  # set the license your base model and data allow"
LIBRARIES = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}


def run_dir_of(target: Path) -> Path | None:
    """The run directory `target` belongs to: itself, or the run above a checkpoint / final directory."""
    for candidate in (target, target.parent, target.parent.parent):
        if (candidate / MANIFEST_FILE).is_file() and (candidate / RESOLVED_RECIPE).is_file():
            return candidate
    return None


def card_facts(target: Path) -> dict[str, Any]:
    """What the card states, read from the run: recipe (resolved), manifest, last metrics."""
    run = run_dir_of(target)
    recipe_file = run / RESOLVED_RECIPE if run else target / RESOLVED_RECIPE
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    manifest = json.loads((run / MANIFEST_FILE).read_text()) if run else {}
    records = read_metrics(run / METRICS_FILE) if run and (run / METRICS_FILE).is_file() else []
    evals = [r for r in records if "eval_loss" in r]
    return {"recipe": recipe, "manifest": manifest, "last_eval": evals[-1] if evals else None}


def render_card(target: Path, format_name: str, base: str, repo: str | None = None) -> str:
    facts = card_facts(target)
    recipe, manifest = facts["recipe"] or {}, facts["manifest"]
    method = (recipe.get("method") or {}).get("kind", "unknown")
    data = recipe.get("data") or {}
    data_paths = [data.get("path"), *(entry.get("path") for entry in data.get("datasets") or [])]
    metadata: dict[str, Any] = {
        "base_model": base,
        "library_name": LIBRARIES[format_name],
        "tags": ["peftrun", method],
        "license": "other",
    }
    if format_name == "adapter":
        metadata["tags"].append("base_model:adapter:" + base)
    if format_name == "gguf":
        metadata["tags"].append("gguf")
    hub_ids = [path for path in data_paths if path and is_hub_id(str(path))]  # local files are not named
    if hub_ids:
        metadata["datasets"] = hub_ids
    front = yaml.safe_dump(metadata, sort_keys=False).rstrip()
    front = front.replace("license: other", f"license: {LICENSE_PLACEHOLDER}")
    lines = [f"---\n{front}\n---", f"# {repo or target.name}", ""]
    lines += [f"Fine-tuned from `{base}` with peftrun ({method}); exported as {format_name}.", ""]
    lines += _facts_table(manifest, facts["last_eval"], recipe)
    lines += ["", "## Use", "", *_usage(format_name, repo or str(target), base)]
    if recipe:
        lines += [
            "",
            "## Training recipe (resolved)",
            "",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False).rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _facts_table(
    manifest: dict[str, Any], last_eval: dict[str, Any] | None, recipe: dict[str, Any]
) -> list[str]:
    data = manifest.get("data") or {}
    rows = [
        ("method", (recipe.get("method") or {}).get("kind")),
        ("optimizer steps", manifest.get("steps")),
        ("training samples", data.get("train_samples")),
        ("validation samples", data.get("eval_samples")),
        ("final train loss", _number(manifest.get("final_train_loss"))),
        ("final eval loss", _number(manifest.get("final_eval_loss"))),
        ("trainable parameters", manifest.get("trainable_parameters")),
        ("processes", manifest.get("world_size")),
    ]
    if last_eval:
        rows += [
            (key.removeprefix("eval_"), _number(value))
            for key, value in last_eval.items()
            if key.startswith("eval_") and key != "eval_loss" and isinstance(value, (int, float))
        ]
    versions = manifest.get("versions") or {}
    rows += [
        (f"{name} version", versions[name])
        for name in ("peftrun", "transformers", "peft", "torch")
        if name in versions
    ]
    present = [(k, v) for k, v in rows if v is not None]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in present)] if present else []


def _number(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


def _usage(format_name: str, where: str, base: str) -> list[str]:
    if format_name == "adapter":
        return [
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")',
            "```",
            f"vLLM: `vllm serve {base} --enable-lora --lora-modules adapter={where}`",
        ]
    if format_name == "gguf":
        return ["`llama-cli -m <file>.gguf -cnv`, or with Ollama: `ollama create my-model -f Modelfile`"]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        "```",
    ]


def write_card(out_dir: Path, target: Path, format_name: str, base: str, repo: str | None) -> Path:
    path = out_dir / CARD_FILE
    path.write_text(render_card(target, format_name, base, repo))
    return path


def push_to_hub(folder: Path, repo: str, api: Any = None) -> str:
    """Upload `folder` to the model repo `repo` (created if missing); returns the commit URL."""
    from peftrun.model.hub import hub_unreachable_reason

    if api is None:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise UserError(f"--push-to-hub: the Hub is not reachable ({reason})")
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo,
        repo_type="model",
        folder_path=str(folder),
        commit_message=f"peftrun export of {folder.name}",
    )
    return str(getattr(commit, "commit_url", commit))


def publish_export(args: Any, base: str) -> None:
    """After an export: `--model-card` writes README.md into --out, `--push-to-hub REPO` uploads --out."""
    out = Path(args.out)
    if args.model_card or args.push_to_hub:
        card = write_card(out, Path(args.run), args.format, base, args.push_to_hub)
        print(f"[peftrun] wrote the model card {card}")
    if args.push_to_hub:
        print(f"[peftrun] uploaded {out} to {push_to_hub(out, args.push_to_hub)}")
