import itertools

import numpy as np
import pyarrow as pa

from curation import schema
from curation.dedup.near_dup import (
    BAND,
    CAPTIONED,
    PARENT,
    BandSplitter,
    band_keys,
    bands,
    match_band,
    pick_parent,
)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def test_bands_cover_64_bits_disjointly():
    for k in range(0, 12):
        b = bands(64, k)
        assert len(b) == k + 1 and sum(w for _, w in b) == 64
        assert [s for s, _ in b] == sorted(s for s, _ in b)


def test_pigeonhole_any_pair_within_distance_shares_a_band_key():
    rng = np.random.default_rng(0)
    for k in (2, 6, 10):
        for _ in range(200):
            a = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
            flips = rng.choice(64, size=k, replace=False)
            b = a
            for f in flips:
                b ^= 1 << int(f)
            assert set(band_keys(_signed(a), k)) & set(band_keys(_signed(b), k))


def _rows(specs):
    return pa.table(
        {
            schema.SOURCE: [s[0] for s in specs],
            schema.SHA256: [s[1] for s in specs],
            schema.PHASH: pa.array([_signed(s[2]) for s in specs], pa.int64()),
            schema.WIDTH: [s[3] for s in specs],
            schema.HEIGHT: [s[4] for s in specs],
            schema.SIZE_BYTES: [s[6] if len(s) > 6 else 1000 for s in specs],
            schema.SHARPNESS: [s[5] for s in specs],
            schema.NATIVE_SCORE: [1.0] * len(specs),
            schema.MODE: [s[7] if len(s) > 7 else "RGB" for s in specs],
            CAPTIONED: [s[8] if len(s) > 8 else 0 for s in specs],
        }
    )


def test_match_band_points_every_copy_at_better_ones_within_distance():
    t = _rows(
        [
            ("big", "s1", 0b1111, 5000, 3000, 1.0),
            ("small", "s2", 0b1110, 4000, 2400, 1.0),  # 1 bit from big
            ("blurry_same_size", "s3", 0b1111, 5000, 3000, 0.5),
            ("other", "s4", 0xFFFF_0000_FFFF_0000, 5000, 3000, 1.0),
        ]
    )
    edges = match_band(t, max_distance=2)
    pairs = set(
        zip(edges.column(schema.SOURCE).to_pylist(), edges.column(PARENT).to_pylist(), strict=True)
    )
    assert pairs == {("small", "big"), ("blurry_same_size", "big"), ("small", "blurry_same_size")}
    best = pick_parent(edges)
    assert dict(
        zip(best.column(schema.SOURCE).to_pylist(), best.column(PARENT).to_pylist(), strict=True)
    ) == {
        "small": "big",
        "blurry_same_size": "big",
    }


def test_the_larger_file_outranks_a_sharper_re_encode_of_the_same_size():
    """A lossy re-encode can measure sharper than its original (block edges, ringing): at equal
    pixel counts the file with more bytes is kept; sharpness decides only between files of
    one size (byte-identical copies: the smaller URI)."""
    t = _rows(
        [
            ("original_q95.jpg", "s1", 0b1111, 5000, 3000, 1.05, 9_000_000),
            ("original_q95_copy.jpg", "s1", 0b1111, 5000, 3000, 1.05, 9_000_000),
            ("reencoded_q85.jpg", "s2", 0b1110, 5000, 3000, 1.48, 4_000_000),
            ("cdn.webp", "s3", 0b0111, 5000, 3000, 1.10, 2_000_000),
            ("same_bytes_blurred.jpg", "s4", 0b1101, 5000, 3000, 0.70, 9_000_000),
        ]
    )
    best = pick_parent(match_band(t, max_distance=2))
    parents = dict(
        zip(best.column(schema.SOURCE).to_pylist(), best.column(PARENT).to_pylist(), strict=True)
    )
    assert parents == {
        "original_q95_copy.jpg": "original_q95.jpg",
        "reencoded_q85.jpg": "original_q95.jpg",
        "cdn.webp": "original_q95.jpg",
        "same_bytes_blurred.jpg": "original_q95.jpg",
    }


