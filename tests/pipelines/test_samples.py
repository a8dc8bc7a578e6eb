"""The demo's renderer: deterministic, and the same pixels as its plain full-grid formula."""

from __future__ import annotations

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.samples import encode, render


def _render_full_grid(width: int, height: int, seed: int) -> np.ndarray:
    """`render` as first written: full coordinate grids and a temporary grain array."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-120, 120, 3)
        img[..., c] = 128 + a * xx / width + b * yy / height + d * (xx + yy) / (width + height)
    scale = min(width, height)
    for _ in range(int(rng.integers(350, 450))):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        kind = rng.integers(0, 3)
        r = int(scale * rng.uniform(0.004, 0.12))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        if kind == 0:
            cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
        elif kind == 1:
            pts = np.stack([rng.integers(cx - r, cx + r, 5), rng.integers(cy - r, cy + r, 5)], 1)
            cv2.fillPoly(img, [pts.astype(np.int32)], color, cv2.LINE_AA)
        else:
            end = (cx + int(rng.integers(-4 * r, 4 * r)), cy + int(rng.integers(-4 * r, 4 * r)))
            cv2.line(img, (cx, cy), end, color, int(rng.integers(1, 6)), cv2.LINE_AA)
    texture = rng.standard_normal((height, width), dtype=np.float32)
    texture = cv2.GaussianBlur(texture, (0, 0), 1.2) * 55.0
    img += texture[..., None]
    img += rng.standard_normal((height, width, 3), dtype=np.float32) * 4.0
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    return np.clip(img, 0, 255).astype(np.uint8)


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(256, 700),  # render draws shapes of at least 1 px: sides >= 250
    height=st.integers(256, 700),
    seed=st.integers(0, 2**32 - 1),
)
def test_render_is_deterministic_and_equals_the_full_grid_formula(
    width: int, height: int, seed: int
) -> None:
    rgb = render(width, height, seed)
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, render(width, height, seed))
    assert np.array_equal(rgb, _render_full_grid(width, height, seed))


def test_png_samples_keep_their_pixels_at_any_compression() -> None:
    from io import BytesIO

    from PIL import Image

    rgb = render(320, 256, 5)
    fast, default = encode(rgb, "PNG"), encode(rgb, "PNG", compress_level=6)
    assert fast != default  # the level is the caller's to choose
    for data in (fast, default):
        assert np.array_equal(np.asarray(Image.open(BytesIO(data)).convert("RGB")), rgb)
