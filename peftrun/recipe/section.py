"""The base of every recipe section: strict keys, validated assignment, no inf/nan."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan=False: lr=inf or nan is a typo that trains to NaN, never a setting.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=False, allow_inf_nan=False
    )
