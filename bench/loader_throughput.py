"""Training-loader throughput: decoded samples/s from real 4K shards, per core and with workers.

1. Builds (once, in `--scratch`) an input folder of real ≥4K JPEGs: the camera photographs of
   lomiri-wallpapers (9.8–20 MP) and the ≥4K renders/artwork of plasma-workspace-wallpapers and
   mate-backgrounds as they are, plus 3840×2160 q95 crops of the latter (baseline and
   progressive, different windows so that de-duplication keeps both), then curates it with the
   real `native4k curate` with `analyze.max_flat_fraction=1.0` (flat skies and bokeh cost the
   same to decode; cached: reused while `_SUCCESS` exists).
2. Runs `training.data.BucketedLoader` over the shards in one process with one thread (torch,
   OpenCV, OpenMP: 1) and reports samples/s by CPU time (what one core delivers; other agents'
   load does not inflate it) and by wall time, for: `bucket` mode at the full bucket size
   (Lanczos, and OpenCV area), `bucket` mode at half size (JPEG draft + Lanczos), `crop` mode
   512² (VAE training).
3. Breaks one sample down into shard read, PIL decode, crop+resize and the float conversion.
4. The same loader with `num_workers=2` DataLoader workers, wall time (both cores).

Usage: `python -m bench.loader_throughput [--scratch DIR] [--epochs N] [--json OUT]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def build_inputs(scratch: Path) -> Path:
    """Real ≥4K JPEGs in `scratch/in` (copies; cached)."""
    from PIL import Image

    from bench.curation_throughput import UHD, _jpeg_info, _slug, _unique_jpegs, camera_set

    folder, done = scratch / "in", scratch / "in.done"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for f in camera_set():
        shutil.copyfile(f["path"], folder / f"camera-{Path(f['path']).stem}.jpg")
    for src in _unique_jpegs():
        info = _jpeg_info(src)
        if info is None or info[0] * info[1] < UHD[0] * UHD[1]:
            continue
        w, h, _ = info
        slug = _slug(src)
        shutil.copyfile(src, folder / f"orig-{slug}.jpg")
        if w <= UHD[0] or h <= UHD[1]:
            continue
        with Image.open(src) as im:
            rgb = im.convert("RGB")
        for i, (x, y, progressive) in enumerate([(0, 0, False), (w - UHD[0], h - UHD[1], True)]):
            x, y = x // 16 * 16, y // 16 * 16
            rgb.crop((x, y, x + UHD[0], y + UHD[1])).save(
                folder / f"crop{i}-{slug}.jpg", "JPEG", quality=95, progressive=progressive
            )
    done.write_text("")
    return folder


def curate(folder: Path, out: Path) -> Path:
    """The real curation job over `folder` (skipped when `out/_SUCCESS` exists)."""
    if (out / "_SUCCESS").exists():
        return out
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipelines.cli import main

    # Flat skies and bokeh do not change what a decode costs: keep them, so that the camera
    # photographs and most wallpapers reach the shards.
    args = ["--set", "ray.num_cpus=2", "--set", "analyze.max_flat_fraction=1.0"]
    assert main(["curate", str(folder), "--output", str(out), *args]) == 0
    return out


def one_thread() -> None:
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def run_loader(root: Path, epochs: int, **kw: Any) -> dict[str, Any]:
    """Iterate the loader; samples/s by this process's CPU time and by wall time."""
    from training.data import BucketedLoader, DataConfig

    loader = BucketedLoader(DataConfig(root=str(root), batch_size=1, **kw))
    n, shape = 0, None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            n += b["pixels"].shape[0]
            shape = tuple(b["pixels"].shape)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "config": kw,
        "samples": n,
        "cpu_s": cpu,
        "wall_s": wall,
        "per_s_cpu": n / cpu,  # with workers: this process only (see main_cpu_ms)
        "main_cpu_ms": 1000 * cpu / n,
        "per_s_wall": n / wall,
        "last_shape": shape,
    }


def breakdown(root: Path) -> dict[str, Any]:
    """Per kept sample, one thread: read from the tar, PIL decode, loader decode, float."""
    import io
    import tarfile

    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from training.data import DataConfig, decode_bucket

    rows = [r for r in pq.read_table(root / "manifest").to_pylist() if r["status"] == "kept"]
    cfg = DataConfig(root=str(root))
    out: dict[str, list[float]] = {
        k: [] for k in ("read", "pil_decode", "bucket_lanczos", "bucket_area", "to_float")
    }
    info = []
    for r in rows:
        t = time.thread_time()
        with tarfile.open(root / r["shard"]) as tf:
            data = tf.extractfile(f"{r['key']}.{r['extension']}").read()
        out["read"].append(time.thread_time() - t)
        t = time.thread_time()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").load()
            progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        out["pil_decode"].append(time.thread_time() - t)
        box = (r["crop_left"], r["crop_top"], r["crop_right"], r["crop_bottom"])
        target = cfg.target_size(r["bucket"])
        t = time.thread_time()
        rgb = decode_bucket(data, box, target, resample="lanczos")
        out["bucket_lanczos"].append(time.thread_time() - t)
        t = time.thread_time()
        decode_bucket(data, box, target, resample="area")
        out["bucket_area"].append(time.thread_time() - t)
        rgb = rgb.copy()  # writable, as the loader's stacked batch is
        t = time.thread_time()
        x = torch.from_numpy(rgb[None]).permute(0, 3, 1, 2)
        x.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
        out["to_float"].append(time.thread_time() - t)
        info.append(
            {
                "size": [r["width"], r["height"]],
                "bucket": r["bucket"],
                "mb": r["size_bytes"] / 1e6,
                "progressive": progressive,
            }
        )
    return {
        "n": len(rows),
        "ms_mean": {k: 1000 * statistics.fmean(v) for k, v in out.items()},
        "ms_median": {k: 1000 * statistics.median(v) for k, v in out.items()},
        "samples": info,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scratch", default="/tmp/native4k-loader-bench")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    scratch = Path(args.scratch)
    root = curate(build_inputs(scratch), scratch / "curated")
    one_thread()
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "load_before": os.getloadavg(),
    }
    res["breakdown"] = breakdown(root)
    res["one_core"] = [
        run_loader(root, args.epochs, mode="bucket", resample="lanczos"),
        run_loader(root, args.epochs, mode="bucket", resample="area"),
        run_loader(root, args.epochs, mode="bucket", resolution_divisor=2),
        run_loader(root, args.epochs, mode="crop", crop_size=512),
    ]
    res["workers_2"] = [
        run_loader(root, args.epochs, mode="bucket", resample="lanczos", num_workers=2),
        run_loader(root, args.epochs, mode="crop", crop_size=512, num_workers=2),
    ]
    res["load_after"] = os.getloadavg()
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
