"""Finding TMA cores on a slide thumbnail: tissue blobs, debris rejected, touching cores split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.morphology import disk
from skimage.segmentation import watershed

from her2_kedro.config.ingestion import DearrayConfig
from her2_kedro.imaging.pixels import BACKGROUND_GREY, grey

__all__ = ["CoreCandidates", "detect_cores"]


@dataclass
class CoreCandidates:
    """Blobs that may be cores (level-0 centroids and areas) plus the diameter used."""

    xy: np.ndarray  # (N, 2) level-0 (x, y)
    area: np.ndarray  # (N,) level-0 px^2
    diameter_px: float
    rejected: list[tuple[str, float, float]] = field(default_factory=list)
    # thumbnail-resolution mask of tissue down to faint, glass-like staining (pale cores,
    # lumens), used to confirm and centre cores on the fitted grid; None if not computed
    tissue: np.ndarray | None = None
    downsample: float = 1.0


def _estimate_diameter_thumb(areas: np.ndarray) -> float:
    """Robust core diameter (thumb px) from blob areas: area-weighted median, then refine."""
    a = np.sort(areas[areas >= 4].astype(np.float64))
    if a.size == 0:
        return 0.0
    cum = np.cumsum(a)
    a0 = a[min(int(np.searchsorted(cum, cum[-1] / 2.0)), a.size - 1)]
    plausible = a[(a >= 0.4 * a0) & (a <= 1.6 * a0)]
    if plausible.size == 0:
        plausible = np.array([a0])
    return float(np.median(2.0 * np.sqrt(plausible / math.pi)))


def _split_blob(crop: np.ndarray, d_t: float) -> list[np.ndarray]:
    """Split a blob mask into touching disks by distance-transform watershed."""
    dist = ndi.distance_transform_edt(crop)
    peaks = peak_local_max(
        dist,
        min_distance=max(1, int(round(0.6 * d_t))),
        threshold_abs=0.25 * d_t,
        labels=crop.astype(np.int32),
        exclude_border=False,
    )
    if len(peaks) < 2:
        return [crop]
    markers = np.zeros(crop.shape, dtype=np.int32)
    for k, (r, c) in enumerate(peaks, start=1):
        markers[r, c] = k
    ws = watershed(-dist, markers, mask=crop)
    return [ws == k for k in range(1, len(peaks) + 1) if np.any(ws == k)]


def _faint_tissue_mask(g: np.ndarray, background_grey: float, se: np.ndarray) -> np.ndarray:
    """Tissue down to just below the glass level: pale (score 0) stroma and lumens included.

    The glass level is the mode of the grey values brighter than ``background_grey`` and the
    threshold sits a few noise widths below it (never below ``background_grey``), so faint
    tissue that the fixed threshold misses still counts when a grid node is checked.
    """
    bright = g[g > background_grey]
    thr = float(background_grey)
    if bright.size >= 0.05 * g.size:
        hist, edges = np.histogram(bright, bins=np.arange(background_grey, 256.5, 0.5))
        glass = float(edges[int(np.argmax(hist))] + 0.25)
        upper = bright[bright >= glass]
        sigma = 1.4826 * float(np.median(upper - glass)) if upper.size else 0.0
        thr = max(thr, glass - max(4.0, 6.0 * sigma))
    tissue = g <= thr
    tissue = ndi.binary_opening(tissue, structure=se)
    tissue = ndi.binary_closing(tissue, structure=se, border_value=0)
    return ndi.binary_fill_holes(tissue)


def _component_areas(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    return np.bincount(lab.ravel(), minlength=n + 1)[1:]


def _merge_fragments(mask: np.ndarray, tissue: np.ndarray, core_area: float) -> np.ndarray:
    """Join the pieces of a core that lumens or pale stroma cut apart on the strict mask.

    A faint-tissue component about one core in size is one punch: its whole area becomes one
    blob. Larger components (touching cores, a blob beside a core) keep their strict pieces.
    """
    lab, n = ndi.label(tissue)
    if n == 0:
        return mask
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    one_core = (areas <= 1.3 * core_area) & (areas > 0)
    one_core[0] = False
    has_strict = np.bincount(lab[mask], minlength=n + 1) > 0
    return mask | (one_core & has_strict)[lab]


def detect_cores(
    thumb_rgb: np.ndarray,
    params: DearrayConfig,
    downsample: float,
    background_grey: float = BACKGROUND_GREY,
) -> CoreCandidates:
    """Find core-like blobs on a thumbnail: tissue mask, holes filled, touching cores split.

    Blobs smaller than ``min_area_fraction`` x the core area are rejected as debris.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    g = ndi.gaussian_filter(grey(thumb_rgb), sigma=1.0)
    mask = g <= background_grey
    d_t = params.core_diameter_px / downsample if params.core_diameter_px else None
    r = max(1, int(round(0.03 * d_t))) if d_t else 1
    se = disk(r)
    mask = ndi.binary_opening(mask, structure=se)
    mask = ndi.binary_closing(mask, structure=se, border_value=0)
    mask = ndi.binary_fill_holes(mask)
    tissue = _faint_tissue_mask(g, background_grey, se)
    if d_t is None:
        d_t = _estimate_diameter_thumb(_component_areas(tissue)) or None
    if d_t:
        mask = _merge_fragments(mask, tissue, math.pi / 4.0 * d_t * d_t)
    lab, n = ndi.label(mask)
    if n == 0:
        return CoreCandidates(
            np.zeros((0, 2)),
            np.zeros(0),
            float(params.core_diameter_px or 0.0),
            [],
            tissue,
            downsample,
        )
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    if d_t is None:
        d_t = _estimate_diameter_thumb(areas)
    core_area = math.pi / 4.0 * d_t * d_t
    slices = ndi.find_objects(lab)

    xy: list[tuple[float, float]] = []
    area_out: list[float] = []
    rejected: list[tuple[str, float, float]] = []

    def to_level0(rc: tuple[float, float]) -> tuple[float, float]:
        return ((rc[1] + 0.5) * downsample, (rc[0] + 0.5) * downsample)

    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        crop = lab[sl] == k
        a = float(areas[k - 1])
        pieces = [crop]
        if a > 1.3 * core_area:
            pieces = _split_blob(crop, d_t)
        for piece in pieces:
            pa = float(piece.sum())
            if pa == 0:
                continue
            rr, cc = np.nonzero(piece)
            rc = (rr.mean() + sl[0].start, cc.mean() + sl[1].start)
            x0, y0 = to_level0(rc)
            if pa < params.min_area_fraction * core_area:
                rejected.append(("debris", x0, y0))
                continue
            xy.append((x0, y0))
            area_out.append(pa * downsample * downsample)
    return CoreCandidates(
        np.asarray(xy, dtype=np.float64).reshape(-1, 2),
        np.asarray(area_out, dtype=np.float64),
        float(d_t * downsample),
        rejected,
        tissue,
        float(downsample),
    )
