"""native_score on straight-from-camera files: an intact Bayer lattice is not an enlargement.

Camera frames are simulated as `bench/camera_natives.py` does (the tables are in
docs/native-detection.md, "Camera files"): a scene (a real photograph area-downscaled by 2, or
a 1/f colour texture) through a Bayer mosaic and a demosaicing filter.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native_images import texture as _texture
from PIL import Image

from bench.camera_natives import bilinear_demosaic, mosaic
from curation.analyze import native as nat
from curation.analyze.native import DEFAULT_NATIVE_THRESHOLD, native_score
from curation.analyze.native_coherence import coherence_statistics
from curation.analyze.pixel_analyzer import block_codec

WALL = "/usr/share/wallpapers"


def _scene(name: str) -> np.ndarray:
    """A 5120×2880 calibration picture area-downscaled by 2 (RGB): no earlier lattice."""
    from native_images import full_luma  # skips when the package is missing

    path = f"{WALL}/{name}/contents/images/5120x2880.{'png' if name == 'IceCold' else 'jpg'}"
    full_luma(path)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return cv2.resize(rgb, (2560, 1440), interpolation=cv2.INTER_AREA)


def _colour_texture(h: int, w: int, seed: int) -> np.ndarray:
    """Three correlated 1/f planes (a colour scene's channels move together)."""
    base = _texture(h, w, seed).astype(np.int16)
    planes = [base + (_texture(h, w, seed + k + 1).astype(np.int16) - 128) // 4 for k in range(3)]
    return np.clip(np.dstack(planes), 0, 255).astype(np.uint8)


def _saved(rgb: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> tuple[np.ndarray, str]:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, quality=quality)
    codec = block_codec(buf.getvalue())
    buf.seek(0)
    with Image.open(buf) as im:
        return np.ascontiguousarray(np.asarray(im.convert("L"))), codec


def _cfa(gray: np.ndarray) -> float:
    g = np.ascontiguousarray(nat._central_window(gray))
    return coherence_statistics(g, *nat._textured_bands(g))[3]


def _enlarged(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_CUBIC)


def test_a_demosaiced_frame_carries_the_lattice_and_its_enlargement_does_not() -> None:
    scene = _scene("Flow")
    frame = bilinear_demosaic(mosaic(scene))
    plain, _ = _saved(scene)
    camera, _ = _saved(frame)
    big, _ = _saved(_enlarged(frame, 2.0), quality=90)
    assert _cfa(camera) >= nat._CFA_THRESHOLD
    assert _cfa(plain) < nat._CFA_THRESHOLD / 2
    assert _cfa(big) < nat._CFA_THRESHOLD / 2


def test_camera_files_that_read_as_2x_are_kept_and_their_enlargements_caught() -> None:
    """`Flow` and `IceCold` as camera JPEGs trip a resampling test (the lattice repeats every
    2 px): kept now, with the lattice as the evidence; their 2× enlargements stay rejected."""
    for name in ("Flow", "IceCold"):
        frame = bilinear_demosaic(mosaic(_scene(name)))
        camera, codec = _saved(frame)
        ev = native_score(camera, codec=codec)
        assert ev.score >= 0.75 and ev.test == "cfa" and ev.period == 2.0, (name, ev)
        assert "Bayer" in ev.detail and "resampl" in ev.detail
        big, codec = _saved(_enlarged(frame, 2.0), quality=90)
        fake = native_score(big, codec=codec)
        assert fake.score < DEFAULT_NATIVE_THRESHOLD and fake.test != "cfa", (name, fake)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), factor=st.floats(1.15, 3.0),
       fmt=st.sampled_from([("JPEG", 90), ("JPEG", 100), ("WEBP", 90), ("PNG", 0)]))
def test_no_enlargement_keeps_a_bayer_lattice(seed: int, factor: float, fmt: tuple) -> None:
    """Whatever the factor and format, an enlarged camera frame is not let through as a camera
    file: its lattice no longer repeats every 2 px."""
    frame = bilinear_demosaic(mosaic(_colour_texture(360, 480, seed)))
    kind, q = fmt
    big, _ = _saved(_enlarged(frame, factor), kind, q or 95)
    assert _cfa(np.asarray(Image.fromarray(frame).convert("L"))) >= nat._CFA_THRESHOLD
    assert _cfa(big) < nat._CFA_THRESHOLD


def test_the_analysis_stage_keeps_a_camera_file_and_says_why() -> None:
    from curation import schema
    from curation.analyze.pixel_analyzer import PixelAnalyzer

    frame = bilinear_demosaic(mosaic(_scene("Flow")))
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=95)
    row = PixelAnalyzer()({
        schema.DATA: [buf.getvalue()], schema.ORIENTATION: [1], schema.STATUS: [None],
    }).to_pylist()[0]
    assert row[schema.NATIVE_TEST] == "cfa" and row[schema.NATIVE_PERIOD] == 2.0
    assert row[schema.NATIVE_SCORE] >= 0.75 and row[schema.NATIVE_STRENGTH] >= 1
    assert row[schema.UPSCALE_FACTOR] is None and "Bayer" in row[schema.NATIVE_DETAIL]
