"""sharpness_score: synthetic cases and real photographs from Debian's wallpaper packages."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from curation.analyze.sharpness import DEFAULT_SHARPNESS_THRESHOLD, sharpness_score

THR = DEFAULT_SHARPNESS_THRESHOLD
WALL = "/usr/share/wallpapers"
# 3840×2160 renders and 2560×1600 photographs (plasma-workspace-wallpapers).
RENDERS_4K = [f"{WALL}/{n}/contents/images/3840x2160.png" for n in ("Canopee", "Cascade", "Opal")]
PHOTOS_2560 = [f"{WALL}/{n}/contents/images/2560x1600.jpg"
               for n in ("Autumn", "BytheWater", "OneStandsOut", "Path")]


def _gray(path: str) -> np.ndarray:
    if not os.path.exists(path):
        pytest.skip(f"{path} missing: apt-get install plasma-workspace-wallpapers")
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-looking random texture: 1/f amplitude spectrum, 8-bit."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(h, w))
    phase = np.exp(2j * np.pi * rng.random(amp.shape))
    img = np.fft.irfft2(amp * phase, s=(h, w))
    img = (img - img.mean()) / img.std() * 40 + 128
    return np.clip(img, 0, 255).astype(np.uint8)


def test_synthetic_texture_sharp_and_blurred() -> None:
    tex = _texture(1080, 1920)
    sharp = sharpness_score(tex)
    blurred = sharpness_score(cv2.GaussianBlur(tex, (0, 0), 3.0))
    assert sharp >= THR
    assert blurred < THR
    assert sharp > blurred + 0.5


def test_flat_image_scores_zero() -> None:
    assert sharpness_score(np.full((1080, 1920), 77, np.uint8)) == 0.0


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        sharpness_score(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ValueError):
        sharpness_score(np.zeros((100, 100), np.float32))
    with pytest.raises(ValueError):
        sharpness_score(np.zeros((7, 7), np.uint8))


def test_deterministic_and_accepts_views() -> None:
    tex = _texture(600, 800, seed=3)
    view = np.pad(tex, 8)[8:-8, 8:-8]
    assert not view.flags.c_contiguous
    assert sharpness_score(tex) == sharpness_score(tex) == sharpness_score(view)


@pytest.mark.parametrize("path", RENDERS_4K)
def test_4k_render_sharp_but_not_after_global_blur(path: str) -> None:
    g = _gray(path)
    assert sharpness_score(g) >= THR
    assert sharpness_score(cv2.GaussianBlur(g, (0, 0), 3.0)) < THR


def test_sharp_subject_on_soft_background_is_kept() -> None:
    """Shallow depth of field: only a centre region (a quarter of the frame) is in focus."""
    g = _gray(RENDERS_4K[0])
    h, w = g.shape
    composite = cv2.GaussianBlur(g, (0, 0), 6.0)
    y0, x0 = h // 4, w // 4
    composite[y0 : y0 + h // 2, x0 : x0 + w // 2] = g[y0 : y0 + h // 2, x0 : x0 + w // 2]
    assert sharpness_score(composite) >= THR
    assert sharpness_score(cv2.GaussianBlur(g, (0, 0), 6.0)) < THR


def test_2560_photographs_sharp_and_blurred() -> None:
    for path in PHOTOS_2560:
        g = _gray(path)
        assert sharpness_score(g) >= THR, path
        assert sharpness_score(cv2.GaussianBlur(g, (0, 0), 3.0)) < THR, path
