import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from curation import schema
from curation.analyze.pixel_analyzer import PixelAnalyzer, decode_gray, perceptual_hash


def _enc(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_gray_handles_modes_and_orientation():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(rgb).convert("L"))
    assert decode_gray(_enc(Image.fromarray(rgb))).shape == (40, 60)
    g16 = ref.astype(np.uint16) * 257
    assert np.array_equal(decode_gray(_enc(Image.fromarray(g16))), ref)  # high byte of 16-bit
    rgba = Image.fromarray(rgb).convert("RGBA")
    assert decode_gray(_enc(rgba)).shape == (40, 60)
    pal = Image.fromarray(rgb).convert("P")
    assert decode_gray(_enc(pal)).shape == (40, 60)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert decode_gray(_enc(cmyk, "JPEG", quality=95)).shape == (40, 60)
    rotated = decode_gray(_enc(Image.fromarray(rgb)), orientation=6)
    assert rotated.shape == (60, 40)
    assert np.array_equal(rotated, np.rot90(decode_gray(_enc(Image.fromarray(rgb))), k=-1))


def test_decode_gray_pixels_are_exact_with_and_without_the_no_copy_export():
    """'L' and 'RGB' images come out exactly, one memory block (Arrow view) or several (copy)."""
    import cv2

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert np.array_equal(
        decode_gray(_enc(Image.fromarray(rgb))), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    )
    gray = rng.integers(0, 256, (4200, 4200), dtype=np.uint8)  # 17.6 MB: several 16 MiB blocks
    default = Image.core.get_block_size()
    try:
        for block in (default, 64 * 1024**2):
            Image.core.set_block_size(block)
            out = decode_gray(_enc(Image.fromarray(gray), compress_level=0))
            assert np.array_equal(out, gray)
    finally:
        Image.core.set_block_size(default)


def test_jpeg_luma_decode_matches_full_decode():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(small).resize((384, 256), Image.Resampling.BICUBIC))
    data = _enc(Image.fromarray(rgb), "JPEG", quality=95)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L")).astype(int)
    diff = np.abs(decode_gray(data).astype(int) - full)
    assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 2


def test_phash_is_stable_under_reencode_and_differs_between_images():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 255, (512, 768), dtype=np.uint8)
    a = np.asarray(Image.fromarray(a).resize((96, 64)).resize((768, 512), Image.Resampling.BICUBIC))
    b = np.ascontiguousarray(a[::-1])
    ha, hb = perceptual_hash(a), perceptual_hash(b)
    again = decode_gray(_enc(Image.fromarray(a), "JPEG", quality=80))
    assert bin((ha ^ perceptual_hash(again)) & (2**64 - 1)).count("1") <= 2
    assert bin((ha ^ hb) & (2**64 - 1)).count("1") > 10


def test_analyzer_scores_pending_rows_and_rejects_corrupt_pixels():
    rng = np.random.default_rng(3)
    good = _enc(Image.fromarray(rng.integers(0, 255, (480, 720), dtype=np.uint8)))
    truncated = _enc(Image.fromarray(rng.integers(0, 255, (480, 720), dtype=np.uint8)), "JPEG")[
        :3000
    ]
    t = PixelAnalyzer()(
        {
            schema.DATA: [good, truncated, good],
            schema.ORIENTATION: [1, 1, 1],
            schema.STATUS: [None, None, "rejected"],
        }
    )
    rows = t.to_pylist()
    assert rows[0][schema.ENTROPY] > 7.9 and rows[0][schema.PHASH] is not None
    assert rows[0][schema.FLAT_FRACTION] == 0.0 and rows[0][schema.SHARPNESS] is not None
    assert rows[1][schema.REASON] == "decode_error" and rows[1][schema.ENTROPY] is None
    assert rows[2][schema.ENTROPY] is None  # rejected earlier: never decoded


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 64), w=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_any_decodable_image_gets_scores_or_a_verdict(h, w, seed):
    """Thresholds are one `--set` away, so tiny images can reach the analyses: one that an
    analysis cannot handle is rejected as `analysis_error`; the batch goes on."""
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)
    good = _enc(Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 720), np.uint8)))
    t = PixelAnalyzer()(
        {
            schema.DATA: [_enc(Image.fromarray(pixels)), good],
            schema.ORIENTATION: [1, 1],
            schema.STATUS: [None, None],
        }
    )
    odd, fine = t.to_pylist()
    if odd[schema.STATUS] is None:
        assert odd[schema.PHASH] is not None
    else:
        assert odd[schema.REASON] == "analysis_error" and odd[schema.PHASH] is None
        assert odd[schema.DETAIL].startswith("pixel analysis failed: ")
    assert fine[schema.STATUS] is None and fine[schema.ENTROPY] > 7.9


