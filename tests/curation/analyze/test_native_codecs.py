"""native_score across codecs (issue 11): lossy WebP natives kept, WebP enlargements caught.

Real photographs from Debian's wallpaper packages are re-encoded here by Pillow; the full sweep
is bench/calibrate_codecs.py (tables in docs/native-detection.md, "Codecs").
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native_images import full_luma as _full
from native_images import texture as _texture
from PIL import Image

from curation import schema
from curation.analyze.native import CODECS, DEFAULT_NATIVE_THRESHOLD, TESTS, native_score
from curation.analyze.pixel_analyzer import (
    VP8_FINE_QUANTISER,
    PixelAnalyzer,
    block_codec,
    vp8_quantiser,
)

THR = DEFAULT_NATIVE_THRESHOLD
WALL = "/usr/share/wallpapers"
BACKGROUNDS = "/usr/share/backgrounds"
# calibration photographs (KDE); the held-out camera file below was never used to set a threshold
PHOTOS = [f"{WALL}/{n}/contents/images/2560x1600.jpg"
          for n in ("Autumn", "Kite", "Grey", "BytheWater")]


def _photo(path: str, width: int, height: int) -> np.ndarray:
    """Centre crop of a real photograph's luma, on its 8-px JPEG grid."""
    g = _full(path)
    h, w = g.shape
    y, x = (h - height) // 16 * 8, (w - width) // 16 * 8
    return np.ascontiguousarray(g[y : y + height, x : x + width])


def _bytes(gray: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.ascontiguousarray(np.asarray(im.convert("L")))


def _webp(gray: np.ndarray, quality: int) -> np.ndarray:
    return _decode(_bytes(gray, "WEBP", quality=quality))


def _enlarge(gray: np.ndarray, factor: float, method: int = Image.BICUBIC,
             source_quality: int = 0) -> np.ndarray:
    """Area-downscale by 1/factor (saved as a JPEG of `source_quality` first, if given), then
    enlarge back to the same size with PIL."""
    h, w = gray.shape
    small = cv2.resize(gray, (round(w / factor), round(h / factor)), interpolation=cv2.INTER_AREA)
    if source_quality:
        small = _decode(_bytes(small, "JPEG", quality=source_quality))
    return np.asarray(Image.fromarray(small).resize((w, h), method))


def test_block_codec_from_the_first_bytes() -> None:
    g = _texture(64, 96)
    rgba = Image.fromarray(g).convert("RGBA")
    rgba.putalpha(128)
    cases = {
        "jpeg": _bytes(g, "JPEG", quality=90),
        "vp8": _bytes(g, "WEBP", quality=80),
        "lossless": _bytes(g, "WEBP", lossless=True),
        "png": _bytes(g, "PNG"),
        "tiff": _bytes(g, "TIFF"),
    }
    assert block_codec(cases["jpeg"]) == "jpeg"
    assert block_codec(_bytes(g, "JPEG", quality=85)) == "jpeg"
    assert block_codec(_bytes(g, "JPEG", quality=84)) == "jpeg_low"
    assert block_codec(_bytes(g, "JPEG", quality=75, progressive=True)) == "jpeg_low"
    for quality, codec in ((74, "jpeg_low"), (73, "jpeg_coarse"), (60, "jpeg_coarse"),
                           (59, "jpeg_coarsest"), (20, "jpeg_coarsest")):
        assert block_codec(_bytes(g, "JPEG", quality=quality)) == codec, quality
    assert block_codec(cases["vp8"]) == "vp8"
    assert block_codec(cases["lossless"]) == "lossless"
    assert block_codec(cases["png"]) == block_codec(cases["tiff"]) == "lossless"
    buf = io.BytesIO()
    rgba.save(buf, "WEBP", quality=80)  # extended file: VP8X, ALPH, then the VP8 chunk
    assert buf.getvalue()[12:16] == b"VP8X" and block_codec(buf.getvalue()) == "vp8"
    if "AVIF" in Image.SAVE:
        assert block_codec(_bytes(g, "AVIF", quality=60)) == "av1"
    assert block_codec(b"") == "lossless"
    photo = _photo(PHOTOS[0], 640, 400)
    for quality, codec in ((75, "vp8"), (89, "vp8"), (90, "vp8_fine"), (100, "vp8_fine")):
        assert block_codec(_bytes(photo, "WEBP", quality=quality)) == codec, quality
    alpha = Image.fromarray(photo).convert("RGBA")
    alpha.putalpha(128)
    buf = io.BytesIO()
    alpha.save(buf, "WEBP", quality=95)
    assert buf.getvalue()[12:16] == b"VP8X" and block_codec(buf.getvalue()) == "vp8_fine"


@pytest.mark.parametrize("path", PHOTOS[:2])
def test_vp8_quantiser_read_from_the_frame_header(path: str) -> None:
    """libwebp's quality → the coarsest luma AC quantiser index over the frame's segments.
    The same on every real photograph tried (its spatial noise shaping lowers it for
    synthetic noise: 9 at q90)."""
    g = _photo(path, 1280, 800)
    found = {}
    for quality in (50, 75, 85, 90, 95, 100):
        data = _bytes(g, "WEBP", quality=quality)
        found[quality] = vp8_quantiser(data[data.index(b"VP8 ") + 8 :])
    assert found == {50: 52, 75: 36, 85: 20, 90: 12, 95: 6, 100: 0}
    assert found[90] == VP8_FINE_QUANTISER
    data = _bytes(g, "WEBP", quality=90)
    frame = data[data.index(b"VP8 ") + 8 :]
    assert vp8_quantiser(frame[:14]) is None  # truncated inside the header
    assert vp8_quantiser(b"\x01" + frame[1:]) is None  # an inter frame, not a key frame


VP8_KEY_FRAME = b"RIFF\x00\x00\x00\x00WEBPVP8 \x40\x00\x00\x00\x50\x02\x00\x9d\x01\x2a"


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from([b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xdb\x00\x43\x00",
                               b"RIFF\x00\x00\x00\x00WEBP", b"RIFF\x10\x00\x00\x00WEBPVP8X",
                               VP8_KEY_FRAME, b"\x00\x00\x00\x1cftypavif"]),
       tail=st.binary(max_size=300))
