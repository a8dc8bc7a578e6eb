"""native_score: synthetic cases and real photographs from Debian's wallpaper packages.

The full sweep (every picture, factor, resizer and JPEG quality) is bench/calibrate_native.py;
these tests use a few photographs cropped to 1280×800 to stay fast.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from native_images import full_luma as _full
from native_images import texture as _texture
from PIL import Image

from curation.analyze.native import DEFAULT_NATIVE_THRESHOLD, NativeEvidence, native_score

THR = DEFAULT_NATIVE_THRESHOLD
WALL = "/usr/share/wallpapers"
PHOTOS = [f"{WALL}/{n}/contents/images/2560x1600.jpg"
          for n in ("Autumn", "Kite", "OneStandsOut", "Grey")]




def _photo(path: str, width: int = 1280, height: int = 800) -> np.ndarray:
    """Centre crop of a real photograph's luma (a crop of a native image is native)."""
    g = _full(path)
    h, w = g.shape
    y, x = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(g[y : y + height, x : x + width])




def _jpeg(gray: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


def _upscale(gray: np.ndarray, factor: float, method: str) -> np.ndarray:
    """Area-downscale by 1/factor, then upscale back to the same size."""
    h, w = gray.shape
    small = cv2.resize(gray, (round(w / factor), round(h / factor)), interpolation=cv2.INTER_AREA)
    if method == "pil_bicubic":
        return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    if method == "pil_lanczos":
        return np.asarray(Image.fromarray(small).resize((w, h), Image.LANCZOS))
    flag = {"cv_cubic": cv2.INTER_CUBIC, "cv_lanczos": cv2.INTER_LANCZOS4}[method]
    return cv2.resize(small, (w, h), interpolation=flag)


def _close_to(factor: float, candidates: tuple[float, ...], tol: float = 0.03) -> bool:
    return any(abs(factor - c) <= tol * c for c in candidates)


def test_result_type_and_native_texture() -> None:
    ev = native_score(_texture(800, 1280))
    assert isinstance(ev, NativeEvidence)
    assert ev.score >= THR
    assert math.isnan(ev.factor)
    assert "no resampling" in ev.detail


def test_synthetic_upscales_rejected_with_factor() -> None:
    tex = _texture(800, 1280, seed=1)
    ev = native_score(_upscale(tex, 1.5, "pil_bicubic"))
    assert ev.score < THR
    assert _close_to(ev.factor, (1.5, 3.0)), ev
    assert "cyc/px" in ev.detail
    ev2 = native_score(_upscale(tex, 2.0, "cv_cubic"))  # integer factor: phase (fold) test
    assert ev2.score < THR
    assert _close_to(ev2.factor, (2.0,)), ev2


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        native_score(np.zeros((200, 200, 3), np.uint8))
    with pytest.raises(ValueError):
        native_score(np.zeros((200, 200), np.float64))
    with pytest.raises(ValueError):
        native_score(np.zeros((32, 400), np.uint8))


def test_deterministic_and_accepts_views() -> None:
    tex = _upscale(_texture(600, 900, seed=2), 1.25, "pil_lanczos")
    view = np.pad(tex, 4)[4:-4, 4:-4]
    assert not view.flags.c_contiguous
    assert native_score(tex) == native_score(tex) == native_score(view)


def test_flat_image_is_not_flagged() -> None:
    assert native_score(np.full((600, 800), 128, np.uint8)).score >= THR


@pytest.mark.parametrize("path", PHOTOS)
def test_real_photographs_stay_native(path: str) -> None:
    """As is, JPEG re-encoded, shifted crop and antialiased downscale: all native."""
    g = _photo(path)
    h, w = g.shape
    down = np.asarray(Image.fromarray(g).resize((round(w / 1.5), round(h / 1.5)), Image.LANCZOS))
    cases = {"as is": g, "q85": _jpeg(g, 85), "q100": _jpeg(g, 100),
             "crop": np.ascontiguousarray(g[3:, 5:]), "down 1.5 q90": _jpeg(down, 90)}
    for name, img in cases.items():
        ev = native_score(img)
        assert ev.score >= THR, (name, ev)


@pytest.mark.parametrize(("factor", "method", "quality"), [
    (1.25, "pil_lanczos", 0), (1.5, "pil_bicubic", 100), (1.78, "cv_cubic", 100),
    (2.0, "pil_bicubic", 100), (2.5, "cv_lanczos", 0), (3.0, "pil_bicubic", 90),
])
def test_real_photographs_upscaled_are_rejected(factor: float, method: str, quality: int) -> None:
    """At least three of the four photographs are caught for each case."""
    caught = 0
    for path in PHOTOS:
        img = _upscale(_photo(path), factor, method)
        if quality:
            img = _jpeg(img, quality)
        caught += native_score(img).score < THR
    assert caught >= 3


@pytest.mark.parametrize(("factor", "method"), [(1.6, "pil_bicubic"), (2.0, "cv_lanczos")])
def test_cyclic_coherence_catches_q90_upscales(factor: float, method: str) -> None:
    """JPEG q90 hides these from the profile tests; the coherence of spectral copies remains."""
    caught, by_coherence = 0, 0
    for path in PHOTOS:
        g = _photo(path, 2560, 1600)
        assert native_score(_jpeg(g, 90)).score >= THR  # the photograph itself stays native
        ev = native_score(_jpeg(_upscale(g, factor, method), 90))
        caught += ev.score < THR
        by_coherence += ev.score < THR and ev.detail.startswith("coherent spectral correlation")
    assert caught >= 3 and by_coherence >= 3


@pytest.mark.parametrize("method", ["pil_bicubic", "pil_lanczos"])
def test_four_pixel_period_catches_q90_four_thirds(method: str) -> None:
    """4/3 puts every cyclic frequency on the JPEG grid; its 1/2 and 3/4 excess still shows."""
    caught = 0
    for path in PHOTOS:
        ev = native_score(_jpeg(_upscale(_photo(path, 2560, 1600), 4 / 3, method), 90))
        caught += ev.score < THR
    assert caught >= 3


def test_large_images_are_judged_on_their_central_window() -> None:
    """The thresholds hold for a 2560×1600 window; a 4K image is judged on its centre."""
    def judged(a: np.ndarray) -> tuple[float, str]:
        ev = native_score(np.ascontiguousarray(a))
        return ev.score, ev.detail

    img = _texture(2160, 3840, seed=3)
    centre = img[279 : 279 + 1601, 639 : 639 + 2561]
    assert judged(img) == judged(centre)
    assert judged(img.T) == judged(centre.T)  # portrait: the window turns with the image
    assert judged(img) != judged(img[:1601, :2561])  # another window, other statistics


BACKGROUNDS = "/usr/share/backgrounds"


@pytest.mark.parametrize("quality", [0, 90])
def test_an_enlargement_shipped_as_a_wallpaper_is_caught(quality: int) -> None:
    """A real fake: 4224×3168 is exactly 1.294× a 3264×2448 (8 MP) camera frame."""
    g = _full(f"{BACKGROUNDS}/Dragonfly_by_Bolly.jpg", "lomiri-wallpapers-16.04")
    ev = native_score(_jpeg(g, quality) if quality else g)
    assert ev.score < THR, ev
    assert _close_to(ev.factor, (1.294, 4.41)), ev


@pytest.mark.parametrize(("path", "package"), [
    (f"{WALL}/Patak/contents/images_dark/3840x2160.png", "plasma-workspace-wallpapers"),  # render
    # camera photographs of 12-20 MP, held out of calibration
    (f"{BACKGROUNDS}/sunset_by_Aitzol_Berasategi.jpg", "lomiri-wallpapers-16.04"),
    (f"{BACKGROUNDS}/seeding_by_Clements_Engelhardt.jpg", "lomiri-wallpapers-16.04"),
    (f"{BACKGROUNDS}/Kleiber_by_Lukas_Baubkus.jpg", "lomiri-wallpapers-20.04"),
])
def test_large_native_files_stay_native(path: str, package: str) -> None:
    """Native files of 8 to 20 MP, at full size and re-encoded at q90."""
    g = _full(path, package)
    for img in (g, _jpeg(g, 90)):
        ev = native_score(img)
        assert ev.score >= THR, ev
