"""Exact and near-duplicate detection over perceptual hashes, as distributable steps.

The job-wide step is built from three pieces that a pipeline runs with group-bys (never on
one machine's memory):

1. `BandSplitter`: by the pigeonhole principle, two 64-bit hashes within Hamming distance
   `k` agree exactly on at least one of `k + 1` disjoint bit bands; each row is emitted once
   per band, keyed by (band index, band bits).
2. `match_band`: inside one band group, every pair within distance `k` is compared; each row
   with a better-ranked neighbour emits an edge to it.
3. `pick_parent`: per row, the best-ranked of its better neighbours is its parent. Following
   parents to a row with none (pointer jumping) gives the kept copy that the row duplicates.

Rank ("the copy kept is the best one"): larger pixel count, then colour over grey (a grey
copy of a colour photograph hashes alike, and a PNG one is often the larger file), then the
larger file (at equal
pixel counts, more bytes per pixel: the least lossy encoding), then sharper, then more native,
then one with a caption (of byte-identical copies, a sidecar's or tar member's caption is kept
over a bare copy), then the smaller source URI (a deterministic tie-break). The file size comes
before the focus measure because re-encoding moves the focus measure either way: on 12 real
photographs a JPEG q85 re-encode measured up to 0.43 sharper (its block edges; 8 of the 12
sharper), a lossy WebP one up to 0.03, while a Gaussian blur of 0.6 px measured 0.14 to 1.4
less, so by sharpness a web copy often outranked its original (docs/dedup.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation import schema
from curation.base import Stage, column

BAND = "band"
PARENT = "parent"
PARENT_SHA256 = "parent_sha256"
DISTANCE = "distance"
PARENT_PIXELS = "parent_pixels"
PARENT_SIZE = "parent_size_bytes"
PARENT_SHARPNESS = "parent_sharpness"
PARENT_NATIVE = "parent_native"
PARENT_COLOUR = "parent_colour"
PARENT_CAPTIONED = "parent_captioned"
CAPTIONED = "captioned"
"""Dedup-internal column: 1 for a row with a caption (English or Chinese), else 0."""
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""PIL modes without colour (the rest, palette included, rank as colour)."""

HASH_COLUMNS = (
    schema.SOURCE,
    schema.SHA256,
    schema.PHASH,
    schema.WIDTH,
    schema.HEIGHT,
    schema.SIZE_BYTES,
    schema.SHARPNESS,
    schema.NATIVE_SCORE,
    schema.MODE,
)
"""The slim columns the dedup step reads (no bytes travel through its shuffles)."""

DEDUP_COLUMNS = (*HASH_COLUMNS, CAPTIONED)
"""What travels through the dedup step's shuffles: `HASH_COLUMNS` and `CAPTIONED`."""

EDGE_SCHEMA = pa.schema(
    [
        (schema.SOURCE, pa.string()),
        (schema.SHA256, pa.string()),
        (PARENT, pa.string()),
        (PARENT_SHA256, pa.string()),
        (DISTANCE, pa.int64()),
        (PARENT_PIXELS, pa.int64()),
        (PARENT_SIZE, pa.int64()),
        (PARENT_SHARPNESS, pa.float64()),
        (PARENT_NATIVE, pa.float64()),
        (PARENT_COLOUR, pa.int64()),
        (PARENT_CAPTIONED, pa.int64()),
    ]
)


def captioned(t: pa.Table) -> list[int]:
    """1 for each row with a caption (`caption_en` or `caption_zh` not empty), else 0."""
    pairs = zip(column(t, schema.CAPTION_EN), column(t, schema.CAPTION_ZH), strict=True)
    return [int(bool(en) or bool(zh)) for en, zh in pairs]


def with_captioned(t: pa.Table) -> pa.Table:
    """`DEDUP_COLUMNS` of rows that hold `HASH_COLUMNS` and the two caption columns: whether
    each row has a caption replaces the captions' text."""
    has = pa.array(captioned(t), pa.int64())
    return t.select(list(HASH_COLUMNS)).append_column(CAPTIONED, has)


