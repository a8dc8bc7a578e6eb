"""The GPU benchmark's DC-scan shortcut for progressive JPEGs (bench/model_stages_gpu.py)."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.model_stages_gpu import _cpu_decode, dc_scans_only


def _photo_like(seed: int, w: int, h: int) -> Image.Image:
    """Smooth colour fields with texture: stands in for a photograph at 1/8 scale."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), float)
    noise = rng.normal(0, 12, (h, w, 1))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    quality=st.integers(60, 98),
    subsampling=st.sampled_from([0, 1, 2]),
)
def test_dc_scans_decode_like_the_whole_file_at_one_eighth(
    seed: int, quality: int, subsampling: int
) -> None:
    data = _jpeg(
        _photo_like(seed, 1920, 1800), quality=quality, progressive=True, subsampling=subsampling
    )
    dc = dc_scans_only(data)
    assert dc is not None and len(dc) < len(data) / 2
    full, short = _cpu_decode(data).astype(int), _cpu_decode(dc).astype(int)
    assert full.shape == short.shape == (224, 224, 3)
    if subsampling == 2:
        # 4:2:0: libjpeg's 2x2 chroma IDCT also reads three AC terms the DC scans lack, so
        # only the luma is the same (up to the rounding of the colour conversion)
        luma = np.array([0.299, 0.587, 0.114])
        assert np.abs((full - short) @ luma).mean() < 0.5
        assert np.abs(full - short).mean() < 6.0  # these fields' colours are extreme
    else:  # no block smoothing: the DC scans alone give the very same 1/8-scale image
        assert np.array_equal(full, short)


def test_only_progressive_jpegs_are_shortened() -> None:
    img = _photo_like(1, 640, 480)
    assert dc_scans_only(_jpeg(img, quality=90)) is None
    png = io.BytesIO()
    img.save(png, format="PNG")
    assert dc_scans_only(png.getvalue()) is None
    progressive = _jpeg(img, quality=90, progressive=True)
    for cut in (3, 200, len(progressive) // 2):  # truncated files: a result or None, no error
        out = dc_scans_only(progressive[:cut])
        assert out is None or out.endswith(b"\xff\xd9")