PHOTO = "/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg"


def _early_exit_batch() -> list[bytes]:
    """Images that stop at different rules: noise, a gradient (flat), a blurred and a 2×
    enlarged texture, and (where installed) a crop of a real photograph, as JPEG and PNG."""
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 255, (720, 1280), dtype=np.uint8)
    ramp = np.tile(np.linspace(0, 255, 1280, dtype=np.uint8), (720, 1))
    texture = Image.fromarray(rng.integers(0, 255, (360, 640), dtype=np.uint8))
    images = [
        _enc(Image.fromarray(noise)),
        _enc(Image.fromarray(ramp), "JPEG", quality=95),
        _enc(Image.fromarray(noise).resize((320, 180)).resize((1280, 720)), "JPEG", quality=95),
        _enc(texture.resize((1280, 720), Image.Resampling.BICUBIC)),
    ]
    if Path(PHOTO).exists():
        with Image.open(PHOTO) as img:
            crop = img.convert("RGB").crop((1000, 800, 2920, 1880))
        images += [_enc(crop, "JPEG", quality=92), _enc(crop)]
    return images


_BATCH = _early_exit_batch()
_RULE_COLUMNS = (schema.SHARPNESS, schema.FLAT_FRACTION, schema.ENTROPY, schema.NATIVE_SCORE)


def _rules(max_flat: float, min_entropy: float, min_sharp: float, min_native: float) -> list:
    from curation.threshold_filter import Rule

    return [
        Rule(column=schema.SHARPNESS, reason="blurry", min=min_sharp),
        Rule(column=schema.FLAT_FRACTION, reason="flat", max=max_flat),
        Rule(column=schema.ENTROPY, reason="low_entropy", min=min_entropy),
        Rule(column=schema.NATIVE_SCORE, reason="upscaled", min=min_native),
    ]


def _analyse(rules: list, complete: bool) -> list[dict]:
    from curation.threshold_filter import ThresholdFilter

    batch = {
        schema.DATA: _BATCH,
        schema.ORIENTATION: [1] * len(_BATCH),
        schema.STATUS: [None] * len(_BATCH),
    }
    scored = PixelAnalyzer(rules=rules, complete=complete)(batch)
    return ThresholdFilter(rules=rules)(scored).to_pylist()


@settings(max_examples=20, deadline=None)
@given(
    max_flat=st.floats(0.0, 1.0),
    min_entropy=st.floats(0.0, 8.0),
    min_sharp=st.floats(0.0, 2.5),
    min_native=st.floats(0.0, 1.0),
)
def test_stopping_at_the_first_failed_rule_changes_no_verdict(
    max_flat, min_entropy, min_sharp, min_native
):
    """With the job's rules, an image's analyses stop at the first rule it fails: the
    verdict, reason and detail are those of computing every score, the scores it computed
    are the same values, and every score after the failed rule is left out."""
    rules = _rules(max_flat, min_entropy, min_sharp, min_native)
    full, short = _analyse(rules, complete=True), _analyse(rules, complete=False)
    for f, s in zip(full, short, strict=True):
        assert (s[schema.STATUS], s[schema.REASON], s[schema.DETAIL]) == (
            f[schema.STATUS],
            f[schema.REASON],
            f[schema.DETAIL],
        )
        assert s[schema.SHARPNESS] is not None
        for name in (*_RULE_COLUMNS, schema.PHASH, schema.NATIVE_TEST):
            assert s[name] is None or s[name] == f[name], name
        failed = {"blurry": 0, "flat": 1, "low_entropy": 2, "upscaled": 3}.get(f[schema.REASON])
        if failed is None:  # passed every rule: nothing left out
            assert all(s[c] is not None for c in (*_RULE_COLUMNS, schema.PHASH))
        else:
            assert all(s[c] is not None for c in _RULE_COLUMNS[: failed + 1])
            assert all(s[c] is None for c in (*_RULE_COLUMNS[failed + 1 :], schema.PHASH))


