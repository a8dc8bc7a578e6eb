"""The demo's renderer: deterministic, and its ramps the values of the full-grid formula."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.samples import colour_ramps, encode, render


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 900), height=st.integers(1, 900), seed=st.integers(0, 2**32 - 1))
def test_colour_ramps_equal_the_full_grid_formula_bit_for_bit(
    width: int, height: int, seed: int
) -> None:
    ramps = colour_ramps(width, height, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-120, 120, 3)
        full = 128 + a * xx / width + b * yy / height + d * (xx + yy) / (width + height)
        assert np.array_equal(ramps[..., c], full.astype(np.float32))


@settings(max_examples=10, deadline=None)
@given(
    width=st.integers(256, 640),  # render draws shapes of at least 1 px: sides of 250 or more
    height=st.integers(256, 640),
    seed=st.integers(0, 2**32 - 1),
)
def test_render_is_deterministic(width: int, height: int, seed: int) -> None:
    rgb = render(width, height, seed)
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, render(width, height, seed))
    assert not np.array_equal(rgb, render(width, height, seed + 1))


def test_png_samples_keep_their_pixels_at_any_compression() -> None:
    rgb = render(320, 256, 5)
    fast, default = encode(rgb, "PNG"), encode(rgb, "PNG", compress_level=6)
    assert fast != default  # zlib level 1 unless the caller says otherwise
    for data in (fast, default):
        assert np.array_equal(np.asarray(Image.open(BytesIO(data)).convert("RGB")), rgb)
