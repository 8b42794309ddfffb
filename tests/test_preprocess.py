"""Preprocessing of accepted cores: reference stains, normalisation of marked cohorts, features."""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from her2_kedro.config import PreprocessingParams, TileConfig
from her2_kedro.features import preprocess
from her2_kedro.imaging.pixels import content_hash
from her2_kedro.imaging.stain_vectors import StainEstimationError, angle_degrees
from her2_kedro.synthetic.optics import EXTERNAL_STAINS, INTERNAL_STAINS
from her2_kedro.synthetic.render import CoreSpec, render_core

RULE = TileConfig()
#: (ihc score, cohort, split) of the six cores c0..c5
CORES = [
    (3, "internal", "train"),
    (0, "internal", "train"),
    (3, "internal", "val"),
    (2, "internal", "test"),
    (3, "external", "train"),  # an evaluation-only cohort's split label must not matter
    (1, "external", "test"),
]


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _spec(score: int, external: bool) -> CoreSpec:
    stains = EXTERNAL_STAINS if external else INTERNAL_STAINS
    return CoreSpec(score, int(score == 3), False, size=448, cell_diameter_px=20, stains=stains)


@pytest.fixture(scope="module")
def cohort():
    """Six small cores: four internal (train, train, val, test), two of an external centre."""
    rows, cores = [], {}
    for i, (score, cohort, split) in enumerate(CORES):
        rgb = render_core(_spec(score, cohort == "external"), np.random.default_rng(i))
        image = f"c{i}.png"
        cores[image] = partial(bytes, _png(rgb))
        rows.append(
            {
                "core_id": f"c{i}",
                "image": image,
                "split": split,
                "cohort": cohort,
                "content_hash": content_hash(rgb),
            }
        )
    return pd.DataFrame(rows), cores


def _params(**changes) -> PreprocessingParams:
    base = PreprocessingParams().model_dump()
    base.update(changes)
    return PreprocessingParams.model_validate(base)


def _features(result) -> pd.DataFrame:
    return pd.DataFrame(result.features).set_index("core_id")


def test_reference_from_tiles_is_close_to_the_rendering_stains(cohort):
    manifest, cores = cohort
    internal = manifest[manifest["cohort"] == "internal"]
    tiles = [
        t
        for image in internal["image"]
        for t in preprocess.richest_tiles(preprocess.decode_rgb(cores[image]()), RULE, 4)
    ]
    assert len(tiles) == 16 and tiles[0].shape == (224, 224, 3)
    vectors, _ = preprocess.estimate_reference(tiles, 220.0)
    assert angle_degrees(vectors.dab, INTERNAL_STAINS.dab) < 10


def test_no_reference_tiles_is_a_clear_error():
    with pytest.raises(StainEstimationError, match="no reference tiles"):
        preprocess.estimate_reference([], 220.0)


def test_only_marked_cohorts_are_normalised_and_flagged(cohort):
    manifest, cores = cohort
    plain = _features(preprocess.preprocess_cores(manifest, cores, RULE, _params(), []))
    result = preprocess.preprocess_cores(manifest, cores, RULE, _params(), ["external"])
    normed = _features(result)
    internal = ["c0", "c1", "c2", "c3"]
    assert normed.loc[internal, "max_mean_dab"].equals(plain.loc[internal, "max_mean_dab"])
    assert normed["normalised"].to_dict() == {c: c in ("c4", "c5") for c in normed.index}
    assert not plain["normalised"].any()
    assert normed.loc["c4", "max_mean_dab"] != plain.loc["c4", "max_mean_dab"]
    assert np.isfinite(normed["max_mean_dab"]).all() and all(len(t) for t in result.tiles)
    assert result.reference["status"] == "estimated"
    assert len(result.previews) == 2 and result.previews[0][0].shape == (224, 224, 3)


def test_reference_is_built_from_train_cores_of_unnormalised_cohorts_only(cohort, monkeypatch):
    """Validation, test and evaluation-only cores never shape the reference the others are mapped to."""
    manifest, cores = cohort
    allowed = ["c0", "c1"]  # internal train cores; c2 is val, c3 test, c4/c5 the external centre
    expected = [
        t.tobytes()
        for c in allowed
        for t in preprocess.richest_tiles(preprocess.decode_rgb(cores[f"{c}.png"]()), RULE, 8)
    ]
    seen: list[list[bytes]] = []
    real = preprocess.estimate_reference

    def spy(tiles, grey):
        seen.append([t.tobytes() for t in tiles])
        return real(tiles, grey)

    monkeypatch.setattr(preprocess, "estimate_reference", spy)
    result = preprocess.preprocess_cores(manifest, cores, RULE, _params(), ["external"])
    assert sorted(result.reference["cores"]) == allowed
    assert sorted(seen[0]) == sorted(expected)  # the reference: those cores' tiles, nothing else
    # the second estimate is the external cohort's own stain vectors, from its own cores
    assert sorted(result.reference["sources"]["external"]["cores"]) == ["c4", "c5"]


