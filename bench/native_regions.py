"""`native_score` on the corners of the natives whose centres calibrate it.

`bench/calibrate_native.py` and `bench/calibrate_codecs.py` judge centre crops; their
thresholds are 1.1 × the largest value a native's centre reached. This judges the four corner
crops (at most 2520×1560, offsets on the 8-px grid, so the re-encode sits on the source's JPEG
grid) of the same pictures, each saved as JPEG q90 and lossy WebP q90, with the codec of its
bytes, as the job does.

Usage: `python -m bench.native_regions [--workers 2]` (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from bench.calibrate_codecs import encode
from bench.calibrate_native import clean_held_out, clean_pictures, load_gray
from curation.analyze import native as nat

SAVES = (("jpeg", 90), ("webp", 90))


def corners(gray: np.ndarray) -> dict[str, np.ndarray]:
    """The four corner crops of at most 2520×1560, offsets on the 8-px grid."""
    h, w = gray.shape
    ch, cw = min(h, 1560), min(w, 2520)
    bottom, right = (h - ch) // 8 * 8, (w - cw) // 8 * 8
    return {name: np.ascontiguousarray(gray[y : y + ch, x : x + cw])
            for name, (y, x) in {"top left": (0, 0), "top right": (0, right),
                                 "bottom left": (bottom, 0),
                                 "bottom right": (bottom, right)}.items()}


def run_picture(job: tuple[str, str, str]) -> list[dict]:
    """Verdicts on the four corners of one picture, in both formats."""
    cv2.setNumThreads(1)
    name, path, group = job
    rows = []
    for corner, crop in corners(load_gray(path)).items():
        for container, q in SAVES:
            img, codec = encode(crop, container, q)
            ev = nat.native_score(img, codec=codec)
            rows.append({"picture": name, "group": group, "corner": corner,
                         "container": container, "rejected": ev.score < 0.5, "detail": ev.detail})
    return rows


def main() -> None:
    """Judge every picture's corners and print the rates and the rejections."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    jobs = [(n, p, "calibration") for n, p in clean_pictures()]
    jobs += [(n, p, "held out") for n, p in clean_held_out()]
    rows: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for r in pool.map(run_picture, jobs):
            rows += r
    print("| set | JPEG q90 | WebP q90 |\n|---|---|---|")
    for group in ("calibration", "held out"):
        cells = []
        for container, _ in SAVES:
            sel = [r for r in rows if r["group"] == group and r["container"] == container]
            k = sum(r["rejected"] for r in sel)
            cells.append(f"{k / len(sel):.3f} ({k}/{len(sel)})")
        print(f"| {group} | " + " | ".join(cells) + " |")
    for group in ("calibration", "held out"):
        rejected = [r for r in rows if r["group"] == group and r["rejected"]]
        print(f"\n{group}: {dict(Counter(r['picture'] for r in rejected))}")
        for r in rejected:
            print(f"- {r['picture']} {r['corner']} {r['container']}: {r['detail']}")


if __name__ == "__main__":
    main()
