"""Curation throughput: the default stage set against one plain full decode, and Ray against a pool.

Measures, on one run over the same files:

1. per image on one core (one thread: OpenCV/OpenMP/BLAS threads 1): one plain
   PIL RGB full decode (the baseline) and the default stage set called as plain functions on
   batches like the job (`FileReader` → `HeaderProbe` → header `ThresholdFilter` →
   `PixelAnalyzer` → pixel `ThresholdFilter`, built by `pipelines.curate.analysis_stages`), plus
   a breakdown per pixel analysis and two alternative grayscale decoders the job does not use;
2. the same stages on Ray Data with N CPUs (`map_batches` with each stage's `ray_options()`, as
   pass 1 of `pipelines/curate.py` does) against a `multiprocessing.Pool(N)` running the same
   stage functions on the same files; Ray start-up timed apart; peak RSS of every worker;
3. the whole job on the set as a user runs it: a fresh `native4k curate` process (its own
   Ray start-up) against a plain decode of the same files on as many processes, before and
   after it.

The set (built once in `--scratch`, reused): the JPEGs of at least 3840×2160 from Debian's
plasma-workspace-wallpapers and mate-backgrounds as they are, plus 3840×2160 crops of them saved
at q95, baseline and progressive. Nothing is upscaled. Those large files are digital renders and
artwork, not camera photographs; the real photographs in those packages are at most 2560 px wide,
so they are measured apart, as they are, as a control (`--no-photos` skips it), with the size
floor lowered so that they reach the pixel analyses. Camera photographs of at least 4K pixels
(9.8–20 MP, from lomiri-wallpapers-16.04/-20.04 when installed) are measured apart too, as they
are: the closest this machine has to the camera JPEGs the job is for.

Usage: `python -m bench.curation_throughput [--images N] [--cores C]`; `--report A.json B.json`
renders saved runs into `docs/benchmarks.md` without measuring.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from curation.base import Stage

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SOURCE_DIRS = ("/usr/share/wallpapers", "/usr/share/backgrounds")
UHD = (3840, 2160)
SET_VERSION = 3
PHOTOS = (  # checked by eye: camera photographs (the other files there are renders or paintings)
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
    "Grey", "Kite", "OneStandsOut", "Path", "summer_1am", "Aqua", "Garden", "LadyBird",
    "TwoWings", "Wood", "YellowFlower",
)
# Camera photographs of at least 3840×2160 pixels, as shipped by lomiri-wallpapers(-16.04, -20.04)
# (two of them are enlargements of smaller camera frames: docs/native-detection.md).
CAMERA_4K = (
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Kleiber_by_Lukas_Baubkus.jpg",
    "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg",
    "Wine_by_Jakkub_Mede.jpg",
)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADING = "## Curation (issue 2)"
NOTES_MARKER = "<!-- curation notes: kept when the section is regenerated -->"

# Heavy modules (numpy, OpenCV, PIL, pyarrow, Ray) are imported inside functions, after
# `limit_threads()` has set the thread counts they read when they load.


def limit_threads() -> None:
    """One thread for OpenMP, OpenBLAS, MKL (read at import) and OpenCV (set now if loaded)."""
    os.environ.update(THREAD_ENV)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)


# --- the benchmark set ---------------------------------------------------------------------

_NOT_NAMES = ("/", "usr", "share", "wallpapers", "backgrounds", "mate", "contents", "images")


def _slug(path: Path) -> str:
    """A unique file name stem: `Flow-images_dark-5120x2880` for …/Flow/contents/…."""
    parts = [p for p in path.with_suffix("").parts if p not in _NOT_NAMES]
    return "-".join(parts)


def _jpeg_info(path: Path) -> tuple[int, int, bool] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                return None
            return im.size[0], im.size[1], bool(im.info.get("progressive"))
    except OSError:
        return None


def build_set(scratch: Path) -> list[dict[str, Any]]:
    """The ≥4K JPEGs as they are plus 3840×2160 crops: JPEG q95 (baseline, progressive) and
    lossy WebP q90; cached."""
    from PIL import Image

    index = scratch / "set.json"
    if index.exists():
        meta = json.loads(index.read_text())
        if meta.get("version") == SET_VERSION and all(
            Path(f["path"]).exists() for f in meta["files"]
        ):
            return meta["files"]
    scratch.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    sources = _unique_jpegs()
    for src in sources:
        info = _jpeg_info(src)
        if info is None or info[0] * info[1] < UHD[0] * UHD[1]:
            continue
        w, h, prog = info
        slug = _slug(src)
        dst = scratch / f"orig-{slug}.jpg"
        shutil.copyfile(src, dst)
        files.append({"path": str(dst), "source": str(src), "kind": "original",
                      "progressive": prog, "width": w, "height": h})
        if w < UHD[0] or h < UHD[1] or (w, h) == UHD:
            continue
        with Image.open(src) as im:
            rgb = im.convert("RGB")
        corners = [(0, 0), ((w - UHD[0]) // 2, (h - UHD[1]) // 2), (w - UHD[0], h - UHD[1])]
        for i, (x, y) in enumerate(corners):
            x, y = x // 16 * 16, y // 16 * 16  # keep the source's JPEG block grid
            crop = rgb.crop((x, y, x + UHD[0], y + UHD[1]))
            for progressive in (False, True):
                tag = "prog" if progressive else "base"
                dst = scratch / f"crop{i}-{tag}-{slug}.jpg"
                crop.save(dst, "JPEG", quality=95, progressive=progressive)
                files.append({"path": str(dst), "source": str(src), "kind": "crop q95",
                              "progressive": progressive, "width": UHD[0], "height": UHD[1]})
            dst = scratch / f"crop{i}-webp-{slug}.webp"
            crop.save(dst, "WEBP", quality=90, method=4)  # lossy WebP, as web pools hold it
            files.append({"path": str(dst), "source": str(src), "kind": "crop WebP q90",
                          "progressive": False, "width": UHD[0], "height": UHD[1]})
    for f in files:
        f["bytes"] = os.path.getsize(f["path"])
    # Interleave the four kinds so that `--images N` keeps a mix.
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        groups.setdefault(_group(f), []).append(f)
    ordered: list[dict[str, Any]] = []
    while any(groups.values()):
        for g in sorted(groups):
            if groups[g]:
                ordered.append(groups[g].pop(0))
    index.write_text(json.dumps({"version": SET_VERSION, "files": ordered}, indent=1))
    return ordered


def _unique_jpegs() -> list[Path]:
    """The JPEG files under SOURCE_DIRS, each once (the packages link one file many times).

    Loose files directly in a source folder (other packages' wallpapers) are left out, so the
    set stays the KDE and MATE files whatever else is installed.
    """
    seen: set[Path] = set()
    out = []
    for d in SOURCE_DIRS:
        for p in sorted(Path(d).rglob("*")):
            if p.suffix.lower() not in (".jpg", ".jpeg") or p.is_symlink() or not p.is_file():
                continue
            if p.parent == Path(d):
                continue
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(p)
    return out


def _as_is(p: Path, info: tuple[int, int, bool], kind: str) -> dict[str, Any]:
    """A set entry for a file measured as it is (no copy in the scratch folder)."""
    return {"path": str(p), "source": str(p), "kind": kind, "progressive": info[2],
            "width": info[0], "height": info[1], "bytes": p.stat().st_size}


def camera_set() -> list[dict[str, Any]]:
    """Camera photographs of at least 4K pixels, as they are (`CAMERA_4K`; empty if absent)."""
    out = []
    for name in CAMERA_4K:
        p = Path("/usr/share/backgrounds") / name
        info = _jpeg_info(p) if p.is_file() else None
        if info is not None and info[0] * info[1] >= UHD[0] * UHD[1]:
            out.append(_as_is(p, info, "camera 4K"))
    return out


def camera_webp_set(camera: list[dict[str, Any]], scratch: Path) -> list[dict[str, Any]]:
    """The camera photographs re-encoded at full size as lossy WebP q90 (cached in
    `scratch`): what a web pool holds of such photographs."""
    from PIL import Image

    out = []
    for f in camera:
        dst = scratch / f"camera-{Path(f['path']).stem}.webp"
        if not dst.exists():
            with Image.open(f["path"]) as im:
                im.convert("RGB").save(dst.with_suffix(".tmp.webp"), "WEBP", quality=90,
                                       method=4)  # fmt: skip
            dst.with_suffix(".tmp.webp").rename(dst)
        out.append({**f, "path": str(dst), "kind": "camera 4K WebP q90", "progressive": False,
                    "bytes": dst.stat().st_size})
    return out


def photo_set() -> list[dict[str, Any]]:
    """Real camera photographs from the same packages, as they are (≤2560 px; a control)."""
    out = []
    for p in _unique_jpegs():
        if any(n in p.parts or p.stem == n for n in PHOTOS):
            info = _jpeg_info(p)
            if info is not None and info[0] >= 1600:
                out.append(_as_is(p, info, "photo"))
    return out


def _group(f: dict[str, Any]) -> str:
    if f["path"].endswith(".webp"):
        return str(f["kind"])
    return f"{f['kind']}, {'progressive' if f['progressive'] else 'baseline'}"


# --- the stage chain as plain functions ---------------------------------------------------

def make_stages(overrides: Sequence[str] = ()) -> tuple[Stage, list[Stage]]:
    """`FileReader` and the job's analysis stages, from the default configuration."""
    from curation.io.readers import FileReader
    from pipelines.config import load_config
    from pipelines.curate import analysis_stages

    cfg = load_config(overrides=list(overrides))
    return FileReader(max_file_bytes=cfg.probe.max_file_bytes), analysis_stages(cfg)


def run_chain(reader: Stage, stages: Sequence[Stage], paths: Sequence[str]) -> pa.Table:
    """The stages on `paths`, each stage called on batches of its own `batch_size`."""
    import pyarrow as pa

    from curation import schema
    from curation.io.readers import SIDECAR

    table = reader({schema.SOURCE: list(paths), SIDECAR: [None] * len(paths)})
    for stage in stages:
        n = stage.batch_size or max(1, table.num_rows)  # None: the whole block
        parts = [stage(table.slice(i, n)) for i in range(0, table.num_rows, n)]
        table = pa.concat_tables(parts, promote_options="permissive")
    return table


def outcome(table: pa.Table) -> Counter[str]:
    """Rows per reason (`kept` for rows still pending)."""
    from curation import schema
    from curation.base import column

    return Counter(r or "kept" for r in column(table, schema.REASON))


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": _ms(statistics.median(values)), "mean": _ms(statistics.fmean(values)),
            "total_s": round(sum(values), 3)}


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    t0, c0 = time.perf_counter(), time.thread_time()
    out = fn()
    return time.perf_counter() - t0, time.thread_time() - c0, out


