"""Resampling evidence from cyclic spectral coherence (used by `curation.analyze.native`).

Resampling a row by a factor ``f`` makes its spectrum ``X(v) = H(v) S(f v)`` with ``S`` periodic
of period ``1/f``, so ``X(v)`` and ``X(α − v)`` are copies of the same source component for the
cyclic frequency ``α = 1/f`` (and its harmonics ``k/f mod 1``). The product ``X(v) X(α − v)``
then has the same phase, set by the global resampling grid, in every row; in a native
(stationary) image it is a random-phase term that averages out (Gardner's spectral
correlation; Vázquez-Padín & Pérez-González on resampling forensics).

Per axis, up to ``_ROWS`` rows (columns) spread over the textured bands the caller chose (the
same bands as the profile tests in `curation.analyze.native`, whose window also bounds the
length) are differentiated (whitening), Hann-windowed and transformed; each frequency is
divided by its row-averaged magnitude. For every ``α`` in
``[0.28, 0.90]`` cycles/px, ``C(α) = Σ_rows Σ_v X(v) X(α − v)`` over pairs ``v`` within ``±0.03``
of ``α/2`` (one small FFT autoconvolution per frequency band, summed over rows before the
inverse transform, so the sum stays phase-coherent) is normalised as a Rayleigh statistic
``z(α) = |C(α)| / sqrt(Σ_rows e_row² · pairs(α))`` (about 1 for random phases). One factor
scales both axes, so the two axes' ``z`` are combined with ``min`` (within a bin).

Three statistics come out:

* **harmonic sum**: for each candidate fundamental ``α1 ∈ [0.30, 0.88]`` (``f`` ≈ 1.14–3.3;
  above 0.81 the sum is divided by ``_MILD_WEIGHT``, since natives reach higher sums there;
  only those candidates count terms above 0.84),
  ``z`` at ``k α1 mod 1``, ``k = 1..4``, summed, skipping ±0.002 around multiples of 1/8 (the
  JPEG block grid is cyclostationary there too; 0.002 is the width a grid line keeps after the
  window's main lobe and the axes' matching tolerance, so factors just off 4/3, 8/5 or 2 stay
  visible). JPEG at q90 wipes out the fundamental's coherence near the source Nyquist for small
  factors; the harmonics' pairs sit lower in frequency and survive.
* **grid values**: ``z`` at ``α = 3/8, 1/2, 5/8, 3/4`` (factors 8/3, 2, 8/5, 4/3), which a JPEG
  grid also produces, so they get their own thresholds (in `curation.analyze.native`).

* **Bayer lattice**: ``C(1/2)`` again, from a band of pairs centred on ``α/2 = 1/4``, with
  each row's term signed by the parity of its index. A camera's demosaicing interpolates, at
  every pixel, the colours its filter did not capture: a pattern that repeats every 2 px and,
  in its checkerboard part, flips between even and odd rows (columns). A resampling grid gives
  every row the same phase, so this sum cancels for it; any resampling also moves the lattice
  off the 2-px grid (an enlargement by ``f`` puts it at ``2 f`` px). A large value says the
  pixels are still at the sensor's resolution (`curation.analyze.native` keeps such images).

About 14 ms for a 2561×1601 window on one core (512 rows per axis: a coherent trace's ``z``
grows with the square root of the rows; 256 rows gave about 2 points less recall).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import scipy.fft as sf

GRID: tuple[float, ...] = (0.375, 0.5, 0.625, 0.75)
"""Cyclic frequencies on the JPEG block grid whose ``z`` is reported apart."""
JPEG_LINES: tuple[float, ...] = (0.25, *GRID, 0.875)
"""Cyclic frequencies of an 8-px block grid (``k/8``) in the scanned range."""
VP8_LINES: tuple[float, ...] = tuple(k / 16 for k in range(4, 15))
"""Cyclic frequencies of a 4-px transform grid inside 16-px macroblocks (``k/16``, VP8, AV1)."""
_HARMONICS = 4
_AMIN, _AMAX = 0.28, 0.90  # scanned cyclic frequencies (cycles/px)
_LO, _HI = 0.30, 0.88  # candidate fundamentals (f ≈ 1.14-3.3)
# Mild enlargements (f < 1.23: fundamentals above 0.81, added 2026-12-02): natives' sums reach
# 71.9 there (`Garden`, `Flow`, `Cascade`, `Kay`), 58 below, so sums there are divided by 1.36
# (a threshold of 79 on the native.py scale), and 7/8 (a JPEG grid line whose leakage these
# candidates' harmonics would pick up) is skipped ±0.004 instead of ±0.002.
_MILD = 0.81
_MILD_WEIGHT = 1.36
_NO_MILD_AMAX = 0.84  # the scanned range without the mild candidates (AVIF: see native.py)
_SEVEN_EIGHTHS = 0.004
_HALF_BAND = 0.03  # pairs v within this of alpha/2
_ROWS = 512  # rows (columns) per axis; z of a coherent trace grows with sqrt(rows)
_GRID_MASK = 0.002  # half-width (cycles/px) skipped around k/8 by the harmonic sum


@functools.lru_cache(maxsize=64)
def _fast_len_below(n: int) -> int:
    """Largest 2^a 3^b 5^c <= n (fast for pocketfft)."""
    best = 1
    p2 = 1
    while p2 <= n:
        p3 = p2
        while p3 <= n:
            p5 = p3
            while p5 <= n:
                best = max(best, p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return best


@functools.lru_cache(maxsize=64)
def _fast_len_above(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast for pocketfft)."""
    m = n
    while _fast_len_below(m) != m:
        m += 1
    return m


