"""Embedded ICC profiles: the loader, curation's thumbnails and the report show sRGB.

The profiles are real ones, Ghostscript's (Debian's `libgs-common`, which `.ci/run` installs):
Adobe RGB (1998), ROMM (ProPhoto) RGB, a SWOP press CMYK, sRGB and sGray.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms

from curation.analyze.pixel_analyzer import make_thumbnail
from curation.probe.header_probe import probe
from pipelines.report import reduced_image
from pipelines.samples import DISPLAY_P3_NAME, display_p3_profile
from training.colour import ADOBE_RGB_DCF_NAME, as_shown, embedded_profile, profile_name, to_srgb
from training.data import decode_bucket, decode_crop

GS = "/usr/share/color/icc/ghostscript"


def icc(name: str) -> bytes:
    path = f"{GS}/{name}"
    if not os.path.exists(path):
        pytest.skip(f"{path} missing: apt-get install libgs-common")
    with open(path, "rb") as f:
        return f.read()


def reference(im: Image.Image, profile: bytes) -> np.ndarray:
    """The image converted to sRGB by littlecms directly, as a colour-managed viewer shows it."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    return np.asarray(out, dtype=np.int16)


def patches(h: int = 96, w: int = 128) -> np.ndarray:
    """Muted colour patches (a landscape's greens, skin, sky, greys) with fine detail."""
    colours = [(100, 150, 100), (200, 160, 140), (120, 150, 190), (128, 128, 128),
               (60, 90, 40), (230, 230, 225), (150, 60, 50), (20, 20, 25)]
    img = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate(colours):
        img[:, i * w // len(colours) : (i + 1) * w // len(colours)] = c
    rng = np.random.default_rng(0)
    return np.clip(img.astype(int) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)


def saved(arr: np.ndarray, fmt: str, profile: bytes | None, mode: str = "RGB", **kw) -> bytes:
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"icc_profile": profile} if profile else {}), **kw)
    return buf.getvalue()


def saturation(rgb: np.ndarray) -> float:
    a = rgb.astype(np.float64)
    return float((a.max(axis=-1) - a.min(axis=-1)).mean())


@pytest.mark.parametrize("name", ["a98.icc", "rommrgb.icc"])
def test_wide_gamut_rgb_is_converted_in_the_loader(name):
    """Adobe and ProPhoto RGB pixels read as sRGB look washed out; converted, they match
    littlecms's own conversion and are more saturated, neutrals staying neutral."""
    profile = icc(name)
    arr = patches()
    data = saved(arr, "PNG", profile)
    box, size = (0, 0, arr.shape[1], arr.shape[0]), (arr.shape[1], arr.shape[0])
    got = decode_bucket(data, box, size, name="x.png").astype(np.int16)
    want = reference(Image.fromarray(arr), profile)
    assert np.abs(got - want).max() <= 1
    assert saturation(got) > 1.15 * saturation(arr)
    grey = decode_bucket(saved(np.full((8, 8, 3), 128, np.uint8), "PNG", profile), (0, 0, 8, 8),
                         (8, 8)).astype(int)
    assert np.ptp(grey) <= 1
    rng = np.random.default_rng(1)  # the window decode_crop draws: x, then y
    x, y = int(rng.integers(0, 128 - 64 + 1)), int(rng.integers(0, 96 - 64 + 1))
    crop = decode_crop(data, 64, np.random.default_rng(1), name="x.png").astype(np.int16)
    assert np.abs(crop - want[y : y + 64, x : x + 64]).max() <= 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_crop_larger_than_its_target_converts_after_the_resize(fmt):
    """A JPEG's draft (DCT-scaled) path and any other format's resize keep the conversion, made
    on the resized pixels."""
    profile = icc("a98.icc")
    arr = np.repeat(np.repeat(patches(), 8, axis=0), 8, axis=1)  # 768x1024
    kw = {"quality": 95} if fmt == "JPEG" else {}
    data = saved(arr, fmt, profile, **kw)
    got = decode_bucket(data, (0, 0, 1024, 768), (128, 96), name="x")
    plain = decode_bucket(saved(arr, fmt, None, **kw), (0, 0, 1024, 768), (128, 96))
    want = reference(Image.fromarray(plain), profile)
    diff = np.abs(got.astype(np.int16) - want)  # converted before the resize, not after
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2
    assert saturation(got) > 1.15 * saturation(plain)


