"""Shared fixtures: the generated sample set (built once per session) and helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo's sample set, with its expected outcomes (real photos when installed)."""
    from pipelines.samples import build_samples

    folder = tmp_path_factory.mktemp("samples")
    build_samples(folder, real_photos=6)
    return folder, json.loads((folder / "expected.json").read_text())


def real_photo_paths(limit: int = 8) -> list[Path]:
    """Real photographs from Debian's wallpaper packages (empty when not installed)."""
    from pipelines.samples import _real_photos

    return _real_photos(limit)
