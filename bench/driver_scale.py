"""How the driver's memory and the listing time grow with the number of inputs.

Writes a synthetic URI list of N entries (paths that do not exist: no image bytes are needed,
the job would record each as `unreadable`) and, in a fresh process per N, runs what the job's
driver does before the analysis pass: plan the INPUTs, start a local Ray instance, expand the
listing in Ray tasks (`pipelines.curate.list_job`), and read the resume set of an earlier run
(an anti-join in Ray). It reports the driver's peak resident memory, the listing time, and the
object-store bytes the listing occupies. The yardstick, in the same run: the old driver-side
listing (`list(list_inputs(...))`, every input as a Python object in the driver).

Usage: `python -m bench.driver_scale [--sizes 1000000 3000000 10000000] [--cpus 2]`
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_list(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for start in range(0, n, 100_000):
            stop = min(n, start + 100_000)
            fh.write("".join(f"/nonexistent/n4k/{i:09d}.jpg\n" for i in range(start, stop)))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, list_file: str, cpus: int) -> dict:
    """One measurement in this (fresh) process."""
    base = _peak_rss_mb()
    start = time.perf_counter()
    if mode == "driver":
        from curation.io.listing import list_inputs

        items = list(list_inputs([list_file]))
        return {"inputs": len(items), "seconds": time.perf_counter() - start,
                "driver_peak_mb": _peak_rss_mb(), "baseline_mb": base}
    import ray

    from curation.io.listing import plan_inputs
    from pipelines.config import load_config
    from pipelines.curate import configure_progress, list_job, local_ray_system_config
    from pipelines.grouping import join

    cfg = load_config()
    specs = plan_inputs([list_file])
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _system_config=local_ray_system_config(cpus))
    configure_progress(ray.data, False)
    started = time.perf_counter()
    listing = list_job(ray.data, specs, cfg)
    listed = time.perf_counter() - started
    # A resume set the size of a tenth of the job: the anti-join runs in Ray.
    done = listing.rows.limit(max(1, listing.count // 10)).select_columns(["source"])
    pending = join(listing.rows, done, "left_anti", max(1, 2 * cpus), on=("source",)).count()
    total = time.perf_counter() - started
    store = ray.available_resources().get("object_store_memory", 0)
    capacity = ray.cluster_resources().get("object_store_memory", 0)
    ray.shutdown()
    return {"inputs": listing.count, "pending_after_resume": pending, "seconds": listed,
            "with_resume_seconds": total, "driver_peak_mb": _peak_rss_mb(), "baseline_mb": base,
            "object_store_used_mb": (capacity - store) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--driver-max", type=int, default=3_000_000,
                    help="largest N for the old driver-side listing (it holds every input)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.cpus)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="native4k-driver-"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    rows = []
    for n in args.sizes:
        lst = scratch / f"uris-{n}.lst"
        _write_list(lst, n)
        for mode in ("ray", "driver"):
            if mode == "driver" and n > args.driver_max:
                continue
            out = subprocess.run(
                [sys.executable, "-m", "bench.driver_scale", "--cpus", str(args.cpus),
                 "--child", mode, str(lst)],
                check=True, capture_output=True, text=True, env=env,
            ).stdout.strip().splitlines()[-1]
            rows.append({"n": n, "mode": mode, **json.loads(out)})
            print(json.dumps(rows[-1]), file=sys.stderr)
        lst.unlink()
    print(f"\n{dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}\n")
    print("| inputs | listing | seconds | with resume anti-join | driver peak RSS (MB) "
          "| object store (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        how = "in Ray (`list_job`)" if r["mode"] == "ray" else "in the driver (old)"
        print(f"| {r['n']:,} | {how} | {r['seconds']:.1f} | "
              f"{r.get('with_resume_seconds', float('nan')):.1f} | {r['driver_peak_mb']:.0f} | "
              f"{r.get('object_store_used_mb', 0):.0f} |")


if __name__ == "__main__":
    main()
