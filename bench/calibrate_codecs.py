"""`native_score` across codecs: natives and enlargements saved as PNG, JPEG, lossy WebP, AVIF.

Issue 11's goals, measured on a calibration set and on a held-out set kept apart (the split of
`bench/calibrate_native.py`): calibration = KDE's and MATE's wallpapers (`find_pictures`, the
suspected enlargements left out), held out = the photographs directly in
`/usr/share/backgrounds` (Lomiri's, `find_held_out`, without the renders and the two known
enlargements). Every picture is centre-cropped to at most 2520×1560 (sides multiples of 120,
offsets multiples of 8, as in `calibrate_native.py`: the detector judges a 2561×1601 window
anyway) and turned into:

* natives: as is (= PNG = lossless WebP: the same pixels), JPEG q75/85/95/100, lossy WebP
  q75/85/90/95/100 (PIL, method 4), WebP q85 and q95 of a crop by 3/5 px (off the 4-px and
  16-px grids) and of a PIL Lanczos ÷1.5 downscale, AVIF q50/q75 (speed 8);
* enlargements: an area downscale to 1/f, then back up by f with PIL bicubic / Lanczos /
  bilinear and OpenCV cubic / Lanczos4 / linear; f in `FACTORS`; each (factor, resizer) is saved
  once as PNG or JPEG (quality rotating over 75/90/100 and PNG, by picture) and once as lossy
  WebP (75/90/100, rotating), plus one AVIF q60 per factor; the near-grid factors (4/3, 8/5 and 2
  ± 3 %) at q90 as JPEG and WebP (resizer rotating);
* with ``--jpeg-sources``, the same enlargements only, each made from the area downscale saved
  as a JPEG first (q75/85/95, rotating by picture and factor), as a fake 4K file made from a
  web image is: the small JPEG's 8-px block grid comes along, magnified to 8 f px.

Each image is judged with the codec the job would pass (`block_codec` of its bytes: ``jpeg``, or
``jpeg_low`` below q85, ``lossless`` for PNG, ``vp8`` for lossy WebP, ``vp8_fine`` for lossy
WebP at q90 and finer, ``av1`` for AVIF) and,
for the report's "before" column, as the detector did before codecs were modelled (``jpeg``
for everything). Raw statistics are saved
too (``--save``) so thresholds can be refitted without re-encoding.

Usage (issue 11's figures: 2 workers, `nice -n 10`, about 10 minutes on 2 cores):
`python bench/calibrate_codecs.py [--held-out] [--natives-limit N] [--upscale-pictures N]`
`[--jpeg-sources]` (about 5 minutes each for the enlargements of JPEG sources).
"""

from __future__ import annotations

import argparse
import io
import pickle
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
from PIL import Image

from bench.calibrate_native import center_crop, clean_held_out, clean_pictures, load_gray
from curation.analyze import native as nat
from curation.analyze.native_coherence import JPEG_LINES, VP8_LINES, coherence_statistics
from curation.analyze.pixel_analyzer import block_codec
from curation.analyze.sharpness import DEFAULT_SHARPNESS_THRESHOLD, sharpness_score

Image.MAX_IMAGE_PIXELS = None
FACTORS = (1.15, 1.25, 4 / 3, 1.5, 1.78, 2.0, 2.5, 3.0)
NEAR_GRID = (4 / 3 * 0.97, 4 / 3 * 1.03, 1.6 * 0.97, 1.6 * 1.03, 2 * 0.97, 2 * 1.03)
METHODS = ("pil_bicubic", "pil_lanczos", "pil_bilinear", "cv_cubic", "cv_lanczos", "cv_linear")
LOSSLESS_OR_JPEG = (("png", 0), ("jpeg", 75), ("jpeg", 90), ("jpeg", 100))
WEBP = (("webp", 75), ("webp", 90), ("webp", 100))