def test_block_codec_never_fails_on_hostile_bytes(prefix: bytes, tail: bytes) -> None:
    """Truncated or forged headers give a codec the detector knows, never an exception."""
    assert block_codec(prefix + tail) in CODECS
    quantiser = vp8_quantiser((prefix + tail)[20:])
    assert quantiser is None or 0 <= quantiser <= 127


def test_codec_is_validated_and_reported() -> None:
    tex = _texture(400, 640, seed=4)
    with pytest.raises(ValueError, match="codec"):
        native_score(tex, codec="h264")
    for codec in CODECS:
        ev = native_score(tex, codec=codec)
        assert ev.codec == codec and ev.test in TESTS
        assert ev.score >= THR and math.isnan(ev.period)
        assert ev.score == pytest.approx(2.0 ** -ev.strength)


@pytest.mark.parametrize("path", PHOTOS)
def test_real_photographs_as_lossy_webp_stay_native(path: str) -> None:
    """The issue's case: native photographs re-encoded as lossy WebP were judged `upscaled`."""
    g = _photo(path, 2520, 1560)
    for q, codec in ((75, "vp8"), (85, "vp8"), (90, "vp8_fine"), (100, "vp8_fine")):
        data = _bytes(g, "WEBP", quality=q)
        assert block_codec(data) == codec
        ev = native_score(_decode(data), codec=codec)
        assert ev.score >= THR, (q, ev)


@pytest.mark.parametrize("path", [f"{WALL}/Kite/contents/images/2560x1600.jpg",
                                  f"{WALL}/Cascade/contents/images/3840x2160.png",
                                  f"{WALL}/Kokkini/contents/images/3840x2160.png"])
def test_real_photographs_as_jpeg_q75_stay_native(path: str) -> None:
    """At q75 the 8×8 grid alone tripped the fold test on these natives (calibration set)."""
    data = _bytes(_photo(path, 2520, 1560), "JPEG", quality=75)
    assert block_codec(data) == "jpeg_low"
    ev = native_score(_decode(data), codec=block_codec(data))
    assert ev.score >= THR, ev


