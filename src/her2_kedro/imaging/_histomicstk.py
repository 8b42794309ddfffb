"""HistomicsTK, imported without its side effect on Pillow.

HistomicsTK and large_image set ``PIL.Image.MAX_IMAGE_PIXELS = None`` when imported, which turns
Pillow's decompression-bomb guard off for the whole process (ingestion included). Every project
module imports HistomicsTK through here, which puts the guard back.
"""

from PIL import Image

_PIL_LIMIT = Image.MAX_IMAGE_PIXELS

from histomicstk.preprocessing.color_conversion import rgb_to_sda  # noqa: E402
from histomicstk.preprocessing.color_deconvolution import (  # noqa: E402
    color_convolution,
    color_deconvolution,
    separate_stains_macenko_pca,
    stain_color_map,
)

Image.MAX_IMAGE_PIXELS = _PIL_LIMIT

__all__ = [
    "color_convolution",
    "color_deconvolution",
    "rgb_to_sda",
    "separate_stains_macenko_pca",
    "stain_color_map",
]
