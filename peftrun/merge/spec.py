"""A merge written down: `peftrun merge merge.yaml`, the same settings as the command's flags.

A YAML file keeps a combination of adapters (weights, method, density) next to the runs it was
made from, reviewable and repeatable, e.g.

    adapters: [runs/math, runs/code]
    weights: [0.7, 0.3]
    combination: ties
    density: 0.5
    out: merged/math_code
    dtype: bf16
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftrun.errors import UserError, did_you_mean

DEFAULT_MAX_SHARD_SIZE = "5GB"
Check = Literal["full", "light"]
QloraBase = Literal["dequantized", "original"]


class MergeSpec(BaseModel):
    """One merge, typed: built from the command's flags or from a merge file, and handed to the merge as is."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, description="a run or adapter directory (or use adapters)")
    adapters: list[str] | None = Field(None, description="several run/adapter directories to combine")
    weights: list[float] | None = None
    combination: str | None = None  # checked (with a did-you-mean) by merge.combine
    density: float | None = None
    svd_rank: int | None = None
    seed: int = 0
    base: str | None = None
    out: str | None = None
    dtype: str | None = None  # checked (with a did-you-mean) by merge.resolve_dtype
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    check: Check = "full"
    qlora_base: QloraBase = "dequantized"
    overwrite: bool = False

    def combining_options_without_adapters(self) -> list[str]:
        """The settings that only combining several adapters reads, set although `adapters` is not."""
        if self.adapters:
            return []
        combining = ("weights", "combination", "density", "svd_rank")
        return [name for name in combining if getattr(self, name) is not None]


def is_spec_file(source: str | None) -> bool:
    return source is not None and source.endswith((".yaml", ".yml")) and Path(source).is_file()


def spec_from_args(args: argparse.Namespace) -> MergeSpec:
    """The command line's merge settings (argparse has typed them), with a merge file's settings over
    them when `source` is one."""
    flags = {name: getattr(args, name) for name in MergeSpec.model_fields if hasattr(args, name)}
    spec = MergeSpec.model_validate({k: v for k, v in flags.items() if v is not None})
    if is_spec_file(spec.source) and spec.source is not None:
        return spec.model_copy(update=read_spec_file(Path(spec.source)))
    return spec


def read_spec_file(path: Path) -> dict[str, Any]:
    """A merge file's settings, validated, with its paths made relative to the file."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a merge file is a YAML mapping of the `peftrun merge` settings")
    for key in raw:
        if key not in MergeSpec.model_fields:
            raise UserError(
                f"{path}: {key}: unknown key{did_you_mean(str(key), list(MergeSpec.model_fields))}"
            )
    try:
        spec = MergeSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{path}: {where}: {first['msg']}") from None
    here = path.resolve().parent

    def local(p: str | None) -> str | None:
        return None if p is None or not (here / p).exists() else str(here / p)

    values = {name: getattr(spec, name) for name in spec.model_fields_set}
    values.setdefault("source", None)  # the command's own source is this file
    for key in ("source", "out"):
        if key in values and values[key] is not None and not Path(values[key]).is_absolute():
            values[key] = str(here / values[key])
    if spec.adapters is not None:
        values["adapters"] = [local(a) or a for a in spec.adapters]
    if spec.base is not None:
        values["base"] = local(spec.base) or spec.base  # a local directory, else a Hub id
    return values
