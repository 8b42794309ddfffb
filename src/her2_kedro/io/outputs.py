"""Kedro datasets for outputs: files the pipelines write and later runs read back.

- ``BytesDataset``: raw bytes in and out, the inner dataset of the accepted-cores folder.
- ``OptionalCSVDataset``: a report table that is ``None`` until a first run writes it.
- ``FiguresDataset``: a folder of PNG figures, also logged to the active MLflow run.
- ``ModelFileDataset``: a model checkpoint file, saved from bytes and loaded as its path (model
  files are opened by :func:`~her2_kedro.modelling.checkpoints.load_checkpoint`, which checks them).
- ``EmbeddingsDataset``: one core's cached tile embeddings and tile coordinates (``.npz``).
- ``WorkDirDataset``: a scratch folder a node keeps between runs (resume checkpoints).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io.core import AbstractDataset, DatasetError

from her2_kedro.io.base import FileDataset

__all__ = [
    "BytesDataset",
    "EmbeddingsDataset",
    "FiguresDataset",
    "ModelFileDataset",
    "OptionalCSVDataset",
    "WorkDirDataset",
]


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
    artifact under ``artifact_path``; without a run the figures are only written to disk. With
    ``clear``, the folder's earlier PNGs are deleted first, so it holds exactly the last save.
    """

    def __init__(
        self,
        *,
        path: str,
        artifact_path: str | None = None,
        dpi: int = 120,
        clear: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._artifact_path = artifact_path
        self._dpi = dpi
        self._clear = clear
        self.metadata = metadata

    def load(self) -> list[Path]:
        return sorted(self._path.glob("*.png"))

    def save(self, data: Mapping[str, Any]) -> None:
        import mlflow

        self._path.mkdir(parents=True, exist_ok=True)
        if self._clear:
            for stale in self._path.glob("*.png"):
                stale.unlink()
        run = mlflow.active_run()
        for name, figure in data.items():
            target = self._path / f"{name}.png"
            figure.savefig(target, dpi=self._dpi)
            if run is not None:
                mlflow.log_artifact(str(target), self._artifact_path)

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "artifact_path": self._artifact_path, "clear": self._clear}


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file, so an interrupted save never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ModelFileDataset(FileDataset[Path, bytes]):
    """A checkpoint file: saved from its bytes (atomically), loaded as its path."""

    def load(self) -> Path:
        if not self._filepath.is_file():
            raise DatasetError(
                f"no model file at {self._filepath}: run the pipeline that trains it"
            )
        return self._filepath

    def save(self, data: bytes) -> None:
        _write_atomically(self._filepath, data)


#: Arrays of one core's cached embeddings, by name in the ``.npz`` file.
EMBEDDING_ARRAYS = ("embeddings", "coords")


class EmbeddingsDataset(FileDataset[dict[str, np.ndarray], Mapping[str, np.ndarray]]):
    """One core's tile embeddings ``(N, D)`` float and tile ``coords`` ``(N, 2)`` (x, y), as ``.npz``.

    The inner dataset of the partitioned embedding cache; a file that cannot be read or lacks an
    array raises an error naming the file (the cache entry is then recomputed by deleting it).
    """

    def load(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self._filepath, allow_pickle=False) as data:
                arrays = {name: data[name] for name in EMBEDDING_ARRAYS}
        except (OSError, ValueError, KeyError) as err:
            raise DatasetError(
                f"{self._filepath}: unreadable embedding cache entry ({err}); delete it to recompute"
            ) from err
        return arrays

    def save(self, data: Mapping[str, np.ndarray]) -> None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.asarray(data[name]) for name in EMBEDDING_ARRAYS})
        _write_atomically(self._filepath, buffer.getvalue())


class WorkDirDataset(AbstractDataset[Path, None]):
    """A folder a node keeps its own files in across runs (e.g. resume checkpoints): loads the
    path, creating the folder; never saved."""

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Path:
        self._path.mkdir(parents=True, exist_ok=True)
        return self._path

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._path} is a work folder: nodes write into it, not through it")

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
