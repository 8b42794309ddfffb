"""The embedding cache's steps as torch ops on a device: decode, tile rule, stain normalisation, forward.

:func:`~her2_kedro.modelling.embeddings.embed_core` does these steps with numpy on the CPU, and on
a GPU the CPU decode (about 0.4 s per 5468 px core) becomes the bottleneck. Here every step takes
``device`` and runs the same code on CPU and CUDA:

- :func:`decode_core`: JPEG with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on
  CPU, which gives Pillow's pixels exactly); PNG / TIFF through the project's CPU decoder.
- :func:`kept_tiles`: the tile grid and tissue rule of :mod:`her2_kedro.imaging.tiling` (exact
  integer grey test, strict ``> min_tissue``, partial edge tiles dropped, raster order), so the
  coordinates equal :func:`~her2_kedro.modelling.bags.bag_tiles` on the same pixels.
- :func:`normalise_tensor`: :func:`~her2_kedro.imaging.normalisation.normalise` (``fast`` method)
  with the same float32 look-up tables, sampled percentile pixels and rounding.
- :func:`cut_tiles` / :func:`tiles_to_input` / :func:`forward_tiles`: tiles cut, scaled to [0, 1]
  and resized like :func:`~her2_kedro.modelling.bags.tiles_to_tensor`, then the trunk in
  inference mode, channels-last, bf16 autocast on CUDA only.

Where results can differ from the numpy path: nvJPEG may decode some pixels a grey level or two
from libjpeg (a tile right at the tissue threshold can then flip); on CUDA, bf16 autocast, cuDNN
and the CUDA resize kernel move embeddings by about 1e-2 relative (bf16 keeps 8 mantissa bits;
``benchmarks/gpu_benchmark.py`` checks 5e-2). On CPU the pixels, coordinates, normalised pixels
and embeddings equal the numpy path's (tested: normalised pixels within one grey level, embeddings
within float32 round-off; in practice bit for bit).

:func:`embed_cores_on_device` runs many cores with the host work (reading bytes, decoding the next
group of JPEGs on a side CUDA stream) overlapped with the device work of the current core.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg

from her2_kedro.config.shared import TileConfig
from her2_kedro.features.preprocess import decode_rgb
from her2_kedro.imaging.normalisation import normalisation_matrix
from her2_kedro.imaging.pixels import (
    BACKGROUND_GREY,
    GREY_WEIGHTS,
    INT_GREY_WEIGHTS,
    int_threshold,
)
from her2_kedro.imaging.stain_vectors import (
    StainEstimationError,
    StainVectors,
    check_stain_vectors,
    estimate_stain_vectors,
)
from her2_kedro.imaging.tiling import as_rule, tile_origins
from her2_kedro.modelling.bags import EmptyBagError
from her2_kedro.modelling.core_images import CoreImageError
from her2_kedro.modelling.devices import autocast

__all__ = [
    "CoreImageError",
    "DeviceNormaliser",
    "EmptyBagError",
    "cohort_device_normaliser",
    "cut_tiles",
    "decode_core",
    "decode_cores",
    "embed_core_on_device",
    "embed_cores_on_device",
    "embed_decoded",
    "forward_tiles",
    "kept_tiles",
    "normalise_tensor",
    "prepare_trunk",
    "tile_counts",
    "tiles_to_input",
]

logger = logging.getLogger(__name__)

#: ``normaliser(rgb) -> rgb`` on a decoded core, uint8 (3, H, W) on its device.
DeviceNormaliser = Callable[[torch.Tensor], torch.Tensor]
Loader = Callable[[], bytes]
#: First bytes of every JPEG stream (SOI marker and the next marker's 0xFF).
JPEG_MAGIC = b"\xff\xd8\xff"
#: Levels of an 8-bit channel (look-up table length) and the value of white.
LEVELS = 256
WHITE = 255.0
#: Concentration percentiles at or below this leave a stain unscaled (as ``normalise``).
MIN_CONCENTRATION = 1e-6


# --------------------------------------------------------------------------- decoding


def _byte_tensor(data: bytes) -> torch.Tensor:
    """The bytes as a 1-d uint8 CPU tensor (a writable copy: torch refuses read-only buffers)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_on_cpu(data: bytes, device: torch.device) -> torch.Tensor:
    """PNG, TIFF and the rest through the project's decoder (Pillow), then moved to the device."""
    try:
        rgb = decode_rgb(data)
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise CoreImageError(
            f"cannot decode core image ({len(data)} bytes, not a JPEG): "
            f"Pillow: {type(exc).__name__}: {exc}"
        ) from exc
    if not rgb.flags.writeable:
        rgb = rgb.copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).to(device)