def test_rules_out_of_the_analysis_order_are_refused():
    import pytest

    sharp, flat, entropy, native = _rules(0.5, 7.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="precedence"):
        PixelAnalyzer(rules=[native, flat])
    with pytest.raises(ValueError, match="precedence"):
        PixelAnalyzer(rules=[flat, sharp])
    PixelAnalyzer(rules=[entropy, native])  # a subset in order is fine
    PixelAnalyzer(rules=[sharp, flat, entropy, native], complete=False)


_FAULTS = """
import resource, sys
from PIL import Image
from curation.analyze.pixel_analyzer import PILLOW_BLOCK_BYTES, PixelAnalyzer, decode_gray
if sys.argv[1] == "setup":
    PixelAnalyzer().setup()
else:  # the rest of the stage's setup
    Image.core.set_block_size(PILLOW_BLOCK_BYTES)
files = [open(sys.argv[2] + "/" + name, "rb").read() for name in sys.argv[3:]]
for data in files:
    decode_gray(data)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    for data in files:
        decode_gray(data)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


BACKGROUNDS = Path("/usr/share/backgrounds")
MIXED_4K = (  # Lomiri's camera JPEGs: progressive and baseline, 8.8 to 15.9 MP
    "Bridge_by_Sander_Klootwijk.jpg",
    "Fossa_by_Jasper_Roks.jpg",
    "seeding_by_Clements_Engelhardt.jpg",
    "umang_by_Abhishek_Mudgal.jpg",
)


@pytest.mark.skipif(
    not all((BACKGROUNDS / n).exists() for n in MIXED_4K), reason="lomiri-wallpapers-16.04"
)
def test_analysis_workers_reuse_freed_decode_memory():
    """After `PixelAnalyzer.setup` a process decodes a mix of real 4K JPEGs (baseline and
    progressive) without page-faulting their buffers in afresh for each one, which a process
    with glibc's default thresholds does (about 7,000 pages per image here)."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        cmd = [sys.executable, "-c", _FAULTS, mode, str(BACKGROUNDS), *MIXED_4K]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    plain, tuned = faults("plain"), faults("setup")
    assert plain > 12 * 1000, plain  # 12 decodes
    assert tuned < plain / 5, (tuned, plain)


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@settings(max_examples=25, deadline=None)
@given(
    opacity=st.integers(0, 255),
    mode=st.sampled_from(["RGBA", "LA", "P+tRNS"]),
    fmt=st.sampled_from(["PNG", "WEBP"]),
)
def test_transparency_is_judged_over_white_as_training_shows_it(opacity, mode, fmt):
    """A cut-out or an all-transparent PNG was scored on the colours its alpha hides (a sharp
    photo), while the training loader and any viewer show it over white (a blank canvas)."""
    from curation.analyze.pixel_analyzer import decode
    from curation.analyze.texture import gray_entropy

    rng = np.random.default_rng(opacity)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    if mode == "P+tRNS":  # a palette PNG whose tRNS gives every entry the opacity
        data = _enc(rgb.quantize(16), transparency=bytes([opacity] * 16))
    else:
        img = rgb.convert(mode)
        img.putalpha(opacity)
        data = _enc(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(io.BytesIO(data)) as shown:
        rgba = shown.convert("RGBA")
        want = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
    gray, thumb = decode(data, 1, thumbnail_size=32)
    assert np.abs(gray.astype(int) - np.asarray(want, dtype=int)).max() <= 1
    if np.asarray(rgba)[..., 3].max() == 0:  # nothing visible: a blank white canvas
        assert gray.min() == 255 and gray_entropy(gray) == 0.0
        assert np.asarray(Image.open(io.BytesIO(thumb)).convert("L")).min() >= 250


@pytest.mark.parametrize("mode", ["LAB", "CMYK", "YCbCr", "RGB"])
def test_every_colour_space_pillow_opens_decodes_to_its_luma(mode):
    """A CIELab TIFF (Photoshop writes them) was `decode_error` "pixels undecodable": Pillow has
    no LAB -> L conversion, though it converts LAB to RGB."""
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (480, 720, 3), dtype=np.uint8))
    data = _enc(rgb.convert(mode), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("L"), dtype=int)
    (row,) = PixelAnalyzer(thumbnail_size=32)(
        {schema.DATA: [data], schema.ORIENTATION: [1], schema.STATUS: [None]}
    ).to_pylist()
    assert row[schema.STATUS] is None, row[schema.DETAIL]
    assert row[schema.ENTROPY] > 7.0 and row[schema.THUMBNAIL] is not None
    assert np.abs(decode_gray(data).astype(int) - want).max() <= 1