def encode(pixels: np.ndarray, container: str, quality: int) -> tuple[np.ndarray, str]:
    """Save luma or RGB `pixels` as `container` at `quality` with Pillow; the luma decoded again
    and the codec the job would pass (`block_codec` of the bytes; png: the pixels' luma,
    ``lossless``)."""
    if container == "png":
        if pixels.ndim == 3:
            pixels = np.asarray(Image.fromarray(pixels).convert("L"))
        return pixels, "lossless"
    buf = io.BytesIO()
    kw = {"speed": 8} if container == "avif" else {}
    Image.fromarray(pixels).save(buf, container.upper(), quality=quality, **kw)
    codec = block_codec(buf.getvalue())
    buf.seek(0)
    with Image.open(buf) as im:
        return np.ascontiguousarray(np.asarray(im.convert("L"))), codec


def resize(gray: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """Resize to (width, height) with a named library method."""
    pil = {"pil_bicubic": Image.BICUBIC, "pil_lanczos": Image.LANCZOS,
           "pil_bilinear": Image.BILINEAR}
    cv = {"cv_cubic": cv2.INTER_CUBIC, "cv_lanczos": cv2.INTER_LANCZOS4,
          "cv_linear": cv2.INTER_LINEAR, "cv_area": cv2.INTER_AREA}
    if method in pil:
        return np.asarray(Image.fromarray(gray).resize(size, pil[method]))
    return cv2.resize(gray, size, interpolation=cv[method])


def enlarged(gray: np.ndarray, factor: float, method: str, source_q: int = 0) -> np.ndarray:
    """Area-downscale to 1/factor, then enlarge back to the original size with `method`; with
    `source_q`, the small picture is first saved as a JPEG of that quality (a web image)."""
    h, w = gray.shape
    small = resize(gray, (round(w / factor), round(h / factor)), "cv_area")
    if source_q:
        small = encode(small, "jpeg", source_q)[0]
    return resize(small, (w, h), method)


# set, method, factor, container, quality, source JPEG quality (0: none), (image, codec)
Case = tuple[str, str, float, str, int, int, tuple[np.ndarray, str]]
SOURCE_QUALITIES = (75, 85, 95)  # of the small JPEG a web-style enlargement is made from


def native_cases(gray: np.ndarray) -> Iterator[Case]:
    """The picture's native variants."""
    h, w = gray.shape
    yield "native", "as is", 1.0, "png", 0, 0, encode(gray, "png", 0)
    for q in (75, 85, 95, 100):
        yield "native", "as is", 1.0, "jpeg", q, 0, encode(gray, "jpeg", q)
    for q in (75, 85, 90, 95, 100):
        yield "native", "as is", 1.0, "webp", q, 0, encode(gray, "webp", q)
    crop = np.ascontiguousarray(gray[3:, 5:])
    down = resize(gray, (round(w / 1.5), round(h / 1.5)), "pil_lanczos")
    for q in (85, 95):  # each side of the vp8 / vp8_fine split
        yield "native", "crop+3/5px", 1.0, "webp", q, 0, encode(crop, "webp", q)
        yield "native", "down pil_lanczos", 1 / 1.5, "webp", q, 0, encode(down, "webp", q)
    for q in (50, 75):
        yield "native", "as is", 1.0, "avif", q, 0, encode(gray, "avif", q)


def upscale_cases(gray: np.ndarray, index: int, jpeg_sources: bool = False) -> Iterator[Case]:
    """Enlargements of the picture, the saved format rotating with the picture's `index`; with
    `jpeg_sources`, each made from a small JPEG (quality rotating over `SOURCE_QUALITIES`)."""
    for i, f in enumerate(FACTORS):
        sq = SOURCE_QUALITIES[(index + i) % len(SOURCE_QUALITIES)] if jpeg_sources else 0
        for j, m in enumerate(METHODS):
            up = enlarged(gray, f, m, sq)
            for saves in (LOSSLESS_OR_JPEG, WEBP):
                container, q = saves[(index + i + j) % len(saves)]
                yield "upscaled", m, f, container, q, sq, encode(up, container, q)
        m = METHODS[(index + i) % len(METHODS)]
        yield "upscaled", m, f, "avif", 60, sq, encode(enlarged(gray, f, m, sq), "avif", 60)
    for i, f in enumerate(NEAR_GRID):
        m = METHODS[(index + i) % len(METHODS)]
        sq = SOURCE_QUALITIES[(index + i) % len(SOURCE_QUALITIES)] if jpeg_sources else 0
        up = enlarged(gray, f, m, sq)
        for container in ("jpeg", "webp"):
            yield "near", m, f, container, 90, sq, encode(up, container, 90)


def raw_statistics(gray: np.ndarray) -> dict[str, float]:
    """Every test's statistic before thresholds, under both grids (for refitting thresholds)."""
    g = np.ascontiguousarray(nat._central_window(gray))
    bands = nat._textured_bands(g)
    p1x, p2x, p1y, p2y, used = nat._profiles(g, *bands)
    thr = max(nat._SPECTRAL_FLOOR, nat._SPECTRAL_THRESHOLD * used / nat._REFERENCE_PIXELS)
    out: dict[str, float] = {}
    for name, model in (("jpeg", nat._JPEG), ("vp8", nat._VP8)):
        ratio, freq, _, _ = nat._spectral_evidence(p1x, p2x, p1y, p2y, thr, model.lines)
        out[f"spectral_{name}"], out[f"freq_{name}"] = ratio, freq
    out["fold"] = nat._fold_evidence(p1x, p1y)[0]
    for name, skip in (("jpeg", JPEG_LINES), ("vp8", VP8_LINES)):
        h, a1, grid, lattice = coherence_statistics(g, *bands, skip=skip)
        out[f"harmonic_{name}"], out[f"alpha_{name}"] = h, a1
    for value, z in zip((0.375, 0.5, 0.625, 0.75), grid, strict=True):
        out[f"z{value}"] = z
    out["quarter"] = nat._quarter_period(grid)
    out["cfa"] = lattice
    return out


def judge(case: Case) -> dict:
    """One case's verdicts (with its container's codec and, as before, as JPEG) and statistics."""
    kind, method, factor, container, q, source_q, (img, codec) = case
    ev = nat.native_score(img, codec=codec)
    before = nat.native_score(img, codec="jpeg")
    return {"set": kind, "method": method, "factor": factor, "container": container, "q": q,
            "source_q": source_q,
            "rejected": ev.score < nat.DEFAULT_NATIVE_THRESHOLD, "score": ev.score,
            "test": ev.test, "period": ev.period, "strength": ev.strength, "detail": ev.detail,
            "rejected_before": before.score < nat.DEFAULT_NATIVE_THRESHOLD,
            "sharpness": sharpness_score(img), "raw": raw_statistics(img)}


def run_picture(job: tuple[str, str, int, bool, bool]) -> list[dict]:
    """All cases of one picture (with JPEG sources: its enlargements only)."""
    cv2.setNumThreads(1)
    name, path, index, with_upscales, jpeg_sources = job
    gray = center_crop(load_gray(path), 2520, 1560)
    cases = [] if jpeg_sources else list(native_cases(gray))
    if with_upscales:
        cases += list(upscale_cases(gray, index, jpeg_sources))
    rows = [judge(c) for c in cases]
    for r in rows:
        r["picture"] = name
    return rows


def subsample(pictures: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """`n` pictures evenly spread over the sorted list (all when `n` is 0 or too large)."""
    if not n or n >= len(pictures):
        return pictures
    idx = np.round(np.linspace(0, len(pictures) - 1, n)).astype(int)
    return [pictures[i] for i in idx]


def rate(rows: list[dict], key: str = "rejected") -> str:
    """Share of `rows` with `key` true, and the count."""
    if not rows:
        return "-"
    k = sum(bool(r[key]) for r in rows)
    return f"{k / len(rows):.3f} ({k}/{len(rows)})"


def report(rows: list[dict], title: str) -> None:
    """Markdown tables: false rejections by codec × quality, recall by factor × codec, etc."""
    print(f"\n### {title}\n")
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["set"], "v", r["method"], r["container"], r["q"])].append(r)
        by[(r["set"], r["container"], "f", round(r["factor"], 4))].append(r)
    print("False rejections of natives (goal ≤ 2 %):\n")
    print("| variant | container | quality | rejected | before (all judged as JPEG) |")
    print("|---|---|---|---|---|")
    for key in sorted(k for k in by if k[0] == "native" and k[1] == "v"):
        print(f"| {key[2]} | {key[3]} | {key[4] or '-'} | {rate(by[key])} | "
              f"{rate(by[key], 'rejected_before')} |")
    for c in ("jpeg", "webp", "avif"):
        sel = [r for r in rows if r["set"] == "native" and r["container"] == c
               and (c == "avif" or r["q"] >= 75)]
        print(f"\nAll {c} natives: {rate(sel)}; before: {rate(sel, 'rejected_before')}.")
    print("\nRecall of enlargements by factor × container (goal ≥ 95 %):\n")
    containers = ("png", "jpeg", "webp", "avif")
    print("| factor | " + " | ".join(containers) + " |")
    print("|---" * (len(containers) + 1) + "|")
    for f in FACTORS:
        cells = [rate(by[("upscaled", c, "f", round(f, 4))]) for c in containers]
        print(f"| {f:.4g} | " + " | ".join(cells) + " |")
    print("\n| container | quality | recall | before |\n|---|---|---|---|")
    for c, q in (("png", 0), ("jpeg", 75), ("jpeg", 90), ("jpeg", 100), *WEBP, ("avif", 60)):
        sel = [r for r in rows if r["set"] == "upscaled" and r["container"] == c and r["q"] == q]
        print(f"| {c} | {q or '-'} | {rate(sel)} | {rate(sel, 'rejected_before')} |")
    print("\n| resizers | png+jpeg | webp |\n|---|---|---|")
    for lib in ("pil", "cv"):
        pj = [r for r in rows if r["set"] == "upscaled" and r["method"].startswith(lib)
              and r["container"] in ("png", "jpeg")]
        wb = [r for r in rows if r["set"] == "upscaled" and r["method"].startswith(lib)
              and r["container"] == "webp"]
        print(f"| {lib} | {rate(pj)} | {rate(wb)} |")
    for c in ("png", "jpeg", "webp"):
        sel = [r for r in rows if r["set"] == "upscaled" and r["container"] == c]
        print(f"\nAll {c} enlargements: {rate(sel)}.")
    if any(r.get("source_q") for r in rows):
        print("\nRecall by the source JPEG's quality × container:\n")
        print("| source | " + " | ".join(containers) + " |")
        print("|---" * (len(containers) + 1) + "|")
        for sq in SOURCE_QUALITIES:
            cells = [rate([r for r in rows if r["set"] == "upscaled" and r["container"] == c
                           and r.get("source_q") == sq]) for c in containers]
            print(f"| q{sq} | " + " | ".join(cells) + " |")
    if all("sharpness" in r for r in rows):
        blurred(rows)
    print("\nNear-grid factors at q90 (goal ≥ 85 %):\n")
    print("| factor | jpeg | webp |\n|---|---|---|")
    for f in NEAR_GRID:
        cells = [rate(by[("near", c, "f", round(f, 4))]) for c in ("jpeg", "webp")]
        print(f"| {f:.4g} | " + " | ".join(cells) + " |")
    print("\nWhich test fired (rejected images):\n")
    tests: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r["rejected"]:
            tests[(r["set"], r["test"])] += 1
    print(", ".join(f"{s} {t}: {n}" for (s, t), n in sorted(tests.items())))
    print("\nFalse rejections:\n")
    for r in rows:
        if r["set"] == "native" and r["rejected"]:
            print(f"- {r['picture']} {r['method']} {r['container']} q{r['q']}: {r['detail']}")