def _spread(bands: list[tuple[int, int]]) -> np.ndarray:
    """Up to ``_ROWS`` indices spread evenly over the rows of ``bands`` (``(start, stop)``)."""
    idx = np.concatenate([np.arange(a, b) for a, b in bands])
    if idx.size > _ROWS:
        idx = idx[np.round(np.linspace(0, idx.size - 1, _ROWS)).astype(int)]
    return idx


@functools.lru_cache(maxsize=8)
def _hann(k: int) -> np.ndarray:
    """A float32 Hann window of ``k`` samples (cached)."""
    return np.hanning(k).astype(np.float32)


def _axis_coherence(
    rows: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Cyclic frequencies (cycles/px) and Rayleigh statistic ``z`` of the rows of ``rows``, and
    the Bayer-lattice ``z`` (see the module's docstring); ``index``: each row's index in the
    image, whose parity signs the lattice's sum."""
    w = rows.shape[1]
    n = _fast_len_below(w)
    k = min(n, w - 1)
    d = np.subtract(rows[:, 1 : k + 1], rows[:, :k], dtype=np.float32)
    d *= _hann(k)
    width = round(2 * _HALF_BAND * n)
    first = round((_AMIN / 2 - _HALF_BAND) * n)
    last = round((_AMAX / 2 + _HALF_BAND) * n) + width
    if k < n:
        d = np.pad(d, ((0, 0), (0, n - k)))
    # OpenCV's packed real DFT (CCS): [Re0, Re1, Im1, Re2, Im2, ...]; bins 1..n/2-1 view as complex
    packed = cv2.dft(d, flags=cv2.DFT_ROWS)
    last = min(last, n // 2)
    spec = np.ndarray(
        (packed.shape[0], last - first),
        np.complex64,
        buffer=packed,
        offset=(2 * first - 1) * 4,
        strides=(packed.strides[0], 8),
    )
    power = spec.real**2 + spec.imag**2
    inv_env = (1.0 / (np.sqrt(power.mean(axis=0)) + 1e-6)).astype(np.float32)
    inv_pow = inv_env**2 / width
    # whitened spectrum, once (bands overlap): float32 products on the packed (re, im) pairs
    white = (packed[:, 2 * first - 1 : 2 * last - 1] * np.repeat(inv_env, 2)).view(np.complex64)
    # Only the central outputs ks of the autoconvolution are kept, so a circular one of length
    # m >= 1.5 width wraps nothing onto them.
    m = _fast_len_above((3 * width + 1) // 2)
    ks = np.arange(width // 2, 3 * width // 2)
    pairs = np.minimum(ks + 1, 2 * width - 1 - ks).astype(np.float64)
    alphas, zs, centres = [], [], []
    c = _AMIN / 2
    while c - _HALF_BAND / 2 < _AMAX / 2:
        lo = round((c - _HALF_BAND) * n)
        band = slice(lo - first, lo - first + width)
        p = sf.fft(white[:, band], n=m, axis=1, workers=1)  # zero-padded to m
        corr = sf.ifft((p * p).sum(axis=0), workers=1)[ks]
        # Rayleigh normalisation: sum over rows and pairs of |X(v)|^2 |X(alpha - v)|^2,
        # approximated per row by (mean whitened band power)^2 x number of pairs.
        energy = power[:, band] @ inv_pow[band]
        norm = float(np.dot(energy, energy)) * pairs
        alphas.append(2 * lo + ks)
        zs.append(np.abs(corr) / np.sqrt(np.maximum(norm, 1e-20)))
        centres.append(np.full(ks.size, 2 * lo + width))
        c += _HALF_BAND
    a = np.concatenate(alphas)
    z = np.concatenate(zs)
    order = np.lexsort((np.abs(a - np.concatenate(centres)), a))
    a, z = a[order], z[order]
    keep = np.r_[True, np.diff(a) > 0]
    lo = round((0.25 - _HALF_BAND) * n)  # a band centred on pairs for alpha = 1/2
    band = slice(lo - first, lo - first + width)
    j = int(np.argmin(np.abs(2 * lo + ks - n / 2)))
    p = sf.fft(white[:, band], n=m, axis=1, workers=1)
    sign = np.where(index % 2 == 0, 1.0, -1.0).astype(np.float32)
    corr = np.dot(sign @ (p * p), np.exp(2j * np.pi * np.arange(m) * ks[j] / m)) / m
    energy = power[:, band] @ inv_pow[band]
    lattice = abs(corr) / np.sqrt(max(float(np.dot(energy, energy)) * pairs[j], 1e-20))
    return a[keep] / n, z[keep], float(lattice)


def _sliding_max(v: np.ndarray, half: int) -> np.ndarray:
    """Maximum over a window of ``2 half + 1`` samples centred on each sample."""
    return np.lib.stride_tricks.sliding_window_view(np.pad(v, half), 2 * half + 1).max(axis=1)


def _combined(
    gray: np.ndarray, row_bands: list[tuple[int, int]], col_bands: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Both axes' ``z`` on the x axis's frequency grid, and their lattice ``z``, combined with
    ``min``."""
    rows = _spread(row_bands)
    ax, zx, lx = _axis_coherence(gray[rows], rows)
    # columns as rows: transpose only the chosen bands
    cols = np.concatenate([cv2.transpose(gray[:, a:b]) for a, b in col_bands])
    index = np.concatenate([np.arange(a, b) for a, b in col_bands])
    sel = _spread([(0, cols.shape[0])])
    ay, zy, ly = _axis_coherence(cols[sel], index[sel])
    ym = _sliding_max(zy, max(1, int(np.ceil(0.0012 / (ay[1] - ay[0])))))
    xm = _sliding_max(zx, max(1, int(np.ceil(0.0004 / (ax[1] - ax[0])))))
    return ax, np.minimum(xm, np.interp(ax, ay, ym)), min(lx, ly)


def _harmonic(
    alpha: np.ndarray, z: np.ndarray, skip: tuple[float, ...], mild: bool = True
) -> tuple[float, float]:
    """Best harmonic sum over candidate fundamentals, skipping the ``skip`` lines: (sum, α1).

    Without ``mild``, as before 2026-12-02: fundamentals up to ``_MILD`` and cyclic
    frequencies up to 0.84 only.
    """
    if not mild:
        keep = alpha <= _NO_MILD_AMAX
        alpha, z = alpha[keep], z[keep]
    grid = np.zeros(alpha.size, bool)
    for g in skip:
        grid |= np.abs(alpha - g) < _GRID_MASK
    grid |= np.abs(alpha - 0.875) < _SEVEN_EIGHTHS
    zm = np.where(grid, 0.0, z)
    cand = alpha[(alpha >= _LO) & (alpha <= (_HI if mild else _MILD))]
    cand = cand[np.abs(cand - 0.875) >= _SEVEN_EIGHTHS]
    total = np.zeros(cand.size)
    for k in range(1, _HARMONICS + 1):
        ak = (k * cand) % 1.0
        ok = (ak >= alpha[0]) & (ak <= alpha[-1])
        ok &= (ak <= _NO_MILD_AMAX) | (cand > _MILD)  # others' harmonics as before 2026-12-02
        ok &= np.interp(ak, alpha, grid.astype(float)) == 0
        total += np.where(ok, np.interp(ak, alpha, zm), 0.0)
    total = np.where(cand > _MILD, total / _MILD_WEIGHT, total)
    i = int(np.argmax(total))
    return float(total[i]), float(cand[i])


def coherence_statistics(
    gray: np.ndarray,
    row_bands: list[tuple[int, int]],
    col_bands: list[tuple[int, int]],
    skip: tuple[float, ...] = JPEG_LINES,
    mild: bool = True,
) -> tuple[float, float, list[float], float]:
    """Raw statistics: (harmonic sum, its fundamental, combined ``z`` at each of `GRID`, Bayer
    lattice ``z``).

    ``gray`` is a C-contiguous 2-D uint8 array of at least 64×64 pixels; ``row_bands`` and
    ``col_bands`` are the ``(start, stop)`` horizontal and vertical bands to analyse (checked and
    chosen by the caller); ``skip`` are the cyclic frequencies of the codec's block grid, which
    the harmonic sum leaves out (`JPEG_LINES`, or `VP8_LINES` for a 4-px transform grid);
    ``mild`` adds the fundamentals of enlargements below 1.23× (above ``_MILD``).
    """
    alpha, z, lattice = _combined(gray, row_bands, col_bands)
    h, a1 = _harmonic(alpha, z, skip, mild)
    return h, a1, [float(z[np.abs(alpha - g) < 0.0008].max(initial=0.0)) for g in GRID], lattice
