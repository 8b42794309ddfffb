"""The base of every parameter model: unknown keys are errors, values are immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A parameter section or sub-section: a typo in a key fails validation instead of being ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
