"""Kedro datasets for outputs: files the pipelines write and later runs read back.

- ``BytesDataset``: raw bytes in and out, the inner dataset of the accepted-cores folder.
- ``OptionalCSVDataset``: a report table that is ``None`` until a first run writes it.
- ``FiguresDataset``: a folder of PNG figures, also logged to the active MLflow run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io.core import AbstractDataset

from her2_kedro.io.base import FileDataset

__all__ = ["BytesDataset", "FiguresDataset", "OptionalCSVDataset"]


class BytesDataset(FileDataset[bytes, bytes]):
    """A file's bytes, unchanged: accepted cores keep their original encoding where possible."""

    def load(self) -> bytes:
        return self._filepath.read_bytes()

    def save(self, data: bytes) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        self._filepath.write_bytes(data)


class OptionalCSVDataset(FileDataset[pd.DataFrame | None, pd.DataFrame]):
    """A report table that later runs update: loads ``None`` while the file does not exist yet.

    Used to read the previous ``metrics.csv`` / predictions so that a run replaces its own rows and
    keeps the other models' rows.
    """

    def load(self) -> pd.DataFrame | None:
        if not self._filepath.is_file():
            return None
        if self._filepath.suffix == ".parquet":
            return pd.read_parquet(self._filepath)
        return pd.read_csv(self._filepath)

    def save(self, data: pd.DataFrame) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        if self._filepath.suffix == ".parquet":
            data.to_parquet(self._filepath, index=False)
        else:
            data.to_csv(self._filepath, index=False)


class FiguresDataset(AbstractDataset[list[Path], Mapping[str, Any]]):
    """A folder of PNG figures saved from ``{name: matplotlib Figure}``, also logged to MLflow.

    When an MLflow run is active (kedro-mlflow opens one per ``kedro run``) each PNG is logged as an
    artifact under ``artifact_path``; without a run the figures are only written to disk.
    """

    def __init__(
        self,
        *,
        path: str,
        artifact_path: str | None = None,
        dpi: int = 120,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._artifact_path = artifact_path
        self._dpi = dpi
        self.metadata = metadata

    def load(self) -> list[Path]:
        return sorted(self._path.glob("*.png"))

    def save(self, data: Mapping[str, Any]) -> None:
        import mlflow

        self._path.mkdir(parents=True, exist_ok=True)
        run = mlflow.active_run()
        for name, figure in data.items():
            target = self._path / f"{name}.png"
            figure.savefig(target, dpi=self._dpi)
            if run is not None:
                mlflow.log_artifact(str(target), self._artifact_path)

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "artifact_path": self._artifact_path}