def _full_decode(path: str) -> None:
    """The baseline: PIL's full decode in the file's own mode (RGB for every 4K file here)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()


def measure_one_core(files: list[dict[str, Any]], repeats: int,
                     overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Per image on one core: plain decode vs the stage chain, interleaved batch by batch.

    For each batch of files (the reader's batch size), `repeats` times: the plain decode of
    each file, the stage chain on each file alone (a one-row batch: exact per-image figures),
    then the chain on the whole batch as the job batches it (read 4, analyse 4). Wall and CPU
    time (`time.thread_time`) are both kept; per file and per batch the fastest repeat counts
    (least disturbed by other processes on a shared machine). Per-stage times come from the
    stages' own `stage_seconds`.
    """
    from curation import schema
    from curation.base import column

    reader, stages = make_stages(overrides)
    paths = [f["path"] for f in files]
    n = len(paths)
    inf = float("inf")
    decode, decode_cpu = [inf] * n, [inf] * n
    chain, chain_cpu = [inf] * n, [inf] * n
    outside = "arrow/batching outside stages"
    per_stage: dict[str, list[float]] = {}
    outcomes: Counter[str] = Counter()
    batched = batched_cpu = 0.0
    run_chain(reader, stages, paths[:1])  # warm-up: imports, stage setup
    step = reader.batch_size
    for start in range(0, n, step):
        idx = range(start, min(n, start + step))
        best: dict[int, pa.Table] = {}
        b_wall = b_cpu = inf
        for _ in range(repeats):
            for i in idx:
                wall, cpu, _ = _timed(lambda p=paths[i]: _full_decode(p))
                decode[i], decode_cpu[i] = min(decode[i], wall), min(decode_cpu[i], cpu)
                wall, cpu, out = _timed(lambda p=paths[i]: run_chain(reader, stages, [p]))
                chain_cpu[i] = min(chain_cpu[i], cpu)
                if wall < chain[i]:
                    chain[i], best[i] = wall, out
            batch = paths[start : start + step]
            wall, cpu, out = _timed(lambda b=batch: run_chain(reader, stages, b))
            b_wall, b_cpu = min(b_wall, wall), min(b_cpu, cpu)
        batched += b_wall
        batched_cpu += b_cpu
        outcomes += outcome(out)
        for i in idx:
            row = json.loads(column(best[i], schema.STAGE_SECONDS)[0])
            for name, sec in row.items():
                per_stage.setdefault(name, [0.0] * n)[i] = sec
            per_stage.setdefault(outside, [0.0] * n)[i] = max(0.0, chain[i] - sum(row.values()))
    groups: dict[str, dict[str, Any]] = {}
    for g in sorted({_group(f) for f in files}):
        idx = [i for i, f in enumerate(files) if _group(f) == g]
        d = [decode_cpu[i] for i in idx]
        c = [chain_cpu[i] for i in idx]
        groups[g] = {"n": len(idx), "decode": _summary(d), "stages": _summary(c),
                     "ratio_mean": round(sum(c) / sum(d), 2),
                     "mb": round(statistics.fmean(files[i]["bytes"] for i in idx) / 1e6, 2),
                     "mpix": round(statistics.fmean(files[i]["width"] * files[i]["height"]
                                                    for i in idx) / 1e6, 1)}
    return {
        "n": len(paths), "repeats": repeats,
        "decode": _summary(decode), "decode_cpu_s": round(sum(decode_cpu), 3),
        "stages": _summary(chain), "stages_cpu_s": round(sum(chain_cpu), 3),
        "batched_mean": _ms(batched / n), "batched_ratio": round(batched / sum(decode), 2),
        "batched_cpu_mean": _ms(batched_cpu / n),
        "batched_ratio_cpu": round(batched_cpu / sum(decode_cpu), 2),
        "decode_cpu_mean": _ms(sum(decode_cpu) / n), "stages_cpu_mean": _ms(sum(chain_cpu) / n),
        "ratio_mean": round(sum(chain) / sum(decode), 2),
        "ratio_cpu": round(sum(chain_cpu) / sum(decode_cpu), 2),
        "ratio_median": round(statistics.median(chain) / statistics.median(decode), 2),
        "images_per_s_core": round(n / batched, 2),
        "decode_images_per_s_core": round(len(paths) / sum(decode), 2),
        "per_stage": {k: _summary(v) for k, v in per_stage.items()},
        "groups": groups, "outcomes": dict(outcomes),
    }


