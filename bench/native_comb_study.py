"""A test for the magnified JPEG grid of a web image's enlargement, tried and not adopted.

An enlargement by `f` of a small JPEG carries the JPEG's 8-px block grid at `8 f` px, i.e. lines
at `k / (8 f)` in the |first difference| profiles. The comb statistic: for every candidate
period `P` from 8.8 to 25.6 px, the sum of the log normalised power at `k / P` (`k ≤ 4`, below the
source's Nyquist; away from the codec's own lines), each the weaker of the two axes; the best
`P` wins. Measured on `bench.calibrate_codecs`'s calibration natives (every picture) and on its
enlargements of 16 pictures, from clean and from JPEG sources (`--jpeg-sources`): what the
natives reach sets a threshold (1.1 × their maximum, AVIF apart), and the table gives the share
of enlargements at or above it, by source and saved format. Findings in
docs/native-detection.md (*Enlargements of web images*).

Usage: `python -m bench.native_comb_study [--workers 2] [--verdicts CAL.pkl WEB.pkl]` (about 9
minutes on 2 cores; the pickles from `bench.calibrate_codecs --save`, calibration, with and
without `--jpeg-sources`).
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from bench.calibrate_codecs import native_cases, subsample, upscale_cases
from bench.calibrate_native import center_crop, clean_pictures, load_gray
from curation.analyze import native as nat

PERIODS = 8 * np.exp(np.linspace(np.log(1.1), np.log(3.2), 1200))


def comb_statistic(gray: np.ndarray, codec: str) -> tuple[float, float]:
    """(best comb sum, its period in px) of the detector's window of ``gray``."""
    g = np.ascontiguousarray(nat._central_window(gray))
    p1x, _, p1y, _, _ = nat._profiles(g, *nat._textured_bands(g))
    spectra = [nat._normalised_periodogram(p)[:2] for p in (p1x, p1y)]
    best, period = -np.inf, float("nan")
    for p in PERIODS:
        freqs = np.arange(1, 5) / p
        ok = (freqs >= 0.03) & (freqs <= 0.49)
        for line in nat._MODELS[codec].lines:  # the codec's own lines, as the spectral test
            ok &= np.abs(freqs - line) > 0.006
        freqs = freqs[ok]
        if freqs.size < 2:
            continue
        weaker = np.inf
        for f, norm in spectra:
            idx = np.round(freqs / (f[1] - f[0])).astype(int)
            near = np.stack([norm[np.clip(idx + d, 0, norm.size - 1)] for d in (-1, 0, 1)])
            weaker = np.minimum(weaker, near.max(axis=0))
        total = float(np.log(weaker).sum())
        if total > best:
            best, period = total, float(p)
    return best, period


def run_picture(job: tuple[str, str, int, bool]) -> list[dict]:
    """The comb statistic of one picture's natives and (optionally) enlargements."""
    cv2.setNumThreads(1)
    name, path, index, with_upscales = job
    gray = center_crop(load_gray(path), 2520, 1560)
    cases = list(native_cases(gray))
    if with_upscales:
        cases += list(upscale_cases(gray, index)) + list(upscale_cases(gray, index, True))
    rows = []
    for kind, _, _, container, q, source_q, (img, codec) in cases:
        value, period = comb_statistic(img, codec)
        rows.append({"set": kind, "container": container, "q": q, "source_q": source_q,
                     "comb": value, "period": period, "picture": name})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--verdicts", nargs="*", default=[],
                    help="pickles of `bench.calibrate_codecs --save` runs on the same pictures "
                         "(with and without --jpeg-sources): also print what the comb adds")
    a = ap.parse_args()
    pictures = clean_pictures()
    ups = {n for n, _ in subsample(pictures, 16)}
    t0 = time.time()
    with ProcessPoolExecutor(a.workers) as ex:
        rows = [r for rs in ex.map(run_picture, [(n, p, i, n in ups)
                                                 for i, (n, p) in enumerate(pictures)])
                for r in rs]
    natives = [r for r in rows if r["set"] == "native"]
    top = max((r for r in natives if r["container"] != "avif"), key=lambda r: r["comb"])
    avif = max(r["comb"] for r in natives if r["container"] == "avif")
    threshold = 1.1 * top["comb"]
    print(f"{len(rows)} images, {time.time() - t0:.0f} s. Natives reach {top['comb']:.2f} "
          f"({top['picture']}, {top['container']} q{top['q']}; AVIF {avif:.2f}): threshold "
          f"{threshold:.2f}.\n")
    cells: dict[tuple[str, str, int], list[bool]] = defaultdict(list)
    for r in rows:
        if r["set"] == "upscaled" and r["container"] in ("jpeg", "webp"):
            source = f"JPEG q{r['source_q']}" if r["source_q"] else "clean"
            cells[(source, r["container"], r["q"])].append(r["comb"] >= threshold)
    print("| source | saved as | quality | at or above the threshold |\n|---|---|---|---|")
    for key in sorted(cells):
        hits = cells[key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {np.mean(hits):.2f} ({sum(hits)}/{len(hits)}) |")
    if a.verdicts:
        added(rows, a.verdicts, threshold)


def added(rows: list[dict], paths: list[str], threshold: float) -> None:
    """Recall of the detector and of the detector with the comb, per source and saved format.

    Both scripts make the same images in the same order per picture, so rows are matched by
    (picture, set, container, quality, source quality) and their order among equals."""
    verdicts: dict[tuple, list[bool]] = defaultdict(list)
    for path in paths:
        with open(path, "rb") as fh:
            for r in pickle.load(fh):
                key = (r["picture"], r["set"], r["container"], r["q"], r.get("source_q", 0))
                verdicts[key].append(r["rejected"])
    seen: dict[tuple, int] = defaultdict(int)
    cells: dict[tuple, list[tuple[bool, bool]]] = defaultdict(list)
    for r in rows:
        key = (r["picture"], r["set"], r["container"], r["q"], r["source_q"])
        i = seen[key]
        seen[key] += 1
        if r["set"] != "upscaled" or r["container"] not in ("jpeg", "webp") or key not in verdicts:
            continue
        rejected = verdicts[key][i]
        source = "JPEG" if r["source_q"] else "clean"
        cells[(source, r["container"], r["q"] if r["q"] == 75 else 90)].append(
            (rejected, rejected or r["comb"] >= threshold))
    print("\n| source | saved as | quality | detector | with the comb |\n|---|---|---|---|---|")
    for key in sorted(cells):
        before, after = (np.mean([v[k] for v in cells[key]]) for k in (0, 1))
        q = "75" if key[2] == 75 else "90-100"
        print(f"| {key[0]} | {key[1]} | {q} | {before:.3f} | {after:.3f} ({len(cells[key])}) |")


if __name__ == "__main__":
    main()