def blurred(rows: list[dict]) -> None:
    """What a job's focus rule (`sharpness_score` below its default threshold) rejects: of the
    natives, and of the enlargements the native test keeps (a job rejects either way)."""
    for r in rows:
        r["blurred"] = r["sharpness"] < DEFAULT_SHARPNESS_THRESHOLD
    print("\nThe focus rule (sharpness < "
          f"{DEFAULT_SHARPNESS_THRESHOLD}) on the same images:\n")
    print("| container | natives rejected as blurred | enlargements kept by the native test "
          "| ... of which rejected as blurred |\n|---|---|---|---|")
    for c in ("png", "jpeg", "webp", "avif"):
        natives = [r for r in rows if r["set"] == "native" and r["container"] == c]
        missed = [r for r in rows if r["set"] == "upscaled" and r["container"] == c
                  and not r["rejected"]]
        print(f"| {c} | {rate(natives, 'blurred')} | {len(missed)} | {rate(missed, 'blurred')} |")
    by_factor = defaultdict(list)
    for r in rows:
        if r["set"] == "upscaled" and r["container"] in ("jpeg", "webp"):
            by_factor[round(r["factor"], 4)].append(r["rejected"] or r["blurred"])
    print("\nJPEG and WebP enlargements rejected by either rule, by factor: " + ", ".join(
        f"{f:.4g}: {np.mean(v):.2f}" for f, v in sorted(by_factor.items())) + ".")