def measure_breakdown(files: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Each step timed on its own in CPU time (fastest of `repeats`), plus two other decoders."""
    import hashlib

    import cv2
    import numpy as np
    from PIL import Image

    from curation.analyze.native import native_score
    from curation.analyze.pixel_analyzer import decode_gray, perceptual_hash
    from curation.analyze.sharpness import sharpness_score
    from curation.analyze.texture import flat_fraction, gray_entropy
    from curation.probe.header_probe import probe
    from pipelines.config import load_config

    cv2.setNumThreads(1)
    a = load_config().analyze

    def pil_draft_gray(data: bytes) -> np.ndarray:
        import io

        im = Image.open(io.BytesIO(data))
        im.draft("L", im.size)
        return np.asarray(im.convert("L"))

    def cv2_gray(data: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)

    names = ["read + sha256", "header probe", "decode_gray", "native_score", "sharpness_score",
             "flat_fraction", "gray_entropy", "perceptual_hash"]
    times: dict[str, list[float]] = {n: [] for n in names}
    alt: dict[str, dict[str, list[float]]] = {}
    for f in files:
        best = dict.fromkeys(names, float("inf"))
        alt_best = {"PIL draft('L') + load": float("inf"), "cv2.imdecode GRAYSCALE": float("inf")}
        diffs: dict[str, float] = {}
        for _ in range(repeats):
            def read(p: str = f["path"]) -> bytes:
                with open(p, "rb") as fh:
                    data = fh.read()
                hashlib.sha256(data).hexdigest()
                return data

            _, wall, data = _timed(read)
            best["read + sha256"] = min(best["read + sha256"], wall)
            _, wall, _ = _timed(lambda d=data: probe(d))
            best["header probe"] = min(best["header probe"], wall)
            _, wall, gray = _timed(lambda d=data: decode_gray(d, 1))
            best["decode_gray"] = min(best["decode_gray"], wall)
            for name, fn in (
                ("native_score", lambda g=gray: native_score(g)),
                ("sharpness_score", lambda g=gray: sharpness_score(g)),
                ("flat_fraction", lambda g=gray: flat_fraction(
                    g, patch=a.flat_patch, flat_variance=a.flat_variance)),
                ("gray_entropy", lambda g=gray: gray_entropy(g)),
                ("perceptual_hash", lambda g=gray: perceptual_hash(g)),
            ):
                _, wall, _ = _timed(fn)
                best[name] = min(best[name], wall)
            for name, dec in (("PIL draft('L') + load", pil_draft_gray),
                              ("cv2.imdecode GRAYSCALE", cv2_gray)):
                _, wall, other = _timed(lambda d=data, dec=dec: dec(d))
                alt_best[name] = min(alt_best[name], wall)
                diffs[name] = float(np.abs(other.astype(np.int16) - gray).max())
        for n in names:
            times[n].append(best[n])
        kind = "progressive" if f["progressive"] else "baseline"
        if f["path"].endswith(".webp"):
            continue  # the alternatives are JPEG decoders
        for n, v in alt_best.items():
            slot = alt.setdefault(f"{n} [{kind}]", {"ms": [], "ref_ms": [], "max_diff": []})
            slot["ms"].append(v)
            slot["ref_ms"].append(best["decode_gray"])
            slot["max_diff"].append(diffs[n])
    return {
        "analyses": {n: _summary(v) for n, v in times.items()},
        "alternatives": {
            n: {"n": len(v["ms"]), "median": _ms(statistics.median(v["ms"])),
                "decode_gray_median": _ms(statistics.median(v["ref_ms"])),
                "max_abs_diff": max(v["max_diff"])}
            for n, v in sorted(alt.items())
        },
    }


# --- N cores: a process pool and Ray Data --------------------------------------------------

_POOL_STAGES: tuple[Stage, list[Stage]] | None = None


def _pool_init() -> None:
    global _POOL_STAGES
    limit_threads()
    import cv2

    cv2.setNumThreads(1)
    _POOL_STAGES = make_stages()


def _pool_ping(_: int) -> tuple[int, tuple[int, int]]:
    import psutil

    time.sleep(0.2)
    rss = psutil.Process().memory_info().rss // 1024
    return os.getpid(), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss)


def _pool_task(paths: list[str]) -> dict[str, Any]:
    assert _POOL_STAGES is not None
    out = run_chain(*_POOL_STAGES, paths)
    return {"outcomes": dict(outcome(out)), "pid": os.getpid(),
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _ray_sink(t: pa.Table) -> pa.Table:
    """A cheap sink: one row per batch with its outcome counts and the worker's peak RSS."""
    import pyarrow as pa

    counts = dict(outcome(t)) if t.num_rows else {}
    return pa.table({"rows": [t.num_rows], "outcomes": [json.dumps(counts)],
                     "pid": [os.getpid()],
                     "maxrss_kb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]})


def _vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set (VmHWM) of a process, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(procs: Sequence[Any]) -> dict[int, float]:
    """User + system CPU seconds used so far by each psutil process (gone ones left out)."""
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
        except Exception:  # the process exited (psutil.Error)
            continue
        out[p.pid] = t.user + t.system
    return out


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots; processes born in between count from zero."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def _ray_processes(exclude: set[int]) -> list[Any]:
    """This driver and every process under it (Ray's GCS, raylet, workers), less `exclude`."""
    import psutil

    me = psutil.Process()
    return [me, *(p for p in me.children(recursive=True) if p.pid not in exclude)]


def _ray_workers() -> list[int]:
    """Ray's Python worker processes under this driver (they retitle themselves `ray::…`)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if cmd.startswith("ray::") or "default_worker.py" in cmd:
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def ray_pass1(
    rd: Any, cores: int, paths: Sequence[str], max_block_mib: int = 0
) -> tuple[float, Counter[str], dict[int, int], int | None]:
    """Pass 1 of the job on Ray Data (mirrors `pipelines.curate`), into a cheap sink.

    `max_block_mib` > 0 lowers Ray Data's `target_max_block_size` for this run (a variant the
    job does not use). Returns seconds, outcomes, peak RSS per sink worker (KB) and the number
    of `PixelAnalyzer` tasks Ray ran.
    """
    from curation import schema
    from curation.io.readers import SIDECAR, FileReader
    from pipelines.config import load_config
    from pipelines.curate import _apply, analysis_stages, input_blocks, no_operator_reservation

    cfg = load_config()
    ctx = rd.DataContext.get_current()
    default_max = ctx.target_max_block_size
    if max_block_mib:
        ctx.target_max_block_size = max_block_mib * 1024**2
    t0 = time.perf_counter()
    with no_operator_reservation(rd):
        ds = rd.from_items([{schema.SOURCE: p, SIDECAR: None} for p in paths],
                           override_num_blocks=input_blocks(len(paths), cores))
        ds = _apply(ds, FileReader(max_file_bytes=cfg.probe.max_file_bytes))
        for stage in analysis_stages(cfg):
            ds = _apply(ds, stage)
        ds = ds.map_batches(_ray_sink, batch_format="pyarrow", zero_copy_batch=True, num_cpus=1)
        rows = ds.take_all()
    seconds = time.perf_counter() - t0
    ctx.target_max_block_size = default_max
    found = re.search(r"MapBatches\(PixelAnalyzer\)[^:\n]*: (\d+) tasks executed", ds.stats())
    tasks = int(found.group(1)) if found else None
    outcomes: Counter[str] = Counter()
    rss: dict[int, int] = {}
    for r in rows:
        outcomes.update(json.loads(r["outcomes"]))
        rss[r["pid"]] = max(rss.get(r["pid"], 0), r["maxrss_kb"])
    return seconds, outcomes, rss, tasks


def measure_cores(files: list[dict[str, Any]], cores: int, rounds: int,
                  scratch: Path, run_job: bool, repeat: int = 1) -> dict[str, Any]:
    """Pool vs Ray Data on `cores` CPUs, alternating, then the whole job (`measure_job`).

    `repeat` > 1 feeds the list of files that many times over (a longer run of the same work,
    so that fixed costs weigh as they do in a real job).
    """
    import multiprocessing as mp

    import psutil

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if hasattr(ray, "cloudpickle") and __name__ != "__main__":
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from pipelines.config import load_config
    from pipelines.curate import init_ray

    paths = [f["path"] for f in files] * repeat
    chunks = [paths[i : i + 4] for i in range(0, len(paths), 4)]
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    pool = ctx.Pool(cores, initializer=_pool_init)
    idle: dict[int, tuple[int, int]] = {}
    for _ in range(20):  # until every worker has answered (they start at different speeds)
        idle.update(pool.map(_pool_ping, range(cores * 2), chunksize=1))
        if len(idle) >= cores:
            break
    pool_procs = psutil.Process().children()  # the workers (and spawn's resource tracker)
    pool_start = time.perf_counter() - t0

    cfg = load_config(overrides=[f"ray.num_cpus={cores}"])
    t0 = time.perf_counter()
    init_ray(cfg, None)
    ray_start = time.perf_counter() - t0
    rd = ray.data
    rd.DataContext.get_current().enable_progress_bars = False

    runs: list[dict[str, Any]] = []
    variant: list[dict[str, Any]] = []
    pool_rss: dict[int, int] = {}
    ray_rss: dict[int, int] = {}
    ray_hwm: dict[int, int] = {}
    outcomes: dict[str, dict[str, int]] = {}
    for r in range(rounds):
        load = os.getloadavg()[0]
        c0 = _cpu_seconds([psutil.Process(), *pool_procs])
        t0 = time.perf_counter()
        results = list(pool.imap_unordered(_pool_task, chunks))
        pool_s = time.perf_counter() - t0
        pool_cpu = _cpu_used(c0, _cpu_seconds([psutil.Process(), *pool_procs]))
        oc: Counter[str] = Counter()
        for res in results:
            oc.update(res["outcomes"])
            pool_rss[res["pid"]] = max(pool_rss.get(res["pid"], 0), res["maxrss_kb"])
        outcomes["pool"] = dict(oc)
        runs.append({"round": r + 1, "what": "pool", "seconds": round(pool_s, 2),
                      "cpu_s": round(pool_cpu, 2), "load1": load})
        load = os.getloadavg()[0]
        not_ray = {p.pid for p in pool_procs}
        c0 = _cpu_seconds(_ray_processes(not_ray))
        ray_s, oc, rss, tasks = ray_pass1(rd, cores, paths)
        ray_cpu = _cpu_used(c0, _cpu_seconds(_ray_processes(not_ray)))
        small_s, _, _, small_tasks = ray_pass1(rd, cores, paths, max_block_mib=16)
        variant.append({"seconds": round(small_s, 2), "analyze_tasks": small_tasks})
        outcomes["ray"] = dict(oc)
        for pid, kb in rss.items():
            ray_rss[pid] = max(ray_rss.get(pid, 0), kb)
        for pid in _ray_workers():
            hwm = _vm_hwm_kb(pid)
            if hwm:
                ray_hwm[pid] = hwm
        runs.append({"round": r + 1, "what": "ray", "seconds": round(ray_s, 2),
                      "cpu_s": round(ray_cpu, 2), "load1": load, "analyze_tasks": tasks})
        print(f"  round {r + 1}: pool {pool_s:.2f} s ({pool_cpu:.1f} CPU s), "
              f"ray {ray_s:.2f} s ({ray_cpu:.1f} CPU s, {tasks} analyse tasks), "
              f"ray with 16 MiB blocks {small_s:.2f} s ({small_tasks} tasks)", flush=True)
    pool.close()
    pool.join()
    ray.shutdown()

    pool_best = min(x["seconds"] for x in runs if x["what"] == "pool")
    ray_runs = [x["seconds"] for x in runs if x["what"] == "ray"]
    ray_warm = min(ray_runs[1:]) if len(ray_runs) > 1 else ray_runs[0]
    pool_cpu_best = min(x["cpu_s"] for x in runs if x["what"] == "pool")
    ray_cpus = [x["cpu_s"] for x in runs if x["what"] == "ray"]
    ray_cpu_warm = min(ray_cpus[1:]) if len(ray_cpus) > 1 else ray_cpus[0]
    out: dict[str, Any] = {
        "cores": cores, "n": len(paths), "repeat": repeat, "rounds": runs,
        "pool_start_s": round(pool_start, 2), "pool_workers": len(idle),
        "pool_idle_rss_mb": sorted(round(v[1] / 1024) for v in idle.values()),
        "pool_idle_peak_mb": sorted(round(v[0] / 1024) for v in idle.values()),
        "ray_init_s": round(ray_start, 2),
        "pool_s": pool_best, "ray_cold_s": ray_runs[0], "ray_warm_s": ray_warm,
        "pool_images_per_s": round(len(paths) / pool_best, 2),
        "ray_images_per_s": round(len(paths) / ray_warm, 2),
        "overhead_warm": round(ray_warm / pool_best - 1, 3),
        "overhead_cold": round(ray_runs[0] / pool_best - 1, 3),
        "pool_cpu_s": pool_cpu_best, "ray_cpu_warm_s": ray_cpu_warm,
        "ray_analyze_tasks": [x.get("analyze_tasks") for x in runs if x["what"] == "ray"],
        "ray_small_blocks": variant,
        "ray_small_blocks_s": min(v["seconds"] for v in variant[1:] or variant),
        "overhead_cpu_warm": round(ray_cpu_warm / pool_cpu_best - 1, 3),
        "pool_rss_mb": sorted(round(v / 1024) for v in pool_rss.values()),
        "ray_sink_rss_mb": sorted(round(v / 1024) for v in ray_rss.values()),
        "ray_worker_hwm_mb": sorted(round(v / 1024) for v in ray_hwm.values()),
        "outcomes": outcomes,
    }
    if run_job:
        out["job"] = measure_job(paths, cores, scratch)
        if "error" in out["job"]:
            out["job_error"] = out["job"].pop("error")
            del out["job"]
    return out


def measure_job(paths: list[str], cores: int, scratch: Path) -> dict[str, Any]:
    """A fresh `native4k curate` process over the set, as a user runs it (its own Ray
    start-up), against a plain `cores`-process decode of the same files in the same run."""
    import subprocess

    from bench.job_throughput import NATIVE4K
    from bench.memory_scale import plain_decode_rate

    job_out = scratch / "job-out"
    shutil.rmtree(job_out, ignore_errors=True)
    listing = scratch / "job-inputs.txt"  # a URI list: one INPUT per line
    listing.write_text("".join(f"{p}\n" for p in paths))
    before = plain_decode_rate(paths, cores)
    load = os.getloadavg()[0]
    cmd = [NATIVE4K, "curate", str(listing),
           "--output", str(job_out), "--set", f"ray.num_cpus={cores}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    after = plain_decode_rate(paths, cores)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {last[:200]}"}
    stats = json.loads((job_out / "stats.json").read_text())
    rate = len(paths) / wall
    return {"seconds": round(wall, 2), "load1": load, "kept": stats.get("kept"),
            "images_per_s": round(rate, 2), "decode_per_s": [round(before, 2), round(after, 2)],
            "of_decode": round(rate / ((before + after) / 2), 3),
            "stage_seconds": stats.get("stage_seconds", {})}


# --- the report ----------------------------------------------------------------------------

def _load_text() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _code_state() -> str:
    """The commit measured, and whether the stage or job code differed from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "curation", "pipelines"],
                               cwd=root, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = sorted({line[3:] for line in dirty.splitlines()})
    return head + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {platform.machine()}, {mem:.0f} GiB"


def _pct(x: float) -> str:
    return f"{x * 100:+.0f}%"


def _one(r: dict[str, Any]) -> dict[str, Any]:
    return r["one_core"]


def _ms_pair(d: dict[str, float]) -> str:
    return f"{d['median']:.0f} / {d['mean']:.0f}"


def render(runs: list[dict[str, Any]]) -> str:
    """The Markdown section for one or more saved runs (columns side by side)."""
    heads = [f"run {i + 1}" for i in range(len(runs))]
    first, last = runs[0], runs[-1]
    lines = [
        f"Measured {first['date']} by `bench/curation_throughput.py` on a {first['machine']} "
        "dev box; the load averages before and after each run are below (their number of "
        "cores would mean every core busy). Software: " + first["software"] + ". "
        "Code: " + ", ".join(dict.fromkeys(f"`{r.get('code', '?')}`" for r in runs)) + ".",
        "",
        "Command: `" + first["command"] + "`" + (f", {len(runs)} runs." if len(runs) > 1 else "."),
        "",
        "| run | started (UTC) | load 1/5/15 min before | after | wall |",
        "|---|---|---|---|---|",
    ]
    for h, r in zip(heads, runs, strict=True):
        lines.append(f"| {h} | {r['started']} | {r['load_before']} | {r['load_after']} | "
                     f"{r['wall_s']:.0f} s |")
    kinds = "; ".join(f"{g}: {v['n']} ({v['mpix']} MP, {v['mb']} MB)"
                      for g, v in _one(first)["groups"].items())
    lines += [
        "",
        f"**Set.** {_one(first)['n']} files in `{first['scratch']}`, none upscaled — {kinds}. "
        "The originals are the ≥3840×2160 JPEGs of plasma-workspace-wallpapers and "
        "mate-backgrounds as they are (5120×2880, 5640×3172, one 3840×2160); the crops are "
        "3840×2160 windows of them saved as JPEG q95 and as lossy WebP q90. Caveat: those "
        "files are digital renders and a "
        "painting, not camera photographs (the packages' photographs are at most 2560 px wide), "
        "so the real photographs are measured apart as a control, as they are, with "
        "`probe.min_pixels` lowered so that they reach the pixel analyses; and so are camera "
        "photographs of 9.8–20 MP from lomiri-wallpapers, as they are.",
        "",
        "**Per image on one core** (one thread: OpenCV/OpenMP/BLAS threads 1; stages called as "
        "plain functions in one process; decode and stages interleaved batch by batch; the "
        "fastest of the repeats per file and per batch). The machine was shared, so the "
        "ratios are judged on CPU time (`time.thread_time`), which other processes do not "
        "inflate; wall times are given too:",
        "",
        "| per image, one core | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(runs),
    ]

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in runs) + " |")

    row("plain full decode (PIL `open().load()`, RGB): wall median / mean ms; CPU mean ms",
        lambda r: f"{_ms_pair(_one(r)['decode'])}; {_one(r)['decode_cpu_mean']:.0f}")
    row("default stage set per file (1-row batches): wall median / mean ms; CPU mean ms",
        lambda r: f"{_ms_pair(_one(r)['stages'])}; {_one(r)['stages_cpu_mean']:.0f}")
    row("default stage set on batches like the job (read 4, analyse 4): wall / CPU mean ms",
        lambda r: f"{_one(r)['batched_mean']:.0f} / {_one(r)['batched_cpu_mean']:.0f}")
    row("**ratio stage set / decode, batched, by CPU time** — goal ≤ 1.5×",
        lambda r: f"**{_one(r)['batched_ratio_cpu']:.2f}×**")
    if all("one_core_all" in r for r in runs):
        row("**every analysis on every image** (`analyze.score_all=true`; the job stops at "
            "the first rule an image fails): stages batched, CPU mean ms; **ratio**",
            lambda r: f"{r['one_core_all']['batched_cpu_mean']:.0f}; "
                      f"**{r['one_core_all']['batched_ratio_cpu']:.2f}×**")
        row("reasons in the default run (the analyses each image reached depend on them)",
            lambda r: ", ".join(f"{k} {v}" for k, v in sorted(_one(r)["outcomes"].items())))
    row("same by wall time; per file by CPU time; per file by wall (means; medians)",
        lambda r: f"{_one(r)['batched_ratio']:.2f}×; {_one(r)['ratio_cpu']:.2f}×; "
                  f"{_one(r)['ratio_mean']:.2f}×; {_one(r)['ratio_median']:.2f}×")
    row("images/s per core (CPU time): stage set, batched / decode only",
        lambda r: f"{1000 / _one(r)['batched_cpu_mean']:.2f} / "
                  f"{1000 / _one(r)['decode_cpu_mean']:.2f}")
    row("CPU time / wall time of the stage set (1.00: the core was ours alone)",
        lambda r: f"{_one(r)['stages_cpu_s'] / _one(r)['stages']['total_s']:.2f}")
    def apart(key: str) -> Callable[[dict[str, Any]], str]:
        """A cell for a set measured apart (`photos`, `camera`): decode / stages, ratio."""
        def cell(r: dict[str, Any]) -> str:
            if key not in r:
                return "-"
            m = r[key]
            return (f"n={m['n']}: {m['decode_cpu_mean']:.0f} / {m['batched_cpu_mean']:.0f} ms, "
                    f"{m['batched_ratio_cpu']:.2f}×")
        return cell

    if all("photos" in r for r in runs):
        row("control, real photographs as they are (2560 px): decode / stages batched, "
            "CPU mean ms, ratio", apart("photos"))
    if "camera" in last:
        row("camera photographs ≥ 4K pixels as they are (Lomiri's, 9.8–20 MP): decode / stages "
            "batched, CPU mean ms, ratio", apart("camera"))
    if "camera_webp" in last:
        row("the same camera photographs as lossy WebP q90, full size: decode / stages "
            "batched, CPU mean ms, ratio", apart("camera_webp"))
    lines += ["", f"| kind ({heads[-1]}, per file, CPU time) | n | MP | MB | decode median / "
              "mean ms | stages median / mean ms | ratio of means |",
              "|---|---|---|---|---|---|---|"]
    for g, v in _one(last)["groups"].items():
        lines.append(f"| {g} | {v['n']} | {v['mpix']} | {v['mb']} | {_ms_pair(v['decode'])} | "
                     f"{_ms_pair(v['stages'])} | {v['ratio_mean']:.2f}× |")
    total = _one(last)["stages"]["mean"]
    steps = last["breakdown"]["analyses"]
    total_cpu = sum(v["mean"] for v in steps.values())
    lines += ["", f"Where the time goes ({heads[-1]}): first the job's own `stage_seconds` "
              "(wall time) in the per-file chain, as a share of that chain's mean wall time "
              "(images stop at their first failed rule), then each step timed on its own on "
              "every image in CPU time (fastest of the repeats), as a share of those steps' "
              "sum:", "",
              "| step | median ms | mean ms | share of the stage set |", "|---|---|---|---|"]
    for name, v in _one(last)["per_stage"].items():
        lines.append(f"| stage `{name}` (wall) | {v['median']:.1f} | {v['mean']:.1f} | "
                     f"{v['mean'] / total * 100:.0f}% |")
    for name, v in last["breakdown"]["analyses"].items():
        lines.append(f"| {name} (CPU) | {v['median']:.1f} | {v['mean']:.1f} | "
                     f"{v['mean'] / total_cpu * 100:.0f}% |")
    lines += ["", "Grayscale decoders beside the job's, on the same files (`decode_gray` is the "
              "job's: Pillow's luma-only libjpeg decode, `draft('L')`, for baseline and "
              "progressive JPEGs alike, with the orientation applied and the array exported; "
              "the first decoder is that decode alone, the second OpenCV's):", "",
              "| decoder [kind] | n | median CPU ms | `decode_gray` median CPU ms | "
              "max abs difference from `decode_gray` |", "|---|---|---|---|---|"]
    for name, v in last["breakdown"]["alternatives"].items():
        lines.append(f"| {name} | {v['n']} | {v['median']:.1f} | {v['decode_gray_median']:.1f} | "
                     f"{v['max_abs_diff']:.0f} |")
    has_cores = all("cores" in r for r in runs)
    if has_cores:
        c = first["cores"]
        lines += ["", f"**Ray Data vs a plain process pool on {c['cores']} CPUs**, same files: "
                  "pass 1 of the job (`FileReader` and the analysis stages through "
                  "`pipelines.curate._apply`, i.e. `map_batches(stage, batch_format=\"pyarrow\", "
                  "**stage.ray_options())`) into a sink that returns one row per batch, against "
                  "`multiprocessing.Pool` running the same stage functions on chunks of 4 files. "
                  "Pool and Ray runs alternate; the fastest of each counts; progress bars off.",
                  "", "| N cores | " + " | ".join(heads) + " |", "|---|" + "---|" * len(runs)]
        row("pool: s for the set (images/s)",
            lambda r: f"{r['cores']['pool_s']:.2f} ({r['cores']['pool_images_per_s']:.2f})")
        row("Ray, warm: s (images/s)",
            lambda r: f"{r['cores']['ray_warm_s']:.2f} ({r['cores']['ray_images_per_s']:.2f})")
        row("**Ray overhead, warm** (ray / pool − 1, wall) — goal ≤ 20%",
            lambda r: f"**{_pct(r['cores']['overhead_warm'])}**")
        row("CPU seconds used: pool (workers + driver) / Ray warm (driver, GCS, raylet, workers)",
            lambda r: f"{r['cores']['pool_cpu_s']:.1f} / {r['cores']['ray_cpu_warm_s']:.1f}")
        row("Ray overhead by CPU seconds (not inflated by other processes)",
            lambda r: _pct(r["cores"]["overhead_cpu_warm"]))
        row("cores actually obtained (CPU s / wall s): pool / Ray warm",
            lambda r: f"{r['cores']['pool_cpu_s'] / r['cores']['pool_s']:.2f} / "
                      f"{r['cores']['ray_cpu_warm_s'] / r['cores']['ray_warm_s']:.2f}")
        row("`PixelAnalyzer` tasks Ray ran for the set (job-like runs)",
            lambda r: ", ".join(str(t) for t in r["cores"].get("ray_analyze_tasks", [])) or "—")
        row("variant the job does not use: `target_max_block_size` 16 MiB — s (analyse tasks); "
            "overhead",
            lambda r: f"{r['cores']['ray_small_blocks_s']:.2f} "
                      f"({r['cores']['ray_small_blocks'][-1]['analyze_tasks']}); "
                      f"{_pct(r['cores']['ray_small_blocks_s'] / r['cores']['pool_s'] - 1)}"
            if "ray_small_blocks_s" in r["cores"] else "—")
        if all("cores_long" in r for r in runs):
            row("long run: the set fed K times over (K × N images): pool s / Ray warm s",
                lambda r: f"K={r['cores_long']['repeat']} ({r['cores_long']['n']}): "
                          f"{r['cores_long']['pool_s']:.2f} / {r['cores_long']['ray_warm_s']:.2f}")
            row("**Ray overhead on the long run, warm** — goal ≤ 20%",
                lambda r: f"**{_pct(r['cores_long']['overhead_warm'])}**")
            def _long(r: dict[str, Any]) -> str:
                c = r["cores_long"]
                return (f"{c['pool_cpu_s']:.1f} / {c['ray_cpu_warm_s']:.1f}; "
                        f"{c['pool_cpu_s'] / c['pool_s']:.2f} / "
                        f"{c['ray_cpu_warm_s'] / c['ray_warm_s']:.2f}")

            row("long run: CPU seconds pool / Ray; cores obtained pool / Ray", _long)
        row("Ray's first run after start-up (workers import the stages): s, overhead",
            lambda r: f"{r['cores']['ray_cold_s']:.2f}, {_pct(r['cores']['overhead_cold'])}")
        row("Ray start-up (`init_ray`; not in the figures above)",
            lambda r: f"{r['cores']['ray_init_s']:.1f} s")
        row("pool start-up (spawn + imports; not in the figures above)",
            lambda r: f"{r['cores']['pool_start_s']:.1f} s")
        row("peak RSS per pool worker (`ru_maxrss` inside), MB; RSS after imports, before work",
            lambda r: ", ".join(map(str, r["cores"]["pool_rss_mb"]))
            + "; " + ", ".join(map(str, r["cores"].get("pool_idle_rss_mb", []))))
        row("peak RSS per Ray worker (VmHWM of each worker process), MB",
            lambda r: ", ".join(map(str, r["cores"]["ray_worker_hwm_mb"])) or "—")
        row("peak RSS of the Ray workers that ran the sink (`ru_maxrss` inside), MB",
            lambda r: ", ".join(map(str, r["cores"]["ray_sink_rss_mb"])))
        def job(r: dict[str, Any]) -> str:
            j = r["cores"].get("job")
            if j is None:
                return f"failed: `{r['cores'].get('job_error', 'not run')}`"
            if "of_decode" not in j:  # a run saved before 2026-12-07 (in-process job)
                return f"{j['seconds']:.0f} s ({j['images_per_s']:.2f} images/s), in-process"
            return (f"{j['seconds']:.0f} s, {j['images_per_s']:.2f} images/s; plain decode "
                    f"{' / '.join(map(str, j['decode_per_s']))} images/s; "
                    f"**{j['of_decode']:.2f}×** of it")

        row("whole job: a fresh `native4k curate` process over the set (its own Ray start-up, "
            "dedup, shards, manifest) against a plain decode on as many processes, before / "
            "after it", job)
        row("load average (1 min) at the start of the pool, Ray, … and job runs",
            lambda r: " / ".join(f"{x['load1']:.1f}" for x in r["cores"]["rounds"])
            + (f" / {r['cores']['job']['load1']:.1f}" if "job" in r["cores"] else ""))
        seen = {json.dumps(v, sort_keys=True)
                for r in runs for v in r["cores"]["outcomes"].values()}
        seen |= {json.dumps(_one(r)["outcomes"], sort_keys=True) for r in runs}
        lines += ["", f"Outcomes per reason (plain loop, pool and Ray "
                  f"{'agree' if len(seen) == 1 else 'DISAGREE'}): "
                  f"`{json.dumps(_one(first)['outcomes'], sort_keys=True)}`."]
    ratios = [_one(r)["batched_ratio_cpu"] for r in runs]
    met = ratios[-1] <= 1.5  # the last run is the code as it stands; earlier ones for context
    by = ", ".join(f"{(x / 1.5 - 1) * 100:+.0f}%" for x in ratios)
    lines += ["", f"**Verdicts** on {heads[-1]}, the code as it stands (figures for "
              f"{', '.join(heads)}):", "",
              f"- Per-image cost ≤ 1.5× one full decode: **{'met' if met else 'not met'}** — "
              + ", ".join(f"{x:.2f}×" for x in ratios) + f" by CPU time ({by} against the 1.5× "
              "goal); by wall time " + ", ".join(f"{_one(r)['batched_ratio']:.2f}×" for r in runs)
              + ". By kind of file (" + heads[-1] + "): " + "; ".join(
                  f"{g} {v['ratio_mean']:.2f}×" for g, v in _one(last)["groups"].items())
              + ("; real photographs (control) " + f"{last['photos']['batched_ratio_cpu']:.2f}×"
                 if "photos" in last else "")
              + ("; camera photographs ≥ 4K " + f"{last['camera']['batched_ratio_cpu']:.2f}×"
                 if "camera" in last else "")
              + ("; the same as WebP q90 " + f"{last['camera_webp']['batched_ratio_cpu']:.2f}×"
                 if "camera_webp" in last else "") + "."
              + (" With every analysis on every image (`analyze.score_all=true`), the cost the "
                 "native test adds where no earlier rule stops an image: " + ", ".join(
                     f"{r['one_core_all']['batched_ratio_cpu']:.2f}×" for r in runs)
                 + f" (**{'within' if last['one_core_all']['batched_ratio_cpu'] <= 1.5 else 'over'}"
                 "** the 1.5× goal)." if "one_core_all" in last else "")]
    if has_cores:
        ov = [r["cores"]["overhead_warm"] for r in runs]
        ok = ov[-1] <= 0.2
        cold = ", ".join(_pct(r["cores"]["overhead_cold"]) for r in runs)
        cpu = ", ".join(_pct(r["cores"]["overhead_cpu_warm"]) for r in runs)
        lines.append(f"- Ray overhead ≤ 20%: **{'met' if ok else 'not met'}** on the "
                     f"{first['cores']['n']}-image set — warm "
                     + ", ".join(_pct(x) for x in ov) + f" by wall time ({cpu} by CPU seconds); "
                     f"the first run after start-up {cold}.")
        if all("cores_long" in r for r in runs):
            ovl = [r["cores_long"]["overhead_warm"] for r in runs]
            lines.append(f"- Ray overhead ≤ 20% on the long run ({first['cores_long']['n']} "
                         f"images): **{'met' if ovl[-1] <= 0.2 else 'not met'}** — "
                         + ", ".join(_pct(x) for x in ovl) + " by wall time.")
        pool = ", ".join(f"{max(r['cores']['pool_rss_mb'])} MB" for r in runs)
        ray_w = ", ".join(f"{max(r['cores']['ray_worker_hwm_mb'] or [0])} MB" for r in runs)
        lines.append(f"- Peak memory per worker: reported — at most {pool} per pool worker and "
                     f"{ray_w} per Ray worker (a Ray worker's RSS also counts the object-store "
                     "pages it maps).")
    return "\n".join(lines) + "\n"


