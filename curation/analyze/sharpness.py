"""A focus measure that keeps sharp subjects on soft backgrounds and rejects global blur.

Method: the image is cut into a grid of about 16×9 tiles (the grid follows the image's aspect
ratio, so tiles scale with the image). From the centre of each tile a square patch is taken and
the root-mean-square of its pixel-to-pixel differences is compared with that of the same patch
averaged over 4×4 blocks (differences between neighbouring blocks, divided by 4 to put them on a
per-pixel scale). The ratio is contrast-normalised: a smooth ramp (any blurred content) gives 1,
an isolated sharp edge 2, pure noise 16; the score is its base-2 logarithm (0, 1, 4). Patches
with little structure at the 4-pixel scale (sky, bokeh; below a quarter of the most structured
patch) are left out. The score is a high percentile of the remaining patches, so a sharp
subject covering a tenth of the frame is enough.

The measure works on pixel scale, which is what "sharp at this resolution" means; the tile grid
is relative to the image size, so 2560-px and 3840-px images are treated alike. Calibration on
Debian's wallpaper photographs: see ``bench/calibrate_native.py`` and
``docs/native-detection.md``.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_SHARPNESS_THRESHOLD: float = 0.5
"""Images with ``sharpness_score(...) < DEFAULT_SHARPNESS_THRESHOLD`` are rejected as ``blurry``."""

_GRID_LONG = 16  # tiles along the longer side
_PATCH = 64  # patch side in pixels (a multiple of 4), or the tile side if smaller
_MIN_CONTRAST = 0.5  # rms per-pixel difference (gray levels) at the 4-px scale to count a patch
_RELATIVE_CONTRAST = 0.25  # ... and at least this fraction of the most structured patch's
_PERCENTILE = 90.0


def _patches(gray: np.ndarray) -> np.ndarray:
    """Centre patches of a tile grid, stacked as ``(num_tiles, side, side)`` float32."""
    h, w = gray.shape
    grid = max(1, min(_GRID_LONG, max(h, w) // 32))  # small images: fewer, 32-px tiles
    if w >= h:
        nx = grid
        ny = max(1, round(grid * h / w))
    else:
        ny = grid
        nx = max(1, round(grid * w / h))
    tile = min(h // ny, w // nx)
    side = min(_PATCH, tile) // 4 * 4
    if side < 8:
        raise ValueError(f"image too small for the sharpness grid: {gray.shape}")
    ys = (np.arange(ny) * h) // ny + (h // ny - side) // 2
    xs = (np.arange(nx) * w) // nx + (w // nx - side) // 2
    out = np.empty((ny * nx, side, side), np.float32)
    k = 0
    for y in ys:
        for x in xs:
            out[k] = gray[y : y + side, x : x + side]
            k += 1
    return out


def _rms_differences(p: np.ndarray) -> np.ndarray:
    """Per-patch rms of horizontal and vertical neighbour differences."""
    dx = p[:, :, 1:] - p[:, :, :-1]
    dy = p[:, 1:] - p[:, :-1]
    sx = np.einsum("ijk,ijk->i", dx, dx) / dx[0].size
    sy = np.einsum("ijk,ijk->i", dy, dy) / dy[0].size
    return np.sqrt((sx + sy) / 2)


def _block_means(p: np.ndarray) -> np.ndarray:
    """Means of the 4×4 blocks of each patch (``side`` is a multiple of 4).

    The patches are stacked into one tall image for one `INTER_AREA` reduction by exactly 4,
    which averages each block (blocks never straddle two patches).
    """
    n, side, _ = p.shape
    stacked = p.reshape(n * side, side)
    small = cv2.resize(stacked, (side // 4, n * side // 4), interpolation=cv2.INTER_AREA)
    return small.reshape(n, side // 4, side // 4)


def sharpness_score(gray: np.ndarray) -> float:
    """Contrast-normalised fine-detail measure of a grayscale image (higher = sharper).

    Args:
        gray: 2-D ``uint8`` array, full resolution.

    Returns:
        ``log2`` of the 90th percentile over structured tiles of ``rms(1-px differences) /
        rms(4-px differences)`` (per pixel): near 0 for blurred content, 0.3–3 for sharp
        photographs. ``0.0`` when no tile has structure (a flat image).

    Raises:
        ValueError: If ``gray`` is not a 2-D uint8 array large enough for the tile grid.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {gray.dtype} {gray.shape}")
    p = _patches(gray)
    coarse = _block_means(p)
    fine_rms = _rms_differences(p)
    coarse_rms = _rms_differences(coarse) / 4.0
    structured = coarse_rms >= max(_MIN_CONTRAST, _RELATIVE_CONTRAST * float(coarse_rms.max()))
    if not structured.any():
        return 0.0
    ratio = fine_rms[structured] / coarse_rms[structured]
    return float(np.log2(np.percentile(ratio, _PERCENTILE)))