def test_nothing_to_normalise_costs_no_reference_and_no_preview(cohort, monkeypatch):
    manifest, cores = cohort
    internal = manifest[manifest["cohort"] == "internal"]

    def fail(*args, **kwargs):
        raise AssertionError("reference estimated although no cohort is normalised")

    monkeypatch.setattr(preprocess, "estimate_reference", fail)
    result = preprocess.preprocess_cores(internal, cores, RULE, _params(), ["external"])
    assert result.reference["status"] == "not needed" and result.previews == []
    assert not _features(result)["normalised"].any()


def test_without_reference_nothing_is_flagged_normalised(cohort):
    """No train core in the reference cohorts: the external cores are measured as they are, and say so."""
    manifest, cores = cohort
    no_train = manifest.assign(split=manifest["split"].replace({"train": "val"}))
    result = preprocess.preprocess_cores(no_train, cores, RULE, _params(), ["external"])
    features = _features(result)
    assert result.reference["status"] == "failed" and result.previews == []
    assert not features["normalised"].any()
    skipped = {p.core_id for p in result.problems if "normalisation skipped" in p.reason}
    assert skipped == {"c4", "c5"}


def test_normalised_external_dab_lands_near_the_reference_cohort(cohort):
    """The same tissue rendered with each centre's stains: normalisation moves DAB onto the internal's.

    The external centre's haematoxylin is purpler, and rgb2hed reads part of it as DAB, so an
    unstained external core looks browner than its internal twin. Normalised to the internal
    reference, its DAB must land within 0.002 (OD 0.012) of the twin's and at most half as far as
    before. (Its faded chromogen amount is deliberately not restored: DAB amount is the signal.)
    """
    manifest, cores = cohort
    rows, twins = [], {}
    for i, score in enumerate((0, 1)):
        for external in (False, True):
            image = f"twin{i}{'e' if external else 'i'}.png"
            rgb = render_core(_spec(score, external), np.random.default_rng(100 + i))
            twins[image] = partial(bytes, _png(rgb))
            rows.append(
                {
                    "core_id": image[:-4],
                    "image": image,
                    "split": "test",
                    "cohort": "external" if external else "internal",
                    "content_hash": content_hash(rgb),
                }
            )
    study = pd.concat([manifest, pd.DataFrame(rows)], ignore_index=True)
    everything = {**cores, **twins}
    before = _features(preprocess.preprocess_cores(study, everything, RULE, _params(), []))
    after = _features(preprocess.preprocess_cores(study, everything, RULE, _params(), ["external"]))
    for i in (0, 1):
        target = before.loc[f"twin{i}i", "dab_mean"]
        gap_before = abs(before.loc[f"twin{i}e", "dab_mean"] - target)
        gap_after = abs(after.loc[f"twin{i}e", "dab_mean"] - target)
        assert after.loc[f"twin{i}e", "normalised"]
        assert gap_after < 0.5 * gap_before and gap_after < 0.002, (gap_before, gap_after)


def test_core_missing_from_the_cores_folder_names_the_file(cohort):
    manifest, cores = cohort
    broken = manifest.assign(image=manifest["image"].replace({"c0.png": "gone.png"}))
    with pytest.raises(KeyError, match="gone.png"):
        preprocess.preprocess_cores(broken, cores, RULE, _params(), [])


def test_changed_core_is_named_with_the_manifest_version(cohort):
    """A manifest whose content_hash no longer matches the core file stops the run, naming both."""
    manifest, cores = cohort
    swapped = {**cores, "c3.png": cores["c1.png"]}
    version = "2026-01-01T00.00.00.000Z"
    with pytest.raises(preprocess.CoreContentError) as err:
        preprocess.preprocess_cores(manifest, swapped, RULE, _params(), [], version)
    message = str(err.value)
    assert "c3" in message and version in message and "c1" not in message


