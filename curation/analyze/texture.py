"""Flatness and entropy exactly as the UltraFlux paper defines them."""

from __future__ import annotations

import cv2
import numpy as np


def flat_fraction(gray: np.ndarray, *, patch: int = 240, flat_variance: float = 800.0) -> float:
    """Fraction of flat patches (paper §MultiAspect-4K-1M, low-level filter).

    The 8-bit grayscale image is cut into non-overlapping `patch`×`patch` patches (a partial
    border strip is ignored). Per patch, the variance of the 3×3 Sobel gradient magnitude
    is computed; a patch is flat when that variance is below `flat_variance`.

    Args:
        gray: 2-D uint8 image.
        patch: patch side in pixels (paper: 240).
        flat_variance: flatness threshold on the variance (paper: 800).

    Returns:
        Flat patches / all patches, in [0, 1]; 1.0 for an image smaller than one patch.
    """
    rows, cols = gray.shape[0] // patch, gray.shape[1] // patch
    if rows == 0 or cols == 0:
        return 1.0
    height, width = gray.shape[0], cols * patch
    n = float(patch * patch)
    var = np.empty((rows, cols))
    # One patch row at a time keeps the float buffers in cache (a 4K frame of float32 gradients
    # is 33 MB); one pixel of context above and below keeps the Sobel identical to a full pass.
    for r in range(rows):
        y0 = r * patch
        a, b = max(0, y0 - 1), min(height, y0 + patch + 1)
        strip = gray[a:b, :width]
        dx = cv2.Sobel(strip, cv2.CV_32F, 1, 0, ksize=3)[y0 - a : y0 - a + patch]
        dy = cv2.Sobel(strip, cv2.CV_32F, 0, 1, ksize=3)[y0 - a : y0 - a + patch]
        mag_sq = cv2.add(cv2.multiply(dx, dx), cv2.multiply(dy, dy))
        mag = cv2.sqrt(mag_sq)
        # Column sums over the strip (one SIMD pass), then sums over each patch's columns.
        sum_sq = cv2.reduce(mag_sq, 0, cv2.REDUCE_SUM, dtype=cv2.CV_64F).reshape(cols, patch)
        sum_m = cv2.reduce(mag, 0, cv2.REDUCE_SUM, dtype=cv2.CV_64F).reshape(cols, patch)
        sum_sq, sum_m = sum_sq.sum(axis=1), sum_m.sum(axis=1)
        var[r] = sum_sq / n - (sum_m / n) ** 2
    return float(np.count_nonzero(var < flat_variance)) / var.size


def gray_entropy(gray: np.ndarray) -> float:
    """Shannon entropy (bits) of the 256-bin histogram of an 8-bit grayscale image."""
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel()
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())
