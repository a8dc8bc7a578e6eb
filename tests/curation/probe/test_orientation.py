"""EXIF orientation 1-8 in every container that carries one: sizes and pixels as displayed."""

import io

import numpy as np
import pytest
from PIL import Image, features

from curation.analyze.pixel_analyzer import decode
from curation.probe.header_probe import probe

# The transpose that stores a displayed image so that EXIF orientation `o` shows it again.
_STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
FORMATS = [
    ("TIFF", {}),
    ("TIFF", {"compression": "tiff_lzw"}),
    ("PNG", {}),
    ("WEBP", {"lossless": True}),
    ("JPEG", {"quality": 100, "subsampling": 0}),
]
if features.check("avif"):
    FORMATS.append(("AVIF", {"quality": 100}))


def _displayed() -> Image.Image:
    """A portrait test card whose every flip and turn is different: a ramp plus a corner mark."""
    y, x = np.mgrid[0:96, 0:64]
    gray = (x * 2 + y).astype(np.uint8)
    gray[:16, :16] = 255
    return Image.fromarray(gray).convert("RGB")


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("fmt", "options"), FORMATS)
def test_sizes_and_pixels_follow_the_displayed_orientation(fmt, options, orientation):
    shown = _displayed()
    store = _STORE[orientation]
    stored = shown if store is None else shown.transpose(store)  # FLIP_LEFT_RIGHT is 0
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, fmt, exif=exif.tobytes(), **options)
    row = probe(buf.getvalue())
    assert "reason" not in row, row
    assert (row["width"], row["height"]) == shown.size
    gray, thumb = decode(buf.getvalue(), row["orientation"], thumbnail_size=48)
    want = np.asarray(shown.convert("L"), dtype=np.int16)
    assert gray.shape == want.shape
    assert np.abs(gray.astype(np.int16) - want).mean() < 3  # the same picture, not a turn of it
    assert Image.open(io.BytesIO(thumb)).size == (32, 48)
