"""The defensive raw-input datasets and the guarded synthetic writer."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from kedro.io.core import DatasetError

from her2_kedro.io.outputs import FiguresDataset, OptionalCSVDataset
from her2_kedro.io.raw_inputs import FileListingDataset, LabelTableDataset
from her2_kedro.io.synthetic_cohort import MARKER, SyntheticCohort, SyntheticCohortDataset


def test_listing_is_relative_and_skips_hidden_and_missing(tmp_path):
    root = tmp_path / "cores"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"x")
    (root / "sub" / "b.png").write_bytes(b"y")
    (root / ".DS_Store").write_bytes(b"z")
    listing = FileListingDataset(path=str(root)).load()
    assert sorted(listing) == ["a.jpg", "sub/b.png"]
    assert listing["sub/b.png"] == (root / "sub" / "b.png").resolve()
    assert FileListingDataset(path=str(tmp_path / "absent")).load() == {}


def test_listing_never_follows_links_out_of_the_folder(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    root = tmp_path / "cores"
    root.mkdir()
    (root / "link.jpg").symlink_to(outside)
    (root / "ok.jpg").write_bytes(b"fine")
    assert list(FileListingDataset(path=str(root)).load()) == ["ok.jpg"]


def test_listing_is_read_only(tmp_path):
    with pytest.raises(DatasetError, match="never writes"):
        FileListingDataset(path=str(tmp_path)).save({})


def test_label_table_missing_and_unreadable(tmp_path):
    missing = LabelTableDataset(filepath=str(tmp_path / "labels.csv")).load()
    assert missing.frame is None and missing.error is None and not missing.present
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage\x00\n\xff")
    table = LabelTableDataset(filepath=str(bad)).load()
    assert table.frame is None
    assert "bad.csv" in table.error and "unreadable" in table.error


def test_label_table_the_system_will_not_read_is_told_not_raised(tmp_path, monkeypatch):
    path = tmp_path / "labels.csv"
    path.write_text("filename,ihc-score\na.jpg,0\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(pd, "read_csv", denied)
    table = LabelTableDataset(filepath=str(path)).load()
    assert table.frame is None and "Permission denied" in table.error


def test_label_table_reads_text_and_blank_cells_as_missing(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("filename,ihc-score,her2-status\n a.jpg,02,\n")
    frame = LabelTableDataset(filepath=str(path)).load().frame
    assert frame.loc[0, "ihc-score"] == "02"  # text, not parsed to 2 here
    assert pd.isna(frame.loc[0, "her2-status"])


def _cohort(fingerprint="f1", names=("core_1.jpg",)):
    labels = pd.DataFrame({"filename": list(names), "ihc-score": [0] * len(names)})
    return SyntheticCohort(
        labels=labels,
        cores=lambda: ((n, b"jpeg-bytes") for n in names),
        slide_map=pd.DataFrame(),
        slides={},
        fingerprint=fingerprint,
    )


def test_synthetic_writer_writes_into_empty_raw_folder(tmp_path):
    dataset = SyntheticCohortDataset(root=str(tmp_path))
    dataset.save(_cohort())
    assert (tmp_path / "cores" / "core_1.jpg").read_bytes() == b"jpeg-bytes"
    assert (tmp_path / "labels.csv").is_file()
    marker = dataset.load()
    assert marker["fingerprint"] == "f1" and "cores/core_1.jpg" in marker["files"]


def test_synthetic_writer_never_touches_user_data(tmp_path, caplog):
    (tmp_path / "cores").mkdir()
    (tmp_path / "cores" / "patient_slide.jpg").write_bytes(b"precious")
    (tmp_path / "labels.csv").write_text("filename,ihc-score\npatient_slide.jpg,3\n")
    SyntheticCohortDataset(root=str(tmp_path)).save(_cohort())
    assert (tmp_path / "cores" / "patient_slide.jpg").read_bytes() == b"precious"
    assert (tmp_path / "labels.csv").read_text().endswith("patient_slide.jpg,3\n")
    assert not (tmp_path / "cores" / "core_1.jpg").exists()
    assert not (tmp_path / MARKER).exists()
    assert "NOT written" in caplog.text


def test_synthetic_writer_replaces_only_its_own_files(tmp_path, caplog):
    dataset = SyntheticCohortDataset(root=str(tmp_path))
    dataset.save(_cohort("f1", names=("core_1.jpg", "core_2.jpg")))
    dataset.save(_cohort("f1", names=("other.jpg",)))  # same fingerprint: nothing rewritten
    assert not (tmp_path / "cores" / "other.jpg").exists()
    dataset.save(_cohort("f2", names=("core_3.jpg",)))  # new parameters: replaced
    assert sorted(p.name for p in (tmp_path / "cores").iterdir()) == ["core_3.jpg"]
    # a user's file dropped next to the demo cohort blocks any further rewrite
    (tmp_path / "cores" / "mine.jpg").write_bytes(b"mine")
    dataset.save(_cohort("f3", names=("core_4.jpg",)))
    assert (tmp_path / "cores" / "mine.jpg").exists() and (
        tmp_path / "cores" / "core_3.jpg"
    ).exists()
    assert json.loads((tmp_path / MARKER).read_text())["fingerprint"] == "f2"


def test_optional_csv_is_none_until_written(tmp_path):
    for name in ("metrics.csv", "predictions.parquet"):
        dataset = OptionalCSVDataset(filepath=str(tmp_path / "reports" / name))
        assert dataset.load() is None
        dataset.save(pd.DataFrame({"model": ["intensity"], "n": [3]}))
        assert dataset.load().to_dict("list") == {"model": ["intensity"], "n": [3]}


def test_figures_are_written_and_logged_to_the_active_mlflow_run(tmp_path):
    import mlflow
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    dataset = FiguresDataset(path=str(tmp_path / "figs"), artifact_path="figures/x")
    dataset.save({"confusion_test": figure})  # no run: written only
    assert [p.name for p in dataset.load()] == ["confusion_test.png"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        dataset.save({"crosstab": figure})
    logged = mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id, "figures/x")
    assert [a.path for a in logged] == ["figures/x/crosstab.png"]


@pytest.mark.parametrize("sep", [";", "\t", ","])
def test_label_tables_with_semicolons_or_tabs_read_like_commas(tmp_path, sep):
    """Spreadsheets in decimal-comma locales export CSV with semicolons (issue 6)."""
    rows = [
        ["filename", "ihc-score", "her2-status", "patient_id"],
        ["a.jpg", "2", "1", "P, 1"],
        ["b.jpg", "0", "", "P2"],
    ]
    text = "\n".join(sep.join(f'"{c}"' if "," in c else c for c in row) for row in rows)
    path = tmp_path / "labels.csv"
    path.write_text(text + "\n", encoding="utf-8-sig")  # with the BOM Excel writes
    table = LabelTableDataset(filepath=str(path)).load()
    assert table.error is None
    assert list(table.frame.columns) == rows[0]
    assert table.frame["filename"].tolist() == ["a.jpg", "b.jpg"]
    assert table.frame["patient_id"].tolist() == ["P, 1", "P2"]
    assert pd.isna(table.frame.loc[1, "her2-status"])


def test_semicolon_slide_map_reads(tmp_path):
    path = tmp_path / "slide_map.csv"
    path.write_text("slide;core;ihc-score;her2-status\ns1.tif;A-1;3;1\ns1.tif;B-2;0;0\n")
    frame = LabelTableDataset(filepath=str(path)).load().frame
    assert frame[["slide", "core", "ihc-score"]].values.tolist() == [
        ["s1.tif", "A-1", "3"],
        ["s1.tif", "B-2", "0"],
    ]


def test_synthetic_marker_records_content_hashes(tmp_path):
    dataset = SyntheticCohortDataset(root=str(tmp_path))
    dataset.save(_cohort())
    marker = dataset.load()
    assert set(marker["sha256"]) == set(marker["files"])
    assert all(len(digest) == 64 for digest in marker["sha256"].values())


def test_tampered_marker_never_deletes_outside_the_raw_targets(tmp_path, caplog):
    root = tmp_path / "01_raw"
    dataset = SyntheticCohortDataset(root=str(root))
    dataset.save(_cohort("f1"))
    outside = tmp_path / "thesis.docx"
    outside.write_bytes(b"years of work")
    listed = root / "notes.txt"  # inside the root, but not one of the raw targets
    listed.write_bytes(b"mine")
    marker = json.loads((root / MARKER).read_text())
    for rel, path in (("../thesis.docx", outside), ("notes.txt", listed)):
        marker["files"].append(rel)
        marker["sha256"][rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / MARKER).write_text(json.dumps(marker))
    dataset.save(_cohort("f2", names=("core_2.jpg",)))
    assert outside.read_bytes() == b"years of work" and listed.read_bytes() == b"mine"
    assert "'../thesis.docx', outside" in caplog.text and "'notes.txt', outside" in caplog.text
    # the cohort's own files were still replaced
    assert sorted(p.name for p in (root / "cores").iterdir()) == ["core_2.jpg"]


def test_a_file_changed_since_it_was_written_is_kept(tmp_path, caplog):
    dataset = SyntheticCohortDataset(root=str(tmp_path))
    dataset.save(_cohort("f1", names=("core_1.jpg", "core_2.jpg")))
    edited = tmp_path / "cores" / "core_1.jpg"
    edited.write_bytes(b"the user's own core, saved over the demo one")
    dataset.save(_cohort("f2", names=("core_3.jpg",)))
    assert edited.read_bytes() == b"the user's own core, saved over the demo one"
    assert (tmp_path / "cores" / "core_2.jpg").exists()  # nothing replaced: the write was refused
    assert not (tmp_path / "cores" / "core_3.jpg").exists()
    assert "changed since the synthetic pipeline wrote it" in caplog.text
    assert "NOT written" in caplog.text
    assert json.loads((tmp_path / MARKER).read_text())["fingerprint"] == "f1"


def _catalog_types() -> set[str]:
    """Every dataset class path named in the project's catalogs (``type:`` and inner ``dataset:``)."""
    import yaml

    from her2_kedro import __file__ as package_file

    conf = Path(package_file).parents[2] / "conf"
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("type", "dataset") and isinstance(value, str) and "." in value:
                    found.add(value)
                walk(value)

    for path in conf.glob("*/catalog*.yml"):
        walk(yaml.safe_load(path.read_text()))
    return found


