"""Thumbnails for the model stages, made only for the rows that will be scored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from curation import schema
from curation.analyze.pixel_analyzer import DECODED_MARK, make_thumbnail
from curation.base import Stage, column, set_columns
from curation.io.readers import read_bytes

ROWS = ("pending", "decoded", "all")


@dataclass(kw_only=True)
class ThumbnailMaker(Stage):
    """Make the missing thumbnails of the rows the model stages will see.

    A JPEG's thumbnail is a second, reduced-size decode (`PixelAnalyzer` decodes only its
    luma), so it is made here, after the thresholds, and a rejected JPEG costs none; other
    formats already got theirs from the one full decode. Bytes come from `data` when the batch
    still holds them, else they are read again from `source` (`tar_offset` and `size_bytes`
    for a tar member): the model pass does so for rows that became candidates only when a
    rerun re-tuned a threshold.

    Reads: `data` (optional), `source`, `tar_offset`, `size_bytes`, `orientation`, `status`,
    `sharpness` (`DECODED_MARK`: set for every decoded image), `thumbnail`. Writes:
    `thumbnail` (null where the file cannot be read or decoded: such a row is not scored,
    and its verdict is the analysis's). Resources: 1 CPU; a reduced-size decode (about a
    sixteenth of the image's pixels) at a time.
    """

    name: ClassVar[str] = "thumbnail"
    batch_size: ClassVar[int | None] = None
    reads: ClassVar[tuple[str, ...]] = (
        schema.DATA,
        schema.SOURCE,
        schema.TAR_OFFSET,
        schema.SIZE_BYTES,
        schema.ORIENTATION,
        schema.STATUS,
        DECODED_MARK,
        schema.THUMBNAIL,
    )
    writes: ClassVar[tuple[str, ...]] = (schema.THUMBNAIL,)
    size: int
    """Longest side of a thumbnail."""
    rows: str = "pending"
    """Which rows need one: `pending` (no verdict yet), `decoded` (also rejected rows whose
    pixels decoded: `score.score_all`), or `all` (every row of the batch)."""

    def __post_init__(self) -> None:
        if self.rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, not {self.rows!r}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, not {self.size}")

    def _wanted(self, table: pa.Table) -> list[bool]:
        have = [t is not None for t in column(table, schema.THUMBNAIL)]
        if self.rows == "all":
            return [not h for h in have]
        pending = [s is None for s in column(table, schema.STATUS)]
        if self.rows == "decoded":
            decoded = [v is not None for v in column(table, DECODED_MARK)]
            pending = [p or d for p, d in zip(pending, decoded, strict=True)]
        return [p and not h for p, h in zip(pending, have, strict=True)]

    def process(self, table: pa.Table) -> pa.Table:
        wanted = self._wanted(table)
        if not any(wanted):
            return set_columns(table, {schema.THUMBNAIL: column(table, schema.THUMBNAIL)})
        thumbs = column(table, schema.THUMBNAIL)
        data = column(table, schema.DATA)
        rows: Any = zip(
            column(table, schema.SOURCE),
            column(table, schema.TAR_OFFSET),
            column(table, schema.SIZE_BYTES),
            column(table, schema.ORIENTATION, 1),
            strict=True,
        )
        for i, (source, offset, size, orientation) in enumerate(rows):
            if not wanted[i]:
                continue
            raw = data[i]
            if raw is None:
                try:
                    raw = read_bytes(source, offset, size)
                except Exception:  # gone or unreadable since the analysis: not scored
                    continue
            thumbs[i] = make_thumbnail(raw, orientation or 1, self.size)
        return set_columns(table, {schema.THUMBNAIL: thumbs})
