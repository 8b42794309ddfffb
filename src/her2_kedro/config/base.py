"""The base of every parameter model: unknown keys are errors, values are immutable."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A parameter section or sub-section: a typo in a key fails validation instead of being ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_keys_are_names(**sections: dict[str, Any]) -> None:
    """Each entry of a declared study is filed under its own name (``models.<key>.name == key``)."""
    for kind, entries in sections.items():
        for key, entry in entries.items():
            if key != entry.name:
                raise ValueError(f"{kind}.{key}.name must be {key!r} (got {entry.name!r})")