def test_cmyk_jpeg_goes_through_its_press_profile():
    """PIL's own CMYK conversion ignores the inks: 100 % cyan becomes (0, 255, 255); through
    the SWOP profile it is the press's cyan, about (0, 170, 235)."""
    profile = icc("default_cmyk.icc")
    cmyk = np.zeros((32, 64, 4), np.uint8)
    cmyk[:, :32, 0] = 255  # cyan ink; the right half is bare paper
    im = Image.frombytes("CMYK", (64, 32), cmyk.tobytes())
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=100, icc_profile=profile)
    got = decode_bucket(buf.getvalue(), (0, 0, 64, 32), (64, 32), name="x.jpg").astype(int)
    cyan, paper = got[8:24, 4:28].mean(axis=(0, 1)), got[8:24, 36:60].mean(axis=(0, 1))
    assert cyan[0] < 40 and 140 < cyan[1] < 200 and cyan[2] > 200, cyan
    assert paper.min() > 235, paper
    naive = decode_bucket(saved(np.asarray(im.convert("RGB")), "JPEG", None, quality=100),
                          (0, 0, 64, 32), (64, 32))
    assert naive[8:24, 4:28, 1].mean() > 240  # what it was before
    thumb = np.asarray(Image.open(io.BytesIO(make_thumbnail(buf.getvalue(), 1, 32)))).astype(int)
    assert np.abs(thumb[4:12, 2:14].mean(axis=(0, 1)) - cyan).max() < 6  # the model stages' view


@pytest.mark.parametrize("name", ["srgb.icc", "default_rgb.icc"])
def test_srgb_profiles_are_skipped(name):
    """A profile that is sRGB in all but name leaves the pixels exactly as they are."""
    arr = patches()
    im = Image.open(io.BytesIO(saved(arr, "PNG", icc(name))))
    im.load()
    assert to_srgb(im) is im
    assert np.array_equal(as_shown(im), arr)
    assert to_srgb(im, ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()) is im


def test_transparency_is_composited_before_the_conversion():
    """Transparent pixels end white (the profile's white is sRGB's); opaque ones converted."""
    profile = icc("a98.icc")
    rgba = np.dstack([patches(), np.full(patches().shape[:2], 255, np.uint8)])
    rgba[:, :16, 3] = 0
    data = saved(rgba, "PNG", profile, mode="RGBA")
    got = decode_bucket(data, (0, 0, 128, 96), (128, 96), name="x.png").astype(np.int16)
    assert got[:, :16].min() >= 254
    want = reference(Image.fromarray(rgba[..., :3]), profile)
    assert np.abs(got[:, 16:] - want[:, 16:]).max() <= 1


def test_grey_profile_and_mismatched_profiles():
    """A grey profile converts an L image (to RGB); a profile of another colour space than the
    image's (a CMYK profile on RGB pixels) is ignored rather than failing the sample."""
    gray = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (16, 1))
    im = Image.open(io.BytesIO(saved(gray, "PNG", icc("ps_gray.icc"), mode="L")))
    out = to_srgb(im)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out, np.int16) - reference(im, icc("ps_gray.icc"))).max() == 0
    rgb = Image.open(io.BytesIO(saved(patches(), "PNG", icc("default_cmyk.icc"))))
    assert to_srgb(rgb) is rgb
    assert np.array_equal(as_shown(rgb), patches())


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["RGB", "CMYK", "L", "RGBA", "P"]))
def test_any_profile_bytes_never_fail_a_decode(junk, mode):
    """Garbage, truncated or hostile profile bytes leave the pixels to PIL's conversions."""
    im = Image.fromarray(patches(16, 16)).convert(mode)
    im.info["icc_profile"] = junk
    plain = Image.fromarray(patches(16, 16)).convert(mode)
    assert np.array_equal(np.asarray(as_shown(im)), np.asarray(as_shown(plain)))
    assert profile_name(junk) is None or isinstance(profile_name(junk), str)


