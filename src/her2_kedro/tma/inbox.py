"""New, unlabelled cores dropped into ``data/01_raw/inbox/``: the same image QC as ingestion
(decode-verified, normalised to 8-bit RGB, at least one tissue tile), without labels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from her2_kedro.config import ImageChecks, TileConfig
from her2_kedro.schema import QCProblem
from her2_kedro.tma.ingest import check_file, core_id_for, reencoded

#: The QC report's source name for inbox files.
INBOX = "inbox"


@dataclass
class InboxCore:
    """An accepted inbox file: its id (the file's stem), where it came from, and its bytes."""

    core_id: str
    source_file: str
    content_hash: str
    width: int
    height: int
    note: str
    load: Callable[[], bytes]


def check_inbox(
    files: Mapping[str, Path], checks: ImageChecks, tiles: TileConfig
) -> tuple[list[InboxCore], list[QCProblem]]:
    """Every inbox file decode-checked: the accepted cores and one problem per rejected file.

    Two files with one core id (``a.jpg`` and ``a.png``) would overwrite each other's calls, so
    the second (in name order) is rejected and named.
    """
    accepted: list[InboxCore] = []
    problems: list[QCProblem] = []
    seen: dict[str, str] = {}
    for name in tqdm(sorted(files), desc="checking inbox", unit="file"):
        checked = check_file(files[name], name, checks, tiles)
        if not checked.ok:
            problems.append(QCProblem(INBOX, name, checked.reason))
            continue
        core_id = core_id_for(name)
        if core_id in seen:
            problems.append(
                QCProblem(INBOX, name, f"core id {core_id!r} is already taken by {seen[core_id]}")
            )
            continue
        seen[core_id] = name
        path = files[name]
        load = (
            partial(reencoded, path, name, checks, tiles) if checked.converted else path.read_bytes
        )
        accepted.append(
            InboxCore(
                core_id,
                name,
                checked.content_hash,
                checked.width,
                checked.height,
                checked.reason,
                load,
            )
        )
        checked.rgb = None
    return accepted, problems
