"""Aspect-ratio buckets: the table, the assignment rule and the `Bucketer` stage."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation import schema
from curation.base import Stage, column, set_columns

PAPER_4096_TIER: tuple[tuple[int, int], ...] = (
    (4096, 4096),
    (5440, 3072),
    (5184, 3264),
    (4992, 3328),
    (4736, 3520),
    (5824, 2880),
    (6272, 2688),
    (5568, 3008),
    (6336, 2624),
    (5632, 3008),
    (4608, 3648),
    (3072, 5440),
    (3648, 4608),
    (3520, 4736),
    (3328, 4992),
)
"""UltraFlux's 4096²-area bucket table, as printed in the paper."""

AR_STEP = 1.04
"""Our fill: where the paper's table has no AR within half a step, a 4096²-area bucket is
added, on a log grid of this ratio up to 3:1 (and its transpose)."""

CROP_TOLERANCE = 0.005
"""Buckets cropping within this fraction of the least crop count as equally good."""


@dataclass(frozen=True, order=True)
class Bucket:
    """A target size; sides are multiples of 64."""

    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, text: str) -> Bucket:
        w, h = text.lower().split("x")
        return cls(int(w), int(h))


def _round64(x: float) -> int:
    return max(64, round(x / 64.0) * 64)


def default_table(tier_scales: Sequence[float] = (1.0, 0.875, 0.75, 0.6875)) -> list[Bucket]:
    """The paper's 4096²-area tier (plus its transposes and wide ARs), scaled to lower tiers.

    Every tier-1 bucket and its transpose is scaled by each factor in `tier_scales` (sides
    rounded to multiples of 64), so images between 8.3 MP and 16.8 MP find a bucket that
    needs no upscaling.
    """
    base: set[tuple[int, int]] = set()
    for w, h in PAPER_4096_TIER:
        base.add((w, h))
        base.add((h, w))
    area = 4096 * 4096
    for i in range(1, int(math.log(3.0) / math.log(AR_STEP)) + 2):
        a = AR_STEP**i
        if any(abs(math.log(w / h / a)) < math.log(AR_STEP) / 2 for w, h in base):
            continue
        w, h = _round64(math.sqrt(area * a)), _round64(math.sqrt(area / a))
        base.add((w, h))
        base.add((h, w))
    table = {Bucket(_round64(w * s), _round64(h * s)) for w, h in base for s in tier_scales}
    return sorted(table, key=lambda b: (-b.width * b.height, b.aspect))


def _div_round(num: Any, den: Any) -> Any:
    """`num / den` rounded half up, in integers (ints or int arrays): exact, so an image and
    its transpose get transposed crops (float `h * aspect` and `w / aspect` could round a
    half apart, and put the two in different buckets)."""
    return (2 * num + den) // (2 * den)


def crop_box(width: int, height: int, bucket: Bucket) -> tuple[int, int, int, int]:
    """The centered box (left, top, right, bottom) of `width`×`height` at the bucket's AR."""
    if width * bucket.height > height * bucket.width:  # image wider than the bucket
        cw = min(width, _div_round(height * bucket.width, bucket.height))
        left = (width - cw) // 2
        return left, 0, left + cw, height
    ch = min(height, _div_round(width * bucket.height, bucket.width))
    top = (height - ch) // 2
    return 0, top, width, top + ch


def assign(
    width: int, height: int, table: Iterable[Bucket]
) -> tuple[Bucket, tuple[int, int, int, int]] | None:
    """The bucket for an image: no upscaling, least cropping, then the largest.

    A bucket fits when the image's centered crop at the bucket's AR is at least the bucket's
    size. Among fitting buckets, those cropping within `CROP_TOLERANCE` of the least crop are
    equal, and the largest of them wins (then the closest AR). None when nothing fits.
    """
    fits: list[tuple[float, Bucket, tuple[int, int, int, int]]] = []
    for b in table:
        box = crop_box(width, height, b)
        if box[2] - box[0] >= b.width and box[3] - box[1] >= b.height:
            kept = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
            fits.append((kept, b, box))
    if not fits:
        return None
    best = max(k for k, _, _ in fits)
    a = width / height
    _, bucket, box = max(
        (f for f in fits if f[0] >= best - CROP_TOLERANCE),
        key=lambda f: (f[1].width * f[1].height, -abs(math.log(f[1].aspect / a))),
    )
    return bucket, box


