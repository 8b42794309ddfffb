"""Kedro datasets for raw inputs that must be read defensively and outputs that must not clobber data.

- ``FileListingDataset``: lists the files of a raw folder (never outside it) instead of loading them,
  so that the ingestion nodes decide how to open each one and can report a corrupt file without
  losing the others.
- ``LabelTableDataset``: an optional CSV label table read as text; a missing or unreadable table
  becomes a value the QC report can describe rather than a crash.
- ``BytesDataset``: raw bytes in and out, the inner dataset of the accepted-cores folder.
- ``SyntheticCohortDataset``: writes the synthetic cohort into the raw layer only where that layer
  holds no user data.
"""

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

logger = logging.getLogger(__name__)


def _is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` resolves to a location inside ``root`` (symlinks included)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


class FileListingDataset(AbstractDataset[dict[str, Path], None]):
    """Read-only listing ``{relative POSIX path: absolute path}`` of the files under a folder.

    A missing folder is an empty listing (every raw source is optional). Hidden files and files whose
    real location lies outside the folder (symlinks pointing elsewhere) are left out, the latter with a
    warning, so that nothing outside the data folder is ever opened.
    """

    def __init__(
        self,
        *,
        path: str,
        suffixes: Iterable[str] | None = None,
        recursive: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._suffixes = tuple(s.lower() for s in suffixes) if suffixes else None
        self._recursive = recursive
        self.metadata = metadata

    def load(self) -> dict[str, Path]:
        root = self._path
        if not root.is_dir():
            logger.info("No folder at %s: that source is skipped.", root)
            return {}
        pattern = "**/*" if self._recursive else "*"
        listing: dict[str, Path] = {}
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts) or not path.is_file():
                continue
            if self._suffixes and not rel.lower().endswith(self._suffixes):
                continue
            if not _is_inside(path, root):
                logger.warning("Skipping %s: it links outside %s.", path, root)
                continue
            listing[rel] = path.resolve()
        return listing

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._path} is a raw input folder: the pipeline never writes to it.")

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "suffixes": self._suffixes}


#: Field separators a label table may use: comma, semicolon (spreadsheets in locales with a
#: decimal comma), tab. Labels are integers and text, so decimal commas never matter.
DELIMITERS = (",", ";", "\t")


def sniff_delimiter(path: Path) -> str:
    """The separator of a label CSV: the one of ``DELIMITERS`` that splits its header line most.

    The header is read outside quotes, so a quoted column name holding a comma does not count;
    a one-column table (or an unreadable one, which the parser then reports) reads as comma.
    """
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as fh:
            header = next((line for line in fh if line.strip()), "")
    except OSError:
        return ","
    unquoted = "".join(part for i, part in enumerate(header.split('"')) if i % 2 == 0)
    counts = {d: unquoted.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: (counts[d], d == ","))
    return best if counts[best] > 0 else ","


@dataclass(frozen=True)
class LabelTable:
    """A label CSV as read from disk: its rows as text, or why it could not be read."""

    source: str
    frame: pd.DataFrame | None
    error: str | None = None

    @property
    def present(self) -> bool:
        return self.frame is not None


class LabelTableDataset(AbstractDataset[LabelTable, None]):
    """Optional label table (``labels.csv``, ``slide_map.csv``), every cell read as text.

    The separator (comma, semicolon or tab) is sniffed from the header line, so a table saved
    by a spreadsheet in a locale that writes semicolons reads the same.

    Missing → ``LabelTable(frame=None)``; unparseable → ``LabelTable(frame=None, error=...)`` naming the
    file and the parser's complaint. Validation of the values happens in ``her2_kedro.tma.qc.labels``.
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> LabelTable:
        source = self._filepath.name
        if not self._filepath.is_file():
            return LabelTable(source=source, frame=None)
        try:
            frame = pd.read_csv(
                self._filepath,
                sep=sniff_delimiter(self._filepath),
                dtype=str,
                keep_default_na=False,
                skipinitialspace=True,
                encoding="utf-8-sig",
            )
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
            message = f"{self._filepath}: unreadable label table ({type(err).__name__}: {err})"
            logger.error(message)
            return LabelTable(source=source, frame=None, error=message)
        frame = frame.replace({"": pd.NA})
        return LabelTable(source=source, frame=frame)

    def save(self, data: LabelTable) -> None:
        raise DatasetError(f"{self._filepath} is a raw input: the pipeline never writes to it.")

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class BytesDataset(AbstractDataset[bytes, bytes]):
    """A file's bytes, unchanged: accepted cores keep their original encoding where possible."""

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> bytes:
        return self._filepath.read_bytes()

    def save(self, data: bytes) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        self._filepath.write_bytes(data)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


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
            or not _is_inside(path, self._root)
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


class OptionalCSVDataset(AbstractDataset[pd.DataFrame | None, pd.DataFrame]):
    """A report table that later runs update: loads ``None`` while the file does not exist yet.

    Used to read the previous ``metrics.csv`` / predictions so that a run replaces its own rows and
    keeps the other models' rows.
    """

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

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

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


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
