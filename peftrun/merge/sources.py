"""What a merge reads: the adapter, the base checkpoint, the task and the tokenizer to ship.

A run directory knows all of them (resolved_recipe.yaml beside final/); a bare adapter directory needs
`--base`, and the task comes from its adapter_config (peft's task_type) or the base's architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftrun.data.templates import recipe_chat_template
from peftrun.errors import UserError
from peftrun.model.hub import require_local_or_reachable
from peftrun.model.load import label_kwargs
from peftrun.model.methods import NON_ADAPTER_KINDS
from peftrun.model.tasks import TASKS, Task
from peftrun.recipe.load import load_run_recipe
from peftrun.recipe.schema import QuantizationConfig
from peftrun.run.io_checks import reading
from peftrun.run.outputs import MANIFEST_FILE, RESOLVED_RECIPE
from peftrun.run.run_dir import FINAL_DIR

ADAPTER_CONFIG = "adapter_config.json"
# What a deployable checkpoint needs from a Hub snapshot (no optimizer states, no other formats).
BASE_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py"]


@dataclass(frozen=True)
class MergeInputs:
    adapter_dir: Path
    base: str  # as the user or the recipe wrote it, for messages and records
    base_dir: Path  # local directory with the base's config and weights
    revision: str | None
    task: Task
    base_dtype: str  # the dtype the adapter was trained on (recipe's model.dtype, or the base's own)
    quantization: QuantizationConfig | None  # QLoRA: the 4-bit base the adapter was trained on
    tokenizer_source: Path  # the tokenizer shipped with the merged model
    chat_template: str | None  # the recipe's template (built-in or inline Jinja) the run rendered chats with
    trust_remote_code: bool = False
    labels: list[str] | None = None  # classifiers: the class names of the head the run trained

    def base_config(self) -> Any:
        """The base's config, with the trained head's classes (a classifier's base may have another head)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.base_dir, trust_remote_code=self.trust_remote_code)
        for key, value in label_kwargs(self.labels).items():
            setattr(config, key, value)
        return config

    @property
    def adapter_config(self) -> dict[str, Any]:
        return read_adapter_config(self.adapter_dir)


def is_run_dir(path: Path) -> bool:
    return (path / RESOLVED_RECIPE).is_file() and (path / MANIFEST_FILE).is_file()


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{adapter_dir}: not a peft adapter directory (no {ADAPTER_CONFIG})")
    with reading(path):
        config: dict[str, Any] = json.loads(path.read_text())
    return config


def read_peft_config(adapter_dir: Path) -> Any:
    """adapter_config.json through peft's own config class (LoraConfig, IA3Config, ...), typed and
    defaulted as peft reads it."""
    read_adapter_config(adapter_dir)  # a missing file is a user's mistake, said as such
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(adapter_dir))


def inputs_from_run(run_dir: Path) -> MergeInputs:
    """A run directory: the recipe says which base, task, dtype and quantization the adapter was trained on."""
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    recipe = load_run_recipe(run_dir / RESOLVED_RECIPE)
    final = run_dir / manifest.get("final", FINAL_DIR)
    if recipe.method.kind in NON_ADAPTER_KINDS:
        raise UserError(
            f"{run_dir}: method '{recipe.method.kind}' trained the model's own weights; there is no adapter to "
            f"merge and {final} already is a transformers checkpoint"
        )
    read_adapter_config(final)
    chat_template = None
    if recipe.data.format == "chat" and recipe.data.chat_template:
        chat_template = recipe_chat_template(recipe.data.chat_template)
    return MergeInputs(
        adapter_dir=final,
        base=recipe.model.name_or_path,
        base_dir=local_base_dir(recipe.model.name_or_path, recipe.model.revision, "model.name_or_path"),
        revision=recipe.model.revision,
        task=TASKS[recipe.task],
        base_dtype=recipe.model.dtype,
        quantization=recipe.model.quantization,
        tokenizer_source=final,
        chat_template=chat_template,
        trust_remote_code=recipe.model.trust_remote_code,
        labels=recipe.data.labels,
    )


def inputs_from_adapter(adapter_dir: Path, base: str | None) -> MergeInputs:
    """An adapter directory: the base is --base, or the one peft recorded in adapter_config.json."""
    config = read_peft_config(adapter_dir)
    base = base or config.base_model_name_or_path
    if not base:
        raise UserError(f"{adapter_dir}: the adapter records no base model; pass --base PATH_OR_HUB_ID")
    revision = config.revision
    task_type = getattr(config.task_type, "value", config.task_type)  # peft's TaskType enum, or None
    base_dir = local_base_dir(base, revision, "--base")
    base_config = read_base_config(base_dir)
    has_tokenizer = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return MergeInputs(
        adapter_dir=adapter_dir,
        base=base,
        base_dir=base_dir,
        revision=revision,
        task=task_for(task_type, base_config.get("architectures") or [], base_dir),
        base_dtype=_dtype_name(base_config.get("dtype") or base_config.get("torch_dtype")),
        quantization=None,
        tokenizer_source=adapter_dir if has_tokenizer else base_dir,
        chat_template=None,
    )


def task_for(peft_task_type: str | None, architectures: list[str], base_dir: Path) -> Task:
    """peft's task type names the head the adapter was trained with; failing that, the base's class does
    (LlamaForCausalLM -> AutoModelForCausalLM)."""
    for task in TASKS.values():
        if peft_task_type and task.peft_task_type == peft_task_type:
            return task
    for task in TASKS.values():
        head = task.auto_class.removeprefix("AutoModel")  # the naming convention, for classes not listed
        if any(name in _classes_loaded_by(task) or name.endswith(head) for name in architectures):
            return task
    raise UserError(
        f"{base_dir}: cannot tell which task the base is for (peft task_type {peft_task_type!r}, architectures "
        f"{architectures}); peftrun merges {', '.join(t.auto_class for t in TASKS.values())} models"
    )


def read_base_config(base_dir: Path) -> dict[str, Any]:
    path = base_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{base_dir}: not a transformers checkpoint (no config.json)")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def local_base_dir(name: str, revision: str | None, key: str) -> Path:
    """The base checkpoint on disk: a directory as given, or the Hub snapshot (cached, else downloaded)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name, revision=revision, allow_patterns=BASE_FILE_PATTERNS, local_files_only=True
            )
        )
    except Exception:  # not in the cache: fetch it, if the Hub can be reached
        require_local_or_reachable(name, key, is_cached=False)
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=BASE_FILE_PATTERNS))
    except Exception as exc:
        raise UserError(f"{key}: cannot download '{name}': {str(exc).splitlines()[0]}") from None


def _dtype_name(torch_name: str | None) -> str:
    return {"bfloat16": "bf16", "float16": "fp16"}.get(str(torch_name), "fp32")


def _classes_loaded_by(task: Task) -> set[str]:
    """Model class names the task's Auto class maps to (GPT2LMHeadModel for AutoModelForCausalLM)."""
    names: dict[str, Any] = getattr(getattr(task.model_class(), "_model_mapping", None), "_model_mapping", {})
    found: set[str] = set()
    for value in names.values():
        found.update([value] if isinstance(value, str) else value)
    return found
