"""Calibration sweep for `native_score` (upscale detection) and `sharpness_score` (blur).

Real photographs and renders come from Debian's plasma-workspace-wallpapers and mate-backgrounds
(`/usr/share/wallpapers`, `/usr/share/backgrounds`). Every distinct picture (largest file per
folder, shorter side ≥ 1000 px) is centre-cropped to at most `--max-width`×`--max-height`, sides
multiples of 120 so that the factors below are exact ratios (a crop of a native image is native),
and then turned into:

* natives: as is (PNG-equivalent), JPEG re-encodes q85/q90/q95/q100, crops by 3/5 and 4/4 px
  saved at q90 (off the source's JPEG grid),
  downscales with PIL's antialiasing bicubic and Lanczos (÷1.25, ÷4/3, ÷1.5, ÷2) saved at q90;
  OpenCV `INTER_AREA` downscales (÷1.25, ÷1.5) are reported apart (see docs);
* upscaled: an area downscale to 1/f, then back up by f with PIL bicubic/Lanczos and OpenCV
  cubic/Lanczos4, kept lossless (PNG) or saved as JPEG q90/q95/q100; f in 1.25 … 3; and, reported
  apart, f = 1.34, 1.61, 1.99 at q90 (just off the JPEG grid's frequencies: a blind spot);
* upscaled from the photographs as they are ("realistic": they keep their own JPEG history, as
  a fake-4K file made from a camera JPEG does): the crop enlarged by 1.25, 4/3, 1.5 and 2 with
  the four resizers, saved at q90/q95 (pictures in `SUSPECTED` left out);
* blurred (for sharpness): Gaussian σ = 3 px on the 4K-and-larger pictures (resized to 3840
  wide), σ = 2 px on 2560-px pictures (the same blur relative to the frame).

Prints Markdown tables (recall per factor × quality and per factor × method, false rejections of
natives, sharpness separation) and the time per 3840×2160 image of each function on one thread.

`--held-out` runs the same cases on the held-out test set instead (Lomiri's and UKUI's
wallpapers, never used to set a threshold) at full size, as the job sees them.

Usage: `python bench/calibrate_native.py [--held-out] [--workers 2] [--limit N]`
"""

from __future__ import annotations

import argparse
import glob
import io
import itertools
import os
import pickle
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

# The held-out pictures enlarged 2× reach 95 MP: our own test images, not decompression bombs.
Image.MAX_IMAGE_PIXELS = None
FACTORS = (1.25, 4 / 3, 1.5, 1.6, 1.78, 2.0, 2.5, 3.0)
# Factors just off the JPEG grid's cyclic frequencies 3/4, 5/8 and 1/2 (4/3, 8/5 and 2 are
# exact there): a known blind spot, reported apart (see docs/native-detection.md).
NEAR_GRID = (1.34, 1.61, 1.99)
STEP = 120  # crops are multiples of this, so that 1.25, 4/3, 1.5, 1.6 and 2 are exact ratios
METHODS = ("pil_bicubic", "pil_lanczos", "cv_cubic", "cv_lanczos")
QUALITIES = (0, 90, 95, 100)  # 0 = lossless
# Pictures whose every variant shows a resampling trace: probably resized up before packaging.
# Patak's 5120×2880 file is its own 3840×2160 version (no trace) enlarged by 4/3; Shell's
# 5120×2880 file (no smaller version shipped) shows the same 4/3 trace.
SUSPECTED = ("FreshFlower.jpg", "OneStandsOut/images", "Patak/images", "Shell/images")
FOLDERS = ("/usr/share/wallpapers", "/usr/share/backgrounds/mate/nature")
# The held-out test set: Lomiri's and UKUI's wallpapers (camera photographs up to 6028×3391 and
# renders), never used to set a threshold, judged at their full size as the job sees them.
HELD_OUT_PACKAGES = ("lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
                     "ukui-wallpapers")
# Two of its files are themselves enlargements (see docs/native-detection.md): Dragonfly is
# 4224×3168, exactly 1.294× a 3264×2448 (8 MP) camera frame; Wine shows magnified JPEG blocks.
HELD_OUT_UPSCALED = ("Dragonfly_by_Bolly.jpg", "Wine_by_Jakkub_Mede.jpg")
# Computer renders (smooth gradients, vector art); every other held-out picture is a photograph.
HELD_OUT_RENDERS = ("2004default.jpg", "calla.png", "city.png", "desert.png", "firstgeneration.jpg",
                    "fluent-color.png", "focal-ubuntukylin.png", "goldfish.png", "rhythm.jpg",
                    "rollpaper.png", "string.jpg", "the-mouse.jpg", "Fossa_by_Jasper_Roks.jpg",
                    "Infinite-Sea_by_Aury88.jpg", "Painting-Colors_by__herobrine7gamer.jpg",
                    "lomiri-default-background.png", "warty-final-ubuntu.png",
                    "umang_by_Abhishek_Mudgal.jpg")


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


