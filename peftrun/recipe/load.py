"""YAML + `key=value` overrides -> a validated Recipe, or one UserError line per problem."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftrun.errors import OptionError, UserError, did_you_mean
from peftrun.recipe.schema import MOVED_TO_CPU, Recipe

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not 'last wins'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001). Values are YAML, so lists and nulls work too."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}': expected dotted.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"override '{text}': the value is not valid YAML ({problem}); quote it") from None
    # YAML 1.1 reads '1e-4' as a string; a number is what anyone typing it means (unless quoted).
    if isinstance(value, str) and _FLOAT.match(value) and raw[:1] not in "'\"":
        value = float(value)
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Set each override into the nested dict; returns the dotted paths that came from the command line."""
    from_cli: set[tuple[str, ...]] = set()
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else child
            if not isinstance(child, dict):
                raise UserError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
        from_cli.add(tuple(path))
    return from_cli


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schema sections an annotation holds: `Model`, `Model | None`, `list[Model] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in getattr(annotation, "__args__", ()) for model in _models_in(arg)]


def _section_fields(loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the schema section at `loc` (for did-you-mean); list indices are stepped over."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        models = _models_in(field.annotation) if field else []
        model = models[0] if models else None
    return list(model.model_fields) if model else []


def dotted(loc: tuple[str | int, ...]) -> str:
    """('data', 'datasets', 1, 'weight') -> 'data.datasets[1].weight'."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).removeprefix(".")


def _format_error(error: dict[str, Any], origin: str, from_cli: set[tuple[str, ...]]) -> str:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, OptionError):
        loc, message = (*loc, *cause.key.split(".")), cause.message
    elif error["type"] == "extra_forbidden":
        message = "unknown key" + did_you_mean(str(loc[-1]), _section_fields(loc[:-1]))
    elif error["type"] == "missing":
        message = "required key is missing"
    else:
        message = error["msg"].removeprefix("Value error, ")
        if (
            "input" in error
            and error["type"] not in ("model_type", "dict_type")
            and not isinstance(error["input"], dict)
        ):
            message += f" (got {error['input']!r})"
    # 'trian.lr=1' fails at 'trian', 'train.lrr=1' at 'train.lrr': one path is a prefix of the other.
    parts = tuple(str(p) for p in loc)
    shared = [min(len(parts), len(p)) for p in from_cli]
    where = (
        "command line"
        if any(n and parts[:n] == p[:n] for n, p in zip(shared, from_cli, strict=True))
        else origin
    )
    return f"{where}: {dotted(loc) or '(top level)'}: {message}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Every problem becomes one line of a single UserError."""
    path = Path(path)
    data = _read_mapping(path)
    from_cli = apply_overrides(data, overrides or [])
    return _validate(data, path, from_cli)


def load_run_recipe(path: str | Path) -> Recipe:
    """The resolved recipe a run wrote (final/, a checkpoint), also from an older peftrun.

    A user's recipe with a moved key is an error that says where it went; a run directory is not the
    user's to edit, so what an older peftrun wrote there is read under the keys' new names.
    """
    path = Path(path)
    return _validate(upgrade_run_recipe(_read_mapping(path)), path, set())


def upgrade_run_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe's moved keys under their new names (train.cpu_matmul -> cpu.matmul, ...)."""
    train = data.get("train")
    if not isinstance(train, dict) or not set(train) & set(MOVED_TO_CPU):
        return data
    train = dict(train)
    cpu = dict(data.get("cpu") or {})
    for old, new in MOVED_TO_CPU.items():
        if old in train:
            cpu.setdefault(new.removeprefix("cpu."), train.pop(old))
    return {**data, "train": train, "cpu": cpu}


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of sections (model, method, data, train, ...)")
    return data


def _validate(data: dict[str, Any], path: Path, from_cli: set[tuple[str, ...]]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(dict(e), str(path), from_cli) for e in exc.errors()]
        raise UserError("\n".join(lines)) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in), as written into every run directory."""
    data = recipe.model_dump(mode="json")
    data["method"] = {**{k: v for k, v in data["method"].items() if k in ("kind", "freeze", "train") and v}}
    data["method"].update(recipe.method.options)
    return yaml.safe_dump(data, sort_keys=False)