def timing(path: str, repeats: int = 15) -> None:
    """Per 3840×2160 image on one thread: one full decode (PIL, RGB) vs `block_codec` +
    `native_score`, by container; the fastest of `repeats` (CPU time) and the median (wall)."""
    cv2.setNumThreads(1)
    rgb = Image.open(path).convert("RGB").resize((3840, 2160), Image.LANCZOS)
    print("\n| container | file MB | full decode, CPU ms (min / median wall) | block_codec + "
          "native_score, CPU ms (min / median wall) | ratio (min) |\n|---|---|---|---|---|")
    for container, kw in (("jpeg", {"quality": 90}), ("webp", {"quality": 90}),
                          ("avif", {"quality": 60, "speed": 8}), ("png", {})):
        buf = io.BytesIO()
        rgb.save(buf, container.upper(), **kw)
        data = buf.getvalue()

        def decode(d: bytes = data) -> np.ndarray:
            with Image.open(io.BytesIO(d)) as im:
                im.load()
                return np.asarray(im.convert("L"))

        gray = np.ascontiguousarray(decode())

        def detect(d: bytes = data, g: np.ndarray = gray) -> object:
            return nat.native_score(g, codec=block_codec(d))

        res = []
        for fn in (decode, detect):
            fn()
            cpu, wall = [], []
            for _ in range(repeats):
                t, c = time.perf_counter(), time.thread_time()
                fn()
                cpu.append(time.thread_time() - c)
                wall.append(time.perf_counter() - t)
            res.append((1e3 * min(cpu), 1e3 * float(np.median(wall))))
        print(f"| {container} | {len(data) / 1e6:.2f} | {res[0][0]:.1f} / {res[0][1]:.1f} | "
              f"{res[1][0]:.1f} / {res[1][1]:.1f} | {res[1][0] / res[0][0]:.2f}× |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--held-out", action="store_true")
    ap.add_argument("--natives-limit", type=int, default=0, help="pictures for natives (0: all)")
    ap.add_argument("--upscale-pictures", type=int, default=16,
                    help="pictures (evenly spread) that also get the enlargements")
    ap.add_argument("--jpeg-sources", action="store_true",
                    help="only enlargements, each made from a small JPEG (q75/85/95), as a fake "
                         "4K file made from a web image is")
    ap.add_argument("--save", help="pickle every row to this file")
    ap.add_argument("--load", help="only print the tables of a saved run")
    ap.add_argument("--timing", help="only time decode vs detector on this picture (4K)")
    a = ap.parse_args()
    if a.timing:
        timing(a.timing)
        return
    if a.load:
        with open(a.load, "rb") as fh:
            rows = pickle.load(fh)
        report(rows, a.load)
        return
    pictures = clean_held_out() if a.held_out else clean_pictures()
    natives = subsample(pictures, a.natives_limit)
    ups = {n for n, _ in subsample(pictures, a.upscale_pictures)}
    if a.jpeg_sources:
        natives = []
    jobs = [(n, p, i, n in ups, False) for i, (n, p) in enumerate(natives)]
    jobs += [(n, p, i, True, a.jpeg_sources) for i, (n, p) in enumerate(pictures)
             if n in ups and n not in {j[0] for j in jobs}]
    t0 = time.time()
    with ProcessPoolExecutor(a.workers) as ex:
        rows = [r for rs in ex.map(run_picture, jobs) for r in rs]
    print(f"{len(jobs)} pictures ({len(ups)} with enlargements), {len(rows)} images, "
          f"{time.time() - t0:.0f} s")
    print("upscale pictures:", ", ".join(sorted(ups)))
    if a.save:
        with open(a.save, "wb") as fh:
            pickle.dump(rows, fh)
    report(rows, ("held out" if a.held_out else "calibration")
           + (", enlargements of JPEG sources" if a.jpeg_sources else ""))


if __name__ == "__main__":
    main()
