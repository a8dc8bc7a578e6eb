"""Memory of a real curation job over thousands of 4K images on a small machine.

Builds (once, cached in `--scratch`) N distinct 3840×2160 images cut from the largest real
photographs and renders this machine has (Debian's wallpaper packages), at offsets on the
16-px grid, saved in rotation as baseline JPEG (q88–95), progressive JPEG (q90) and lossy WebP
(q90): the formats web data comes in. Then starts a local Ray cluster (`ray start --head`,
`--cpus` CPUs), runs `native4k curate --ray-address` on the set as a fresh process, and samples
every 0.5 s the resident memory of the driver and of every process under Ray's raylet. Reports
throughput, the peak RSS per worker and of all Ray processes together, object-store spilling
(Ray's memory summary), and whether Ray's memory monitor killed anything (its log lines).
The yardstick in the same run: a plain two-process Pillow decode of the same files.

`--tars N` packs the same images into N WebDataset tars (`<key>.jpg` / `.webp` with a
`<key>.txt` caption) and curates those instead: the memory a worker needs for a large shard.
`--code DIR` runs the `native4k` of another checkout (its Ray workers too), for a
before/after comparison in the same run.

Usage: `python -m bench.memory_scale [--images 2000] [--cpus 2] [--scratch DIR] [--tars N]
[--code DIR]`
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

UHD = (3840, 2160)
SOURCES = [
    "/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
    "/usr/share/backgrounds/Painting-Colors_by__herobrine7gamer.jpg",
    "/usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg",
    "/usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
    "/usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg",
    "/usr/share/backgrounds/Dragonfly_by_Bolly.jpg",
    "/usr/share/backgrounds/Fossa_by_Jasper_Roks.jpg",
    "/usr/share/backgrounds/Infinite-Sea_by_Aury88.jpg",
]
NATIVE4K = str(Path(sys.executable).with_name("native4k"))
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(tmp: Path) -> None:
    """Stop this benchmark's Ray cluster only (`ray stop` would stop every instance here)."""
    victims = []
    for p in psutil.process_iter(["cmdline"]):
        if str(tmp) in " ".join(p.info["cmdline"] or []):
            victims += [p, *p.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _make(job: tuple[str, int, int, int, str]) -> str:
    """One image: a crop of `src` at (x, y) saved as `fmt`; returns its path."""
    from PIL import Image

    src, x, y, i, out = job
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = UHD if im.width >= im.height else UHD[::-1]
        crop = im.crop((x, y, x + w, y + h))
    kind = i % 4
    if kind == 3:
        path = f"{out}/img{i:05d}.webp"
        crop.save(path, "WEBP", quality=90)
    else:
        path = f"{out}/img{i:05d}.jpg"
        crop.save(path, "JPEG", quality=(88, 95, 90)[kind], progressive=kind == 2)
    return path


def build_set(scratch: Path, n: int) -> list[str]:
    """N distinct 4K images (cached in `scratch`)."""
    from PIL import Image

    folder = scratch / f"set-{n}"
    marker = scratch / f"set-{n}.json"  # outside the folder the job lists
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = []
    for s in SOURCES:
        if Path(s).exists():
            with Image.open(s) as im:
                w, h = UHD if im.width >= im.height else UHD[::-1]
                if im.width >= w and im.height >= h:
                    sources.append((s, im.width - w, im.height - h))
    if not sources:
        sys.exit("no 4K photographs found: apt-get install lomiri-wallpapers-16.04")
    jobs = []
    for i in range(n):
        s, dx, dy = sources[i % len(sources)]
        k = i // len(sources)
        x = (k * 16 * 7) % (dx + 1) // 16 * 16  # distinct offsets on the 16-px grid
        y = (k * 16 * 3) % (dy + 1) // 16 * 16
        jobs.append((s, x, y, i, str(folder)))
    with ProcessPoolExecutor(2) as pool:
        paths = list(pool.map(_make, jobs, chunksize=8))
    marker.write_text(json.dumps(paths))
    return paths


def build_tars(scratch: Path, paths: list[str], n: int) -> Path:
    """The images of `paths` packed into `n` WebDataset tars with captions (cached)."""
    import tarfile

    folder = scratch / f"tars-{len(paths)}-{n}"
    marker = scratch / f"tars-{len(paths)}-{n}.done"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per = -(-len(paths) // n)
    for t in range(n):
        with tarfile.open(folder / f"shard-{t:05d}.tar", "w") as tf:
            for p in paths[t * per : (t + 1) * per]:
                key = Path(p).stem
                tf.add(p, arcname=f"{key}{Path(p).suffix}")
                caption = f"a 4K photograph, cut {key}".encode()
                info = tarfile.TarInfo(f"{key}.txt")
                info.size = len(caption)
                tf.addfile(info, io.BytesIO(caption))
    marker.write_text("")
    return folder


def _decode(path: str) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.convert("RGB")


def plain_decode_rate(paths: list[str], procs: int) -> float:
    start = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_decode, paths, chunksize=4))
    return len(paths) / (time.perf_counter() - start)