def find_held_out(min_long_side: int = 2560) -> list[tuple[str, str]]:
    """(name, path) of the held-out pictures: the files directly in `/usr/share/backgrounds`."""
    out = []
    for p in sorted(glob.glob("/usr/share/backgrounds/*")):
        if not p.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        with Image.open(p) as im:
            if max(im.size) >= min_long_side:
                out.append((os.path.basename(p), p))
    return out


def clean_pictures() -> list[tuple[str, str]]:
    """The calibration pictures without the suspected enlargements (`SUSPECTED`)."""
    return [p for p in find_pictures() if p[0] not in SUSPECTED]


def clean_held_out() -> list[tuple[str, str]]:
    """The held-out camera photographs: no renders, not the two known enlargements."""
    skip = set(HELD_OUT_RENDERS) | set(HELD_OUT_UPSCALED)
    return [p for p in find_held_out() if p[0] not in skip]


def load_gray(path: str) -> np.ndarray:
    """8-bit luma of a picture (the same plane the curation job analyses)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def center_crop(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre crop to at most width×height, both sides multiples of `STEP`.

    Enlargements between standard sizes have exact ratios (2880 → 3840 is 4/3); whole sides
    keep the test's ratios exact too. The offsets are multiples of 8, so a JPEG source's block
    grid stays where the re-encodes put theirs (the `crop+4px` variant tests the other case).
    """
    h, w = gray.shape
    ch, cw = min(h, height) // STEP * STEP, min(w, width) // STEP * STEP
    y, x = (h - ch) // 16 * 8, (w - cw) // 16 * 8  # on the source's 8-px JPEG grid
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
    yield "native", "crop+4px", 1.0, 90, jpeg(np.ascontiguousarray(gray[4:, 4:]), 90)
    for d, m in ((1.25, "pil_bicubic"), (4 / 3, "pil_lanczos"), (1.5, "pil_bicubic"),
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
    for f in NEAR_GRID:
        for m in METHODS:
            yield "upscaled_near", m, f, 90, jpeg(upscaled(gray, f, m), 90)


REAL_FACTORS = (1.25, 4 / 3, 1.5, 2.0)


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


def run_picture(args: tuple[str, str, int, int, tuple[str, ...]]) -> dict:
    """All cases of one picture: detection rows and sharpness rows."""
    cv2.setNumThreads(1)
    name, path, max_w, max_h, suspected = args
    full = load_gray(path)
    gray = center_crop(full, max_w or full.shape[1], max_h or full.shape[0])
    rows = []
    cases = variants(gray)
    if name not in suspected:
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
    ap.add_argument("--held-out", action="store_true",
                    help="the held-out test set, at full size (apt-get install "
                         + " ".join(HELD_OUT_PACKAGES) + ")")
    ap.add_argument("--save", help="pickle every verdict to this file")
    a = ap.parse_args()
    if a.held_out:
        pictures, suspected, packages = find_held_out(), HELD_OUT_UPSCALED, HELD_OUT_PACKAGES
        a.max_width = a.max_height = 0
    else:
        pictures, suspected = find_pictures(), SUSPECTED
        packages = ("plasma-workspace-wallpapers", "mate-backgrounds")
    if not pictures:
        raise SystemExit(f"no pictures found: apt-get install {' '.join(packages)}")
    if a.timing_only:
        print_timing(pictures)
        return
    if a.limit:
        pictures = pictures[: a.limit]
    t0 = time.time()
    jobs = [(n, p, a.max_width, a.max_height, suspected) for n, p in pictures]
    with ProcessPoolExecutor(a.workers) as ex:
        results = list(ex.map(run_picture, jobs))
    elapsed = time.time() - t0

    if a.save:
        with open(a.save, "wb") as fh:
            pickle.dump(results, fh)
    hits: dict[tuple, list[bool]] = defaultdict(list)
    false_by_picture: dict[str, list[str]] = defaultdict(list)
    for r in results:
        group = "render" if r["name"] in HELD_OUT_RENDERS else "photograph"
        for kind, method, factor, q, rejected, detail in r["rows"]:
            hits[(r["name"], kind, q >= 90 or kind == "native")].append(rejected)
            if kind in ("native", "upscaled") and r["name"] not in suspected:
                jpeg_case = kind == "native" or q >= 90
                hits[(group, kind, jpeg_case)].append(rejected)
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
            if kind == "upscaled_near":
                hits[(kind, factor)].append(rejected)
                continue
            if kind != "upscaled":
                hits[(kind, method, q)].append(rejected)
                if kind == "native" and r["name"] not in suspected:
                    hits[("native_clean", "all")].append(rejected)
                if rejected:
                    false_by_picture[r["name"]].append(f"{method} q{q}: {detail}")

    def rate(key: tuple, digits: int = 2) -> str:
        v = hits[key]
        return f"{np.mean(v):.{digits}f}" if v else "-"

    title = ("held-out test, full size" if a.held_out
             else f"calibration, ≤{a.max_width}×{a.max_height}")
    print(f"# native_score {title} — {len(results)} pictures, {platform.machine()}, "
          f"{elapsed:.0f} s, threshold {DEFAULT_NATIVE_THRESHOLD}\n")
    print("## Recall on upscaled images, by factor × quality (0 = lossless PNG)\n")
    print("| factor | " + " | ".join(f"q{q}" if q else "PNG" for q in QUALITIES) + " |")
    print("|---" * (len(QUALITIES) + 1) + "|")
    for f in FACTORS:
        print(f"| {f:.4g} | " + " | ".join(rate(("upscaled", "fq", f, q)) for q in QUALITIES)
              + " |")
    print("\n## Recall on upscaled images, by factor × method\n")
    print("| factor | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for f in FACTORS:
        print(f"| {f:.4g} | " + " | ".join(rate(("upscaled", "fm", f, m)) for m in METHODS)
              + " |")
    n_up = len(hits[("upscaled", "all")])
    print(f"\nOverall recall: {rate(('upscaled', 'all'), 3)} of {n_up} upscaled images; "
          f"saved as JPEG q90–q100 only: {rate(('upscaled', 'jpeg'), 3)} of "
          f"{len(hits[('upscaled', 'jpeg')])} (PIL's resizers "
          f"{rate(('upscaled', 'jpeg', 'pil'), 3)}, "
          f"OpenCV's {rate(('upscaled', 'jpeg', 'cv'), 3)}).\n")
    near = ", ".join(f"{f}: {rate(('upscaled_near', f))}" for f in NEAR_GRID)
    print(f"Just off the JPEG grid (q90, all resizers), not in the figures above: {near}.\n")
    print("## Recall on pictures upscaled as they are (own JPEG history), by factor\n")
    print("| factor | q90 | q95 | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 3) + "|")
    for f in REAL_FACTORS:
        cells = [rate(("upscaled_real", "rq", f, q)) for q in (90, 95)]
        cells += [rate(("upscaled_real", "rm", f, m)) for m in METHODS]
        print(f"| {f:.4g} | " + " | ".join(cells) + " |")
    n_real = len(hits[("upscaled_real", "all")])
    print(f"\nOverall: {rate(('upscaled_real', 'all'), 3)} of {n_real}.\n")
    print("## False rejections of natives\n")
    print("| variant | quality | rate | n |\n|---|---|---|---|")
    for key in sorted(k for k in hits if k[0] in ("native", "native_area") and len(k) == 3):
        print(f"| {key[0]}: {key[1]} | {key[2] or 'PNG'} | {rate(key)} | {len(hits[key])} |")
    n_nat = len(hits[("native", "all")])
    print(f"\nAll natives (without cv2 INTER_AREA downscales): {rate(('native', 'all'), 3)} of "
          f"{n_nat}; without the suspected {suspected}: {rate(('native_clean', 'all'), 3)} of "
          f"{len(hits[('native_clean', 'all')])}; cv2 INTER_AREA downscales: "
          f"{rate(('native_area', 'all'), 3)}.\n")
    for name, items in sorted(false_by_picture.items()):
        print(f"- {name}: {len(items)} false: {items[0]}")
    if a.held_out:
        print("\n## Photographs and renders apart (without the two enlarged files)\n")
        print("| group | pictures | false rejections | recall, JPEG q90–q100 upscales |")
        print("|---|---|---|---|")
        for group in ("photograph", "render"):
            n_pic = sum(1 for r in results if r["name"] not in suspected
                        and (r["name"] in HELD_OUT_RENDERS) == (group == "render"))
            nat, up = hits[(group, "native", True)], hits[(group, "upscaled", True)]
            print(f"| {group}s | {n_pic} | {rate((group, 'native', True), 3)} ({sum(nat)} of "
                  f"{len(nat)}) | {rate((group, 'upscaled', True), 3)} (of {len(up)}) |")
    print("\n## Per picture\n")
    print("| picture | size | natives rejected | recall, JPEG upscales | recall, as they are |")
    print("|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: r["name"]):
        nat = hits[(r["name"], "native", True)]
        h, w = r["shape"]
        print(f"| {r['name']} | {w}×{h} | {sum(nat)} of {len(nat)} | "
              f"{rate((r['name'], 'upscaled', True))} | "
              f"{rate((r['name'], 'upscaled_real', True))} |")

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
