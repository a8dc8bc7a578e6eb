"""`native_score` on JPEGs coarser than quality 75: natives and enlargements, by model.

Where the ``jpeg_coarse`` (q60-q73) and ``jpeg_coarsest`` (below q60) thresholds come from
(docs/native-detection.md, *Coarse JPEG*). Every clean calibration picture and held-out
photograph of `bench.calibrate_native` (centre crop ≤ 2520×1560) is saved as a JPEG of quality
20, 30, 40, 50, 60, 70 and 72 (natives); every third picture is also enlarged by each factor
of `bench.calibrate_codecs` (resizer rotating) and saved at q40, q50, q60 and q70. Each image is
judged with the model its bytes give (`block_codec`) and, as before, with ``jpeg_low``; the
natives' raw statistics are printed as the largest value per model and test, so the thresholds
(1.1 × those of the calibration pictures) can be checked.

Usage: `python -m bench.coarse_jpeg [--workers 2]` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import cv2

from bench.calibrate_codecs import FACTORS, METHODS, encode, enlarged, raw_statistics
from bench.calibrate_native import center_crop, clean_held_out, clean_pictures, load_gray
from curation.analyze import native as nat

NATIVE_QUALITIES = (20, 30, 40, 50, 60, 70, 72)
UPSCALE_QUALITIES = (40, 50, 60, 70)
STATISTICS = ("spectral_jpeg", "harmonic_jpeg", "z0.375", "z0.5", "z0.625", "z0.75")


def run_picture(job: tuple[str, str, bool, int]) -> list[dict]:
    """One picture's coarse natives and (every third picture) enlargements."""
    cv2.setNumThreads(1)
    name, path, held, index = job
    gray = center_crop(load_gray(path), 2520, 1560)
    cases = [("native", 1.0, q, encode(gray, "jpeg", q)) for q in NATIVE_QUALITIES]
    if index % 3 == 0:
        for i, f in enumerate(FACTORS):
            up = enlarged(gray, f, METHODS[(index + i) % len(METHODS)])
            cases += [("upscaled", f, q, encode(up, "jpeg", q)) for q in UPSCALE_QUALITIES]
    rows = []
    for kind, factor, q, (img, codec) in cases:
        rows.append({
            "set": kind, "picture": name, "held": held, "factor": factor, "q": q, "codec": codec,
            "rejected": nat.native_score(img, codec).score < nat.DEFAULT_NATIVE_THRESHOLD,
            "rejected_low": nat.native_score(img, "jpeg_low").score
            < nat.DEFAULT_NATIVE_THRESHOLD,
            "raw": raw_statistics(img)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    jobs = [(n, p, False, i) for i, (n, p) in enumerate(clean_pictures())]
    jobs += [(n, p, True, i) for i, (n, p) in enumerate(clean_held_out())]
    t0 = time.time()
    with ProcessPoolExecutor(a.workers) as ex:
        rows = [r for rs in ex.map(run_picture, jobs) for r in rs]
    print(f"{len(rows)} images, {time.time() - t0:.0f} s\n")
    print("| set | quality | model | natives rejected (jpeg_low) | enlargements caught "
          "(jpeg_low) |\n|---|---|---|---|---|")
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["held"], r["q"])].append(r)
    for (held, q), sel in sorted(cells.items()):
        def rate(kind: str, key: str, sel: list[dict] = sel) -> str:
            group = [r for r in sel if r["set"] == kind]
            return f"{sum(r[key] for r in group)}/{len(group)}" if group else "-"
        print(f"| {'held out' if held else 'calibration'} | {q} | {sel[0]['codec']} | "
              f"{rate('native', 'rejected')} ({rate('native', 'rejected_low')}) | "
              f"{rate('upscaled', 'rejected')} ({rate('upscaled', 'rejected_low')}) |")
    print("\nLargest value of the calibration natives, by model:\n")
    for codec in sorted({r["codec"] for r in rows}):
        natives = [r for r in rows if r["codec"] == codec and r["set"] == "native"
                   and not r["held"]]
        tops = {k: max(natives, key=lambda r, k=k: r["raw"][k]) for k in STATISTICS}
        print(f"- {codec}: " + ", ".join(
            f"{k} {t['raw'][k]:.2f} ({t['picture'].split('/')[0]} q{t['q']})"
            for k, t in tops.items()))


if __name__ == "__main__":
    main()