def decode_core(data: bytes, device: torch.device | str) -> torch.Tensor:
    """A core's pixels as uint8 (3, H, W) on ``device``: nvJPEG on CUDA, libjpeg-turbo on CPU.

    Non-JPEG bytes, and JPEGs torchvision cannot decode, go through
    :func:`~her2_kedro.features.preprocess.decode_rgb` (what the numpy path uses). Raises
    :class:`~her2_kedro.modelling.core_images.CoreImageError` naming the problem when the bytes
    are not a decodable image.
    """
    return decode_cores([data], device)[0]


def decode_cores(datas: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """:func:`decode_core` of several cores; their JPEGs in one batched call (nvJPEG's fast path).

    When the batch fails, its JPEGs are decoded one by one so that the error is the bad one's.
    """
    device = torch.device(device)
    jpeg = [i for i, d in enumerate(datas) if d[: len(JPEG_MAGIC)] == JPEG_MAGIC]
    out: list[torch.Tensor | None] = [None] * len(datas)
    if jpeg:
        try:
            decoded = _decode_jpegs([datas[i] for i in jpeg], device)
        except RuntimeError:
            decoded = [_decode_jpeg(datas[i], device) for i in jpeg]
        for i, image in zip(jpeg, decoded, strict=True):
            out[i] = image
    for i, data in enumerate(datas):
        if out[i] is None:
            out[i] = _decode_on_cpu(data, device)
    return out  # type: ignore[return-value]


def _decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """torchvision's decoder (one batched call on CUDA), RGB output; raises its RuntimeError."""
    tensors = [_byte_tensor(d) for d in datas]
    return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))


def _decode_jpeg(data: bytes, device: torch.device) -> torch.Tensor:
    """One JPEG; where torchvision fails, Pillow (what the numpy path uses) gets a second try."""
    try:
        return _decode_jpegs([data], device)[0]
    except RuntimeError as exc:
        first = f"torchvision: {exc}"
    try:
        return _decode_on_cpu(data, device)
    except CoreImageError as exc:
        pillow = str(exc).split(": ", 1)[1]
        raise CoreImageError(
            f"cannot decode core image ({len(data)} bytes, JPEG): {first}; {pillow}"
        ) from exc


# --------------------------------------------------------------------------- tile rule


def foreground_int(rgb: torch.Tensor, background_grey: float = BACKGROUND_GREY) -> torch.Tensor:
    """Tissue mask (H, W) by the exact integer grey rule of :mod:`her2_kedro.imaging.pixels`."""
    wr, wg, wb = INT_GREY_WEIGHTS
    r, g, b = (rgb[c].to(torch.int32) for c in range(3))
    return r * wr + g * wg + b * wb <= int_threshold(background_grey)


def foreground_float(rgb: torch.Tensor, background_grey: float = BACKGROUND_GREY) -> torch.Tensor:
    """Tissue mask (H, W) by the float32 grey rule (``pixels.foreground_mask``, which normalise
    uses); one product and sum per kernel, in numpy's order, so ties round as they do there."""
    w = [float(x) for x in GREY_WEIGHTS]
    r, g, b = (rgb[c].to(torch.float32) for c in range(3))
    return (r * w[0] + g * w[1]) + b * w[2] <= background_grey


