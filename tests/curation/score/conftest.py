"""Tiny random models for the scorer tests, built once per session from configs."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_JPEGS = [
    "/usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg",
    "/usr/share/backgrounds/Fossa_by_Jasper_Roks.jpg",
    "/usr/share/backgrounds/Painting-Colors_by__herobrine7gamer.jpg",
]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny open_clip model (config registered with add_model_config) and random heads."""
    from curation.score.random_models import build_aesthetic, build_open_clip, build_safety

    folder = tmp_path_factory.mktemp("clip")
    clip = build_open_clip(folder, "tiny-clip")
    clip["aesthetic"] = build_aesthetic(folder / "aesthetic.pth", clip["dim"])
    clip["safety"] = build_safety(folder / "safety.pth", [clip["dim"], 16, 1])
    return clip


@pytest.fixture(scope="session")
def real_thumbnails() -> list[bytes]:
    """512-px thumbnails of real photographs, made by pass 1's decode (skip when absent)."""
    from curation.analyze.pixel_analyzer import decode

    paths = [Path(p) for p in REAL_JPEGS if Path(p).is_file()]
    if len(paths) < 2:
        pytest.skip("Debian wallpaper photographs are not installed")
    return [decode(p.read_bytes(), 1, 512)[1] for p in paths]
