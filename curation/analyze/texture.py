"""Flatness and entropy exactly as the UltraFlux paper defines them."""

from __future__ import annotations

import math

import cv2
import numpy as np

_SQRT2 = math.sqrt(2.0)


def _patch_is_flat(px: np.ndarray, py: np.ndarray, flat_variance: float) -> bool:
    """Whether the variance of ``sqrt(px² + py²)`` is below ``flat_variance``.

    ``px``/``py`` are one patch's int16 Sobel derivatives. The variance is
    ``E[m²] − E[m]²``; ``E[m²]`` is exact from integer sums, and ``E[m]`` is first bracketed
    without a square root (``max(|x|,|y|) ≤ m ≤ max + (√2−1)·min`` and
    ``(|x|+|y|)/√2 ≤ m ≤ |x|+|y|``, with ``max(|x|,|y|) = (|x+y| + |x−y|) / 2``). Only a patch
    whose bracket straddles the threshold gets the float64 magnitude. The result is the same as
    computing the variance in float64 for every patch, at a fraction of the cost.
    """
    n = float(px.size)
    e2 = (cv2.norm(px, cv2.NORM_L2SQR) + cv2.norm(py, cv2.NORM_L2SQR)) / n  # exact: integer sums
    margin = 1e-9 * max(1.0, e2)
    if e2 < flat_variance - margin:  # var ≤ E[m²]
        return True
    l1 = (cv2.norm(px, cv2.NORM_L1) + cv2.norm(py, cv2.NORM_L1)) / n
    lo, hi = l1 / _SQRT2, min(l1, math.sqrt(e2))  # bracket of E[m]
    for tighter in (False, True):
        if tighter:  # not decided yet: bracket by max(|x|,|y|) too
            mx = (cv2.norm(cv2.add(px, py), cv2.NORM_L1)
                  + cv2.norm(cv2.subtract(px, py), cv2.NORM_L1)) / (2.0 * n)
            lo, hi = max(lo, mx), min(hi, mx + (_SQRT2 - 1.0) * (l1 - mx))
        if e2 - lo * lo < flat_variance - margin:  # even the largest variance is flat
            return True
        if e2 - hi * hi >= flat_variance + margin:  # even the smallest is not
            return False
    m = cv2.magnitude(px.astype(np.float64), py.astype(np.float64))
    return float((m * m).mean() - m.mean() ** 2) < flat_variance


def flat_fraction(gray: np.ndarray, *, patch: int = 240, flat_variance: float = 800.0) -> float:
    """Fraction of flat patches (paper §MultiAspect-4K-1M, low-level filter).

    The 8-bit grayscale image is cut into non-overlapping `patch`×`patch` patches (a partial
    border strip is ignored). Per patch, the variance of the 3×3 Sobel gradient magnitude
    is computed; a patch is flat when that variance is below `flat_variance`. The derivatives
    are those of the whole image (reflected only at the image's own border), and each patch's
    decision equals a float64 computation of its variance (see `_patch_is_flat`).

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
    height, full_width = gray.shape
    flat = 0
    # One patch row at a time keeps the int16 derivatives in cache; one pixel of context on
    # every side that has one keeps them identical to a whole-image Sobel.
    for r in range(rows):
        y0 = r * patch
        a, b = max(0, y0 - 1), min(height, y0 + patch + 1)
        strip = gray[a:b, : min(full_width, cols * patch + 1)]
        dx, dy = cv2.spatialGradient(strip)  # 3×3 Sobel, int16, one pass
        dx, dy = dx[y0 - a : y0 - a + patch], dy[y0 - a : y0 - a + patch]
        for c in range(cols):
            x = slice(c * patch, (c + 1) * patch)
            flat += _patch_is_flat(dx[:, x], dy[:, x], flat_variance)
    return flat / (rows * cols)


def gray_entropy(gray: np.ndarray) -> float:
    """Shannon entropy (bits) of the 256-bin histogram of an 8-bit grayscale image."""
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel()
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: one grey level is 0.0 bits, not -0.0
