"""Kedro datasets for raw inputs, read defensively so that one bad file never costs the others.

- ``FileListingDataset``: lists the files of a raw folder (never outside it) instead of loading them,
  so that the ingestion nodes decide how to open each one and can report a corrupt file without
  losing the others.
- ``LabelTableDataset``: an optional CSV label table read as text; a missing or unreadable table
  becomes a value the QC report can describe rather than a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io.core import AbstractDataset, DatasetError

from her2_kedro.io.base import FileDataset, is_inside

__all__ = [
    "DELIMITERS",
    "FileListingDataset",
    "LabelTable",
    "LabelTableDataset",
    "sniff_delimiter",
]

logger = logging.getLogger(__name__)


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
            if not is_inside(path, root):
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


class LabelTableDataset(FileDataset[LabelTable, None]):
    """Optional label table (``labels.csv``, ``slide_map.csv``), every cell read as text.

    The separator (comma, semicolon or tab) is sniffed from the header line, so a table saved
    by a spreadsheet in a locale that writes semicolons reads the same.

    Missing → ``LabelTable(frame=None)``; unparseable → ``LabelTable(frame=None, error=...)`` naming the
    file and the parser's complaint. Validation of the values happens in ``her2_kedro.tma.qc.labels``.
    """

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
        except (
            OSError,
            pd.errors.ParserError,
            UnicodeDecodeError,
            pd.errors.EmptyDataError,
        ) as err:
            message = f"{self._filepath}: unreadable label table ({type(err).__name__}: {err})"
            logger.error(message)
            return LabelTable(source=source, frame=None, error=message)
        frame = frame.replace({"": pd.NA})
        return LabelTable(source=source, frame=frame)

    def save(self, data: LabelTable) -> None:
        raise DatasetError(f"{self._filepath} is a raw input: the pipeline never writes to it.")
