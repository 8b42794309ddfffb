"""The guarded writer of the synthetic demo cohort into the raw layer (never over user data)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io.core import AbstractDataset, DatasetError

from her2_kedro.io.base import is_inside

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


#: Names the generator has always given its files (cores ``core_{k:05d}.jpg``, slides
#: ``tma_{i:02d}.tif``, the two tables). A marker written before content hashes were recorded
#: (a "legacy" marker) is trusted for these names only.
_GENERATOR_NAMES = re.compile(
    r"cores/core_\d{5,}\.jpg|slides/tma_\d{2,}\.tif|labels\.csv|slide_map\.csv"
)


@dataclass(frozen=True)
class _Marker:
    """The marker file as read: the files it lists with their sha256 (None where not recorded)."""

    fingerprint: str | None
    files: dict[str, str | None]
    legacy: bool  # written before content hashes were recorded: no ``sha256`` field at all


class SyntheticCohortDataset(AbstractDataset[dict[str, Any], SyntheticCohort]):
    """Writes a ``SyntheticCohort`` under ``root`` (the raw layer) without ever touching user data.

    The raw targets (``cores/``, ``labels.csv``, ``slides/``, ``slide_map.csv``) are written only
    when every file in them is one that a marker file says this dataset wrote (so empty or absent
    targets qualify, and a user's file anywhere there blocks the write). A file counts as ours, and
    may be replaced, only while it lies inside a target (no ``..``, no link leading out) and its
    content has the sha256 the marker recorded, so a tampered marker (``../elsewhere``) or an
    edited file is never deleted. With the same fingerprint in the marker the cohort is already
    there and nothing is rewritten. Loading returns the marker.

    A legacy marker (written before hashes were recorded) vouches only for files inside the
    targets named as the generator names them; it is upgraded by rewriting the cohort. One that
    lists anything else was not written by the generator: nothing is written or deleted.
    """

    TARGETS = ("cores", "labels.csv", "slides", "slide_map.csv")

    def __init__(self, *, root: str, metadata: dict[str, Any] | None = None) -> None:
        self._root = Path(root)
        self.metadata = metadata

    @property
    def _marker(self) -> Path:
        return self._root / MARKER

    def _read_marker(self) -> _Marker | None:
        """The marker, None when there is none; an unreadable one vouches for nothing."""
        if not self._marker.is_file():
            return None
        try:
            raw = json.loads(self._marker.read_text())
            hashes = raw.get("sha256")
            files = {str(rel): (hashes or {}).get(rel) for rel in raw.get("files", [])}
            return _Marker(raw.get("fingerprint"), files, legacy=hashes is None)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
            logger.warning(
                "Synthetic marker %s is unreadable: no file it lists counts as synthetic.",
                self._marker,
            )
            return _Marker(None, {}, legacy=False)

    def _contained(self, rel: str) -> bool:
        """True when ``rel`` names a location inside one of the raw targets, links resolved."""
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts or parts[0] not in self.TARGETS:
            return False
        return is_inside(self._root / rel, self._root.resolve() / parts[0])

    def _own_file(self, rel: str, recorded_hash: str | None, legacy: bool) -> Path | None:
        """The file a marker entry names, if it is provably ours: else None, the reason logged.

        Ours means: inside a raw target (see ``_contained``), a regular file, and the content
        hash recorded when it was written or, under a legacy marker, a name the generator writes.
        """
        path = self._root / rel
        if not self._contained(rel):
            logger.warning(
                "Synthetic marker lists %r, outside %s: left untouched.", rel, self._root
            )
            return None
        if not path.is_file():
            return None
        if legacy:
            return path if _GENERATOR_NAMES.fullmatch(rel) else None
        if recorded_hash is None:
            logger.warning("Synthetic marker has no content hash for %s: left untouched.", path)
            return None
        if file_sha256(path) != recorded_hash:
            logger.warning(
                "%s changed since the synthetic pipeline wrote it: left untouched.", path
            )
            return None
        return path

    def _own_files(self, marker: _Marker | None) -> dict[str, Path]:
        """Marker entries that are provably this dataset's files, by relative path."""
        if marker is None:
            return {}
        own = {
            rel: self._own_file(rel, digest, marker.legacy) for rel, digest in marker.files.items()
        }
        return {rel: path for rel, path in own.items() if path is not None}

    def _foreign_legacy_entries(self, marker: _Marker) -> list[str]:
        """Entries of a legacy marker that the generator never wrote (so it is not its marker)."""
        return [
            rel
            for rel in marker.files
            if not (self._contained(rel) and _GENERATOR_NAMES.fullmatch(rel))
        ]

    def _user_data(self, ours: Mapping[str, Path]) -> list[str]:
        """Files under the targets that this dataset did not write (so must never be touched)."""
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
        try:
            return json.loads(self._marker.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(
                f"{self._marker} is unreadable ({err}); run `make clean-data`."
            ) from err

    def save(self, data: SyntheticCohort) -> None:
        marker = self._read_marker()
        if marker is not None and marker.legacy and self._refuse_legacy(marker):
            return
        ours = self._own_files(marker)
        occupied = self._user_data(ours)
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
        if marker is not None and marker.legacy:
            logger.warning(
                "Synthetic marker %s was written by an earlier version, without content hashes: "
                "replacing the %d file(s) it lists under the generator's names and recording "
                "their hashes from now on.",
                self._marker,
                len(ours),
            )
        elif marker is not None:
            if marker.fingerprint == data.fingerprint:
                logger.info("Synthetic cohort with these parameters already in %s.", self._root)
                return
            logger.info("Replacing the synthetic cohort in %s (parameters changed).", self._root)
        self._clear(ours)
        self._write(data)

    def _refuse_legacy(self, marker: _Marker) -> bool:
        """True (with the reason logged) when a legacy marker lists what the generator never wrote."""
        foreign = self._foreign_legacy_entries(marker)
        if foreign:
            logger.warning(
                "Synthetic cohort NOT written: the legacy marker %s (no content hashes) lists "
                "%d file(s) the synthetic generator never writes (first: %r), so it cannot vouch "
                "for any file; nothing was deleted. Check those files, then delete the marker "
                "or run `make clean-data`.",
                self._marker,
                len(foreign),
                foreign[0],
            )
        return bool(foreign)

    def _clear(self, ours: Mapping[str, Path]) -> None:
        """Delete the previous cohort's files: only those proven ours (see ``_own_file``)."""
        for path in ours.values():
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
