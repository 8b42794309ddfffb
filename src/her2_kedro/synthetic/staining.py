"""What the labels change in a synthetic core: the HER2 staining of its tumour cells (from the IHC
score) and the nuclear atypia of the ISH-linked status cue.

Staining, per tumour cell, by category (gastric HER2 criteria, Hofmann/Rueschoff, >= 10 % of
tumour cells): faint partial membranes (a patchy mask removes part of each membrane);
weak-moderate complete; strong complete; and moderate but fragmented (partial) membranes, which a
pathologist scores 1. Every category has thin membranes over a granular cytoplasmic blush (also
faintly over the nucleus), as on the real cores, where a strongly stained core is tan throughout
with crisp dark membranes rather than a few very dark cells. A score fixes the category fractions
(``composition``). Categories are handed out at random (diffuse) or down a smooth field so the
most stained cells form a patch (focal). Per-cell intensity is log-normal, per-core intensity
within a category varies (most for weak-to-moderate complete staining, ``CORE_CATEGORY_SD``), and
a per-core DAB gain (staining run, section thickness; log-normal, median 1) scales it all. So the score is defined by the staining pattern
while the paper's max-mean-DAB overlaps between neighbouring scores, as on real cores.

Status cue, a stated property of this benchmark, never a claim about real tissue: tumour nuclei
of cue cores show atypia -- mean nuclear area x1.5, more pleomorphism, irregular outlines and
hyperchromasia. Nothing else depends on it, so max-mean-DAB cannot see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Staining categories of a tumour cell: membrane DAB concentration (median, optical density
#: units of the stain vector), its per-cell log-sd, cytoplasmic blush (fraction of the membrane
#: concentration), membrane width factor, partial membranes (a patchy mask removes part of each).
CATEGORY: dict[int, tuple[float, float, float, float, bool]] = {
    1: (0.20, 0.30, 0.70, 1.0, True),  # faint, barely perceptible, partial
    2: (0.90, 0.25, 0.40, 1.0, False),  # weak to moderate, complete
    3: (2.40, 0.22, 0.28, 1.0, False),  # strong, complete
    4: (0.35, 0.25, 0.30, 1.0, True),  # moderate but incomplete (fragmented): scored 1
}
#: Categories in the order they are handed out (highest first, the focus of a focal core).
CATEGORY_ORDER = (3, 2, 4, 1)

#: Defaults of the per-core nuisance draws used when a ``CoreSpec`` field is None.
DAB_GAIN_SD = 0.3  # log-normal sd of the staining-run / section-thickness DAB gain (median 1)
TUMOUR_FRACTION_RANGE = (0.3, 0.95)  # uniform range of the tumour share of the core's tissue
FOCAL_RATE = 0.3  # probability that the stained cells are clustered in a patch
#: Log-sd of a core's intensity within each category (index = category): weak-to-moderate
#: complete staining (score 2) spans the widest range, from barely visible to moderate.
CORE_CATEGORY_SD = np.array([0.0, 0.2, 0.45, 0.2, 0.2])
#: Share of the cytoplasmic blush that lies over the nucleus (cytoplasm above and below it).
NUCLEAR_BLUSH = 0.6
MEMBRANE_WIDTH = 0.045  # membrane width (cell diameters; x the category's width factor)
BACKGROUND_DAB = 0.02  # median non-specific DAB of tissue (label-free; cytoplasm and stroma)
BACKGROUND_DAB_SD = 0.35  # its log-sd between cores


def composition(score: int, rng: np.random.Generator) -> dict[int, float]:
    """Fractions of tumour cells in each staining category for a core of this IHC score.

    Gastric criteria (Hofmann/Ruschoff, >= 10 % of tumour cells): 0 -- < 10 % faint partial;
    1 -- >= 10 % faint partial (some fragmented moderate membranes), < 10 % complete; 2 -- >= 10 %
    weak-moderate complete, < 10 % strong; 3 -- >= 10 % strong complete. Always 4 draws.
    """
    u = rng.random(4)
    if score == 0:
        return {1: 0.08 * u[0]}
    if score == 1:
        return {2: 0.05 * u[0], 4: 0.15 * u[1], 1: 0.12 + 0.50 * u[2]}
    if score == 2:
        f2 = 0.10 + 0.30 * u[0] if u[3] < 0.5 else 0.40 + 0.50 * u[0]
        f3 = 0.05 * u[1]
        return {3: f3, 2: f2, 1: 0.6 * u[2] * (1.0 - f2 - f3)}
    f3 = 0.10 + 0.30 * u[0] if u[3] < 0.35 else 0.40 + 0.60 * u[0]
    f2 = 0.7 * u[1] * (1.0 - f3)
    return {3: f3, 2: f2, 1: 0.5 * u[2] * (1.0 - f3 - f2)}


@dataclass(frozen=True)
class Atypia:
    """Tumour-nucleus modifiers of the status cue: semi-axis factor, log-sd of nuclear size
    (pleomorphism), outline irregularity and haematoxylin density."""

    axis_scale: float
    pleomorphism: float
    irregularity: float
    hyperchromasia: float


def atypia(status_cue: bool) -> Atypia:
    """Nuclear modifiers of a core with (area x1.5, pleomorphic, irregular, dark) or without the
    status cue."""
    if status_cue:
        return Atypia(axis_scale=1.22, pleomorphism=0.16, irregularity=0.22, hyperchromasia=0.65)
    return Atypia(axis_scale=1.0, pleomorphism=0.07, irregularity=0.06, hyperchromasia=0.45)


@dataclass
class Staining:
    """Per-cell DAB of a core (0 for cells that are not stained tumour cells)."""

    category: np.ndarray  # staining category of each cell (0 none, see CATEGORY)
    dab: np.ndarray  # membrane DAB concentration (gain included)
    cyto: np.ndarray  # cytoplasmic DAB concentration
    width: np.ndarray  # membrane width (px)
    partial_mem: np.ndarray  # 1.0 where a cell's membrane is partial (patchy), else 0.0


def assign_staining(
    score: int,
    tumour: np.ndarray,
    focus: np.ndarray,
    n: int,
    gain: float,
    focal: bool,
    d: float,
    rng: np.random.Generator,
) -> Staining:
    """Hand the score's category fractions to the tumour cells ``tumour`` (indices of n cells),
    highest category first along a random order (diffuse) or down ``focus`` (focal: a patch)."""
    fractions = composition(score, rng)
    key_diffuse = rng.random(n)
    key_focal = focus + 0.35 * rng.standard_normal(n)
    cell_noise = rng.standard_normal(n)
    core_k = np.exp(rng.normal(0.0, CORE_CATEGORY_SD, 5))
    key = key_focal if focal else key_diffuse
    order = tumour[np.argsort(-key[tumour], kind="stable")]
    category = np.zeros(n, np.int8)
    start = 0
    for cat in CATEGORY_ORDER:
        k = int(round(fractions.get(cat, 0.0) * tumour.size))
        category[order[start : start + k]] = cat
        start += k
    med, sd, cyto_k, width_k, partial_k = (np.zeros(5) for _ in range(5))
    for cat, (m, s_, c, w, pm) in CATEGORY.items():
        med[cat], sd[cat], cyto_k[cat], width_k[cat] = m * core_k[cat], s_, c, w
        partial_k[cat] = float(pm)
    width_k[0] = 1.0
    dab = gain * med[category] * np.exp(sd[category] * cell_noise)
    f32 = np.float32
    return Staining(
        category=category,
        dab=dab.astype(f32),
        cyto=(dab * cyto_k[category]).astype(f32),
        width=(max(0.7, MEMBRANE_WIDTH * d) * width_k[category]).astype(f32),
        partial_mem=partial_k[category].astype(f32),
    )
