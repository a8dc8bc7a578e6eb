"""What converting embedded ICC profiles to sRGB costs the loader and the thumbnails.

The real camera photographs of lomiri-wallpapers (≥ 4K), each cut to 3840×2160 and saved as
JPEG q95 four ways: no profile, an sRGB profile (skipped), Adobe RGB (1998) and CMYK with a SWOP
press profile (Ghostscript's profiles, `libgs-common`). Per variant, one thread, CPU time per
image (median over the photographs, best of `--repeat`):

* the loader's decode at the full bucket size (`decode_bucket`, 3840×2160, as 4K training
  reads a sample) and at half size (JPEG draft + Lanczos);
* curation's model-stage thumbnail (`make_thumbnail`, 448 px);
* the yardstick, in the same run: a plain PIL decode of the same file (`Image.open(...).load()`).

Usage: `python -m bench.colour_cost [--repeat N] [--json OUT]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

PROFILES = Path("/usr/share/color/icc/ghostscript")
SIZE = (3840, 2160)


def variants(path: Path) -> dict[str, bytes]:
    """The photograph's centre at 3840×2160, saved as JPEG q95 with each kind of profile."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    x, y = (w - SIZE[0]) // 2 // 16 * 16, (h - SIZE[1]) // 2 // 16 * 16
    rgb = rgb.crop((x, y, x + SIZE[0], y + SIZE[1]))
    out = {}
    kinds = (("none", "RGB", None), ("sRGB", "RGB", "srgb.icc"), ("Adobe RGB", "RGB", "a98.icc"),
             ("CMYK SWOP", "CMYK", "default_cmyk.icc"))
    for name, mode, icc in kinds:
        buf = io.BytesIO()
        extra = {"icc_profile": (PROFILES / icc).read_bytes()} if icc else {}
        rgb.convert(mode).save(buf, "JPEG", quality=95, **extra)
        out[name] = buf.getvalue()
    return out


def cpu(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from bench.curation_throughput import camera_set
    from curation.analyze.pixel_analyzer import make_thumbnail
    from training.data import decode_bucket

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    photos = [Path(f["path"]) for f in camera_set()]
    if not photos or not (PROFILES / "a98.icc").exists():
        print("needs lomiri-wallpapers-16.04/-20.04 and libgs-common (apt-get install)")
        return 2
    box = (0, 0, *SIZE)
    half = (SIZE[0] // 2, SIZE[1] // 2)
    rows: dict[str, dict[str, list[float]]] = {}
    for path in photos:
        for name, data in variants(path).items():
            r = rows.setdefault(name, {"plain decode": [], "loader 3840x2160": [],
                                       "loader 1920x1080": [], "thumbnail 448": []})

            def plain(data: bytes = data) -> None:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()

            r["plain decode"].append(cpu(plain, args.repeat))
            r["loader 3840x2160"].append(cpu(lambda d=data: decode_bucket(d, box, SIZE),
                                             args.repeat))
            r["loader 1920x1080"].append(cpu(lambda d=data: decode_bucket(d, box, half),
                                             args.repeat))
            r["thumbnail 448"].append(cpu(lambda d=data: make_thumbnail(d, 1, 448), args.repeat))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "photographs": [p.name for p in photos],
        "median_ms": {v: {k: round(1000 * statistics.median(t), 1) for k, t in r.items()}
                      for v, r in rows.items()},
    }
    cols = list(next(iter(rows.values())))
    print(f"{len(photos)} photographs, 3840x2160 JPEG q95; median CPU ms per image, one thread")
    print(f"{'profile':12s}" + "".join(f"{c:>18s}" for c in cols))
    for v, r in result["median_ms"].items():
        print(f"{v:12s}" + "".join(f"{r[c]:18.1f}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
