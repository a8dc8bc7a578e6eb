"""Share thresholds ("keep the top 30 %") from a mergeable quantile sketch.

Each block of scores is summarised by at most `k` weighted points (its exact values when it
holds `k` or fewer); the driver merges the sketches and reads the cut. A block of `n` values
summarised by `k` evenly spaced quantiles places any rank within `n / k` of the exact one, and
the cut, taken at a sketch point, gives up at most one point's weight more: a job's cut is off
by at most `2 N / k` ranks of its `N` scores (0.2 % of the job at k=1024), and is exact when
every block is small.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def sketch(values: Iterable[float | None], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(points, weights) summarising the finite values of one block."""
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size <= k:
        return arr, np.ones(arr.size)
    levels = (np.arange(k) + 0.5) / k
    return np.quantile(arr, levels), np.full(k, arr.size / k)


def _merged(
    sketches: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray] | None:
    parts = list(sketches)
    if not parts:
        return None
    points = np.concatenate([p for p, _ in parts])
    weights = np.concatenate([w for _, w in parts])
    if points.size == 0:
        return None
    order = np.argsort(points, kind="stable")
    return points[order], np.cumsum(weights[order])


def share_cut(
    sketches: Iterable[tuple[np.ndarray, np.ndarray]], share: float, lower_better: bool
) -> float | None:
    """The score that keeps the best `share` of the sketched values (None when there are none).

    Higher-better scores pass at or above the cut, lower-better ones at or below it. At most
    `share` of the values pass (the floor of it, for exact sketches; ties at the cut aside);
    +inf (-inf) when not even one value fits in the share.
    """
    merged = _merged(sketches)
    if merged is None:
        return None
    points, cum = merged
    budget = share * cum[-1] * (1 + 1e-12)
    if lower_better:  # the largest point whose cumulative weight fits in the budget
        idx = int(np.searchsorted(cum, budget, side="right")) - 1
        return float(points[idx]) if idx >= 0 else float("-inf")
    # the smallest point such that the weight at or above it fits in the budget
    idx = int(np.searchsorted(cum, cum[-1] - budget, side="left")) + 1
    if cum[-1] - budget <= 0:
        idx = 0
    return float(points[idx]) if idx < points.size else float("inf")
