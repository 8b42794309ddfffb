"""The guarded writer of the synthetic demo cohort into the raw layer (never over user data)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io.core import AbstractDataset, DatasetError

from her2_kedro.io.raw_inputs import is_inside

__all__ = ["MARKER", "SyntheticCohort", "SyntheticCohortDataset", "file_sha256"]

logger = logging.getLogger(__name__)


@dataclass
class SyntheticCohort:
    """Everything the synthetic pipeline writes into the raw layer, produced lazily.

    ``cores`` yields ``(filename, encoded bytes)``; ``slides`` maps a slide file name to a function
    that streams the slide to a given path; ``fingerprint`` identifies the parameters that made it.
    """

    labels: pd.DataFrame
    cores: Callable[[], Iterable[tuple[str, bytes]]]
    slide_map: pd.DataFrame
    slides: Mapping[str, Callable[[Path], None]]
    fingerprint: str


MARKER = ".her2_kedro_synthetic.json"


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SyntheticCohortDataset(AbstractDataset[dict[str, Any], SyntheticCohort]):
    """Writes a ``SyntheticCohort`` under ``root`` (the raw layer) without ever touching user data.

    The raw targets (``cores/``, ``labels.csv``, ``slides/``, ``slide_map.csv``) are written only when
    every file in them is one that a marker file says this dataset wrote (so empty or absent targets
    qualify, and a user's file anywhere there blocks the write). The marker records each file's
    sha256: a file counts as ours, and may be replaced, only while it lies inside a target and its
    content is unchanged, so a tampered marker (``../elsewhere``) or an edited file is never deleted. With the same fingerprint in the
    marker the cohort is already there and nothing is rewritten. Loading returns the marker.
    """

    TARGETS = ("cores", "labels.csv", "slides", "slide_map.csv")

    def __init__(self, *, root: str, metadata: dict[str, Any] | None = None) -> None:
        self._root = Path(root)
        self.metadata = metadata

    @property
    def _marker(self) -> Path:
        return self._root / MARKER

    def _recorded(self) -> dict[str, str | None]:
        """Files (relative to the root) an earlier synthetic run recorded, with their sha256."""
        if not self._marker.is_file():
            return {}
        try:
            marker = json.loads(self._marker.read_text())
            hashes = marker.get("sha256", {})
            return {str(rel): hashes.get(rel) for rel in marker.get("files", [])}
        except (json.JSONDecodeError, AttributeError, TypeError):
            return {}

    def _own_file(self, rel: str, recorded_hash: str | None) -> Path | None:
        """The file a marker entry names, if it is provably ours: else None, with the reason logged.

        Ours means: a relative path inside one of the raw targets (no ``..``, no link leading out
        of the root), a regular file, and the content hash recorded when it was written.
        """
        path = self._root / rel
        parts = Path(rel).parts
        if (
            Path(rel).is_absolute()
            or ".." in parts
            or not parts
            or parts[0] not in self.TARGETS
            or not is_inside(path, self._root)
        ):
            logger.warning(
                "Synthetic marker lists %r, outside %s: left untouched.", rel, self._root
            )
            return None
        if not path.is_file():
            return None
        if recorded_hash is None:
            logger.warning("Synthetic marker has no content hash for %s: left untouched.", path)
            return None
        if file_sha256(path) != recorded_hash:
            logger.warning(
                "%s changed since the synthetic pipeline wrote it: left untouched.", path
            )
            return None
        return path

    def _written_before(self) -> set[str]:
        """Marker entries that are provably this dataset's files (contained, hash unchanged)."""
        return {rel for rel, digest in self._recorded().items() if self._own_file(rel, digest)}

    def _user_data(self) -> list[str]:
        """Files under the targets that this dataset did not write (so must never be touched)."""
        ours = self._written_before()
        foreign = []
        for name in self.TARGETS:
            target = self._root / name
            files = (
                [target]
                if target.is_file()
                else sorted(target.rglob("*"))
                if target.is_dir()
                else []
            )
            for path in files:
                if path.is_file() and path.relative_to(self._root).as_posix() not in ours:
                    foreign.append(str(path))
        return foreign

    def load(self) -> dict[str, Any]:
        if not self._marker.is_file():
            raise DatasetError(f"No synthetic cohort under {self._root} (no {MARKER}).")
        return json.loads(self._marker.read_text())

    def save(self, data: SyntheticCohort) -> None:
        occupied = self._user_data()
        if occupied:
            logger.warning(
                "Synthetic cohort NOT written: %s holds %d file(s) that the synthetic pipeline did "
                "not write (first: %s). Your data is left untouched; use an empty raw folder to "
                "generate the demo cohort.",
                self._root,
                len(occupied),
                occupied[0],
            )
            return
        if self._marker.is_file():
            previous = json.loads(self._marker.read_text())
            if previous.get("fingerprint") == data.fingerprint:
                logger.info("Synthetic cohort with these parameters already in %s.", self._root)
                return
            logger.info("Replacing the synthetic cohort in %s (parameters changed).", self._root)
        self._clear_own_outputs()
        self._write(data)

    def _clear_own_outputs(self) -> None:
        """Delete the previous cohort's files: only those proven ours (see ``_own_file``)."""
        for rel, digest in self._recorded().items():
            path = self._own_file(rel, digest)
            if path is not None:
                path.unlink()
        self._marker.unlink(missing_ok=True)

    def _write(self, data: SyntheticCohort) -> None:
        from tqdm.auto import tqdm

        written: list[str] = []
        hashes: dict[str, str] = {}
        cores_dir = self._root / "cores"
        cores_dir.mkdir(parents=True, exist_ok=True)
        n_cores = 0
        for filename, payload in tqdm(
            data.cores(), total=len(data.labels), desc="synthetic cores", unit="core"
        ):
            (cores_dir / filename).write_bytes(payload)
            written.append(f"cores/{filename}")
            hashes[f"cores/{filename}"] = hashlib.sha256(payload).hexdigest()
            n_cores += 1
        data.labels.to_csv(self._root / "labels.csv", index=False)
        written.append("labels.csv")
        if data.slides:
            slides_dir = self._root / "slides"
            slides_dir.mkdir(parents=True, exist_ok=True)
            for name, write in tqdm(data.slides.items(), desc="synthetic slides", unit="slide"):
                write(slides_dir / name)
                written.append(f"slides/{name}")
            data.slide_map.to_csv(self._root / "slide_map.csv", index=False)
            written.append("slide_map.csv")
        marker = {
            "fingerprint": data.fingerprint,
            "cores": n_cores,
            "slides": sorted(data.slides),
            "slide_cores": len(data.slide_map),
            "files": written,
            "sha256": {rel: hashes.get(rel) or file_sha256(self._root / rel) for rel in written},
        }
        self._marker.write_text(json.dumps(marker, indent=2))
        logger.info(
            "Synthetic cohort written to %s: %d cores, %d slides.",
            self._root,
            n_cores,
            len(data.slides),
        )

    def _exists(self) -> bool:
        return self._marker.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"root": str(self._root)}