def test_a_colour_copy_outranks_a_larger_grey_one():
    """A grey copy of a colour photograph hashes alike (the hash reads luma) and, as a PNG,
    is often the larger file: at equal pixel counts the colour one is kept (the grey one was
    before, and the job lost the colour)."""
    t = _rows(
        [
            ("colour.jpg", "s1", 0b1111, 5000, 3000, 1.0, 4_000_000, "RGB"),
            ("grey.png", "s2", 0b1111, 5000, 3000, 1.2, 9_000_000, "L"),
            ("grey16.png", "s3", 0b1111, 5000, 3000, 1.2, 19_000_000, "I;16"),
            ("cmyk.jpg", "s4", 0b1110, 5000, 3000, 1.0, 3_000_000, "CMYK"),
            ("bigger_grey.png", "s5", 0b0111, 6000, 3600, 1.0, 9_000_000, "L"),
        ]
    )
    best = pick_parent(match_band(t, max_distance=2))
    parents = dict(
        zip(best.column(schema.SOURCE).to_pylist(), best.column(PARENT).to_pylist(), strict=True)
    )
    assert parents == {  # more pixels still come first
        "colour.jpg": "bigger_grey.png",
        "grey.png": "bigger_grey.png",
        "grey16.png": "bigger_grey.png",
        "cmyk.jpg": "bigger_grey.png",
    }
    best = pick_parent(match_band(t.slice(0, 4), max_distance=2))
    parents = dict(
        zip(best.column(schema.SOURCE).to_pylist(), best.column(PARENT).to_pylist(), strict=True)
    )
    assert parents == dict.fromkeys(("grey.png", "grey16.png", "cmyk.jpg"), "colour.jpg")


def test_splitter_emits_one_row_per_band():
    t = _rows([("a", "s", 123, 1, 1, 0.0), ("b", "t", 456, 1, 1, 0.0)])
    out = BandSplitter(max_distance=3)(t)
    assert out.num_rows == 8
    for src, keys in itertools.groupby(
        zip(out.column(schema.SOURCE).to_pylist(), out.column(BAND).to_pylist(), strict=True),
        key=lambda x: x[0],
    ):
        assert len({k for _, k in keys}) == 4, src


def test_max_hamming_zero_splits_hashes_with_the_top_bit_set():
    """`dedup.max_hamming=0` (allowed: 0..31) is one 64-bit band; a pHash with its top bit
    set made a band key beyond int64, and the job's dedup pass failed on it."""
    a, b = (1 << 63) | 0xABC, (1 << 62) | 0xABC
    t = _rows([("a", "s", a, 1, 1, 0.0), ("a2", "s", a, 1, 1, 0.0), ("b", "t", b, 1, 1, 0.0)])
    out = BandSplitter(max_distance=0)(t)
    keys = out.column(BAND).to_pylist()
    assert out.num_rows == 3 and keys[0] == keys[1] != keys[2]
    for k in (0, 1, 6, 31):  # every key fits the band column's int64
        assert all(-(1 << 63) <= x < (1 << 63) for x in band_keys(_signed(a), k))


def test_of_identical_copies_the_one_with_a_caption_is_kept():
    """Byte-identical copies tie on every measure but the URI: a folder copy without a caption
    (the smaller URI) was kept over a tar member with one, and the caption was lost."""
    t = _rows(
        [
            ("/a/bare.jpg", "s1", 0b1111, 5000, 3000, 1.0, 9_000_000, "RGB", 0),
            ("/b/pool.tar#x.jpg", "s1", 0b1111, 5000, 3000, 1.0, 9_000_000, "RGB", 1),
            ("/c/bare_too.jpg", "s1", 0b1111, 5000, 3000, 1.0, 9_000_000, "RGB", 0),
            ("/0/better.jpg", "s2", 0b1110, 5000, 3000, 1.0, 9_500_000, "RGB", 0),
        ]
    )
    parents = dict(zip(*(pick_parent(match_band(t.slice(0, 3), max_distance=2)).column(c)
                         .to_pylist() for c in (schema.SOURCE, PARENT)), strict=True))  # fmt: skip
    assert parents == dict.fromkeys(("/a/bare.jpg", "/c/bare_too.jpg"), "/b/pool.tar#x.jpg")
    # a caption only breaks ties: the larger file still wins without one
    parents = dict(zip(*(pick_parent(match_band(t, max_distance=2)).column(c).to_pylist()
                         for c in (schema.SOURCE, PARENT)), strict=True))  # fmt: skip
    assert set(parents.values()) == {"/0/better.jpg"} and len(parents) == 3