def write_docs(section: str, path: Path = DOCS) -> None:
    """Replace the body of the curation section only (notes after NOTES_MARKER are kept)."""
    text = path.read_text()
    start = text.index(HEADING) + len(HEADING)
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end + 1
    body = text[start:end]
    notes = body[body.index(NOTES_MARKER):].rstrip() + "\n" if NOTES_MARKER in body else ""
    new = "\n\n" + section + ("\n" + notes if notes else "") + "\n"
    path.write_text(text[:start] + new + text[end:])


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (or re-render saved runs) and write the section of docs/benchmarks.md."""
    ap = argparse.ArgumentParser(prog="python -m bench.curation_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=0, help="use the first N files (0: all)")
    ap.add_argument("--cores", type=int, default=0, help="CPUs for Ray and the pool (0: all)")
    ap.add_argument("--scratch", default="/tmp/native4k-bench", help="where the set is built")
    ap.add_argument("--repeats", type=int, default=3, help="timings per file on one core")
    ap.add_argument("--rounds", type=int, default=3, help="alternating pool/Ray runs")
    ap.add_argument("--no-photos", action="store_true",
                    help="skip the real photographs: the 2560-px control and the camera 4K sets")
    ap.add_argument("--no-job", action="store_true", help="skip the end-to-end job")
    ap.add_argument("--long", type=int, default=4, metavar="K",
                    help="also compare Ray and the pool on the set fed K times over (0: skip)")
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="render saved runs (side by side) into the docs; measures nothing")
    args = ap.parse_args(argv)
    if args.report:
        section = render([json.loads(Path(p).read_text()) for p in args.report])
        print(section)
        if not args.no_docs:
            write_docs(section)
        return 0

    limit_threads()
    wall0 = time.perf_counter()
    scratch = Path(args.scratch)
    cores = args.cores or os.cpu_count() or 1
    run: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "machine": machine(),
        "started": dt.datetime.now(dt.UTC).strftime("%H:%M"),
        "load_before": _load_text(), "scratch": str(scratch),
        "command": "python -m bench.curation_throughput" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
    }
    import cv2
    import PIL
    import ray

    run["code"] = _code_state()
    run["software"] = (f"Python {platform.python_version()}, Pillow {PIL.__version__}, "
                       f"OpenCV {cv2.__version__}, Ray {ray.__version__}")
    files = build_set(scratch)
    if args.images:
        files = files[: args.images]
    print(f"set: {len(files)} files in {scratch}; load {run['load_before']}", flush=True)
    run["one_core"] = measure_one_core(files, args.repeats)
    print(f"one core: decode {run['one_core']['decode']}, stages {run['one_core']['stages']}, "
          f"ratio {run['one_core']['batched_ratio']}", flush=True)
    # The job stops an image's analyses at the first rule it fails (most renders here are
    # `flat`): the same set with every analysis on every image is the detector's full cost.
    run["one_core_all"] = measure_one_core(files, args.repeats, ["analyze.score_all=true"])
    print(f"one core, every analysis: ratio {run['one_core_all']['batched_ratio_cpu']}",
          flush=True)
    run["breakdown"] = measure_breakdown(files, args.repeats)
    if not args.no_photos:
        photos = photo_set()
        run["photos"] = measure_one_core(photos, args.repeats, ["probe.min_pixels=1000000"])
        print(f"photos: ratio {run['photos']['ratio_mean']}", flush=True)
        camera = camera_set()
        if camera:
            run["camera"] = measure_one_core(camera, args.repeats)
            print(f"camera 4K: ratio {run['camera']['batched_ratio_cpu']}", flush=True)
            webp = camera_webp_set(camera, scratch)
            run["camera_webp"] = measure_one_core(webp, args.repeats)
            print(f"camera 4K as WebP: ratio {run['camera_webp']['batched_ratio_cpu']}",
                  flush=True)
    run["cores"] = measure_cores(files, cores, args.rounds, scratch, not args.no_job)
    if args.long > 1:
        run["cores_long"] = measure_cores(files, cores, args.rounds, scratch, False, args.long)
    run["load_after"] = _load_text()
    run["wall_s"] = round(time.perf_counter() - wall0, 1)
    results = scratch / "results"
    results.mkdir(exist_ok=True)
    saved = results / f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S')}.json"
    saved.write_text(json.dumps(run, indent=1))
    section = render([run])
    print(section)
    print(f"saved {saved}")
    if not args.no_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
