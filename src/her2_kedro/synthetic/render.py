"""Procedural HER2 IHC tissue-microarray cores: plan every random choice of a core, then render it
in row strips of float32 (so memory stays modest even at the paper's 5468 px) to stain
concentrations and, by the Beer-Lambert law, to RGB on glass.

A core is a round disk of tissue (``geometry``: outline, artefacts, gland architecture) made of
cells (``cells``: tessellation, nuclei, membranes) whose HER2 staining and nuclear atypia follow
the labels (``staining``). Fields of ``CoreSpec`` left None (DAB gain, tumour fraction, focal
staining) are drawn from the core's generator, with the defaults of ``staining``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from her2_kedro.synthetic.cells import (
    NUCLEUS_AXES,
    TUMOUR,
    Cells,
    assign_kinds,
    draw_nuclei,
    draw_seeds,
    membrane_rows,
    nucleus_rows,
    voronoi_rows,
)
from her2_kedro.synthetic.geometry import (
    COLUMNAR,
    EPI_CELLS,
    NO_LUMEN_RATE,
    SEPTUM,
    Architecture,
    Field,
    Outline,
    Texture,
    band_threshold,
    draw_cuts,
    draw_outline,
    outline_rows,
    smoothstep,
)
from her2_kedro.synthetic.optics import INTERNAL_STAINS, StainSet, render_optical_density
from her2_kedro.synthetic.staining import (
    BACKGROUND_DAB,
    BACKGROUND_DAB_SD,
    DAB_GAIN_SD,
    FOCAL_RATE,
    NUCLEAR_BLUSH,
    TUMOUR_FRACTION_RANGE,
    Staining,
    assign_staining,
    atypia,
)

STRIP_ROWS = 384
# Tissue optics (optical-density units of the stain vectors), calibrated on five real cores.
STROMA_H = 0.08  # haematoxylin of dense stroma (fibres and ground substance)
CYTO_H = 0.07  # haematoxylin of tumour cytoplasm
MEMBRANE_H = 0.04  # haematoxylin along cell borders
TISSUE_OD = 0.03  # neutral optical density of tissue (unstained protein, section thickness)
FIBRE_PERIOD = 0.15  # spacing of stroma fibres (cell diameters)
GRAIN = 0.018  # size of chromatin / cytoplasm granules (cell diameters)
LOOSENESS_RANGE = (-0.6, 0.3)  # per-core shift of the loose-stroma field (uniform)


@dataclass(frozen=True)
class CoreSpec:
    """Everything that defines one synthetic core apart from the random seed."""

    ihc_score: int
    her2_status: int
    status_cue: bool
    size: int = 672
    cell_diameter_px: float = 60.0
    stains: StainSet = field(default=INTERNAL_STAINS)
    tear: bool = False
    fold: bool = False
    partial: bool = False
    blur_sigma: float = 0.0
    dab_gain: float | None = None
    tumour_fraction: float | None = None
    focal: bool | None = None


@dataclass
class Textures:
    """Fields and noise that give the tissue its texture at several scales (all in pixels)."""

    f_rim: Field  # wobble of bites and tears
    f_mid: Field  # nuclear outline irregularity and chromatin clumps
    f_fine: Field  # cytoplasm and stroma grain (a few px)
    f_patch: Field  # gaps of partial membranes
    f_warp: Field  # waviness of stroma fibres
    f_loose: Field  # loose (oedematous, cracked) stroma, where it is high
    grain: Texture  # 1-2 px granules: chromatin speckles, cytoplasmic granularity


@dataclass
class CorePlan:
    """All random choices of one core, drawn up front so strips can be rendered independently."""

    size: int
    d: float
    outline: Outline
    arch: Architecture
    texture: Textures
    cells: Cells
    staining: Staining
    dab_gain: float
    tumour_fraction: float
    focal: bool
    background_dab: float  # non-specific DAB of the core's tissue (label-free)
    looseness: float = 0.0  # shift of the loose-stroma field: pale, oedematous stroma share

    @property
    def any_partial(self) -> bool:
        """Whether any cell has a partial (patchy) membrane."""
        return bool(self.staining.partial_mem.any())


def _check(spec: CoreSpec) -> None:
    """Reject specs the renderer cannot draw, with the reason."""
    if spec.ihc_score not in (0, 1, 2, 3):
        raise ValueError(f"ihc_score must be 0..3, got {spec.ihc_score}")
    if int(spec.size) < 32 or float(spec.cell_diameter_px) < 4:
        raise ValueError("size must be >= 32 px and cell_diameter_px >= 4")
    if spec.dab_gain is not None and not spec.dab_gain >= 0:
        raise ValueError(f"dab_gain must be >= 0, got {spec.dab_gain}")
    if spec.tumour_fraction is not None and not 0.0 <= spec.tumour_fraction <= 1.0:
        raise ValueError(f"tumour_fraction must lie in [0, 1], got {spec.tumour_fraction}")


def plan_core(spec: CoreSpec, rng: np.random.Generator) -> CorePlan:
    """Draw every random quantity of a core (fields, seeds, per-cell parameters, artefacts).

    The per-core nuisances (DAB gain, tumour fraction, focal staining) are always drawn, then
    replaced by the spec's value where one is given, so a spec that fixes them renders the same
    tissue as one that does not.
    """
    _check(spec)
    size, d = int(spec.size), float(spec.cell_diameter_px)
    outline = draw_outline(size, rng)
    f_gland = Field(rng, size, d * rng.uniform(3.0, 4.0), grad=True)
    f_sept = Field(rng, size, d * rng.uniform(4.0, 5.5), grad=True)
    f_arch = Field(rng, size, d * rng.uniform(2.2, 3.2))
    f_big = Field(rng, size, d * 9.0)
    f_rim = Field(rng, size, size * 0.08)
    f_low = Field(rng, size, d * 4.0)
    texture = Textures(
        f_rim=f_rim,
        f_mid=Field(rng, size, d * 0.18),
        f_fine=Field(rng, size, max(1.0, d * 0.07)),
        f_patch=Field(rng, size, d * 0.35),
        f_warp=Field(rng, size, d * 2.5),
        f_loose=Field(rng, size, d * 0.8),
        grain=Texture(rng, max(0.6, d * GRAIN)),
    )
    f_focus = Field(rng, size, d * 5.0)
    gain = float(np.exp(rng.normal(0.0, DAB_GAIN_SD)))
    tumour_fraction = float(rng.uniform(*TUMOUR_FRACTION_RANGE))
    focal = bool(rng.random() < FOCAL_RATE)
    lumen_ratio = float(rng.uniform(0.1, 0.4)) if rng.random() < 1.0 - NO_LUMEN_RATE else 0.0
    gain = gain if spec.dab_gain is None else float(spec.dab_gain)
    if spec.tumour_fraction is not None:
        tumour_fraction = float(spec.tumour_fraction)
    focal = focal if spec.focal is None else bool(spec.focal)
    lumen_w = d * (0.3 + 1.6 * lumen_ratio) if lumen_ratio > 0 else 0.0
    arch = Architecture(d, f_gland, f_sept, f_arch, f_big, f_low, 0.0, lumen_w)

    sy, sx = draw_seeds(size, d, rng)
    sy_f, sx_f = sy.ravel(), sx.ravel()
    c, r = outline.centre, outline.radius
    inside = (sy_f - c) ** 2 + (sx_f - c) ** 2 < r**2
    # The tumour band (epithelium E plus lumens L = lumen_ratio * E of the disk, with
    # E / (1 - L) = tumour fraction) is the top band_share of the seeds' band score.
    epi_share = tumour_fraction / (1.0 + lumen_ratio * tumour_fraction)
    arch.t_band = band_threshold(arch, sy_f, sx_f, inside, (1.0 + lumen_ratio) * epi_share)
    geom = arch.at(sy_f, sx_f)
    kind, columnar = assign_kinds(geom, d, rng)
    cells = draw_nuclei(sy, sx, kind, columnar, geom[4:6], d, atypia(bool(spec.status_cue)), rng)
    tumour = np.flatnonzero((kind == TUMOUR) & inside)
    staining = assign_staining(
        spec.ihc_score, tumour, f_focus.at(sy_f, sx_f), kind.size, gain, focal, d, rng
    )
    staining.cyto *= _blush_compensation(cells, d)
    background = BACKGROUND_DAB * float(np.exp(rng.normal(0.0, BACKGROUND_DAB_SD)))
    looseness = float(rng.uniform(*LOOSENESS_RANGE))
    draw_cuts(
        outline, d, rng, spec.partial, spec.tear, spec.fold
    )  # last: artefacts change no other draw
    return CorePlan(
        size,
        d,
        outline,
        arch,
        texture,
        cells,
        staining,
        gain,
        tumour_fraction,
        focal,
        background,
        looseness,
    )


def _blush_compensation(cells: Cells, d: float) -> np.ndarray:
    """Per-cell factor that keeps a cell's total cytoplasmic DAB independent of its nuclear size
    (the blush is weaker over the nucleus), so the status cue's larger nuclei cannot move
    max-mean-DAB."""
    k = 1.0 - NUCLEAR_BLUSH
    share = np.clip(np.pi * cells.na * cells.nb / (d * d), 0.0, 0.8)
    ref = np.pi * NUCLEUS_AXES[0] * NUCLEUS_AXES[1]
    return ((1.0 - k * ref) / (1.0 - k * share)).astype(np.float32)


def _compartments(p: CorePlan, y0: int, y1: int) -> dict[str, np.ndarray]:
    """Epithelium, lumen and stroma weights of rows y0..y1-1, the lining's geometry (for the
    membranes) and the stretch of the cell metric across the lining (columnar cells)."""
    f32, d, w = np.float32, np.float32(p.d), p.size
    s, hw, wl, sm, nrm_y, nrm_x = p.arch.rows(y0, y1, w)
    band = smoothstep(hw - s, -0.8, 0.8)
    has_lumen = smoothstep(wl, 0.0, 1.0)
    lum = smoothstep(wl - s, -0.8, 0.8) * has_lumen
    sep_gate = smoothstep(s - wl - f32(EPI_CELLS) * d, 0.0, 2.0)
    sep = smoothstep(f32(SEPTUM) * d - sm, -0.8, 0.8) * sep_gate
    lumen = band * lum
    epi = band * (1.0 - lum) * (1.0 - sep)
    colw = smoothstep(wl, 0.3 * d, 0.7 * d) * smoothstep(wl + 1.7 * d - s, 0.0, 0.5 * d)
    return {
        "epi": epi,
        "lumen": lumen,
        "stroma": 1.0 - epi - lumen,
        "lining": (s, hw, wl, sm, has_lumen, sep_gate),
        "normal": (nrm_y, nrm_x),
        "stretch": 1.0 + f32(COLUMNAR - 1.0) * colw,
    }


def render_strip(p: CorePlan, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Haematoxylin, DAB and extra (neutral) optical density of rows y0..y1-1."""
    w, d, f32 = p.size, p.d, np.float32
    yy = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    core, fold = outline_rows(p.outline, p.texture.f_rim, y0, y1, w)
    comp = _compartments(p, y0, y1)
    epi, lumen, stroma = comp["epi"], comp["lumen"], comp["stroma"]
    lab, md = voronoi_rows(p.cells, d, yy, xx, comp["normal"], comp["stretch"])
    mid = p.texture.f_mid.rows(y0, y1, w)
    fine = p.texture.f_fine.rows(y0, y1, w)
    grain = p.texture.grain.rows(y0, y1, w)
    low = p.arch.f_low.rows(y0, y1, w)
    nuc, nuc_h = nucleus_rows(p.cells, lab, yy, xx, d, mid, fine, grain)
    in_place = np.where(p.cells.kind[lab] == TUMOUR, epi, stroma)
    nuc *= in_place
    nuc_h *= in_place
    loose = smoothstep(p.texture.f_loose.rows(y0, y1, w) + f32(p.looseness), -0.2, 0.6)
    fibres = _fibres(p, yy, xx, y0, y1, mid, fine)
    stroma_h = (STROMA_H + 0.02 * low) * (0.5 + 0.7 * fibres + 0.1 * fine) * (1.0 - 0.85 * loose)
    mem = membrane_rows(md, p.staining.width[lab], comp["lining"], d) * epi
    cyto = epi * (1.0 - nuc)
    cyto_h = cyto * (CYTO_H + 0.015 * fine + 0.012 * grain + 0.01 * mid)
    h_conc = stroma * (1.0 - nuc) * stroma_h + cyto_h + MEMBRANE_H * mem + nuc_h
    h_conc += lumen * 0.006 * (1.0 + 0.3 * fine)
    blush_w = epi * (1.0 - f32(1.0 - NUCLEAR_BLUSH) * nuc)
    dab = _dab(p, y0, y1, lab, mem, blush_w, low, mid, fine, grain)
    tissue = epi + stroma * (1.0 - 0.8 * loose)
    dab += (
        p.background_dab * tissue * np.clip(1.0 + 0.8 * fine + 0.4 * grain + 0.4 * mid, 0.05, 3.0)
    )
    h_conc *= core
    dab *= core
    if fold is not None:
        h_conc *= 1.0 + fold
        dab *= 1.0 + fold
    extra = (0.004 * fine + core * (TISSUE_OD * tissue + 0.01)).astype(f32)
    return h_conc.astype(f32), dab.astype(f32), extra