def fits_any(widths: np.ndarray, heights: np.ndarray, table: Sequence[Bucket]) -> np.ndarray:
    """For each image size, whether some bucket holds it without upscaling (`assign` is not None).

    The same rule as `crop_box` and `assign`, evaluated for every (image, bucket) pair at once.
    """
    w = np.asarray(widths, dtype=np.int64)[:, None]
    h = np.asarray(heights, dtype=np.int64)[:, None]
    bw = np.array([b.width for b in table], dtype=np.int64)[None, :]
    bh = np.array([b.height for b in table], dtype=np.int64)[None, :]
    wider = w * bh > h * bw
    crop_w = np.minimum(w, _div_round(h * bw, bh))  # as in crop_box
    crop_h = np.minimum(h, _div_round(w * bh, bw))
    ok = np.where(wider, (crop_w >= bw) & (h >= bh), (w >= bw) & (crop_h >= bh))
    return ok.any(axis=1)


def coverage_gaps(
    table: Sequence[Bucket],
    min_pixels: int,
    min_aspect: float,
    max_aspect: float,
    steps: int = 4000,
) -> list[tuple[int, int]]:
    """Smallest images (w, h ≥ `min_pixels`) over the AR range that fit no bucket."""
    shapes = []
    lo, hi = math.log(min_aspect), math.log(max_aspect)
    for i in range(steps + 1):
        a = math.exp(lo + (hi - lo) * i / steps)
        h = math.ceil(math.sqrt(min_pixels / a))
        w = math.ceil(min_pixels / h)
        if min_aspect <= w / h <= max_aspect:
            shapes.append((w, h))
    if not shapes or not table:
        return shapes
    ws, hs = zip(*shapes, strict=True)
    ok = fits_any(np.array(ws), np.array(hs), table)
    return [shape for shape, fit in zip(shapes, ok, strict=True) if not fit]


@dataclass(kw_only=True)
class Bucketer(Stage):
    """Assign every kept image to its bucket and record the crop box.

    Reads: `status`, `width`, `height`. Writes: `bucket`, `crop_left`, `crop_top`,
    `crop_right`, `crop_bottom`. Rows with no fitting bucket are rejected `too_small` (only
    possible with a custom table). Resources: 1 CPU, cheap.
    """

    name: ClassVar[str] = "bucket"
    batch_size: ClassVar[int | None] = None
    reads: ClassVar[tuple[str, ...]] = (schema.STATUS, schema.WIDTH, schema.HEIGHT)
    writes: ClassVar[tuple[str, ...]] = (
        schema.BUCKET,
        schema.CROP_LEFT,
        schema.CROP_TOP,
        schema.CROP_RIGHT,
        schema.CROP_BOTTOM,
    )
    table: list[Bucket] = field(default_factory=default_table)

    def process(self, t: pa.Table) -> pa.Table:
        cols: dict[str, list[Any]] = {c: [] for c in self.writes}
        status, reason, detail = (
            column(t, c) for c in (schema.STATUS, schema.REASON, schema.DETAIL)
        )
        for i, (s, w, h) in enumerate(
            zip(status, column(t, schema.WIDTH), column(t, schema.HEIGHT), strict=True)
        ):
            found = assign(w, h, self.table) if s == schema.STATUS_KEPT else None
            if s == schema.STATUS_KEPT and found is None:
                status[i], reason[i] = schema.STATUS_REJECTED, "too_small"
                detail[i] = f"{w}x{h} fits no bucket of the table without upscaling"
            bucket, box = found if found else (None, (None,) * 4)
            cols[schema.BUCKET].append(bucket.name if bucket else None)
            for c, v in zip(self.writes[1:], box, strict=True):
                cols[c].append(v)
        return set_columns(
            t, {**cols, schema.STATUS: status, schema.REASON: reason, schema.DETAIL: detail}
        )
