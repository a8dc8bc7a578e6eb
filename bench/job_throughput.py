"""End-to-end throughput of `native4k curate` as a user runs it, against a plain decode.

The set: N distinct 3840×2160 cuts of the largest real photographs this machine has, saved in
rotation as baseline JPEG (q88–95), progressive JPEG (q90) and lossy WebP (q90)
(`bench.memory_scale.build_set`, cached in `--scratch`). Each configuration runs as a fresh
`native4k curate` process that starts its own local Ray instance (`ray.num_cpus` = `--cpus`):
Ray's start-up is in the figures. The yardstick in the same run: a plain `--cpus`-process
Pillow RGB decode of the same files, measured before and after the jobs (their mean is the
reference; their spread says how steady the machine was).

Configurations: the paper's defaults; the same with `analyze.score_all=true` (every pixel score
of every image, as every job computed before the analyses stopped at the first failed rule);
and any `--case "NAME:k=v,k=v"` given (the --set overrides after the last colon).

Usage: `python -m bench.job_throughput [--images 1000] [--cpus 2]`; prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.memory_scale import build_set, plain_decode_rate

NATIVE4K = str(Path(sys.executable).with_name("native4k"))


def run_job(folder: str, out: Path, cpus: int, overrides: list[str]) -> dict:
    """One fresh `native4k curate` process; its wall time and `stats.json`."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    args = [NATIVE4K, "curate", folder, "--output", str(out), "--set", f"ray.num_cpus={cpus}"]
    for o in overrides:
        args += ["--set", o]
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    return {"wall": wall, **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/native4k-memory"))
    ap.add_argument("--case", action="append", default=[], metavar="NAME:k=v,k=v",
                    help="another configuration: a name, then --set overrides, comma-separated")
    ap.add_argument("--no-score-all", action="store_true", help="skip the score_all case")
    args = ap.parse_args()
    paths = build_set(args.scratch, args.images)
    folder = str(Path(paths[0]).parent)
    cases: dict[str, list[str]] = {"paper defaults": []}
    if not args.no_score_all:
        cases["defaults, `analyze.score_all=true`"] = ["analyze.score_all=true"]
    for c in args.case:
        name, _, rest = c.rpartition(":")
        cases[name] = [o for o in rest.split(",") if o]
    before = plain_decode_rate(paths, args.cpus)
    results = {name: run_job(folder, args.scratch / "job-out", args.cpus, o)
               for name, o in cases.items()}
    after = plain_decode_rate(paths, args.cpus)
    decode = (before + after) / 2
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {len(paths)} images; "
          f"plain {args.cpus}-process decode {before:.1f} / {after:.1f} images/s "
          f"(before / after the jobs)\n")
    print("| configuration | wall (s) | images/s | of the plain decode | kept | reasons | "
          "analysis pass (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = len(paths) / r["wall"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items()))
        print(f"| {name} | {r['wall']:.1f} | {rate:.1f} | {rate / decode:.2f}× | {r['kept']} | "
              f"{reasons} | {r['pass_seconds'].get('analysis', 0):.1f} |")


if __name__ == "__main__":
    main()
