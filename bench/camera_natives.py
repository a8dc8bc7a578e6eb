"""`native_score` on simulated straight-from-camera files: a Bayer mosaic, demosaiced, saved.

The wallpapers that calibrate the detector were resized before packaging, so none of them
still carries a camera's colour-filter-array (CFA) lattice, which a straight-from-camera file
does: demosaicing interpolates, at every pixel, the two colours its filter did not capture, a
pattern that repeats every 2 px, as a 2× enlargement's does. This simulates such files from the
calibration pictures (`bench/calibrate_native.py`'s 41 clean ones) and the 12 held-out
photographs: each picture is area-downscaled by 2 (the scene: band-limited, no earlier
lattice), centre-cropped to at most 2520×1560 (offsets on the 8-px grid), sampled through an
RGGB-type mosaic (blue at (0, 0), red at (1, 1)), demosaiced by a textbook bilinear filter
(`bilinear_demosaic`) or by OpenCV's bilinear, VNG and edge-aware methods, optionally with
sensor noise, and saved as JPEG q85/q95 and WebP q90 (Pillow, 4:2:0), as cameras and phones
save them; and, with noise, denoised and sharpened before a JPEG q92 (`processed`).
Enlargements of those camera frames (1.25–3×, bicubic, JPEG q90; a fake 4K made from a camera
JPEG) check that the CFA override keeps them caught.

Each image is judged as the job judges it (`native_score` with the codec of its bytes); the
verdict without the override (``before``) is the same call's, read from its evidence.

Usage: `python -m bench.camera_natives [--workers 2]` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
from PIL import Image, ImageFilter

from bench.calibrate_codecs import encode
from bench.calibrate_native import center_crop, clean_held_out, clean_pictures
from curation.analyze import native as nat

Image.MAX_IMAGE_PIXELS = None
DEMOSAIC = ("bilinear", "cv_bilinear", "cv_vng", "cv_ea")
_CV = {"cv_bilinear": cv2.COLOR_BayerBG2RGB, "cv_vng": cv2.COLOR_BayerBG2RGB_VNG,
       "cv_ea": cv2.COLOR_BayerBG2RGB_EA}
SAVES = (("jpeg", 85), ("jpeg", 95), ("webp", 90))
UP_FACTORS = (1.25, 4 / 3, 1.5, 2.0, 2.5, 3.0)


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """One colour per pixel: blue at (even, even), green at (even, odd) and (odd, even), red at
    (odd, odd) (OpenCV's ``BayerBG`` layout)."""
    raw = np.empty(rgb.shape[:2], rgb.dtype)
    raw[0::2, 0::2] = rgb[0::2, 0::2, 2]
    raw[0::2, 1::2] = rgb[0::2, 1::2, 1]
    raw[1::2, 0::2] = rgb[1::2, 0::2, 1]
    raw[1::2, 1::2] = rgb[1::2, 1::2, 0]
    return raw


def bilinear_demosaic(raw: np.ndarray) -> np.ndarray:
    """Textbook bilinear demosaicing of `mosaic`'s layout (symmetric 3×3 kernels), RGB uint8."""
    planes = np.zeros((3, *raw.shape), np.float32)
    planes[2, 0::2, 0::2] = raw[0::2, 0::2]
    planes[1, 0::2, 1::2] = raw[0::2, 1::2]
    planes[1, 1::2, 0::2] = raw[1::2, 0::2]
    planes[0, 1::2, 1::2] = raw[1::2, 1::2]
    k_g = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4
    k_rb = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
    out = [cv2.filter2D(p, -1, k_g if i == 1 else k_rb, borderType=cv2.BORDER_REFLECT_101)
           for i, p in enumerate(planes)]
    return np.clip(np.dstack(out) + 0.5, 0, 255).astype(np.uint8)


def camera_frame(
    rgb: np.ndarray, method: str, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """`rgb` through the mosaic (with shot-like noise of `noise` levels at mid-grey) and back."""
    x = rgb.astype(np.float32)
    if noise:
        x += rng.normal(0.0, 1.0, x.shape).astype(np.float32) * noise * np.sqrt(
            np.maximum(x, 1.0) / 128)
    raw = mosaic(np.clip(x + 0.5, 0, 255).astype(np.uint8))
    return bilinear_demosaic(raw) if method == "bilinear" else cv2.cvtColor(raw, _CV[method])


def processed(frame: np.ndarray) -> dict[str, np.ndarray]:
    """`frame` denoised (OpenCV non-local means, or a bilateral filter), then sharpened (unsharp
    mask, radius 1.2, 120 %), as cameras and phones finish a frame before saving it."""
    denoised = {"non-local means + sharpening": cv2.fastNlMeansDenoisingColored(
                    frame, None, 3, 3, 5, 11),
                "bilateral + sharpening": cv2.bilateralFilter(frame, 5, 20, 3)}
    sharpen = ImageFilter.UnsharpMask(radius=1.2, percent=120, threshold=1)
    return {k: np.asarray(Image.fromarray(v).filter(sharpen)) for k, v in denoised.items()}


def judge(gray: np.ndarray, codec: str) -> dict:
    """The job's verdict, and the verdict the detector gave before the CFA override."""
    ev = nat.native_score(gray, codec=codec)
    rejected = ev.score < nat.DEFAULT_NATIVE_THRESHOLD
    return {"rejected": rejected, "rejected_before": rejected or ev.test == "cfa",
            "test": ev.test, "strength": ev.strength}


def run_picture(job: tuple[str, str, str, int]) -> list[dict]:
    """Every camera variant of one picture, and enlargements of two of them."""
    cv2.setNumThreads(1)
    name, path, group, index = job
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    scene = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    ch, cw = center_crop(scene[..., 0], 2520, 1560).shape  # its offsets, for all three planes
    y0, x0 = (scene.shape[0] - ch) // 16 * 8, (scene.shape[1] - cw) // 16 * 8
    scene = np.ascontiguousarray(scene[y0 : y0 + ch, x0 : x0 + cw])
    rng = np.random.default_rng(index)
    rows = []
    for method in DEMOSAIC:
        for noise in (0.0, 3.0):
            frame = camera_frame(scene, method, noise, rng)
            for container, q in SAVES:
                gray, codec = encode(frame, container, q)
                rows.append({"kind": "camera", "method": method, "noise": noise,
                             "container": container, "q": q, **judge(gray, codec)})
            if noise:
                continue
            f = UP_FACTORS[(index + DEMOSAIC.index(method)) % len(UP_FACTORS)]
            for g, f_ in ((f, f), (UP_FACTORS[(index + 3) % len(UP_FACTORS)], None)):
                if f_ is None and method != "bilinear":
                    continue
                big = cv2.resize(frame, (round(frame.shape[1] * g), round(frame.shape[0] * g)),
                                 interpolation=cv2.INTER_CUBIC)
                gray, codec = encode(big, "jpeg", 90)
                rows.append({"kind": "camera enlarged", "method": method, "noise": noise,
                             "container": "jpeg", "q": 90, "factor": g, **judge(gray, codec)})
    for method in ("bilinear", "cv_ea"):  # a phone's or camera's finishing, after the mosaic
        frame = camera_frame(scene, method, 3.0, rng)
        for processing, finished in processed(frame).items():
            gray, codec = encode(finished, "jpeg", 92)
            rows.append({"kind": "processed", "method": method, "noise": 3.0,
                         "processing": processing, "container": "jpeg", "q": 92,
                         **judge(gray, codec)})
    for r in rows:
        r["picture"], r["group"] = name, group
    return rows


def rate(rows: list[dict], key: str) -> str:
    """Share of `rows` with `key` true, and the count."""
    k = sum(bool(r[key]) for r in rows)
    return f"{k / len(rows):.3f} ({k}/{len(rows)})" if rows else "-"


def report(rows: list[dict]) -> None:
    """Markdown tables: false rejections of camera natives and recall of their enlargements."""
    for group in ("calibration", "held out"):
        sel = [r for r in rows if r["group"] == group]
        cams = [r for r in sel if r["kind"] == "camera"]
        print(f"\n### {group}: camera natives rejected (before the CFA override → now)\n")
        print("| demosaicing | JPEG q85 | JPEG q95 | WebP q90 | all |")
        print("|---|---|---|---|---|")
        for m in DEMOSAIC:
            cells = []
            for container, q in SAVES:
                c = [r for r in cams if r["method"] == m and r["container"] == container
                     and r["q"] == q]
                cells.append(f"{rate(c, 'rejected_before')} → {rate(c, 'rejected')}")
            c = [r for r in cams if r["method"] == m]
            cells.append(f"{rate(c, 'rejected_before')} → {rate(c, 'rejected')}")
            print(f"| {m} | " + " | ".join(cells) + " |")
        print(f"| all | | | | {rate(cams, 'rejected_before')} → {rate(cams, 'rejected')} |")
        by_test: dict[str, int] = defaultdict(int)
        for r in cams:
            if r["rejected_before"] and not r["rejected"]:
                by_test["overridden"] += 1
            elif r["rejected"]:
                by_test[r["test"]] += 1
        print(f"\nStill rejected, by test: {dict(by_test)}")
        for processing in ("non-local means + sharpening", "bilateral + sharpening"):
            c = [r for r in sel if r["kind"] == "processed" and r["processing"] == processing]
            print(f"Denoised ({processing}), JPEG q92: rejected {rate(c, 'rejected_before')} → "
                  f"{rate(c, 'rejected')}")
        ups = [r for r in sel if r["kind"] == "camera enlarged"]
        print(f"Camera frames enlarged 1.25–3× (JPEG q90): recall {rate(ups, 'rejected_before')}"
              f" → {rate(ups, 'rejected')}")


def main() -> None:
    """Run every picture on a process pool and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    cal = [(n, p, "calibration") for n, p in clean_pictures()]
    held = [(n, p, "held out") for n, p in clean_held_out()]
    jobs = [(n, p, g, i) for i, (n, p, g) in enumerate(cal + held)]
    t = time.perf_counter()
    rows: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for r in pool.map(run_picture, jobs):
            rows += r
    print(f"{len(rows)} images from {len(jobs)} pictures in {time.perf_counter() - t:.0f} s")
    report(rows)


if __name__ == "__main__":
    main()
