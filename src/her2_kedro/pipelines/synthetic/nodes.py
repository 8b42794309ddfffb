"""Thin nodes of the synthetic pipeline: sample labels, plan slides, render lazily."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from her2_kedro.config import SyntheticParams
from her2_kedro.io.synthetic_cohort import SyntheticCohort
from her2_kedro.synthetic import GENERATOR_VERSION
from her2_kedro.synthetic.cohort import core_spec_from_row, render_cohort, sample_cohort
from her2_kedro.synthetic.render import render_core
from her2_kedro.synthetic.slide import SlideSpec, slide_layout, write_synthetic_slide

LABEL_COLUMNS = ["filename", "ihc-score", "her2-status", "patient_id", "cohort"]
SLIDE_MAP_COLUMNS = ["slide", "core", "ihc-score", "her2-status", "patient_id", "cohort"]


def _params(params: dict[str, Any]) -> SyntheticParams:
    return SyntheticParams.model_validate(params)


def sample_core_table(params: dict[str, Any]) -> pd.DataFrame:
    """Patients, labels and artefacts of the cores-folder part of the cohort (no pixels yet)."""
    p = _params(params)
    return sample_cohort(
        n_patients=p.n_patients,
        cores_per_patient=p.cores_per_patient,
        class_priors=p.priors(),
        seed=p.seed,
        external_fraction=p.external_fraction,
        status_cue_strength=p.status_cue_strength,
        artefact_rates=p.artefact_rates.model_dump(),
        **_nuisances(p),
    )


def _nuisances(p: SyntheticParams) -> dict[str, Any]:
    """The per-core nuisance settings of the cohort sampler."""
    return {
        "dab_gain_sd": p.dab_gain_sd,
        "tumour_fraction_range": p.tumour_fraction_range,
        "focal_rate": p.focal_rate,
    }


def plan_slides(params: dict[str, Any]) -> pd.DataFrame:
    """Grid layout and labels of each synthetic whole TMA slide (one row per grid position)."""
    p = _params(params)
    s = p.slides
    rows = []
    for index in range(s.n_slides):
        rng = np.random.default_rng([p.seed, 1000 + index])
        labels = [f"{chr(65 + r)}-{c + 1}" for r in range(s.n_rows) for c in range(s.n_cols)]
        missing = tuple(rng.choice(labels, size=min(s.n_missing, len(labels)), replace=False))
        spec = _slide_spec(p, missing)
        layout = slide_layout(spec, rng).assign(slide=f"tma_{index + 1:02d}")
        present = layout[layout["present"]]
        cores = sample_cohort(
            n_patients=len(present),
            cores_per_patient=1,
            class_priors=p.priors(),
            seed=p.seed + 7919 * (index + 1),
            external_fraction=p.external_fraction,
            status_cue_strength=p.status_cue_strength,
            artefact_rates={"tear": 0.0, "fold": 0.0, "partial": 0.0, "blur": 0.0},
            **_nuisances(p),
        )
        cores["patient_id"] = [f"tma{index + 1:02d}_{pid}" for pid in cores["patient_id"]]
        rows.append(
            pd.concat([present.reset_index(drop=True), cores.reset_index(drop=True)], axis=1)
        )
    if not rows:
        return pd.DataFrame(columns=[*SLIDE_MAP_COLUMNS, "status_cue"])
    return pd.concat(rows, ignore_index=True)


def _slide_spec(p: SyntheticParams, missing: tuple[str, ...]) -> SlideSpec:
    s = p.slides
    return SlideSpec(
        n_rows=s.n_rows,
        n_cols=s.n_cols,
        core_diameter_px=s.core_diameter_px,
        pitch_px=s.pitch_px,
        rotation_deg=s.rotation_deg,
        jitter_px=s.jitter_px,
        missing=missing,
        n_debris=s.n_debris,
    )


def _fingerprint(params: dict[str, Any]) -> str:
    """Identifies the cohort: the parameters and the generator version that render it."""
    payload = {"params": params, "generator": GENERATOR_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def render_synthetic_cohort(
    core_table: pd.DataFrame, slide_plan: pd.DataFrame, params: dict[str, Any]
) -> SyntheticCohort:
    """The cohort as lazy writers: cores are rendered one at a time while the dataset saves them."""
    p = _params(params)

    def cores():
        return render_cohort(
            core_table, size=p.core_size, cell_diameter_px=p.cell_diameter_px, seed=p.seed
        )

    slides = {}
    for index, (name, plan) in enumerate(slide_plan.groupby("slide", sort=True)):
        slides[f"{name}.tif"] = _slide_writer(p, plan, index)
    slide_map = slide_plan[SLIDE_MAP_COLUMNS] if len(slide_plan) else slide_plan
    return SyntheticCohort(
        labels=core_table[LABEL_COLUMNS],
        cores=cores,
        slide_map=slide_map,
        slides=slides,
        fingerprint=_fingerprint(params),
    )


def _slide_writer(p: SyntheticParams, plan: pd.DataFrame, index: int):
    """A function that renders this slide's cores and streams the slide to a path."""
    s = p.slides
    core_size = int(round(s.core_diameter_px / 0.93))

    def core_image(label: str) -> np.ndarray:
        row = plan.set_index("core").loc[label].to_dict()
        spec = core_spec_from_row(row, size=core_size, cell_diameter_px=p.cell_diameter_px)
        return render_core(
            spec, np.random.default_rng([p.seed, 2000 + index, zlib.crc32(label.encode())])
        )

    def write(path: Path) -> None:
        missing = tuple(sorted(set(_all_labels(s.n_rows, s.n_cols)) - set(plan["core"])))
        rng = np.random.default_rng([p.seed, 1000 + index])
        write_synthetic_slide(path, _slide_spec(p, missing), core_image, rng)

    return write


def _all_labels(n_rows: int, n_cols: int) -> list[str]:
    return [f"{chr(65 + r)}-{c + 1}" for r in range(n_rows) for c in range(n_cols)]
