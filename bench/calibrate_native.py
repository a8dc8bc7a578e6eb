"""Calibration sweep for `native_score` (upscale detection) and `sharpness_score` (blur).

Real photographs and renders come from Debian's plasma-workspace-wallpapers and mate-backgrounds
(`/usr/share/wallpapers`, `/usr/share/backgrounds`). Every distinct picture (largest file per
folder, shorter side ≥ 1000 px) is centre-cropped to at most `--max-width`×`--max-height` (a crop
of a native image is native) and then turned into:

* natives: as is (PNG-equivalent), JPEG re-encodes q85/q90/q95/q100, an odd-offset crop,
  downscales with PIL's antialiasing bicubic and Lanczos (÷1.25, ÷1.333, ÷1.5, ÷2) saved at q90;
  OpenCV `INTER_AREA` downscales (÷1.25, ÷1.5) are reported apart (see docs);
* upscaled: an area downscale to 1/f, then back up by f with PIL bicubic/Lanczos and OpenCV
  cubic/Lanczos4, kept lossless (PNG) or saved as JPEG q90/q95/q100; f in 1.25 … 3;
* upscaled from the photographs as they are ("realistic": they keep their own JPEG history, as
  a fake-4K file made from a camera JPEG does): the crop enlarged by 1.25, 1.333, 1.5 and 2 with
  the four resizers, saved at q90/q95 (pictures in `SUSPECTED` left out);
* blurred (for sharpness): Gaussian σ = 3 px on the 4K-and-larger pictures (resized to 3840
  wide), σ = 2 px on 2560-px pictures (the same blur relative to the frame).

Prints Markdown tables (recall per factor × quality and per factor × method, false rejections of
natives, sharpness separation) and the time per 3840×2160 image of each function on one thread.

Usage: `python bench/calibrate_native.py [--workers 2] [--limit N]`
"""

from __future__ import annotations

import argparse
import glob
import io
import itertools
import os
import platform
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
from PIL import Image

from curation.analyze.native import DEFAULT_NATIVE_THRESHOLD, native_score
from curation.analyze.sharpness import DEFAULT_SHARPNESS_THRESHOLD, sharpness_score

FACTORS = (1.25, 1.333, 1.5, 1.6, 1.78, 2.0, 2.5, 3.0)
METHODS = ("pil_bicubic", "pil_lanczos", "cv_cubic", "cv_lanczos")
QUALITIES = (0, 90, 95, 100)  # 0 = lossless
# Pictures whose every variant shows a resampling trace: probably resized up before packaging.
SUSPECTED = ("FreshFlower.jpg", "OneStandsOut/images")
FOLDERS = ("/usr/share/wallpapers", "/usr/share/backgrounds/mate/nature")


def find_pictures(min_side: int = 1000) -> list[tuple[str, str]]:
    """(name, path) of the largest distinct picture in each wallpaper folder.

    Photographs and renders only: KDE's wallpapers and MATE's `nature` folder (MATE's `abstract`
    and `desktop` folders hold flat graphics, not pictures).
    """
    best: dict[str, tuple[int, str]] = {}
    paths = sorted(glob.glob("/usr/share/wallpapers/*/contents/images*/*"))
    paths += sorted(glob.glob("/usr/share/backgrounds/mate/nature/*"))
    for p in paths:
        if not p.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        real = os.path.realpath(p)
        try:
            with Image.open(real) as im:
                w, h = im.size
        except OSError:
            continue
        if min(w, h) < min_side:
            continue
        parts = p.split("/")
        key = f"{parts[4]}/{parts[-2]}" if parts[3] == "wallpapers" else parts[-1]
        if key not in best or w * h > best[key][0]:
            best[key] = (w * h, real)
    return sorted((k, v[1]) for k, v in best.items())


def load_gray(path: str) -> np.ndarray:
    """8-bit luma of a picture (the same plane the curation job analyses)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def center_crop(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre crop to at most width×height."""
    h, w = gray.shape
    ch, cw = min(h, height), min(w, width)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(gray[y : y + ch, x : x + cw])