def test_catalog_dataset_types_import():
    types = _catalog_types()
    assert any(t.startswith("her2_kedro.io.") for t in types)
    for dotted in types:
        if dotted.startswith("her2_kedro."):
            module, _, name = dotted.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name), type), dotted


def _legacy_cohort(root, extra_files=()):
    """A demo cohort as the generator wrote it before markers recorded content hashes."""
    files = ["cores/core_00000.jpg", "cores/core_00001.jpg", "labels.csv"]
    files += ["slides/tma_01.tif", "slide_map.csv"]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"old demo " + rel.encode())
    marker = {  # the pre-hash format: no "sha256" field
        "fingerprint": "f1",
        "cores": 2,
        "slides": ["tma_01.tif"],
        "slide_cores": 1,
        "files": files + list(extra_files),
    }
    (root / MARKER).write_text(json.dumps(marker, indent=2))
    return files


def test_a_legacy_marker_is_upgraded_and_the_cohort_rewritten(tmp_path, caplog):
    _legacy_cohort(tmp_path)
    dataset = SyntheticCohortDataset(root=str(tmp_path))
    dataset.save(_cohort("f1", names=("core_00000.jpg",)))  # same fingerprint: still rewritten
    assert (tmp_path / "cores" / "core_00000.jpg").read_bytes() == b"jpeg-bytes"
    assert sorted(p.name for p in (tmp_path / "cores").iterdir()) == ["core_00000.jpg"]
    assert not (tmp_path / "slides" / "tma_01.tif").exists()
    assert not (tmp_path / "slide_map.csv").exists()
    marker = dataset.load()
    assert set(marker["sha256"]) == set(marker["files"]) == {"cores/core_00000.jpg", "labels.csv"}
    assert f"Synthetic marker {tmp_path / MARKER} was written by an earlier version" in caplog.text
    caplog.clear()
    caplog.set_level(logging.INFO)
    dataset.save(_cohort("f1", names=("core_00000.jpg",)))  # upgraded: now a plain no-op
    assert "already in" in caplog.text and "earlier version" not in caplog.text


