"""Tests of the synthetic cohort generator: cores, cohort tables and whole TMA slides."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.color import rgb2hed
from skimage.measure import label
from sklearn.metrics import roc_auc_score

from her2_kedro.config import SyntheticParams
from her2_kedro.imaging.pixels import encode_jpeg, foreground_mask
from her2_kedro.pipelines.synthetic.nodes import sample_core_table
from her2_kedro.synthetic import staining
from her2_kedro.synthetic.cohort import (
    BALANCED_PRIORS,
    CLASSES,
    COLUMNS,
    PAPER_PRIORS,
    render_cohort,
    sample_cohort,
)
from her2_kedro.synthetic.optics import EXTERNAL_STAINS, INTERNAL_STAINS, render_optical_density
from her2_kedro.synthetic.render import CoreSpec, plan_core, render_core
from her2_kedro.synthetic.slide import (
    SlideSpec,
    core_label,
    slide_layout,
    slide_size,
    write_synthetic_slide,
)


def max_mean_dab(rgb: np.ndarray, tile: int = 224) -> float:
    """The paper's intensity descriptor: max over kept 224 tiles of the mean rgb2hed DAB."""
    dab = rgb2hed(rgb)[..., 2]
    fg = foreground_mask(rgb)
    best = -np.inf
    for y in range(0, rgb.shape[0] - tile + 1, tile):
        for x in range(0, rgb.shape[1] - tile + 1, tile):
            if fg[y : y + tile, x : x + tile].mean() > 0.05:
                best = max(best, float(dab[y : y + tile, x : x + tile].mean()))
    return best


def median_nucleus_area(rgb: np.ndarray, cell_diameter_px: float) -> float:
    """A simple morphology measure: median area of haematoxylin-rich connected blobs of at least
    0.12 d^2 (tumour-nucleus sized: drops the smaller lymphocytes and thin fibroblasts, whose share
    follows the core's tumour fraction)."""
    lab = label(rgb2hed(rgb)[..., 0] > 0.03)
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= 0.12 * cell_diameter_px**2]
    return float(np.median(areas)) if areas.size else 0.0


# ---------------------------------------------------------------- optics


def test_render_optical_density_beer_lambert():
    zero = np.zeros((4, 5), np.float32)
    out = render_optical_density(zero, zero, INTERNAL_STAINS)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == INTERNAL_STAINS.background_rgb
    dab = render_optical_density(zero, zero + 1.0, INTERNAL_STAINS)[0, 0].astype(int)
    assert dab[0] > dab[1] > dab[2]  # brown: blue absorbed most
    faded = render_optical_density(zero, zero + 1.0, EXTERNAL_STAINS)[0, 0].astype(int)
    assert faded.sum() > dab.sum()  # external DAB is faded
    assert EXTERNAL_STAINS.haematoxylin != INTERNAL_STAINS.haematoxylin


# ---------------------------------------------------------------- cores


