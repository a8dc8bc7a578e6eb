"""Fixed cost of a curation job: what a tiny job pays before and after its real work.

Runs the real `native4k curate` as a fresh process (Ray start-up included, as a new user meets
it) on one real photograph, kept and rejected, and on the demo's small mixed set, several times
each, and reads each run's per-pass seconds from `stats.json`. Yardsticks in the same run: the
CLI's imports alone (`native4k config`), and `ray.init` + `ray.shutdown` alone.

Usage: `python -m bench.fixed_cost [--repeats 3] [--cpus 2]`; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTO = Path("/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg")  # 6028x3391, lomiri
PASSES = ("listing", "start-up", "analysis", "dedup", "models", "shards", "manifest")
NATIVE4K = str(Path(sys.executable).with_name("native4k"))


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _job(inputs: Path, extra: list[str], env: dict[str, str], scratch: Path) -> dict:
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    wall = _timed([NATIVE4K, "curate", str(inputs), "--output", str(out), *extra], env)
    stats = json.loads((out / "stats.json").read_text())
    return {"wall": wall, "kept": stats["kept"], "total": stats["total"], **stats["pass_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = ap.parse_args()
    if not PHOTO.exists():
        sys.exit(f"{PHOTO} is missing: apt-get install lomiri-wallpapers-16.04")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    scratch = Path(tempfile.mkdtemp(prefix="native4k-fixed-"))
    one = scratch / "one"
    one.mkdir()
    shutil.copy(PHOTO, one / PHOTO.name)
    mixed = scratch / "mixed"
    from pipelines.samples import build_samples

    build_samples(mixed, real_photos=0)
    cpus = ["--set", f"ray.num_cpus={args.cpus}"]
    cases = {
        "one real photo, kept (flatness rule relaxed)": (
            one, [*cpus, "--set", "analyze.max_flat_fraction=1.0"]
        ),
        "one real photo, kept, model pass off (`score.enabled=false`)": (
            one, [*cpus, "--set", "analyze.max_flat_fraction=1.0", "--set", "score.enabled=false"]
        ),
        "one real photo, rejected (flat)": (one, cpus),
        f"demo set without photos ({len(list(mixed.rglob('*')))} files)": (mixed, cpus),
    }
    init = (
        f"import ray;ray.init(num_cpus={args.cpus},include_dashboard=False);ray.shutdown()"
    )
    rows = []
    yard = {
        "imports (`native4k config`)": [
            _timed([NATIVE4K, "config"], env) for _ in range(args.repeats)
        ],
        "`ray.init` + `ray.shutdown`": [
            _timed([sys.executable, "-c", init], env) for _ in range(args.repeats)
        ],
    }
    for name, (inputs, extra) in cases.items():
        runs = [_job(inputs, extra, env, scratch) for _ in range(args.repeats)]
        rows.append((name, runs))
    shutil.rmtree(scratch, ignore_errors=True)

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f}"

    print(
        f"Fixed cost, {dt.date.today()}, {platform.node()}, {os.cpu_count()} cores, "
        f"Ray with {args.cpus} CPUs; median of {args.repeats} fresh processes (seconds)\n"
    )
    print("| run | end to end | " + " | ".join(PASSES) + " | kept/total |")
    print("|---|---|" + "---|" * len(PASSES) + "---|")
    for name, runs in rows:
        cells = [med([r.get(p, 0.0) for r in runs]) for p in PASSES]
        kept = f"{runs[0]['kept']}/{runs[0]['total']}"
        wall = med([r["wall"] for r in runs])
        print(f"| {name} | {wall} | " + " | ".join(cells) + f" | {kept} |")
    for name, xs in yard.items():
        print(f"| {name} | {med(xs)} |" + " |" * len(PASSES) + " |")


if __name__ == "__main__":
    main()
