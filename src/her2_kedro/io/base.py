"""What the project's dataset classes share: path containment and the one-file dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from kedro.io.core import AbstractDataset

__all__ = ["FileDataset", "is_inside"]

_Load = TypeVar("_Load")
_Save = TypeVar("_Save")


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` resolves to a location inside ``root`` (symlinks included)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


class FileDataset(AbstractDataset[_Load, _Save]):
    """A dataset stored in one file (``filepath``): it exists while that file does."""

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