def test_render_core_deterministic_shape_and_round():
    spec = CoreSpec(ihc_score=2, her2_status=1, status_cue=True, size=336, cell_diameter_px=16)
    a = render_core(spec, np.random.default_rng(5))
    b = render_core(spec, np.random.default_rng(5))
    c = render_core(spec, np.random.default_rng(6))
    assert a.shape == (336, 336, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert encode_jpeg(a, 85) == encode_jpeg(b, 85)
    fg = foreground_mask(a)
    k = 20
    for corner in (fg[:k, :k], fg[:k, -k:], fg[-k:, :k], fg[-k:, -k:]):
        assert corner.mean() == 0.0
    assert fg[118:218, 118:218].mean() > 0.5
    yy, xx = np.mgrid[:336, :336]
    assert fg[np.hypot(yy - 168, xx - 168) > 0.49 * 336].mean() < 0.01  # round core


def test_encode_jpeg_quality_controls_size():
    rgb = render_core(
        CoreSpec(3, 1, False, size=224, cell_diameter_px=14), np.random.default_rng(0)
    )
    lo, hi = encode_jpeg(rgb, 60), encode_jpeg(rgb, 95)
    assert len(lo) < len(hi)
    back = np.asarray(Image.open(io.BytesIO(hi)))
    assert back.shape == rgb.shape and np.abs(back.astype(int) - rgb).mean() < 4


@pytest.mark.parametrize("flag", ["tear", "fold", "partial", "blur"])
def test_artefacts_change_the_core(flag):
    base = CoreSpec(2, 0, False, size=224, cell_diameter_px=14)
    kwargs = {"blur_sigma": 2.0} if flag == "blur" else {flag: True}
    plain = render_core(base, np.random.default_rng(3))
    art = render_core(
        CoreSpec(2, 0, False, size=224, cell_diameter_px=14, **kwargs), np.random.default_rng(3)
    )
    assert art.shape == plain.shape and not np.array_equal(art, plain)
    if flag == "partial":
        assert foreground_mask(art).mean() < foreground_mask(plain).mean() - 0.03
    if flag == "fold":
        assert art.astype(float).mean() < plain.astype(float).mean()


def test_dab_descriptor_increases_with_score_on_average():
    # Per-core DAB gain, tumour fraction and focal staining make single cores overlap (as on real
    # cores); the class means over several cores still rise with the score.
    vals = {
        score: [
            max_mean_dab(
                render_core(
                    CoreSpec(score, int(score == 3), False, size=448, cell_diameter_px=18),
                    np.random.default_rng(100 + 10 * score + i),
                )
            )
            for i in range(6)
        ]
        for score in range(4)
    }
    means = [np.mean(vals[s]) for s in range(4)]
    assert all(b > a for a, b in zip(means[:-1], means[1:], strict=True)), means
    assert means[3] > 2 * means[0] and means[2] > 1.2 * means[0], means
    assert roc_auc_score([0] * 6 + [1] * 6, vals[0] + vals[3]) == 1.0  # 0 and 3 clearly apart


def test_staining_pattern_follows_gastric_criteria():
    """Per-cell staining categories obey the >= 10 % rule of the score (1 faint partial, 2 weak-moderate
    complete, 3 strong complete, 4 moderate fragmented = scored 1)."""
    for score in range(4):
        for i in range(8):
            p = plan_core(
                CoreSpec(score, int(score == 3), False, size=336, cell_diameter_px=16),
                np.random.default_rng(i),
            )
            c, r = p.outline.centre, p.outline.radius
            inside = (p.cells.sy.ravel() - c) ** 2 + (p.cells.sx.ravel() - c) ** 2 < r**2
            category, partial = p.staining.category, p.staining.partial_mem
            cat = category[(p.cells.kind == 1) & inside]
            share = {c: float(np.mean(cat == c)) for c in range(5)}
            if score == 0:
                assert 1 - share[0] < 0.10
            elif score == 1:
                assert share[1] + share[4] >= 0.10 and share[2] + share[3] < 0.10
            elif score == 2:
                assert share[2] >= 0.10 and share[3] < 0.10
            else:
                assert share[3] >= 0.10
            assert (partial[category == 1] == 1).all() and (partial[category == 3] == 0).all()
    # the spec's nuisances override the drawn ones without changing the tissue
    spec = CoreSpec(3, 1, False, size=224, cell_diameter_px=14)
    a = plan_core(spec, np.random.default_rng(1))
    b = plan_core(
        CoreSpec(3, 1, False, size=224, cell_diameter_px=14, dab_gain=2.0, focal=not a.focal),
        np.random.default_rng(1),
    )
    assert b.dab_gain == 2.0 and b.focal != a.focal and b.tumour_fraction == a.tumour_fraction
    assert np.array_equal(a.cells.kind, b.cells.kind)


def test_dab_gain_scales_measured_intensity():
    vals = [
        max_mean_dab(
            render_core(
                CoreSpec(
                    2, 0, False, size=448, cell_diameter_px=18, dab_gain=g, tumour_fraction=0.6
                ),
                np.random.default_rng(7),
            )
        )
        for g in (0.6, 1.0, 1.6)
    ]
    assert vals[0] < vals[1] < vals[2], vals
    assert vals[2] - vals[0] > 0.5 * (vals[1] - vals[0] + vals[2] - vals[1]) > 0.002, vals
    more_tumour = [
        max_mean_dab(
            render_core(
                CoreSpec(
                    3, 1, False, size=448, cell_diameter_px=18, dab_gain=1.0, tumour_fraction=f
                ),
                np.random.default_rng(7),
            )
        )
        for f in (0.25, 0.85)
    ]
    assert more_tumour[0] < more_tumour[1], more_tumour


def test_status_cue_is_morphological_not_intensity():
    """Paired: the same tissue with and without the cue differs in nuclear size, not in DAB."""
    ratio_dab, ratio_area = [], []
    for i in range(6):
        rgb = {
            cue: render_core(
                CoreSpec(2, int(cue), cue, size=448, cell_diameter_px=24),
                np.random.default_rng(1000 + i),
            )
            for cue in (False, True)
        }
        ratio_dab.append(max_mean_dab(rgb[True]) / max_mean_dab(rgb[False]))
        ratio_area.append(median_nucleus_area(rgb[True], 24) / median_nucleus_area(rgb[False], 24))
    assert all(0.93 < r < 1.07 for r in ratio_dab), ratio_dab
    assert min(ratio_area) > 1.15 and np.mean(ratio_area) > 1.3, ratio_area


# ---------------------------------------------------------------- cohort


def test_sample_cohort_columns_priors_and_rules():
    t = sample_cohort(2000, (1, 3), BALANCED_PRIORS, seed=1, external_fraction=0.25)
    assert list(t.columns) == list(COLUMNS)
    assert t["filename"].is_unique
    assert all(f.startswith("core_") and f.endswith(".jpg") for f in t["filename"])
    per_patient = t.groupby("patient_id")
    assert (
        (per_patient[["ihc-score", "her2-status", "cohort", "status_cue"]].nunique() == 1)
        .all()
        .all()
    )
    patients = per_patient.first()
    cls = np.where(
        patients["ihc-score"] == 2,
        np.where(patients["her2-status"] == 1, "2+", "2-"),
        patients["ihc-score"].astype(str),
    )
    shares = pd.Series(cls).value_counts(normalize=True)
    assert set(shares.index) == set(CLASSES)
    assert shares.between(0.15, 0.25).all(), shares
    assert (t.loc[t["ihc-score"].isin([0, 1]), "her2-status"] == 0).all()
    assert (t.loc[t["ihc-score"] == 3, "her2-status"] == 1).all()
    assert abs((patients["cohort"] == "external").mean() - 0.25) < 0.01
    s2 = patients[patients["ihc-score"] == 2]
    assert s2.loc[s2["her2-status"] == 1, "status_cue"].mean() > 0.8
    assert s2.loc[s2["her2-status"] == 0, "status_cue"].mean() < 0.2
    assert t["jpeg_quality"].between(70, 95).all()
    for flag in ("tear", "fold", "partial"):
        assert 0.05 < t[flag].mean() < 0.15
    assert t.equals(sample_cohort(2000, (1, 3), BALANCED_PRIORS, seed=1, external_fraction=0.25))
    # per-core nuisances: log-normal gain (log-sd 0.3), tumour fraction 0.3-0.95, 30 % focal, label-free
    assert (
        abs(np.log(t["dab_gain"]).std() - 0.3) < 0.03 and abs(np.log(t["dab_gain"]).mean()) < 0.03
    )
    assert t["tumour_fraction"].between(0.3, 0.95).all() and abs(t["focal"].mean() - 0.3) < 0.05
    for col in ("dab_gain", "tumour_fraction"):
        assert abs(np.corrcoef(t[col], t["ihc-score"])[0, 1]) < 0.1
    fixed = sample_cohort(
        50,
        1,
        BALANCED_PRIORS,
        seed=1,
        dab_gain_sd=0.0,
        tumour_fraction_range=(0.5, 0.5),
        focal_rate=0,
    )
    assert (
        (fixed["dab_gain"] == 1).all()
        and (fixed["tumour_fraction"] == 0.5).all()
        and not fixed["focal"].any()
    )
    base = sample_cohort(50, 1, BALANCED_PRIORS, seed=1).drop(
        columns=["dab_gain", "tumour_fraction", "focal"]
    )
    assert base.equals(fixed.drop(columns=["dab_gain", "tumour_fraction", "focal"]))


def test_nuisance_parameters_come_from_yaml_with_the_renderers_defaults():
    """SyntheticParams' nuisance defaults are the renderer's, and the sample node passes them on."""
    p = SyntheticParams()
    assert p.dab_gain_sd == staining.DAB_GAIN_SD and p.focal_rate == staining.FOCAL_RATE
    assert p.tumour_fraction_range == staining.TUMOUR_FRACTION_RANGE
    params = {"n_patients": 40, "dab_gain_sd": 0.0, "tumour_fraction_range": [0.4, 0.4]}
    t = sample_core_table({**params, "focal_rate": 1.0})
    assert (t["dab_gain"] == 1).all() and (t["tumour_fraction"] == 0.4).all() and t["focal"].all()
    with pytest.raises(ValueError, match="min <= max"):
        SyntheticParams(tumour_fraction_range=(0.9, 0.2))


def test_sample_cohort_paper_priors_and_no_label_in_names():
    t = sample_cohort(
        500, 2, PAPER_PRIORS, seed=3, artefact_rates={"tear": 0, "fold": 0, "partial": 0, "blur": 0}
    )
    assert len(t) == 1000
    assert (t["ihc-score"] == 0).mean() > 0.75
    assert not (t["tear"] | t["fold"] | t["partial"]).any() and (t["blur_sigma"] == 0).all()
    assert t["cohort"].eq("internal").all()
    # file number order is unrelated to the label
    num = t["filename"].str.slice(5, 10).astype(int)
    assert abs(np.corrcoef(num, t["ihc-score"])[0, 1]) < 0.15
    with pytest.raises(ValueError):
        sample_cohort(10, 1, {"4": 1.0}, seed=0)


def test_render_cohort_lazy_and_reproducible_per_row():
    t = sample_cohort(3, 1, BALANCED_PRIORS, seed=2, external_fraction=0.5)
    it = render_cohort(t, size=224, cell_diameter_px=14, seed=9)
    first = next(it)
    rest = list(it)
    assert [n for n, _ in [first, *rest]] == list(t["filename"])
    again = list(render_cohort(t.iloc[[0]], size=224, cell_diameter_px=14, seed=9))
    assert again[0] == first
    img = np.asarray(Image.open(io.BytesIO(first[1])))
    assert img.shape == (224, 224, 3)
    # the table's nuisance columns reach the renderer
    row = t.iloc[0]
    spec = CoreSpec(
        int(row["ihc-score"]),
        int(row["her2-status"]),
        bool(row["status_cue"]),
        size=224,
        cell_diameter_px=14,
        stains=EXTERNAL_STAINS if row["cohort"] == "external" else INTERNAL_STAINS,
        tear=bool(row["tear"]),
        fold=bool(row["fold"]),
        partial=bool(row["partial"]),
        blur_sigma=float(row["blur_sigma"]),
        dab_gain=float(row["dab_gain"]),
        tumour_fraction=float(row["tumour_fraction"]),
        focal=bool(row["focal"]),
    )
    assert (
        encode_jpeg(render_core(spec, np.random.default_rng([9, 0])), int(row["jpeg_quality"]))
        == first[1]
    )
    changed = list(
        render_cohort(
            t.iloc[[0]].assign(dab_gain=row["dab_gain"] * 2), size=224, cell_diameter_px=14, seed=9
        )
    )
    assert changed[0][1] != first[1]


# ---------------------------------------------------------------- slides


def test_slide_layout_labels_and_geometry():
    spec = SlideSpec(
        n_rows=3, n_cols=4, core_diameter_px=200, pitch_px=260, missing=("B-2",), margin_px=50
    )
    lay = slide_layout(spec, np.random.default_rng(0))
    assert list(lay.columns) == ["core", "row", "col", "cx", "cy", "present"]
    assert lay["core"].tolist()[:5] == ["A-1", "A-2", "A-3", "A-4", "B-1"]
    assert lay.set_index("core").loc["B-2", "present"] == np.False_ and lay["present"].sum() == 11
    w, h = slide_size(spec)
    r = 200 / 0.93 / 2
    assert (lay["cx"] - r >= 0).all() and (lay["cx"] + r <= w).all()
    assert (lay["cy"] - r >= 0).all() and (lay["cy"] + r <= h).all()
    assert core_label(27, 0) == "AB-1"


def test_write_synthetic_slide_pyramid(tmp_path):
    tiffslide = pytest.importorskip("tiffslide")
    spec = SlideSpec(
        n_rows=3,
        n_cols=4,
        core_diameter_px=200,
        pitch_px=300,
        missing=("A-2", "C-3"),
        n_debris=4,
        margin_px=500,
        tile_size=256,
    )
    images = {
        core_label(r, c): render_core(
            CoreSpec(3, 1, False, size=216, cell_diameter_px=12), np.random.default_rng(r * 4 + c)
        )
        for r in range(3)
        for c in range(4)
    }
    path = tmp_path / "tma.tif"
    lay = write_synthetic_slide(path, spec, images, np.random.default_rng(4))
    assert lay.equals(slide_layout(spec, np.random.default_rng(4)))
    slide = tiffslide.TiffSlide(path)
    try:
        w, h = slide_size(spec)
        assert slide.level_count > 1
        assert slide.level_dimensions[0] == (w, h)
        assert slide.level_dimensions[1] == (-(-w // 2), -(-h // 2))
        for row in lay.itertuples():
            x, y = int(row.cx), int(row.cy)
            patch = np.asarray(slide.read_region((x - 30, y - 30), 0, (60, 60)).convert("RGB"))
            tissue = foreground_mask(patch).mean()
            assert (tissue > 0.3) if row.present else (tissue == 0.0), (row.core, tissue)
        low = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
        assert 0.05 < foreground_mask(low).mean() < 0.6
    finally:
        slide.close()