class Sampler(threading.Thread):
    """Peak RSS per process of the driver and of this benchmark's Ray cluster: the processes
    started with its `--temp-dir` (raylet, GCS) and everything under them (the workers).
    Another Ray instance on the machine is not counted."""

    def __init__(self, driver: psutil.Process, temp_dir: Path) -> None:
        super().__init__(daemon=True)
        self.driver, self.stop = driver, threading.Event()
        self.temp_dir = str(temp_dir)
        self.peak: dict[int, tuple[str, int]] = {}
        self.peak_total = 0

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            procs = {self.driver.pid: self.driver}
            for p in psutil.process_iter(["cmdline"]):
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    with contextlib.suppress(psutil.Error):
                        for q in (p, *p.children(recursive=True)):
                            procs[q.pid] = q
            for p in procs.values():
                try:
                    rss = p.memory_info().rss
                    cmd = p.cmdline()
                except psutil.Error:
                    continue
                if p.pid == self.driver.pid:
                    name = "driver (native4k curate)"
                elif cmd and cmd[0].startswith("ray::"):
                    name = cmd[0][:48]
                else:
                    name = " ".join(Path(c).name for c in cmd[:2])[:48]
                total += rss
                if rss > self.peak.get(p.pid, ("", 0))[1]:
                    self.peak[p.pid] = (name, rss)
            self.peak_total = max(self.peak_total, total)
            self.stop.wait(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/native4k-memory"))
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra --set for the job (e.g. score.enabled=false)")
    ap.add_argument("--tars", type=int, default=0,
                    help="curate the images packed into this many WebDataset tars")
    ap.add_argument("--code", type=Path, default=None,
                    help="a checkout whose native4k (and Ray workers) run the job")
    args = ap.parse_args()
    t0 = time.perf_counter()
    paths = build_set(args.scratch, args.images)
    print(f"set: {len(paths)} images ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    decode = plain_decode_rate(paths, args.cpus)
    tmp = Path(tempfile.mkdtemp(prefix="n4k-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    native4k = [NATIVE4K]
    if args.code is not None:
        env["PYTHONPATH"] = str(args.code.resolve())
        native4k = [sys.executable, "-m", "pipelines.cli"]
    inputs = str(paths[0].rsplit("/", 1)[0])
    if args.tars:
        inputs = str(build_tars(args.scratch, paths, args.tars))
    started = subprocess.run(
        [RAY, "start", "--head", "--num-cpus", str(args.cpus), "--temp-dir", str(tmp),
         "--include-dashboard", "false", "--port", str(_free_port())],
        check=True, env=env, capture_output=True, text=True,
    )
    address = re.search(r"--address='([^']+)'", started.stdout + started.stderr).group(1)
    out = args.scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    extra = [a for o in args.overrides for a in ("--set", o)]
    start = time.perf_counter()
    proc = subprocess.Popen([*native4k, "curate", inputs, "--output",
                             str(out), "--ray-address", address, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=args.code)
    sampler = Sampler(psutil.Process(proc.pid), tmp)
    sampler.start()
    log, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    import ray
    from ray._private.internal_api import memory_summary

    ray.init(address=address, log_to_driver=False)
    summary = memory_summary(address=address, stats_only=True)
    ray.shutdown()
    killed = subprocess.run(
        ["grep", "-rlE", "OutOfMemoryError|Killing worker.*memory|killed due to memory", str(tmp)],
        capture_output=True, text=True,
    ).stdout.split()
    _stop_cluster(tmp)
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").exists() else {}
    workers = sorted((v for v in sampler.peak.values() if "raylet" not in v[0]),
                     key=lambda v: -v[1])
    spill = [ln.strip() for ln in summary.splitlines() if "pill" in ln or "estore" in ln]
    what = f"{args.tars} tars" if args.tars else "files"
    code = f", code {args.code}" if args.code else ""
    print(f"\n{what}{code}: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print(f"- job: exit {proc.returncode}, {wall:.0f} s wall, {len(paths) / wall:.1f} images/s "
          f"end to end (Ray cluster already up); plain {args.cpus}-process decode "
          f"{decode:.1f} images/s in the same run (ratio {len(paths) / wall / decode:.2f})")
    print(f"- outcome: {stats.get('kept')} kept of {stats.get('total')}; "
          f"reasons {stats.get('reasons')}; passes {stats.get('pass_seconds')}")
    print(f"- peak RSS: all Ray processes and the driver together {sampler.peak_total / 2**30:.2f}"
          f" GiB; largest processes " + ", ".join(f"{n or '?'} {r / 2**20:.0f} MiB"
                                                  for n, r in workers[:5]))
    print(f"- object store: {' | '.join(spill) or 'no spilling reported'}")
    print(f"- memory-monitor kills: {killed or 'none'}")
    if proc.returncode:
        print(log[-3000:])


if __name__ == "__main__":
    main()
