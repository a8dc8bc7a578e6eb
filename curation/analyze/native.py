"""Evidence that an image's pixels were not upscaled from a smaller image.

Resampling forensics (Popescu & Farid 2005; Kirchner 2008): interpolating an image by a factor
``f`` makes the local derivative statistics of the result periodic along each axis, with a
period of ``f`` output pixels. Averaging ``|first difference|`` and ``|second difference|`` over
the rows (columns) of the most textured horizontal (vertical) bands gives a 1-D profile per
axis whose spectrum then carries a line at ``1/f`` cycles per pixel (aliased into ``[0, 0.5]``)
and its harmonics. Native photographs, including downscaled ones, mostly have no such line.
The same resampling also makes the spectrum's components at ``v`` and ``1/f − v`` copies of one
another, with a phase that is the same in every row; `curation.analyze.native_coherence`
measures that cyclic spectral coherence, which survives JPEG compression better.

Two tests on the profiles:

* **spectral**: per frequency, the normalised periodograms (power over a block-median
  background) of the order-1 and order-2 profiles are averaged per axis and the weaker axis is
  kept (one factor scales both axes). A line counts when it is strong (× background; the
  threshold grows with the number of pixels averaged, as a coherent line does) and deep (its
  amplitude a few percent of the profile's mean): depth is what separates resampling from the
  faint periodicities of natives. The JPEG block grid puts lines at ``k/8`` cycles per pixel;
  those frequencies are masked out. A JPEG-compressed source that was then upscaled shows its
  own block grid at period ``8 f``, which this test also sees.
* **block fold** (factors whose lines sit on the JPEG grid: 4/3, 8/5, 2, 4): the order-1
  profile is folded modulo 8 with its strongest step (a JPEG block boundary) at index 7. A JPEG
  grid is symmetric within its block and changes mostly the differences across boundaries;
  two contrasts between interior positions (``T`` and ``U`` below) are near zero for JPEG-only
  patterns but large for resampling with a period of 2, 4 or 8 pixels (the phase test for
  integer factors).

and three on the cyclic coherence: a **harmonic** sum of the coherence at ``k/f`` (off the JPEG
grid); the coherence at the **grid** frequencies 3/8, 1/2, 5/8, 3/4 (factors 8/3, 2, 8/5, 4/3),
above what JPEG grids of native photographs reach; and a **4-px period** (factor 4/3, whose
cyclic frequencies all lie on the grid): the coherence at 1/2 and 3/4 in excess of the level at
5/8, which only a JPEG grid feeds.

Which block grid the tests ignore depends on the codec of the file (`CODECS`): JPEG's 8×8 grid
(``k/8``), or the 4-px transform grid of lossy WebP (VP8) and AVIF, whose ``k/16`` lines are
masked and under which the fold and 4-px-period tests are off; JPEGs coarser than q85, and
lossy WebPs quantised as finely as q90 or finer, have their own thresholds. The caller passes
the codec (`pixel_analyzer.block_codec`).

Each test's statistic is divided by a threshold calibrated on real photographs and renders
(``bench/calibrate_native.py``; tables and held-out figures in ``docs/native-detection.md``);
the largest ratio ``E`` becomes ``score = 2 ** -E``, so ``score = 0.5`` is the decision
boundary. One piece of evidence goes the other way: a straight-from-camera file still carries
its demosaicing lattice, a 2-px pattern like a 2× enlargement's, except that it alternates
between even and odd rows (columns), and any resampling moves it off the 2-px grid. The
coherence pass measures that lattice too (about 1 ms); when a test fires and it
is intact, it keeps the image (``test == "cfa"``, ``score`` at least 0.75;
``bench/camera_natives.py``).
The centre of the image, at most 2561 × 1601 pixels, is analysed (the calibrated window):
about 17 ms on one core (profiles 3, coherence 14).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from curation.analyze.native_coherence import GRID, JPEG_LINES, coherence_statistics

DEFAULT_NATIVE_THRESHOLD: float = 0.5
"""Images with ``native_score(...).score`` below this are rejected as ``upscaled``."""

# Calibrated on Debian's wallpaper photographs (see docs/native-detection.md).
_SPECTRAL_THRESHOLD = 20.0  # both-axes periodogram peak (× background) per 2560×1440 px...
_REFERENCE_PIXELS = 2560 * 1440
_HARMONIC_THRESHOLD = 58.0  # cyclic coherence: harmonic sum of z (native_coherence)
# ... z at GRID: 1.1 × the calibration natives' maxima (the 3/4 one was set by two files later
# found to be enlargements; kept, since held-out photographs reach 134: see the docs)
_GRID_THRESHOLDS = (15.4, 42.7, 90.0, 199.5)
_QUARTER_THRESHOLD = 34.0  # ... 4-px period beyond the JPEG grid (`_quarter_period`)
_QUARTER_GRID_WEIGHT = 0.5
# Lossy WebP (VP8) and AVIF: z at GRID, the larger of the JPEG threshold (a WebP may hold a
# JPEG's pixels) and 1.1 × the largest value of the calibration natives saved as WebP q75-q100
# (26.1 and 75.1 at 3/8 and 1/2: see docs/native-detection.md, "Codecs").
_VP8_GRID_THRESHOLDS = (28.7, 82.6, 90.0, 199.5)
# Lossy WebP quantised as finely as libwebp's q90 or finer (`vp8_fine`): the same recipe over
# the calibration natives saved at q90-q100 (maxima 15.6 and 45.1 at 3/8 and 1/2; 52.8 for the
# 4-px-period statistic, whose JPEG threshold is 34).
_VP8_FINE_GRID_THRESHOLDS = (17.2, 49.6, 90.0, 199.5)
_VP8_FINE_QUARTER_THRESHOLD = 58.1
# An intact Bayer lattice (native_coherence: row-alternating z at 1/2) overrides the tests above:
# 1.1 × the largest value an enlargement reached in calibration (bench.calibrate_codecs, 2026-12-06:
# 8.17 over 864 PNG and JPEG files; 16.75 over 864 lossy WebPs, whose 4×4 transform grid feeds
# this statistic too; AVIF, on a 4-px lattice as well, takes WebP's).
_CFA_THRESHOLD = 9.0
_VP8_CFA_THRESHOLD = 18.4
_SPECTRAL_FLOOR = 8.0  # never below this (small images: chance peaks of the periodogram)
_DEPTH_THRESHOLD = 5.0  # ...and its modulation depth (percent of the mean |difference|)
_FOLD_T_THRESHOLD = 20.0  # |T| in percent of the mean |difference|
_FOLD_U_LOW = -8.0  # U in percent; JPEG grids push U up, resampling by 8/5 pushes it down
_FOLD_U_HIGH = 10.0
_FOLD_MIN_Z = 6.0  # the fold contrasts must also be significant against their own noise
_MIN_FREQ = 0.065  # cycles/px below which image content (and render patterns) dominate
_GRID_MASK = 0.004  # half-width (cycles/px) of the masks around the JPEG lines k/8
_FREQ_TOL = 0.0015  # how far apart (cycles/px) the two axes' lines may be
_MIN_SIDE = 64
# The analysed window: the centre of the image, at most the size of the calibration pictures
# (2560×1600 plus the pixel the differences use), long side along the image's long side.
_WINDOW_LONG, _WINDOW_SHORT = 2561, 1601
_TEXTURE_STEP = 8  # subsampling of the cheap texture map used to choose bands
_NUM_BANDS = 16  # the image is cut into this many bands per axis...
_BANDS_USED = 5  # ...and the most textured of them are analysed
_D2_X = np.array([[1.0, -2.0, 1.0]], np.float32)  # second difference along x


class NativeEvidence(NamedTuple):
    """Result of :func:`native_score`.

    Attributes:
        score: Higher means more native; roughly in ``[0, 1]``; ``0.5`` at the calibrated
            decision boundary. ``2^-strength``, or ``1 - 2^-strength / 2`` (at least 0.75)
            when an intact Bayer lattice overrides a resampling test (``test == "cfa"``).
        factor: Estimated upscale factor, ``nan`` when no resampling trace was found.
        detail: A few words for a person explaining the strongest evidence.
        period: Period in pixels of the strongest trace (``1/ν`` of a spectral line, ``1/α``
            of a cyclic frequency, the fold's period), ``nan`` when no test fired.
        strength: The strongest test's statistic over its threshold (``E``; ``score = 2^-E``).
        test: Which test gave ``strength``: ``spectral``, ``fold``, ``harmonic``, ``grid``,
            ``quarter``, or ``cfa`` (see `TESTS`).
        codec: The block structure the detector modelled (see `CODECS`).
    """

    score: float
    factor: float
    detail: str
    period: float = float("nan")
    strength: float = 0.0
    test: str = ""
    codec: str = "jpeg"


Bands = list[tuple[int, int]]


def _top_bands(texture: np.ndarray, length: int) -> Bands:
    """The ``_BANDS_USED`` most textured of the bands along an axis of ``length`` pixels.

    ``texture`` holds one value per ``_TEXTURE_STEP`` pixels along the axis; bands are
    ``(start, stop)`` in order.
    """
    size = max(_TEXTURE_STEP, length // _NUM_BANDS // _TEXTURE_STEP * _TEXTURE_STEP)
    n = texture.size * _TEXTURE_STEP // size
    per_band = [float(texture[i * size // _TEXTURE_STEP : (i + 1) * size // _TEXTURE_STEP].sum())
                for i in range(n)]
    order = np.argsort(per_band)[::-1][:_BANDS_USED]
    return [(int(i) * size, min(length, (int(i) + 1) * size)) for i in sorted(order)]


def _textured_bands(gray: np.ndarray) -> tuple[Bands, Bands]:
    """The most textured horizontal and vertical bands, from a sparse texture map.

    Flat regions (sky) carry no resampling trace, only JPEG noise; both the profile and the
    coherence tests analyse these bands only.
    """
    sub = gray[::_TEXTURE_STEP, ::_TEXTURE_STEP].astype(np.int16)
    rows = _top_bands(np.abs(np.diff(sub, axis=1)).sum(axis=1), gray.shape[0])
    cols = _top_bands(np.abs(np.diff(sub, axis=0)).sum(axis=0), gray.shape[1])
    return rows, cols


def _profiles(
    gray: np.ndarray, row_bands: Bands, col_bands: Bands
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Mean |first| and |second| differences per column (x) and per row (y).

    Only the most textured horizontal bands feed the x profiles and the most textured vertical
    bands the y profiles (about a third of the image each), which keeps the cost low and the
    flat regions out.

    Returns:
        The x and y profiles and the number of pixels averaged into them.
    """
    h, w = gray.shape
    sums = [np.zeros(w - 1, np.float64), np.zeros(w - 2, np.float64),
            np.zeros(h - 1, np.float64), np.zeros(h - 2, np.float64)]
    used = 0
    for y0, y1 in row_bands:
        rows = gray[y0:y1]
        d2 = cv2.convertScaleAbs(cv2.filter2D(rows, cv2.CV_16S, _D2_X))[:, 1:-1]
        sums[0] += cv2.reduce(cv2.absdiff(rows[:, 1:], rows[:, :-1]), 0, cv2.REDUCE_SUM,
                              dtype=cv2.CV_32F).ravel()
        sums[1] += cv2.reduce(d2, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32F).ravel()
        used += rows.size
    for x0, x1 in col_bands:
        cols = gray[:, x0:x1]
        d2 = cv2.convertScaleAbs(cv2.filter2D(cols, cv2.CV_16S, _D2_X.T))[1:-1]
        sums[2] += cv2.reduce(cv2.absdiff(cols[1:], cols[:-1]), 1, cv2.REDUCE_SUM,
                              dtype=cv2.CV_32F).ravel()
        sums[3] += cv2.reduce(d2, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F).ravel()
        used += cols.size
    return sums[0], sums[1], sums[2], sums[3], used // 2


def _running_median(x: np.ndarray, size: int) -> np.ndarray:
    """Smooth background of ``x``: medians of blocks of ``size`` samples, linearly interpolated."""
    n = x.size // size
    if n < 2:
        return np.full_like(x, np.median(x))
    medians = np.median(x[: n * size].reshape(n, size), axis=1)
    centres = np.arange(n) * size + (size - 1) / 2
    return np.interp(np.arange(x.size), centres, medians)


def _normalised_periodogram(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Periodogram of a profile over its running median (≈1 where there is no line).

    Returns:
        Frequencies, normalised power and the modulation depth of each frequency (amplitude of
        that sinusoid relative to the profile's mean, in percent).
    """
    n = profile.size
    p = profile.astype(np.float64)
    mean = p.mean() + 1e-9
    window = np.hanning(n)
    spectrum = np.abs(np.fft.rfft((p - mean) * window))
    power = spectrum**2
    freq = np.fft.rfftfreq(n)
    size = max(15, (n // 100) | 1)
    background = _running_median(power, size)
    depth = 200.0 * spectrum / (window.sum() * mean)
    return freq, power / (background + 1e-12 * power.max() + 1e-30), depth


def _line_strength(freq: np.ndarray, norm: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Normalised power on ``grid`` frequencies, taking the max within ``_FREQ_TOL``."""
    step = freq[1] - freq[0]
    width = max(1, round(_FREQ_TOL / step))
    padded = np.pad(norm, width, mode="constant")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * width + 1)
    peak = windows.max(axis=1)
    return np.interp(grid, freq, peak)


def _spectral_evidence(
    p1x: np.ndarray,
    p2x: np.ndarray,
    p1y: np.ndarray,
    p2y: np.ndarray,
    threshold: float,
    lines: tuple[float, ...],
) -> tuple[float, float, float, float]:
    """Best line on both axes away from the codec's block grid (``lines``, masked).

    Per axis, the normalised powers of the order-1 and order-2 profiles are averaged (a
    resampling line shows in both, chance peaks rarely do); the strength of a frequency is the
    weaker axis, its depth the larger of the two orders' weaker-axis depths.

    Returns:
        (evidence ratio, frequency, strength, depth) of the frequency with the highest
        ``min(strength / threshold, depth / _DEPTH_THRESHOLD)``.
    """
    spectra = [_normalised_periodogram(p) for p in (p1x, p2x, p1y, p2y)]
    grid = spectra[0][0] if spectra[0][0].size >= spectra[2][0].size else spectra[2][0]
    power = [_line_strength(f, n, grid) for f, n, _ in spectra]
    depths = [_line_strength(f, d, grid) for f, _, d in spectra]
    strength = np.minimum(power[0] + power[1], power[2] + power[3]) / 2
    depth = np.maximum(np.minimum(depths[0], depths[2]), np.minimum(depths[1], depths[3]))
    masked = (grid < _MIN_FREQ) | (grid > 0.5 - _GRID_MASK)
    for line in lines:
        masked |= np.abs(grid - line) < _GRID_MASK
    ratio = np.minimum(strength / threshold, depth / _DEPTH_THRESHOLD)
    ratio[masked] = 0.0
    i = int(np.argmax(ratio))
    return float(ratio[i]), float(grid[i]), float(strength[i]), float(depth[i])


def _fold_contrasts(profile: np.ndarray, phase: int) -> tuple[float, float, float, float]:
    """Interior contrasts of the profile folded modulo 8 from ``phase``: (T, z_T, U, z_U) in %.

    Index ``i`` of a first-difference profile is the step between pixels ``i`` and ``i + 1``;
    with the JPEG grid at the image origin, ``(i - phase) % 8 == 7`` crosses a block boundary
    for ``phase == 0``. With ``v`` the fold: ``T = (v1 + v5)/2 - (v2 + v4)/2`` (alternation; a
    period of 2 or 8 px) and ``U = v3 - (v2 + v4)/2`` (block centre; a period of 4 or 8 px).
    """
    p = profile[phase:]
    nb = p.size // 8
    blocks = p[: nb * 8].reshape(nb, 8).astype(np.float64)
    scale = blocks.mean() + 1e-9
    t = ((blocks[:, 1] + blocks[:, 5]) - (blocks[:, 2] + blocks[:, 4])) / 2 / scale * 100
    u = (blocks[:, 3] - (blocks[:, 2] + blocks[:, 4]) / 2) / scale * 100
    t_mean, u_mean = float(t.mean()), float(u.mean())
    t_se = float(t.std()) / np.sqrt(nb) + 1e-9
    u_se = float(u.std()) / np.sqrt(nb) + 1e-9
    return t_mean, t_mean / t_se, u_mean, u_mean / u_se


def _fold_ratio(t: float, zt: float, u: float, zu: float) -> float:
    """Evidence ratio of one fold: the larger of the T and U tests (0 when not significant)."""
    t_ratio = abs(t) / _FOLD_T_THRESHOLD if abs(zt) >= _FOLD_MIN_Z else 0.0
    u_ratio = max(u / _FOLD_U_HIGH, u / _FOLD_U_LOW, 0.0) if abs(zu) >= _FOLD_MIN_Z else 0.0
    return max(t_ratio, u_ratio)


def _axis_fold(profile: np.ndarray) -> tuple[float, float, float]:
    """(ratio, T, U) of one axis, folded with its strongest step at fold index 7.

    A JPEG grid's strongest step is its block boundary, so this finds the grid phase of an
    image cropped off the 8-px grid after its last encoding; resampling patterns of period 2, 4
    and 8 px peak there too, so aligned and unaligned images are judged alike.
    """
    nb = profile.size // 8
    v = profile[: nb * 8].reshape(nb, 8).mean(axis=0)
    phase = (int(np.argmax(v)) + 1) % 8
    t, zt, u, zu = _fold_contrasts(profile, phase)
    return _fold_ratio(t, zt, u, zu), t, u


def _fold_evidence(px: np.ndarray, py: np.ndarray) -> tuple[float, str, float, float]:
    """Evidence ratio of the block-fold test (both axes must agree), words, factor, period."""
    rx, tx, ux = _axis_fold(px)
    ry, ty, uy = _axis_fold(py)
    ratio = min(rx, ry)
    t, u = (tx, ux) if rx <= ry else (ty, uy)
    if abs(abs(t) - abs(u)) <= 0.35 * max(abs(t), abs(u)):
        factor, period, words = 2.0, 2.0, "alternating even/odd difference statistics"
    elif u < 0:
        factor, period, words = 1.6, 8.0, "8-px resampling pattern inside JPEG blocks"
    else:
        factor, period, words = 4 / 3, 4.0, "4-px resampling pattern inside JPEG blocks"
    return ratio, f"{words} (T={t:.1f}%, U={u:.1f}%)", factor, period


def _factor_from_frequency(freq: float) -> tuple[float, str]:
    """Upscale factors whose resampling line aliases to ``freq``: the smaller one first."""
    low, high = 1.0 / (1.0 - freq), 1.0 / freq
    return low, f"≈{low:.2f}× or {high:.2f}× upscale"


class _Model(NamedTuple):
    """What a codec's block structure does to the tests (see `CODECS`)."""

    lines: tuple[float, ...]  # spectral-line frequencies (cycles/px, ≤ 0.5) of its grid: masked
    cyclic: tuple[float, ...]  # cyclic frequencies of its grid, skipped by the harmonic sum
    fold: bool  # the 8-px block-fold test applies (an 8×8 grid only)
    grid_thresholds: tuple[float, ...]  # z at each of GRID
    quarter_threshold: float  # 4-px period beyond the grid; inf: not tested
    harmonic_threshold: float = _HARMONIC_THRESHOLD
    spectral_scale: float = 1.0  # × the spectral test's threshold
    mild: bool = True  # harmonic fundamentals of enlargements below 1.23× (native_coherence)
    cfa_threshold: float = _CFA_THRESHOLD  # intact Bayer lattice (native_coherence): kept


_JPEG = _Model((1 / 8, 2 / 8, 3 / 8), JPEG_LINES, True, _GRID_THRESHOLDS, _QUARTER_THRESHOLD)
# The harmonic sum skips k/8 only (k/4 included): natives saved as WebP show no coherence at
# odd k/16 (same maxima with and without skipping them), and 16/9 ≈ 1.78 lives there.
_VP8 = _Model(tuple(k / 16 for k in range(1, 8)), JPEG_LINES, False, _VP8_GRID_THRESHOLDS,
              float("inf"), cfa_threshold=_VP8_CFA_THRESHOLD)
# JPEG coarser than q85: fold and 4-px-period tests off, the other thresholds at 1.1 × the
# largest value of the calibration natives saved at q75 (harmonic 67.8, spectral 1.1 × its
# threshold, z 38.8 and 82.0 at 3/8 and 1/2, 103.6 at 5/8).
_JPEG_LOW = _Model((1 / 8, 2 / 8, 3 / 8), JPEG_LINES, False, (42.7, 90.2, 114.0, 199.5),
                   float("inf"), harmonic_threshold=74.6, spectral_scale=1.2)
# JPEG coarser still (q60-q73; below q60): the same tests as `_JPEG_LOW`, thresholds at 1.1 × the
# largest value of the calibration natives saved at q60, q70 and q72 (spectral 1.18 × its
# threshold, harmonic 99.6, z 67.9, 90.7 and 144.2 at 3/8, 1/2 and 5/8; 3/4 keeps 199.5) and at
# q20-q50 (1.37 ×, 142.1, z 107.7, 148.5, 167.8 and 183.9); bench/coarse_jpeg.py.
_JPEG_COARSE = _JPEG_LOW._replace(grid_thresholds=(74.7, 99.8, 158.6, 199.5),
                                  harmonic_threshold=109.6, spectral_scale=1.30)
_JPEG_COARSEST = _JPEG_LOW._replace(grid_thresholds=(118.5, 163.3, 184.6, 202.3),
                                    harmonic_threshold=156.3, spectral_scale=1.51)
# AVIF: as VP8, without the mild-enlargement fundamentals: measured so (a first version of
# them, counting terms above 0.84 for every candidate, rejected 3 more AVIF natives).
# Its 4-px lattice feeds the Bayer-lattice statistic as VP8's does: WebP's threshold (AVIF
# enlargements reached 7.2 in calibration but 13.1 held out).
_AV1 = _VP8._replace(mild=False)
# Lossy WebP at q90 or finer (the quantiser read from the frame header by the caller): its
# 4-px grid is weak enough for the 4-px-period test and lower grid thresholds, and its spectra
# show no 16-px lines (natives reach 1.64 × the spectral threshold with k/8 masked, at 0.068
# cyc/px: content), so only the k/8 lines a JPEG history leaves are masked. The 8-px fold
# stays off: it fires on natives at q90-q100 (16.5 × its threshold).
_VP8_FINE = _Model((1 / 8, 2 / 8, 3 / 8), JPEG_LINES, False, _VP8_FINE_GRID_THRESHOLDS,
                   _VP8_FINE_QUARTER_THRESHOLD, cfa_threshold=_VP8_CFA_THRESHOLD)
_MODELS: dict[str, _Model] = {"jpeg": _JPEG, "jpeg_low": _JPEG_LOW, "jpeg_coarse": _JPEG_COARSE,
                              "jpeg_coarsest": _JPEG_COARSEST, "lossless": _JPEG,
                              "vp8": _VP8, "vp8_fine": _VP8_FINE, "av1": _AV1}
CODECS: tuple[str, ...] = tuple(_MODELS)
"""Block structures `native_score` models, by the codec of the file analysed:

* ``jpeg``: JPEG's 8×8 DCT grid (lines at ``k/8`` masked; every test);
* ``jpeg_low``: a JPEG of quality 74-84 (its quantisation table, read by the caller):
  at q75 the 8×8 grid alone trips the fold and grid tests of ``jpeg`` (29 % of the calibration
  natives), so the fold and 4-px-period tests are off and the other thresholds are set on q75
  natives;
* ``jpeg_coarse`` (q60-q73) and ``jpeg_coarsest`` (below q60): as ``jpeg_low``, with thresholds
  set on natives saved that coarsely (``jpeg_low`` rejected 15-20 % of the natives at q50-q60);
  they catch a third of the enlargements at q60-q70 and few below;
* ``lossless``: PNG, lossless WebP (VP8L), TIFF, ...: no grid of its own, but a lossless file
  may hold a JPEG's pixels, so it is judged as ``jpeg``;
* ``vp8``: lossy WebP: a 4×4 transform in 16×16 macroblocks with a loop filter on both edges,
  so the profile spectra's lines at ``k/16`` (which include ``k/8`` and ``k/4``) are masked,
  the 8-px fold and the 4-px-period tests are off (the 4-px transform grid is a 4-px period),
  and the grid frequencies have thresholds of their own;
* ``vp8_fine``: lossy WebP with a quantiser index of at most 12 (libwebp's q90 and finer; read
  from the frame header by the caller): as ``vp8``, but only the ``k/8`` lines are masked, and
  the grid frequencies and the 4-px-period test have thresholds set on natives saved that
  finely;
* ``av1``: AVIF: transforms of 4 to 64 px, all on a 4-px lattice, deblocking and CDEF; judged as
  ``vp8``, without the harmonic fundamentals of enlargements below 1.23× (see
  docs/native-detection.md).
"""
TESTS: tuple[str, ...] = ("spectral", "fold", "harmonic", "grid", "quarter", "cfa")
"""Names of the tests, as `NativeEvidence.test` reports the strongest (``cfa``: a camera's
intact Bayer lattice overrode the others, see `native_score`)."""


class _Trace(NamedTuple):
    """One family's strongest evidence."""

    ratio: float
    factor: float
    detail: str
    period: float
    test: str


def _profile_evidence(gray: np.ndarray, bands: tuple[Bands, Bands], model: _Model) -> _Trace:
    """The profile tests' strongest evidence (spectral line and, for an 8×8 grid, block fold)."""
    p1x, p2x, p1y, p2y, used = _profiles(gray, *bands)
    threshold = max(_SPECTRAL_FLOOR, _SPECTRAL_THRESHOLD * used / _REFERENCE_PIXELS)
    spectral, freq, strength, depth = _spectral_evidence(p1x, p2x, p1y, p2y, threshold,
                                                         model.lines)
    spectral /= model.spectral_scale
    fold, fold_detail, fold_factor, fold_period = (
        _fold_evidence(p1x, p1y) if model.fold else (0.0, "", float("nan"), float("nan")))
    if spectral >= fold:
        factor, words = _factor_from_frequency(freq)
        return _Trace(spectral, factor, (
            f"periodic resampling peak at {freq:.3f} cyc/px on both axes "
            f"({strength:.0f}× background, depth {depth:.1f}%, {words})"), 1.0 / freq, "spectral")
    return _Trace(fold, fold_factor, f"{fold_detail} (≈{fold_factor:.2f}× upscale)",
                  fold_period, "fold")


def _quarter_period(grid: list[float]) -> float:
    """Coherence of a 4-px period (a 4/3 upscale) in excess of the JPEG grid's.

    A JPEG grid is cyclostationary at every ``k/8``; resampling with a 4-px period adds ``1/4``,
    ``1/2`` and ``3/4`` only. So the geometric mean of ``z`` at 1/2 and 3/4, less half the ``z``
    at 5/8 (an odd eighth, which only the JPEG grid feeds), grows with the resampling and not
    with the grid.
    """
    z = dict(zip(GRID, grid, strict=True))
    return float(np.sqrt(z[0.5] * z[0.75]) - _QUARTER_GRID_WEIGHT * z[0.625])


def _coherence_evidence(
    gray: np.ndarray, bands: tuple[Bands, Bands], model: _Model
) -> tuple[_Trace, float]:
    """The cyclic-coherence tests' strongest evidence (harmonic, grid, 4-px period), and the
    Bayer lattice's statistic over its threshold."""
    harmonic, alpha1, grid, lattice = coherence_statistics(gray, *bands, skip=model.cyclic,
                                                           mild=model.mild)
    cfa = lattice / model.cfa_threshold
    quarter = _quarter_period(grid)
    ratios = [harmonic / model.harmonic_threshold] + [
        z / t for z, t in zip(grid, model.grid_thresholds, strict=True)
    ] + [quarter / model.quarter_threshold]
    j = int(np.argmax(ratios))
    if j == len(ratios) - 1:
        return _Trace(ratios[j], 4 / 3, (
            f"coherent spectral correlation at 1/2 and 3/4 cyc/px (z={grid[1]:.0f}, "
            f"{grid[3]:.0f}) beyond the JPEG-grid level at 5/8 (z={grid[2]:.0f}): a 4-px "
            f"resampling period (≈1.33× or 2× upscale)"), 4.0, "quarter"), cfa
    if j == 0:
        alias = 1.0 / max((2 * alpha1) % 1.0, 1e-3)
        return _Trace(ratios[0], 1.0 / alpha1, (
            f"coherent spectral correlation at cyclic frequency {alpha1:.4f} cyc/px and its "
            f"harmonics (sum z={harmonic:.0f}; ≈{1 / alpha1:.2f}× or {alias:.2f}× upscale)"),
            1.0 / alpha1, "harmonic"), cfa
    g = GRID[j - 1]
    detail = (f"coherent spectral correlation at {g:.3f} cyc/px (z={grid[j - 1]:.0f}, beyond "
              f"the block-grid level; ≈{1 / g:.2f}× upscale)")
    return _Trace(ratios[j], 1.0 / g, detail, 1.0 / g, "grid"), cfa


def _central_window(gray: np.ndarray) -> np.ndarray:
    """The centre of ``gray``, at most ``_WINDOW_LONG`` × ``_WINDOW_SHORT`` pixels (a view).

    The thresholds hold for this much image: the statistics of a coherent trace, and of a
    native's JPEG grid alike, grow with the pixels analysed. It also bounds the cost at 4K.
    """
    h, w = gray.shape
    mh, mw = (_WINDOW_SHORT, _WINDOW_LONG) if w >= h else (_WINDOW_LONG, _WINDOW_SHORT)
    y, x = max(0, (h - mh) // 2), max(0, (w - mw) // 2)
    return gray[y : y + mh, x : x + mw]


def native_score(gray: np.ndarray, codec: str = "jpeg") -> NativeEvidence:
    """Score how likely a grayscale image is at its native resolution (not upscaled).

    Args:
        gray: 2-D ``uint8`` array, full resolution, EXIF orientation applied.
        codec: The block structure of the file the pixels came from, one of `CODECS`
            (``jpeg`` when unknown: its masks also cover a JPEG history).

    Returns:
        A :class:`NativeEvidence`; ``score < DEFAULT_NATIVE_THRESHOLD`` means upscaled.

    Raises:
        ValueError: If ``gray`` is not a 2-D uint8 array of at least 64×64 pixels, or
            ``codec`` is not one of `CODECS`.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {gray.dtype} {gray.shape}")
    if min(gray.shape) < _MIN_SIDE:
        raise ValueError(f"image too small for resampling analysis: {gray.shape}")
    if codec not in _MODELS:
        raise ValueError(f"unknown codec {codec!r}: expected one of {CODECS}")
    model = _MODELS[codec]
    gray = np.ascontiguousarray(_central_window(gray))
    bands = _textured_bands(gray)
    coherence, cfa = _coherence_evidence(gray, bands, model)
    tests = [_profile_evidence(gray, bands, model), coherence]
    best = max(tests, key=lambda t: t.ratio)
    score = float(2.0 ** -best.ratio)
    if best.ratio >= 1.0 and cfa >= 1.0:
        # A camera's demosaicing lattice repeats every 2 px, as a 2× enlargement's trace does,
        # but alternates between rows; resampling moves it off the 2-px grid. Still intact, it
        # shows the pixels are at the sensor's resolution, whatever else fired.
        return NativeEvidence(
            1.0 - 0.5 * 2.0**-cfa, float("nan"),
            f"intact Bayer colour-filter lattice (a 2-px pattern alternating between rows, "
            f"z={cfa * model.cfa_threshold:.0f}): pixels at the camera's resolution, so not "
            f"taken as resampling: {best.detail}", 2.0, cfa, "cfa", codec)
    if best.ratio < 1.0:
        return NativeEvidence(score, float("nan"),
                              f"no resampling trace (profile tests {tests[0].ratio:.2f}, "
                              f"cyclic coherence {tests[1].ratio:.2f} of their thresholds)",
                              float("nan"), best.ratio, best.test, codec)
    return NativeEvidence(score, best.factor, best.detail, best.period, best.ratio, best.test,
                          codec)