def jpeg(gray: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG and decode again (quality 0: unchanged, i.e. lossless)."""
    if quality == 0:
        return gray
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


def resize(gray: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """Resize to (width, height) with a named library method."""
    pil = {"pil_bicubic": Image.BICUBIC, "pil_lanczos": Image.LANCZOS}
    cv = {"cv_cubic": cv2.INTER_CUBIC, "cv_lanczos": cv2.INTER_LANCZOS4, "cv_area": cv2.INTER_AREA}
    if method in pil:
        return np.asarray(Image.fromarray(gray).resize(size, pil[method]))
    return cv2.resize(gray, size, interpolation=cv[method])


def upscaled(gray: np.ndarray, factor: float, method: str) -> np.ndarray:
    """Area-downscale to 1/factor, then upscale back to the original size with `method`."""
    h, w = gray.shape
    small = resize(gray, (round(w / factor), round(h / factor)), "cv_area")
    return resize(small, (w, h), method)


def variants(gray: np.ndarray) -> Iterator[tuple[str, str, float, int, np.ndarray]]:
    """(set, method, factor, quality, image) for every test case built from one native."""
    h, w = gray.shape
    for q in (0, 85, 90, 95, 100):
        yield "native", "as is", 1.0, q, jpeg(gray, q)
    yield "native", "crop+3px", 1.0, 90, jpeg(np.ascontiguousarray(gray[3:, 5:]), 90)
    for d, m in ((1.25, "pil_bicubic"), (1.333, "pil_lanczos"), (1.5, "pil_bicubic"),
                 (2.0, "pil_lanczos")):
        yield "native", f"down {m}", 1 / d, 90, jpeg(resize(gray, (round(w / d), round(h / d)),
                                                            m), 90)
    for d in (1.25, 1.5):
        small = resize(gray, (round(w / d), round(h / d)), "cv_area")
        yield "native_area", "down cv_area", 1 / d, 90, jpeg(small, 90)
    for f in FACTORS:
        for m in METHODS:
            up = upscaled(gray, f, m)
            for q in QUALITIES:
                yield "upscaled", m, f, q, jpeg(up, q)


REAL_FACTORS = (1.25, 1.333, 1.5, 2.0)


def realistic_variants(gray: np.ndarray) -> Iterator[tuple[str, str, float, int, np.ndarray]]:
    """The picture itself enlarged by each factor and resizer, saved at q90 and q95."""
    h, w = gray.shape
    for f in REAL_FACTORS:
        for m in METHODS:
            up = resize(gray, (round(w * f), round(h * f)), m)
            for q in (90, 95):
                yield "upscaled_real", m, f, q, jpeg(up, q)


def sharpness_cases(gray_full: np.ndarray) -> list[tuple[str, float]]:
    """(label, sharpness) for a picture and its globally blurred copy.

    Pictures 3840 px wide or more are reduced to 3840 wide and blurred with σ = 3 px; smaller
    ones keep their size and get the same blur relative to the frame (σ = 3 · width / 3840).
    """
    h, w = gray_full.shape
    if w >= 3840:
        g = cv2.resize(gray_full, (3840, round(h * 3840 / w)), interpolation=cv2.INTER_AREA)
        sigma, group = 3.0, "4K"
    else:
        g, sigma, group = gray_full, 3.0 * w / 3840, f"{w}px"
    blurred = cv2.GaussianBlur(g, (0, 0), sigma)
    return [(f"sharp {group}", sharpness_score(g)),
            (f"blurred {group} σ={sigma:.1f}", sharpness_score(jpeg(blurred, 95)))]


def run_picture(args: tuple[str, str, int, int]) -> dict:
    """All cases of one picture: detection rows and sharpness rows."""
    cv2.setNumThreads(1)
    name, path, max_w, max_h = args
    full = load_gray(path)
    gray = center_crop(full, max_w, max_h)
    rows = []
    cases = variants(gray)
    if name not in SUSPECTED:
        cases = itertools.chain(cases, realistic_variants(gray))
    for kind, method, factor, q, img in cases:
        ev = native_score(img)
        rows.append((kind, method, factor, q, ev.score < DEFAULT_NATIVE_THRESHOLD, ev.detail))
    return {"name": name, "shape": full.shape, "rows": rows, "sharp": sharpness_cases(full)}


def timing(path: str, repeats: int = 30) -> list[tuple[str, float, float]]:
    """(function, min ms, median ms) per 3840×2160 image on one thread.

    The minimum is the cost on an idle core; the median shows contention from other work.
    """
    cv2.setNumThreads(1)
    g = np.ascontiguousarray(resize(load_gray(path), (3840, 2160), "pil_lanczos"))
    out = []
    for fn in (native_score, sharpness_score):
        fn(g)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(g)
            ts.append(time.perf_counter() - t)
        out.append((fn.__name__, 1e3 * min(ts), 1e3 * float(np.median(ts))))
    return out


def print_timing(pictures: list[tuple[str, str]]) -> None:
    """Time both functions on the first 4K-or-larger picture."""
    big = next((p for _, p in pictures if min(load_gray(p).shape) >= 2160), pictures[0][1])
    print(f"\n## Speed (3840×2160, one thread; {os.path.basename(os.path.dirname(big))} "
          f"{os.path.basename(big)})\n")
    for name, t_min, t_med in timing(big):
        print(f"- {name}: {t_min:.1f} ms (min of 30), {t_med:.1f} ms (median)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pictures")
    ap.add_argument("--max-width", type=int, default=2560)
    ap.add_argument("--max-height", type=int, default=1600)
    ap.add_argument("--timing-only", action="store_true", help="only time the two functions")
    a = ap.parse_args()
    pictures = find_pictures()
    if not pictures:
        raise SystemExit(f"no pictures under {FOLDERS}: apt-get install plasma-workspace-wallpapers"
                         " mate-backgrounds")
    if a.timing_only:
        print_timing(pictures)
        return
    if a.limit:
        pictures = pictures[: a.limit]
    t0 = time.time()
    jobs = [(n, p, a.max_width, a.max_height) for n, p in pictures]
    with ProcessPoolExecutor(a.workers) as ex:
        results = list(ex.map(run_picture, jobs))
    elapsed = time.time() - t0

    hits: dict[tuple, list[bool]] = defaultdict(list)
    false_by_picture: dict[str, list[str]] = defaultdict(list)
    for r in results:
        for kind, method, factor, q, rejected, detail in r["rows"]:
            hits[(kind, "fq", factor, q)].append(rejected)
            hits[(kind, "fm", factor, method)].append(rejected)
            hits[(kind, "all")].append(rejected)
            if kind == "upscaled" and q >= 90:
                hits[(kind, "jpeg")].append(rejected)
                hits[(kind, "jpeg", method.split("_")[0])].append(rejected)
            if kind == "upscaled_real":
                hits[(kind, "rq", factor, q)].append(rejected)
                hits[(kind, "rm", factor, method)].append(rejected)
                continue
            if kind != "upscaled":
                hits[(kind, method, q)].append(rejected)
                if kind == "native" and r["name"] not in SUSPECTED:
                    hits[("native_clean", "all")].append(rejected)
                if rejected:
                    false_by_picture[r["name"]].append(f"{method} q{q}: {detail}")

    def rate(key: tuple, digits: int = 2) -> str:
        v = hits[key]
        return f"{np.mean(v):.{digits}f}" if v else "-"

    print(f"# native_score calibration — {len(results)} pictures, {platform.machine()}, "
          f"{elapsed:.0f} s, threshold {DEFAULT_NATIVE_THRESHOLD}\n")
    print("## Recall on upscaled images, by factor × quality (0 = lossless PNG)\n")
    print("| factor | " + " | ".join(f"q{q}" if q else "PNG" for q in QUALITIES) + " |")
    print("|---" * (len(QUALITIES) + 1) + "|")
    for f in FACTORS:
        print(f"| {f} | " + " | ".join(rate(("upscaled", "fq", f, q)) for q in QUALITIES) + " |")
    print("\n## Recall on upscaled images, by factor × method\n")
    print("| factor | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for f in FACTORS:
        print(f"| {f} | " + " | ".join(rate(("upscaled", "fm", f, m)) for m in METHODS) + " |")
    n_up = len(hits[("upscaled", "all")])
    print(f"\nOverall recall: {rate(('upscaled', 'all'), 3)} of {n_up} upscaled images; "
          f"saved as JPEG q90–q100 only: {rate(('upscaled', 'jpeg'), 3)} of "
          f"{len(hits[('upscaled', 'jpeg')])} (PIL's resizers "
          f"{rate(('upscaled', 'jpeg', 'pil'), 3)}, "
          f"OpenCV's {rate(('upscaled', 'jpeg', 'cv'), 3)}).\n")
    print("## Recall on pictures upscaled as they are (own JPEG history), by factor\n")
    print("| factor | q90 | q95 | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 3) + "|")
    for f in REAL_FACTORS:
        cells = [rate(("upscaled_real", "rq", f, q)) for q in (90, 95)]
        cells += [rate(("upscaled_real", "rm", f, m)) for m in METHODS]
        print(f"| {f} | " + " | ".join(cells) + " |")
    n_real = len(hits[("upscaled_real", "all")])
    print(f"\nOverall: {rate(('upscaled_real', 'all'), 3)} of {n_real}.\n")
    print("## False rejections of natives\n")
    print("| variant | quality | rate | n |\n|---|---|---|---|")
    for key in sorted(k for k in hits if k[0] in ("native", "native_area") and len(k) == 3):
        print(f"| {key[0]}: {key[1]} | {key[2] or 'PNG'} | {rate(key)} | {len(hits[key])} |")
    n_nat = len(hits[("native", "all")])
    print(f"\nAll natives (without cv2 INTER_AREA downscales): {rate(('native', 'all'), 3)} of "
          f"{n_nat}; without the suspected {SUSPECTED}: {rate(('native_clean', 'all'), 3)} of "
          f"{len(hits[('native_clean', 'all')])}; cv2 INTER_AREA downscales: "
          f"{rate(('native_area', 'all'), 3)}.\n")
    for name, items in sorted(false_by_picture.items()):
        print(f"- {name}: {len(items)} false: {items[0]}")

    groups: dict[str, list[float]] = defaultdict(list)
    for r in results:
        for label, value in r["sharp"]:
            groups["sharp" if label.startswith("sharp") else "blurred"].append(value)
            big_or_small = "4K" if "4K" in label else "<4K"
            groups[f"{label.split()[0]} {big_or_small}"].append(value)
    print(f"\n## sharpness_score (threshold {DEFAULT_SHARPNESS_THRESHOLD})\n")
    print("Blurred: σ = 3 px at 3840 wide, σ = 3·width/3840 for smaller pictures; saved at q95.\n")
    print("| set | n | min | 5th pct | median | 95th pct | max | rejected |")
    print("|---|---|---|---|---|---|---|---|")
    for label in ("sharp 4K", "sharp <4K", "blurred 4K", "blurred <4K", "sharp", "blurred"):
        v = np.asarray(groups[label])
        if v.size:
            print(f"| {label} | {v.size} | {v.min():.2f} | {np.percentile(v, 5):.2f} | "
                  f"{np.median(v):.2f} | {np.percentile(v, 95):.2f} | {v.max():.2f} | "
                  f"{np.mean(v < DEFAULT_SHARPNESS_THRESHOLD):.2f} |")
    print_timing(pictures)


if __name__ == "__main__":
    main()