def test_threads_give_the_same_results(cohort):
    manifest, cores = cohort
    one = preprocess.preprocess_cores(manifest, cores, RULE, _params(workers=1), ["external"])
    two = preprocess.preprocess_cores(manifest, cores, RULE, _params(workers=2), ["external"])
    pd.testing.assert_frame_equal(_features(one), _features(two))
    for a, b in zip(one.tiles, two.tiles, strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert one.reference == two.reference


def test_stain_matrix_option_changes_the_dab_definition(cohort):
    manifest, cores = cohort
    default = _features(preprocess.preprocess_cores(manifest, cores, RULE, _params(), []))
    htk = preprocess.preprocess_cores(
        manifest, cores, RULE, _params(stain_matrix="histomicstk_hdab"), []
    )
    a, b = default["max_mean_dab"], _features(htk)["max_mean_dab"]
    assert not np.allclose(a, b)
    assert a.loc["c0"] > a.loc["c1"] and b.loc["c0"] > b.loc["c1"]  # score 3 above 0 either way


def test_cohort_dab_scaling_restores_a_faded_chromogen_for_the_whole_cohort():
    """The external centre's chromogen is faded (``EXTERNAL_STAINS.dab_scale`` 0.6). Five tissues
    rendered by both centres: with ``dab_scaling: cohort`` one factor from the pooled 99th
    percentiles (about 1 / 0.6) brings the stained external twins' DAB near the internal ones';
    without it the fade stays. Models normalise the same way (``cohort_normaliser`` reads the
    factor from the reference record)."""
    from her2_kedro.imaging.normalisation import cohort_normaliser, normalise
    from her2_kedro.imaging.stain_vectors import StainVectors

    rows, cores = [], {}
    for i, score in enumerate((3, 2, 1, 0, 3)):
        for external in (False, True):
            name = f"t{i}{'e' if external else 'i'}"
            rgb = render_core(_spec(score, external), np.random.default_rng(500 + i))
            cores[f"{name}.png"] = partial(bytes, _png(rgb))
            rows.append(
                {
                    "core_id": name,
                    "image": f"{name}.png",
                    "split": "train",
                    "cohort": "external" if external else "internal",
                    "content_hash": content_hash(rgb),
                }
            )
    study = pd.DataFrame(rows)
    plain = preprocess.preprocess_cores(study, cores, RULE, _params(), ["external"])
    settings = PreprocessingParams().stain_normalisation.model_dump() | {"dab_scaling": "cohort"}
    params = _params(stain_normalisation=settings)
    scaled = preprocess.preprocess_cores(study, cores, RULE, params, ["external"])
    assert "dab_scale" not in plain.reference["sources"]["external"]
    factor = scaled.reference["sources"]["external"]["dab_scale"]
    assert 1.3 < factor < 1.9, factor
    before, after = _features(plain), _features(scaled)
    for feature in ("max_mean_dab", "dab_mean"):
        internal = before.loc[["t0i", "t1i", "t4i"], feature].to_numpy()  # the stained tissues
        gap_before = np.abs(before.loc[["t0e", "t1e", "t4e"], feature].to_numpy() - internal)
        gap_after = np.abs(after.loc[["t0e", "t1e", "t4e"], feature].to_numpy() - internal)
        assert gap_after.sum() < 0.5 * gap_before.sum(), (feature, gap_before, gap_after)
    assert after.loc["t0i", "dab_mean"] == before.loc["t0i", "dab_mean"]  # internal untouched

    transform = cohort_normaliser(scaled.reference, ["external"], RULE.background_grey)
    rgb = np.asarray(Image.open(io.BytesIO(cores["t0e.png"]())).convert("RGB"))
    source = StainVectors.from_dict(scaled.reference["sources"]["external"]["vectors"])
    target_vectors = StainVectors.from_dict(scaled.reference["vectors"])
    expected = normalise(rgb, source, target_vectors, RULE.background_grey, dab_scale=factor)
    assert np.array_equal(transform({"cohort": "external"}, rgb), expected)


def test_an_implausible_cohort_dab_factor_is_bounded_with_a_warning(monkeypatch, caplog):
    settings = PreprocessingParams().stain_normalisation.model_copy(update={"max_dab_scale": 2.0})
    for factor, expected in ((5.0, 2.0), (0.1, 0.5), (1.4, 1.4)):
        monkeypatch.setattr(preprocess, "cohort_dab_scale", lambda *_, f=factor: f)
        caplog.clear()
        assert preprocess._bounded_dab_scale(None, None, "far", settings) == expected
        assert ("limited to" in caplog.text) == (factor != expected)


def test_cohort_without_pooled_dab_percentile_is_left_unscaled_and_says_so(
    cohort, monkeypatch, caplog
):
    """Where a cohort's pooled DAB vector fell back to Ruifrok's, no percentile was measured with
    it: calibration is skipped with a warning and a note, and the cohort is still normalised."""
    import dataclasses

    manifest, cores = cohort
    estimate = preprocess.estimate_reference
    calls = []

    def fallback_for_the_cohort(tiles, grey):
        vectors, notes = estimate(tiles, grey)
        calls.append(1)
        if len(calls) == 2:  # the first call is the training reference, the second the cohort's
            vectors = dataclasses.replace(vectors, max_concentrations=None)
        return vectors, notes

    monkeypatch.setattr(preprocess, "estimate_reference", fallback_for_the_cohort)
    settings = PreprocessingParams().stain_normalisation.model_dump() | {"dab_scaling": "cohort"}
    result = preprocess.preprocess_cores(
        manifest, cores, RULE, _params(stain_normalisation=settings), ["external"]
    )
    entry = result.reference["sources"]["external"]
    assert entry["dab_scale"] == 1.0
    assert any("no pooled DAB percentile" in note for note in entry["notes"])
    assert "Cohort external" in caplog.text and "DAB left unscaled" in caplog.text
    features = _features(result)
    assert len(features) == len(manifest)  # nothing else lost
    assert features.loc[["c4", "c5"], "normalised"].all()
