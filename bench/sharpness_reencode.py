"""How re-encoding and blur move the focus measure (`sharpness`) of real photographs.

Why de-duplication ranks the larger file before the sharper one (docs/dedup.md): for each
photograph (the first 8 Lomiri backgrounds and 4 Plasma 5120×2880 wallpapers; crops to
4096×2304 where larger), the change of `sharpness_score` from the photograph's own decode to
its JPEG and WebP re-encodes at q95/85/75 and to Gaussian blurs (σ 0.6 and 1.0 px, JPEG q95).

Usage: ``python -m bench.sharpness_reencode``.
"""

from __future__ import annotations

import glob
import io

import cv2
import numpy as np
from PIL import Image

from curation.analyze.sharpness import sharpness_score

PHOTOS = sorted(glob.glob("/usr/share/backgrounds/*.jpg"))[:8] + sorted(
    glob.glob("/usr/share/wallpapers/*/contents/images/5120x2880.jpg")
)[:4]


def _gray(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def _encode(rgb: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, quality=quality)
    return buf.getvalue()


def changes(rgb: np.ndarray) -> dict[str, float]:
    """`sharpness` of each copy minus that of `rgb` itself."""
    base = sharpness_score(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    out = {}
    for fmt in ("JPEG", "WEBP"):
        for q in (95, 85, 75):
            out[f"{fmt} q{q}"] = sharpness_score(_gray(_encode(rgb, fmt, q))) - base
    for sigma in (0.6, 1.0):
        blurred = cv2.GaussianBlur(rgb, (0, 0), sigma)
        out[f"blur {sigma}"] = sharpness_score(_gray(_encode(blurred, "JPEG", 95))) - base
    return out


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    table: dict[str, list[float]] = {}
    for path in PHOTOS:
        rgb = np.asarray(Image.open(path).convert("RGB"))[:2304, :4096]
        row = changes(np.ascontiguousarray(rgb))
        print(path.rsplit("/", 1)[-1][:24].ljust(24), " ".join(f"{v:+.3f}" for v in row.values()))
        for k, v in row.items():
            table.setdefault(k, []).append(v)
    print("\n| copy | min | max | sharper than the original |\n|---|---|---|---|")
    for k, v in table.items():
        print(f"| {k} | {min(v):+.3f} | {max(v):+.3f} | {sum(x > 0 for x in v)} of {len(v)} |")


if __name__ == "__main__":
    main()