def tile_counts(
    mask: torch.Tensor, tile_size: int, stride: int, offset: tuple[int, int]
) -> torch.Tensor:
    """Foreground pixels (ny, nx) int64 of every full tile of the grid from ``offset`` (x, y).

    Rows and columns follow :func:`~her2_kedro.imaging.tiling.tile_origins` (partial edge tiles
    dropped). A gap-free grid is one block reduction; any other stride reads an integral image.
    """
    ox, oy = offset
    m = mask[oy:, ox:]
    ny, nx = ((n - tile_size) // stride + 1 if n >= tile_size else 0 for n in m.shape)
    if ny == 0 or nx == 0:
        return torch.zeros((ny, nx), dtype=torch.int64, device=mask.device)
    if stride == tile_size:
        blocks = m[: ny * tile_size, : nx * tile_size].reshape(ny, tile_size, nx, tile_size)
        return blocks.sum(dim=(1, 3), dtype=torch.int64)
    integral = F.pad(m.to(torch.int64).cumsum(0).cumsum(1), (1, 0, 1, 0))
    y = torch.arange(ny, device=mask.device)[:, None] * stride
    x = torch.arange(nx, device=mask.device)[None, :] * stride
    s = tile_size
    return integral[y + s, x + s] - integral[y, x + s] - integral[y + s, x] + integral[y, x]


def _grid(
    rgb: torch.Tensor, mask: torch.Tensor, rule: TileConfig, offset: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Origins (n, 2) of the grid at ``offset`` and the tissue fraction (float64) of each."""
    rule = as_rule(rule, offset)
    origins = tile_origins(int(rgb.shape[1]), int(rgb.shape[2]), rule)
    counts = tile_counts(mask, rule.tile_size, rule.stride, rule.offset).cpu().numpy()
    return origins, counts.ravel() / float(rule.tile_size * rule.tile_size)


def kept_tiles(
    rgb: torch.Tensor,
    core_id: str,
    rule: TileConfig,
    offset: tuple[int, int] = (0, 0),
    mask: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``coords`` int64 (N, 2) (x, y) and tissue fractions of the kept tiles, as ``bag_tiles``.

    Same grid, order, fallback to the (0, 0) grid when ``offset`` keeps nothing, and the same
    :class:`~her2_kedro.modelling.bags.EmptyBagError` when no tile has tissue > ``min_tissue``.
    ``mask`` (the integer-rule foreground mask, when the caller has it) avoids recomputing it.
    """
    _check_image(rgb)
    if mask is None:
        mask = foreground_int(rgb, rule.background_grey)
    offsets = [tuple(offset)] + ([(0, 0)] if tuple(offset) != (0, 0) else [])
    for grid_offset in offsets:
        origins, fractions = _grid(rgb, mask, rule, grid_offset)
        keep = fractions > rule.min_tissue
        if keep.any():
            return origins[keep].astype(np.int64), fractions[keep]
    raise EmptyBagError(
        f"core {core_id!r} has no tile with tissue fraction > {rule.min_tissue} "
        f"({rule.tile_size} px tiles, background grey > {rule.background_grey}): no bag"
    )


def _check_image(rgb: torch.Tensor) -> None:
    if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype != torch.uint8:
        raise ValueError(
            f"expected a uint8 RGB tensor of shape (3, H, W), got {rgb.dtype} {tuple(rgb.shape)}"
        )


# --------------------------------------------------------------------------- stain normalisation


def _sda_lut() -> np.ndarray:
    """HistomicsTK SDA (``I_0=None``) of each uint8 value, float64 (as ``normalisation`` has it)."""
    v = np.arange(LEVELS, dtype=np.float64)
    return -np.log((v + 1.0) / LEVELS) * WHITE / np.log(LEVELS)


def _percentile(values: torch.Tensor, q: float) -> float:
    """numpy's default (``linear``) percentile ``q`` (0-100) of a 1-d tensor, numpy's arithmetic;
    two order statistics by selection (``kthvalue``), not a full sort."""
    n = len(values)
    position = (n - 1) * (q / 100.0)
    lo = int(np.floor(position))
    t = position - lo
    a = float(torch.kthvalue(values, lo + 1).values)
    b = float(torch.kthvalue(values, min(lo + 2, n)).values)
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def _percentile_pixels(rgb: torch.Tensor, mask: torch.Tensor, max_pixels: int, seed: int):
    """Foreground pixels (N, 3) for the concentration percentiles, sampled as ``normalise`` does
    (at most ``max_pixels``, drawn with numpy's generator seeded by ``seed``)."""
    px = rgb.permute(1, 2, 0)[mask]  # raster order, like rgb[mask] in numpy
    if len(px) > max_pixels:
        index = np.random.default_rng(seed).integers(0, len(px), size=max_pixels)
        px = px[torch.from_numpy(index).to(px.device)]
    return px


def _stain_scale(
    rgb: torch.Tensor,
    mask: torch.Tensor,
    source: StainVectors,
    target: StainVectors,
    match_haematoxylin: bool,
    match_dab: bool,
    max_pixels: int,
    seed: int,
) -> np.ndarray:
    """Per-stain factors bringing the core's concentration percentiles to the target's
    (``normalisation._stain_scale``, its pixels and percentiles computed on the device)."""
    scale = np.ones(3)
    if target.max_concentrations is None or not (match_haematoxylin or match_dab):
        return scale
    px = _percentile_pixels(rgb, mask, max_pixels, seed)
    lut = torch.from_numpy(_sda_lut()).to(px.device)
    sda = lut[px.long()].T  # (3, N) float64
    pinv = torch.from_numpy(np.linalg.pinv(source.matrix())).to(px.device)
    conc = pinv @ sda
    src_h = _percentile(conc[0], target.percentile)
    src_d = _percentile(conc[2], target.percentile)
    tgt_h, tgt_d = target.max_concentrations
    if match_haematoxylin and src_h > MIN_CONCENTRATION:
        scale[0] = tgt_h / src_h
    if match_dab and src_d > MIN_CONCENTRATION:
        scale[2] = tgt_d / src_d
    return scale


def normalisation_tables(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 look-up tables of the back-conversion: ``rg`` (65536, 3) by ``r | g << 8`` and
    ``b`` (256, 3), whose product is 256 exp(-k m sda) per output channel (as ``normalise``)."""
    k = np.log(LEVELS) / WHITE
    tables = np.exp(-k * _sda_lut()[None, :, None] * matrix.T[:, None, :])
    tables[0] *= LEVELS
    rg = tables[1][:, None, :] * tables[0][None, :, :]
    return rg.reshape(LEVELS * LEVELS, 3).astype(np.float32), tables[2].astype(np.float32)


def apply_tables(rgb: torch.Tensor, rg: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) of ``rg[r | g << 8] * b[b] - 0.5`` clipped and truncated (numpy's rounding)."""
    index = rgb[0].to(torch.int32) | (rgb[1].to(torch.int32) << 8)
    value = rg[index] * b[rgb[2].to(torch.int32)]  # (H, W, 3) float32
    value -= 0.5  # -1 from the SDA definition, +0.5 so that truncation rounds
    return value.clamp_(0.0, WHITE).to(torch.uint8).permute(2, 0, 1)


def normalise_tensor(
    rgb: torch.Tensor,
    source: StainVectors | None,
    target: StainVectors,
    background_grey: float = BACKGROUND_GREY,
    *,
    match_haematoxylin: bool = True,
    match_dab: bool = False,
    dab_scale: float = 1.0,
    max_percentile_pixels: int = 500_000,
    seed: int = 0,
) -> torch.Tensor:
    """:func:`~her2_kedro.imaging.normalisation.normalise` (``method="fast"``) of a uint8
    (3, H, W) tensor on its device; same parameters, background pixels unchanged.

    ``source=None`` estimates the core's own Macenko vectors on the host (numpy, as there).
    """
    _check_image(rgb)
    mask = foreground_float(rgb, background_grey)
    if not bool(mask.any()):
        return rgb.clone()
    if source is None:
        host = rgb.permute(1, 2, 0).cpu().numpy()
        source, _ = check_stain_vectors(estimate_stain_vectors(host, background_grey))
    scale = _stain_scale(
        rgb,
        mask,
        source,
        target,
        match_haematoxylin,
        match_dab,
        max_percentile_pixels,
        seed,
    )
    scale[2] *= float(dab_scale)
    rg, b = (
        torch.from_numpy(t).to(rgb.device)
        for t in normalisation_tables(normalisation_matrix(source, target, scale))
    )
    return torch.where(mask, apply_tables(rgb, rg, b), rgb)


def cohort_device_normaliser(
    reference: Mapping[str, Any] | None,
    cohorts: Iterable[str],
    background_grey: float = BACKGROUND_GREY,
) -> Callable[[Mapping[str, Any], torch.Tensor], torch.Tensor] | None:
    """``transform(row, rgb)`` on tensors, as
    :func:`~her2_kedro.imaging.normalisation.cohort_normaliser` on arrays (None when unneeded).

    Cores of ``cohorts`` are normalised with their cohort's pooled source vectors (or their own)
    and DAB factor; others, and cores whose stains cannot be estimated, pass unchanged.
    """
    cohorts = set(cohorts)
    if not cohorts or not reference or not reference.get("vectors"):
        return None
    target = StainVectors.from_dict(reference["vectors"])
    entries = (reference.get("sources") or {}).items()
    sources = {c: StainVectors.from_dict(e["vectors"]) for c, e in entries if e.get("vectors")}
    dab_scales = {c: float(e.get("dab_scale", 1.0)) for c, e in entries}

    def transform(row: Mapping[str, Any], rgb: torch.Tensor) -> torch.Tensor:
        cohort = row.get("cohort")
        if cohort not in cohorts:
            return rgb
        try:
            return normalise_tensor(
                rgb,
                sources.get(cohort),
                target,
                background_grey,
                dab_scale=dab_scales.get(cohort, 1.0),
            )
        except StainEstimationError as err:  # preprocessing reported the same core unnormalised
            logger.warning("Core %s left unnormalised: %s", row.get("core_id"), err)
            return rgb

    return transform


# --------------------------------------------------------------------------- tiles and trunk


def cut_tiles(rgb: torch.Tensor, coords: np.ndarray, tile_size: int) -> torch.Tensor:
    """uint8 tiles (N, 3, s, s) at ``coords`` (x, y), one gather; laid out (N, s, s, 3) in
    memory (channels-last), as ``tiles_to_tensor`` stacks them from the numpy image."""
    hwc = rgb.permute(1, 2, 0)
    xy = torch.tensor(np.asarray(coords, dtype=np.int64), device=rgb.device)
    step = torch.arange(tile_size, device=rgb.device)
    rows = (xy[:, 1, None] + step)[:, :, None]  # (N, s, 1)
    cols = (xy[:, 0, None] + step)[:, None, :]  # (N, 1, s)
    return hwc[rows, cols].permute(0, 3, 1, 2)


def tiles_to_input(tiles: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """float tiles in [0, 1] resized to ``input_size`` (torch bilinear, antialiased, clamped),
    the scaling and resize of :func:`~her2_kedro.modelling.bags.tiles_to_tensor`."""
    x = tiles.float().div_(WHITE)
    side = tiles.shape[-1] if input_size is None else int(input_size)
    if side != tiles.shape[-1]:
        x = F.interpolate(
            x, size=(side, side), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    return x


def forward_tiles(
    trunk: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    *,
    bf16: bool = True,
    channels_last: bool = True,
) -> torch.Tensor:
    """Features (N, D) float32 on the device: inference mode, bf16 autocast on CUDA only."""
    with torch.inference_mode(), autocast(device, bf16):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return trunk(x).flatten(1).float()


def prepare_trunk(
    trunk: nn.Module,
    device: torch.device | str,
    *,
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """The trunk on ``device`` in eval mode (channels-last weights), ``torch.compile``d if asked.

    Compile once and reuse; with ``compile`` pass ``pad_batches=True`` to the embedding calls so
    every batch has one shape (no recompilation for a core's last, shorter batch).
    """
    trunk = trunk.to(torch.device(device)).eval()
    if channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    return torch.compile(trunk) if compile else trunk


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with zero tiles appended up to ``size`` rows (a fixed shape for a compiled trunk)."""
    if len(x) >= size:
        return x
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


def embed_decoded(
    trunk: nn.Module,
    rgb: torch.Tensor,
    core_id: str,
    rule: TileConfig,
    input_size: int | None,
    *,
    normaliser: DeviceNormaliser | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = True,
    channels_last: bool = True,
    pad_batches: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """Embeddings (N, D) float32 (left on the device) and coords of a decoded core's eval bag.

    As ``embed_cores`` does with numpy: the core is normalised first (``normaliser``), then its
    tiles are kept by the tissue rule on those pixels (grid at (0, 0)), cut, resized and embedded
    ``batch_size`` at a time; ``pad_batches`` pads the last batch to ``batch_size`` (zero tiles,
    dropped again) so a compiled trunk sees one shape.
    """
    device = torch.device(device)
    if normaliser is not None:
        rgb = normaliser(rgb)
    coords, _ = kept_tiles(rgb, core_id, rule)
    trunk.eval()
    parts = []
    for start in range(0, len(coords), batch_size):
        chunk = coords[start : start + batch_size]
        x = tiles_to_input(cut_tiles(rgb, chunk, rule.tile_size), input_size)
        if pad_batches:
            x = _padded(x, batch_size)
        features = forward_tiles(trunk, x, device, bf16=bf16, channels_last=channels_last)
        parts.append(features[: len(chunk)])
    return torch.cat(parts), coords


def _entry(embeddings: torch.Tensor, coords: np.ndarray) -> dict[str, np.ndarray]:
    """The cache entry on the host."""
    return {"embeddings": embeddings.cpu().numpy(), "coords": coords}


def embed_core_on_device(
    trunk: nn.Module,
    data: bytes,
    core_id: str,
    rule: TileConfig,
    input_size: int | None,
    *,
    normaliser: DeviceNormaliser | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = True,
    channels_last: bool = True,
    pad_batches: bool = False,
) -> dict[str, np.ndarray]:
    """A core's cache entry from its bytes, every step on ``device``: what
    :func:`~her2_kedro.modelling.embeddings.embed_core` gives for the decoded, normalised core.

    ``{"embeddings": (N, D) float32, "coords": (N, 2) int64}`` on the host. ``trunk`` must be on
    ``device`` (see :func:`prepare_trunk`). Raises ``EmptyBagError`` for a core without a tissue
    tile and ``CoreImageError`` for bytes that are not an image, each naming the core.
    """
    device = torch.device(device)
    try:
        rgb = decode_core(data, device)
    except CoreImageError as err:
        raise CoreImageError(f"core {core_id!r}: {err}") from err
    embeddings, coords = embed_decoded(
        trunk,
        rgb,
        core_id,
        rule,
        input_size,
        normaliser=normaliser,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
        channels_last=channels_last,
        pad_batches=pad_batches,
    )
    return _entry(embeddings, coords)


# --------------------------------------------------------------------------- many cores


def _read_ahead(
    cores: Iterable[tuple[str, Loader]], pool: ThreadPoolExecutor, ahead: int
) -> Iterator[tuple[str, bytes]]:
    """``(core_id, bytes)`` in order, the loaders run on ``pool`` up to ``ahead`` cores ahead."""
    pending: deque[tuple[str, Future]] = deque()
    for core_id, loader in cores:
        pending.append((core_id, pool.submit(loader)))
        if len(pending) > ahead:
            core, future = pending.popleft()
            yield core, future.result()
    while pending:
        core, future = pending.popleft()
        yield core, future.result()


def _groups(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _decode_group(group: list[tuple[str, bytes]], device: torch.device, stream):
    """Decode a group (on ``stream`` when given): ids, images and the event marking the end."""
    ids = [core_id for core_id, _ in group]
    datas = [data for _, data in group]

    def decode() -> list[torch.Tensor]:
        try:
            return decode_cores(datas, device)
        except CoreImageError:  # name the core: decode one by one
            images = []
            for core_id, data in group:
                try:
                    images.append(decode_core(data, device))
                except CoreImageError as err:
                    raise CoreImageError(f"core {core_id!r}: {err}") from err
            return images

    if stream is None:
        return ids, decode(), None
    with torch.cuda.stream(stream):
        images = decode()
        event = torch.cuda.Event()
        event.record(stream)
    return ids, images, event


def _decoded(
    groups: Iterable[list[tuple[str, bytes]]], device: torch.device, pool: ThreadPoolExecutor
) -> Iterator[tuple[str, torch.Tensor]]:
    """Decoded cores in order. On CUDA each group is decoded on ``pool`` and a side stream while
    the group before is processed; on CPU in this thread (torch's threads already use the cores)."""
    if device.type != "cuda":
        for group in groups:
            yield from _ready(_decode_group(group, device, None), device)
        return
    stream = torch.cuda.Stream(device)
    future = None
    for group in groups:
        nxt = pool.submit(_decode_group, group, device, stream)
        if future is not None:
            yield from _ready(future.result(), device)
        future = nxt
    if future is not None:
        yield from _ready(future.result(), device)


def _ready(decoded, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The group's images, usable on the current stream (it waits for the decode's event)."""
    ids, images, event = decoded
    if event is not None:
        current = torch.cuda.current_stream(device)
        current.wait_event(event)
        for image in images:
            image.record_stream(current)  # its memory is not reused before this stream is done
    yield from zip(ids, images, strict=True)


class _HostCopy:
    """A core's embeddings on their way to the host: an asynchronous copy (pinned memory on
    CUDA) and the event that marks its end, so the next core's work is queued meanwhile."""

    def __init__(self, core_id: str, embeddings: torch.Tensor, coords: np.ndarray) -> None:
        self.core_id, self.coords = core_id, coords
        self.host = embeddings.to("cpu", non_blocking=True)
        self.event = None
        if embeddings.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(embeddings.device))

    def result(self) -> tuple[str, dict[str, np.ndarray]]:
        if self.event is not None:
            self.event.synchronize()
        return self.core_id, {"embeddings": self.host.numpy(), "coords": self.coords}


def embed_cores_on_device(
    trunk: nn.Module,
    cores: Iterable[tuple[str, Loader]],
    rule: TileConfig,
    input_size: int | None,
    *,
    normalisers: Mapping[str, DeviceNormaliser] | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = True,
    channels_last: bool = True,
    pad_batches: bool = False,
    decode_batch: int = 8,
    read_workers: int = 4,
    read_ahead: int = 16,
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(core_id, cache entry)`` for each ``(core_id, loader)``, in order, as
    :func:`embed_core_on_device` gives them, with the host work overlapped.

    ``read_workers`` threads read bytes up to ``read_ahead`` cores ahead; JPEGs are decoded
    ``decode_batch`` at a time (one batched nvJPEG call) on a side thread and CUDA stream while
    the group before is normalised (``normalisers[core_id]`` where given), tiled and embedded;
    each core's embeddings are copied to the host while the next core is queued.
    """
    device = torch.device(device)
    normalisers = normalisers or {}
    with (
        ThreadPoolExecutor(max(1, read_workers), thread_name_prefix="read") as readers,
        ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder,
    ):
        groups = _groups(_read_ahead(cores, readers, max(1, read_ahead)), max(1, decode_batch))
        pending: _HostCopy | None = None
        for core_id, rgb in _decoded(groups, device, decoder):
            embeddings, coords = embed_decoded(
                trunk,
                rgb,
                core_id,
                rule,
                input_size,
                normaliser=normalisers.get(core_id),
                batch_size=batch_size,
                device=device,
                bf16=bf16,
                channels_last=channels_last,
                pad_batches=pad_batches,
            )
            if pending is not None:
                yield pending.result()
            pending = _HostCopy(core_id, embeddings, coords)
        if pending is not None:
            yield pending.result()