@pytest.mark.parametrize(
    "listed",
    ["cores/patient_7.jpg", "slides/my_scan.svs", "notes.txt", "../thesis.docx", "link"],
)
def test_a_legacy_marker_listing_what_the_generator_never_wrote_deletes_nothing(
    tmp_path, caplog, listed
):
    root = tmp_path / "01_raw"
    root.mkdir()
    thesis = tmp_path / "thesis.docx"
    thesis.write_bytes(b"years of work")
    if listed == "link":  # named like a generated core, but a link out of the raw folder
        listed = "cores/core_00009.jpg"
        (root / "cores").mkdir()
        (root / listed).symlink_to(thesis)
    elif not listed.startswith(".."):
        (root / listed).parent.mkdir(parents=True, exist_ok=True)
        (root / listed).write_bytes(b"the user's own file")
    files = _legacy_cohort(root, extra_files=[listed])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    SyntheticCohortDataset(root=str(root)).save(_cohort("f2", names=("core_00005.jpg",)))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing deleted, nothing written, the marker unchanged
    assert all((root / rel).exists() for rel in files)
    assert f"legacy marker {root / MARKER}" in caplog.text and repr(listed) in caplog.text


def test_an_unreadable_marker_vouches_for_nothing(tmp_path, caplog):
    (tmp_path / MARKER).write_text("{not json")
    dataset = SyntheticCohortDataset(root=str(tmp_path))
    with pytest.raises(DatasetError, match="unreadable"):
        dataset.load()
    (tmp_path / "cores").mkdir()
    (tmp_path / "cores" / "core_00000.jpg").write_bytes(b"whose?")
    dataset.save(_cohort())
    assert (tmp_path / "cores" / "core_00000.jpg").read_bytes() == b"whose?"
    assert "is unreadable" in caplog.text and "NOT written" in caplog.text
    (tmp_path / "cores" / "core_00000.jpg").unlink()
    dataset.save(_cohort())  # empty targets: written, and the marker replaced
    assert dataset.load()["fingerprint"] == "f1"
