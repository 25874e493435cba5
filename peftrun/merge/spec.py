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
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftrun.errors import UserError, did_you_mean


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, description="a run or adapter directory (or use adapters)")
    adapters: list[str] | None = Field(None, description="several run/adapter directories to combine")
    weights: list[float] | None = None
    combination: str | None = None
    density: float | None = None
    svd_rank: int | None = None
    seed: int = 0
    base: str | None = None
    out: str | None = None
    dtype: str | None = None
    max_shard_size: str | None = None
    check: str | None = None
    qlora_base: str | None = None
    overwrite: bool = False


def is_spec_file(source: str | None) -> bool:
    return source is not None and source.endswith((".yaml", ".yml")) and Path(source).is_file()


def apply_spec(args: argparse.Namespace, path: Path) -> argparse.Namespace:
    """The command's arguments with the file's settings; paths in the file are relative to it."""
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

    values = spec.model_dump(exclude_unset=True)
    values.setdefault("source", None)  # the command's own source is this file
    for key in ("source", "out"):
        if key in values and values[key] is not None and not Path(values[key]).is_absolute():
            values[key] = str(here / values[key])
    if spec.adapters is not None:
        values["adapters"] = [local(a) or a for a in spec.adapters]
    if spec.base is not None:
        values["base"] = local(spec.base) or spec.base  # a local directory, else a Hub id
    merged = vars(args) | values
    return argparse.Namespace(**merged)