@pytest.mark.parametrize("name", ["greentock_by_Peter_Nerlich.jpg",
                                  "analogpattern_by_Peter_Nerlich.jpg"])
def test_held_out_photographs_as_coarse_jpeg_stay_native(name: str) -> None:
    """Saved at q40-q60, two held-out photographs were rejected by ``jpeg_low``'s thresholds
    (the 8×8 grid at 5/8 cyc/px); the coarse models, set on other pictures, keep them."""
    g = _full(f"{BACKGROUNDS}/{name}", "lomiri-wallpapers-16.04")
    h, w = g.shape
    crop = np.ascontiguousarray(g[(h - 1560) // 16 * 8 :][:1560, (w - 2520) // 16 * 8 :][:, :2520])
    for quality in (40, 50, 60):
        data = _bytes(crop, "JPEG", quality=quality)
        img = _decode(data)
        assert native_score(img, codec="jpeg_low").score < THR, quality
        ev = native_score(img, codec=block_codec(data))
        assert ev.score >= THR and ev.codec == block_codec(data), (quality, ev)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quality=st.integers(75, 100), dy=st.integers(0, 15), dx=st.integers(0, 15),
       seed=st.integers(0, 3))
def test_webp_natives_kept_at_any_quality_and_grid_offset(
    quality: int, dy: int, dx: int, seed: int
) -> None:
    """A 1/f texture cropped by any offset (the 4-px and 16-px grids anywhere) and saved as WebP."""
    tex = _texture(816, 1296, seed=seed)
    data = _bytes(np.ascontiguousarray(tex[dy : dy + 800, dx : dx + 1280]), "WEBP", quality=quality)
    assert native_score(_decode(data), codec=block_codec(data)).score >= THR


@pytest.mark.parametrize(("factor", "quality"), [(1.25, 100), (1.5, 90), (2.0, 100), (3.0, 90)])
def test_webp_enlargements_are_caught(factor: float, quality: int) -> None:
    """Bicubic enlargements saved as lossy WebP: at least three of the four photographs."""
    caught = 0
    for path in PHOTOS:
        data = _bytes(_enlarge(_photo(path, 2520, 1560), factor), "WEBP", quality=quality)
        ev = native_score(_decode(data), codec=block_codec(data))
        caught += ev.score < THR and ev.strength >= 1 and not math.isnan(ev.period)
    assert caught >= 3


@pytest.mark.parametrize(("factor", "quality"), [(4 / 3, 100), (2.0, 90)])
def test_fine_webp_enlargements_on_the_transform_grid(factor: float, quality: int) -> None:
    """4/3 and 2× put their trace on VP8's 4-px grid: lost to the ``vp8`` model, caught by
    ``vp8_fine`` at q90 and finer (bicubic, at least three of the four photographs)."""
    caught = {"vp8": 0, "vp8_fine": 0}
    for path in PHOTOS:
        data = _bytes(_enlarge(_photo(path, 2520, 1560), factor), "WEBP", quality=quality)
        assert block_codec(data) == "vp8_fine"
        for codec in caught:
            caught[codec] += native_score(_decode(data), codec=codec).score < THR
    assert caught["vp8_fine"] >= 3 and caught["vp8_fine"] > caught["vp8"], caught


@pytest.mark.parametrize(("factor", "source", "fmt", "quality"),
                         [(1.25, 75, "JPEG", 90), (1.5, 85, "WEBP", 90), (2.0, 75, "WEBP", 100),
                          (2.5, 85, "JPEG", 90)])
def test_enlargements_of_web_jpegs_are_caught(
    factor: float, source: int, fmt: str, quality: int
) -> None:
    """A fake 4K file made from a small JPEG (bicubic), saved at q90 or finer: at least three of
    the four photographs (docs: *Enlargements of web images*, 0.87-0.97 in those cells)."""
    caught = 0
    for path in PHOTOS:
        data = _bytes(_enlarge(_photo(path, 2520, 1560), factor, source_quality=source), fmt,
                      quality=quality)
        caught += native_score(_decode(data), codec=block_codec(data)).score < THR
    assert caught >= 3


@pytest.mark.parametrize(("method", "webp"), [(Image.BICUBIC, False), (Image.BILINEAR, True)])
def test_mild_enlargements_are_caught(method: int, webp: bool) -> None:
    """1.15× (fundamental 0.87 cyc/px, beyond the old harmonic range) as PNG or WebP q100."""
    caught = 0
    for path in PHOTOS:
        img = _enlarge(_photo(path, 2520, 1560), 1.15, method)
        codec = "lossless"
        if webp:
            data = _bytes(img, "WEBP", quality=100)
            img, codec = _decode(data), block_codec(data)
        ev = native_score(img, codec=codec)
        caught += ev.score < THR
    assert caught >= 3


def test_held_out_camera_photograph_as_webp() -> None:
    """A 16 MP camera photograph held out of calibration: native as WebP q85, 2× caught."""
    g = _full(f"{BACKGROUNDS}/seeding_by_Clements_Engelhardt.jpg", "lomiri-wallpapers-16.04")
    h, w = g.shape
    crop = np.ascontiguousarray(g[(h - 1600) // 2 : (h + 1600) // 2, (w - 2560) // 2 :][:, :2560])
    assert native_score(_webp(crop, 85), codec="vp8").score >= THR
    ev = native_score(_webp(_enlarge(crop, 2.0), 85), codec="vp8")
    assert ev.score < THR, ev


def test_analyzer_writes_the_evidence_columns() -> None:
    tex = _texture(720, 1080, seed=5)
    native_webp = _bytes(tex, "WEBP", quality=85)
    upscaled_png = _bytes(_enlarge(tex, 1.5), "PNG")
    rows = PixelAnalyzer()({
        schema.DATA: [native_webp, upscaled_png],
        schema.ORIENTATION: [1, 1],
        schema.STATUS: [None, None],
    }).to_pylist()
    kept, fake = rows
    assert kept[schema.NATIVE_CODEC] == "vp8" and fake[schema.NATIVE_CODEC] == "lossless"
    assert kept[schema.NATIVE_SCORE] >= THR and kept[schema.NATIVE_PERIOD] is None
    assert kept[schema.NATIVE_STRENGTH] < 1 and kept[schema.NATIVE_TEST] in TESTS
    assert fake[schema.NATIVE_SCORE] < THR and fake[schema.NATIVE_STRENGTH] >= 1
    assert fake[schema.NATIVE_TEST] in TESTS and fake[schema.NATIVE_PERIOD] > 1
    # the period is the trace's: 1.5 (or its alias 3 px) for a 1.5× enlargement
    assert min(abs(fake[schema.NATIVE_PERIOD] - p) for p in (1.5, 3.0)) < 0.1


def test_block_codec_sees_past_megabytes_of_metadata(python_lines) -> None:
    """A q75 JPEG whose ICC profile or Photoshop XMP fills more than 1 MB in front of its
    quantisation tables was judged with the q85-q100 ``jpeg`` model (the walk stopped at
    1 MB); a lossy WebP with such an ICCP chunk was taken for ``lossless``."""
    from PIL import ImageCms

    from curation.analyze.pixel_analyzer import MAX_HEADER_STEPS, _jpeg_quant_scale

    g = _texture(48, 64)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for padding in (0, 1_500_000, 4_000_000):
        icc = srgb + b"\0" * padding  # Pillow splits it over APP2 segments / one ICCP chunk
        assert block_codec(_bytes(g, "JPEG", quality=75, icc_profile=icc)) == "jpeg_low"
        assert block_codec(_bytes(g, "WEBP", quality=60, icc_profile=icc)) == "vp8"
    # The walks are bounded in steps (MAX_HEADER_STEPS, a few lines each), not in bytes: 20
    # million fill bytes or 2 million empty chunks would otherwise take 10^7 lines and more.
    bound = 10 * MAX_HEADER_STEPS
    fill = b"\xff\xd8" + b"\xff" * 20_000_000
    assert python_lines(bound, _jpeg_quant_scale, fill) is None
    chunks = b"RIFF\0\0\0\0WEBP" + b"JUNK\0\0\0\0" * 2_000_000
    assert python_lines(bound, block_codec, chunks) == "lossless"
