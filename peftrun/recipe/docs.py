"""The recipe reference, generated from the schema: `--help`, `peftrun keys` and docs/recipe.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from peftrun.model.methods import OPTION_ALIASES, OWNED_OPTIONS, adapter_kinds
from peftrun.recipe.schema import MethodConfig, Recipe


@dataclass
class KeyDoc:
    key: str
    default: str
    description: str


def _type_name(annotation: Any) -> str:
    return (
        str(annotation).replace("typing.", "").replace("pathlib.", "")
        if not isinstance(annotation, type)
        else annotation.__name__
    )


def key_docs(model: type[BaseModel] = Recipe, prefix: str = "") -> list[KeyDoc]:
    docs: list[KeyDoc] = []
    for name, field in model.model_fields.items():
        args = getattr(field.annotation, "__args__", (field.annotation,))
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            docs += key_docs(nested[0], f"{prefix}{name}.")
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        docs.append(KeyDoc(f"{prefix}{name}", default, field.description or ""))
        # A list of sections (data.datasets): its entries' keys follow it, as name[].key.
        listed = [get_args(a)[0] for a in args if get_origin(a) is list and _is_section(get_args(a)[0])]
        if listed:
            docs += key_docs(listed[0], f"{prefix}{name}[].")
    return docs


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def keys_text(prefix: str | None = None) -> str:
    docs = [d for d in key_docs() if not prefix or d.key.startswith(prefix)]
    lines = [f"  {d.key}  ({d.default})\n      {d.description}" for d in docs]
    return "recipe keys (set in YAML or as key=value overrides):\n" + "\n".join(lines)


def reference_markdown() -> str:
    sections: dict[str, list[KeyDoc]] = {}
    for doc in key_docs():
        sections.setdefault(doc.key.split(".")[0] if "." in doc.key else "(top level)", []).append(doc)
    out = [
        "# Recipe reference",
        "",
        "Generated from `peftrun/recipe/schema.py` by `peftrun keys --markdown`; a test keeps it in sync.",
        "Every key can be set in the YAML or on the command line as `section.key=value`.",
        "",
    ]
    for section, docs in sections.items():
        out += [f"## {section}", "", "| key | default | description |", "|---|---|---|"]
        out += [f"| `{d.key}` | `{d.default}` | {d.description.replace('|', '/')} |" for d in docs]
        out.append("")
    method_doc = " ".join(line.strip() for line in (MethodConfig.__doc__ or "").splitlines())
    out += [
        "## method options",
        "",
        method_doc,
        "",
        "List an adapter's options with `peftrun keys method --kind lora`.",
        "",
    ]
    return "\n".join(out)


def adapter_options_text(kind: str) -> str:
    """The options of one peft adapter, from peft's own dataclass (names, defaults, help)."""
    import dataclasses

    config_cls = adapter_kinds()[kind]
    aliases = {name: alias for alias, name in OPTION_ALIASES.items()}
    lines = [f"options of method '{kind}' ({config_cls.__name__}), set beside `kind:` in the method section:"]
    for field in dataclasses.fields(config_cls):
        if field.name in OWNED_OPTIONS:
            continue
        default = field.default if field.default is not dataclasses.MISSING else "(factory)"
        alias = f" (or {aliases[field.name]})" if field.name in aliases else ""
        help_text = " ".join(str(field.metadata.get("help", "")).split())[:200]
        lines.append(f"  {field.name}{alias}  (default {default!r})\n      {help_text}")
    return "\n".join(lines)
