"""Images for the native-detector tests: real photographs' luma and synthetic 1/f textures."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


def full_luma(path: str, package: str = "plasma-workspace-wallpapers") -> np.ndarray:
    """A whole picture's luma, as the job analyses it (skips when the package is missing)."""
    if not os.path.exists(path):
        pytest.skip(f"{path} missing: apt-get install {package}")
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-looking random texture: 1/f amplitude spectrum, 8-bit."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(h, w))
    img = np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), s=(h, w))
    img = (img - img.mean()) / img.std() * 40 + 128
    return np.clip(img + rng.normal(0, 1.0, img.shape), 0, 255).astype(np.uint8)