def _dab(
    p: CorePlan,
    y0: int,
    y1: int,
    lab: np.ndarray,
    mem: np.ndarray,
    cyto: np.ndarray,
    low: np.ndarray,
    mid: np.ndarray,
    fine: np.ndarray,
    grain: np.ndarray,
) -> np.ndarray:
    """HER2 DAB of rows y0..y1-1: per-cell membrane staining (patchy where partial) plus a
    granular cytoplasmic blush, modulated by a regional field."""
    st = p.staining
    mem_dab = mem
    if p.any_partial:
        patchy = smoothstep(p.texture.f_patch.rows(y0, y1, p.size), 0.1, 0.5)
        mem_dab = mem * (1.0 - st.partial_mem[lab] * (1.0 - patchy))
    region = np.clip(1.0 + 0.35 * low, 0.4, 1.8)
    beads = np.clip(0.8 + 0.3 * mid, 0.3, 1.6)  # uneven intensity along a membrane
    blush = st.cyto[lab] * cyto * np.clip(0.8 + 0.35 * fine + 0.2 * grain, 0.1, 2.0)
    return region * (st.dab[lab] * mem_dab * beads + blush)


def _fibres(
    p: CorePlan, yy: np.ndarray, xx: np.ndarray, y0: int, y1: int, mid: np.ndarray, fine: np.ndarray
) -> np.ndarray:
    """Stroma fibres (0..1): thin wavy, broken, roughly parallel fibres."""
    ang = p.cells.fibre_angle
    ca, sa = np.float32(np.cos(ang)), np.float32(np.sin(ang))
    wavelength = np.float32(max(3.0, FIBRE_PERIOD * p.d))
    phase = (xx * -sa + yy * ca) * (np.float32(2 * np.pi) / wavelength)
    phase += np.float32(8.0) * p.texture.f_warp.rows(y0, y1, p.size) + np.float32(0.6) * mid
    return (0.5 + 0.5 * np.sin(phase)) ** 2 * np.clip(0.7 + 0.4 * fine, 0.0, 1.2)


def render_core(spec: CoreSpec, rng: np.random.Generator) -> np.ndarray:
    """Render one synthetic HER2 IHC core as a (size, size, 3) uint8 RGB image on glass."""
    p = plan_core(spec, rng)
    out = np.empty((p.size, p.size, 3), dtype=np.uint8)
    for y0 in range(0, p.size, STRIP_ROWS):
        y1 = min(p.size, y0 + STRIP_ROWS)
        h_conc, dab, extra = render_strip(p, y0, y1)
        out[y0:y1] = render_optical_density(h_conc, dab, spec.stains, extra_od=extra)
    if spec.blur_sigma > 0:
        for ch in range(3):
            out[..., ch] = ndimage.gaussian_filter(out[..., ch], sigma=float(spec.blur_sigma))
    return out