def test_truncated_real_profile_is_ignored():
    profile = icc("a98.icc")
    im = Image.fromarray(patches())
    im.info["icc_profile"] = profile[: len(profile) // 2]
    assert to_srgb(im) is im


def test_profile_name():
    assert profile_name(icc("a98.icc")) == "Artifex Software A98 ICC Profile"
    assert profile_name(None) is None and profile_name(b"") is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_curation_thumbnails_and_report_show_srgb(fmt):
    """The model stages score, and auditors see, the converted colours: the thumbnail of an
    Adobe RGB file is as saturated as the loader's pixels, not as the raw values."""
    profile = icc("a98.icc")
    arr = np.repeat(np.repeat(patches(), 4, axis=0), 4, axis=1)  # 384x512
    data = saved(arr, fmt, profile, **({"quality": 95} if fmt != "PNG" else {}))
    want = reference(Image.fromarray(arr), profile)
    for thumb in (np.asarray(Image.open(io.BytesIO(make_thumbnail(data, 1, 128)))),
                  np.asarray(reduced_image(data, 128))):
        assert thumb.shape[:2] == (96, 128)
        small = np.asarray(Image.fromarray(want.astype(np.uint8)).resize((128, 96)), np.int16)
        assert np.abs(thumb.astype(np.int16) - small).mean() < 4
        assert saturation(thumb) > 1.12 * saturation(arr)


def test_display_p3_as_phones_save_it():
    """sRGB's primaries and neutrals written in Display P3 (the demo's built profile: no file
    needed) come back as sRGB's primaries and the same neutrals."""
    profile = display_p3_profile()
    assert profile_name(profile) == DISPLAY_P3_NAME
    p3 = np.array([[[234, 51, 35], [117, 251, 76], [0, 0, 245], [128, 128, 128],
                    [255, 255, 255], [0, 0, 0]]], np.uint8)
    data = saved(np.repeat(p3, 4, axis=0), "PNG", profile)
    got = decode_bucket(data, (0, 0, 6, 4), (6, 4), name="p3.png")[0].astype(int)
    want = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 255, 255], [0, 0, 0]]
    assert np.abs(got - np.array(want)).max() <= 3, got


def _dcf_jpeg(arr: np.ndarray, color_space: int, interop: str) -> bytes:
    """A camera JPEG marking its colour space in EXIF only (no embedded profile)."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[0xA001] = color_space
    exif.get_ifd(ExifTags.IFD.Exif)[0xA005] = {1: interop}
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=100, subsampling=0, exif=exif)
    return buf.getvalue()


def test_adobe_rgb_marked_the_dcf_way_is_converted():
    """A camera set to Adobe RGB often embeds no profile: it sets EXIF ColorSpace to
    "uncalibrated" and the interoperability index to R03. Such pixels convert as Adobe RGB,
    as Ghostscript's own Adobe RGB profile converts them (the built profile's numbers agree
    with it); sRGB (ColorSpace 1, R98), "uncalibrated" without R03, and a broken EXIF block
    that merely contains the bytes R03 leave the pixels as they are."""
    arr = patches()
    box, size = (0, 0, 128, 96), (128, 96)
    plain = decode_bucket(saved(arr, "JPEG", None, quality=100, subsampling=0), box, size)
    got = decode_bucket(_dcf_jpeg(arr, 0xFFFF, "R03"), box, size).astype(np.int16)
    assert np.abs(got - reference(Image.fromarray(plain), icc("a98.icc"))).max() <= 2
    assert saturation(got) > 1.15 * saturation(plain)
    for color_space, interop in ((1, "R98"), (0xFFFF, "R98"), (1, "R03")):
        kept = decode_bucket(_dcf_jpeg(arr, color_space, interop), box, size)
        assert np.array_equal(kept, plain), (color_space, interop)
    broken = Image.open(io.BytesIO(saved(arr, "JPEG", None, quality=100, subsampling=0)))
    broken.info["exif"] = b"Exif\0\0R03 not a TIFF header"
    assert embedded_profile(broken) is None and to_srgb(broken) is broken
    probed = probe(_dcf_jpeg(arr, 0xFFFF, "R03"))
    assert probed["color_profile"] == ADOBE_RGB_DCF_NAME and "reason" not in probed