def bands(num_bits: int, max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of `max_distance + 1` disjoint bit bands covering `num_bits` bits."""
    n = max_distance + 1
    edges = [round(i * num_bits / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(n)]


def band_keys(phash: int, max_distance: int) -> list[int]:
    """One int64 key per band: band index in the high bits, the band's hash bits below.

    With `max_distance` 0 the one band is the whole 64-bit hash: its key is the hash itself,
    as a signed int64 (the band column's type).
    """
    u = phash & ((1 << 64) - 1)
    keys = [
        (i << 40) | ((u >> shift) & ((1 << width) - 1))
        for i, (shift, width) in enumerate(bands(64, max_distance))
    ]
    return [k - (1 << 64) if k >= (1 << 63) else k for k in keys]


def colour(mode: Any) -> int:
    """1 for a PIL mode with colour (or unknown), 0 for a grey one (`GREY_MODES`)."""
    return 0 if mode in GREY_MODES else 1


def rank_key(
    pixels: Any,
    size_bytes: Any,
    sharpness: Any,
    native: Any,
    source: str,
    colour: int = 1,
    captioned: int = 0,
) -> tuple:
    """Sort key of a copy: smaller is better (more pixels, colour over grey, more bytes,
    sharper, more native, with a caption, smaller URI; a null counts as 0). Byte-identical
    copies differ only in the last two: the one with a caption is kept, so its text stays."""
    return (-(pixels or 0), -colour, -(size_bytes or 0), -(sharpness or 0.0), -(native or 0.0),
            -(captioned or 0), source)


@dataclass(kw_only=True)
class BandSplitter(Stage):
    """Emit each hashed row once per pigeonhole band (adds the `band` key column).

    Reads: `HASH_COLUMNS`. Writes: `band`. Resources: 1 CPU, cheap.
    """

    name: ClassVar[str] = "dedup_bands"
    batch_size: ClassVar[int | None] = None
    reads: ClassVar[tuple[str, ...]] = DEDUP_COLUMNS
    writes: ClassVar[tuple[str, ...]] = (BAND,)
    max_distance: int = 6

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """Only the slim hash columns travel on, plus the band key."""
        del input_schema
        return pa.schema(
            [
                *((c, schema.arrow_type(c)) for c in HASH_COLUMNS),
                (CAPTIONED, pa.int64()),
                (BAND, pa.int64()),
                (schema.STAGE_SECONDS, schema.arrow_type(schema.STAGE_SECONDS)),
            ]
        )

    def process(self, t: pa.Table) -> pa.Table:
        keys = [band_keys(h, self.max_distance) for h in column(t, schema.PHASH)]
        idx = [i for i, ks in enumerate(keys) for _ in ks]
        out = t.select(list(DEDUP_COLUMNS)).take(pa.array(idx, type=pa.int64()))
        return out.append_column(BAND, pa.array([k for ks in keys for k in ks], type=pa.int64()))


def match_band(group: pa.Table, max_distance: int) -> pa.Table:
    """Edges from each row of one band group to every better-ranked row within distance."""
    n = group.num_rows
    out: dict[str, list[Any]] = {f.name: [] for f in EDGE_SCHEMA}
    if n >= 2:
        hashes = np.array(column(group, schema.PHASH), dtype=np.int64).view(np.uint64)
        src, sha = column(group, schema.SOURCE), column(group, schema.SHA256)
        w, h = column(group, schema.WIDTH), column(group, schema.HEIGHT)
        sharp, native = column(group, schema.SHARPNESS), column(group, schema.NATIVE_SCORE)
        size = column(group, schema.SIZE_BYTES)
        pixels = [(a or 0) * (b or 0) for a, b in zip(w, h, strict=True)]
        colours = [colour(m) for m in column(group, schema.MODE)]
        capt = column(group, CAPTIONED)
        keys = [
            rank_key(*r)
            for r in zip(pixels, size, sharp, native, src, colours, capt, strict=True)
        ]
        for i in range(n):
            dist = np.bitwise_count(hashes ^ hashes[i])
            for j in np.nonzero(dist <= max_distance)[0]:
                if keys[j] < keys[i]:
                    out[schema.SOURCE].append(src[i])
                    out[schema.SHA256].append(sha[i])
                    out[PARENT].append(src[j])
                    out[PARENT_SHA256].append(sha[j])
                    out[DISTANCE].append(int(dist[j]))
                    out[PARENT_PIXELS].append(pixels[j])
                    out[PARENT_SIZE].append(size[j])
                    out[PARENT_SHARPNESS].append(sharp[j])
                    out[PARENT_NATIVE].append(native[j])
                    out[PARENT_COLOUR].append(colours[j])
                    out[PARENT_CAPTIONED].append(capt[j])
    return pa.table(out, schema=EDGE_SCHEMA)


def pick_parent(edges: pa.Table) -> pa.Table:
    """Per source, keep only the edge to its best-ranked better neighbour."""
    best: dict[str, tuple[tuple, int]] = {}
    names = (PARENT_PIXELS, PARENT_SIZE, PARENT_SHARPNESS, PARENT_NATIVE, PARENT, PARENT_COLOUR,
             PARENT_CAPTIONED)
    cols = [column(edges, c, 1) for c in names]
    for i, src in enumerate(column(edges, schema.SOURCE)):
        k = rank_key(*(c[i] for c in cols))
        if src not in best or k < best[src][0]:
            best[src] = (k, i)
    idx = sorted(i for _, i in best.values())
    return edges.take(pa.array(idx, type=pa.int64()))
