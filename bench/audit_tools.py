"""Auditing tools at scale: `native4k stats` on a million-row manifest, `report` and `verify`
over a thousand 4K images.

Usage:
    python -m bench.audit_tools stats [--rows 1000000] [--repeats 3]
    python -m bench.audit_tools report [--images 1000]
    python -m bench.audit_tools verify [--images 1000]

`stats` writes a synthetic manifest (the contract's columns, realistic value mixes: 60 % kept
over 40 buckets, 13 rejection reasons, scores with nulls where a rejection stopped the
analysis) in a finished-job layout, then times `native4k stats` in a fresh process (imports
included) and the in-process computation. `report` and `verify` build a job of real
photographs from Debian's wallpaper packages enlarged to 3840×2160 (so every file costs what a
4K JPEG costs to decode; the content is irrelevant to these tools), half kept in shards and half
rejected as plain files, and time the tools over it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import schema

REASONS = schema.REASONS
BUCKETS = [f"{w}x{h}" for w, h in ((3840 + 64 * i, 2176 - 32 * (i % 3)) for i in range(40))]


def synthetic_manifest(rows: int, seed: int = 0) -> pa.Table:
    """A manifest table of `rows` rows with the contract's columns, built with numpy only."""
    rng = np.random.default_rng(seed)
    kept = rng.random(rows) < 0.6
    reason_idx = rng.integers(0, len(REASONS), rows)
    bucket_idx = np.minimum(rng.geometric(0.12, rows) - 1, len(BUCKETS) - 1)
    idx = np.arange(rows)
    sha = np.char.add(np.char.mod("%064x", idx), "")
    keys = np.char.ljust(np.char.mod("%032x", idx), 32)
    bucket = np.array(BUCKETS, dtype=object)[bucket_idx]
    shard_no = idx // 1000
    shard = np.char.add(
        np.char.add("shards/", bucket.astype(str)),
        np.char.add("/", np.char.mod("%06d.tar", shard_no % 50)),
    )
    analysed = kept | (reason_idx >= REASONS.index("upscaled"))

    def score(loc: float, sd: float) -> pa.Array:
        v = rng.normal(loc, sd, rows)
        return pa.array(v, mask=~analysed)

    cols: dict[str, Any] = {
        schema.SOURCE: pa.array(np.char.mod("/data/raw/img-%08d.jpg", idx)),
        schema.SIZE_BYTES: pa.array(rng.integers(500_000, 8_000_000, rows)),
        schema.SHA256: pa.array(sha),
        schema.STATUS: pa.array(np.where(kept, "kept", "rejected")),
        schema.REASON: pa.array(np.array(REASONS, dtype=object)[reason_idx], mask=kept),
        schema.WIDTH: pa.array(rng.integers(3000, 8000, rows)),
        schema.HEIGHT: pa.array(rng.integers(1800, 5000, rows)),
        schema.FORMAT: pa.array(np.where(rng.random(rows) < 0.8, "jpeg", "png")),
        schema.KEY: pa.array(keys, mask=~kept),
        schema.BUCKET: pa.array(bucket, mask=~kept),
        schema.SHARD: pa.array(shard, mask=~kept),
        schema.SHARPNESS: score(20, 6),
        schema.FLAT_FRACTION: score(0.2, 0.1),
        schema.ENTROPY: score(7.4, 0.3),
        schema.NATIVE_SCORE: score(70, 10),
    }
    return schema.conform(pa.table(cols))


def write_finished(out: Path, manifest: pa.Table, parts: int = 4) -> None:
    """A finished-job layout around `manifest` (no shards: `stats` reads only the manifest)."""
    (out / "manifest").mkdir(parents=True, exist_ok=True)
    step = -(-manifest.num_rows // parts)
    for i in range(parts):
        pq.write_table(manifest.slice(i * step, step), out / "manifest" / f"part-{i:05d}.parquet")
    (out / "_SUCCESS").write_text(
        json.dumps({"manifest_version": schema.MANIFEST_VERSION, "rows": manifest.num_rows})
    )


def _machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"pyarrow {pa.__version__}; load before: {load}"
    )


def bench_stats(rows: int, repeats: int, scratch: Path) -> dict[str, Any]:
    """Time `native4k stats` (fresh process) and `output_stats` (in process) on `rows` rows."""
    from pipelines.stats import output_stats

    out = scratch / f"stats-{rows}"
    if not (out / "_SUCCESS").exists():
        t = time.perf_counter()
        write_finished(out, synthetic_manifest(rows))
        print(f"built {rows} rows in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    cli = Path(sys.executable).with_name("native4k")
    result: dict[str, Any] = {"rows": rows, "machine": _machine(), "cli": [], "in_process": []}
    for args in ([], ["--json"], ["--by", "format"]):
        for _ in range(repeats):
            cmd = [str(cli), "stats", str(out), *args]
            done, wall, cpu = _timed(
                lambda c=cmd: subprocess.run(c, capture_output=True, text=True, check=True)
            )
            result["cli"].append({"args": args, "wall_s": wall, "cpu_s": cpu})
            assert done.stdout
    for _ in range(repeats):
        s, wall, cpu = _timed(lambda: output_stats(str(out)))
        result["in_process"].append({"wall_s": wall, "cpu_s": cpu})
    assert s["total"] == rows
    return result


UHD = (3840, 2160)


def _base_jpegs(n: int) -> list[bytes]:
    """`n` real photographs (Debian's wallpapers) cropped and enlarged to 3840×2160, q90."""
    from PIL import Image, ImageOps

    from pipelines.samples import _real_photos

    out = []
    for p in _real_photos(n):
        with Image.open(p) as im:
            im = ImageOps.fit(im.convert("RGB"), UHD, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    assert out, "needs Debian's wallpapers (plasma-workspace-wallpapers, mate-backgrounds)"
    return out


def _variant(jpeg: bytes, i: int) -> bytes:
    """The same JPEG with a comment segment naming `i`: other bytes, same decode cost."""
    text = f"native4k bench {i}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def build_image_job(out: Path, num_kept: int, num_rejected: int, per_shard: int = 100) -> None:
    """A finished job of 4K JPEGs: `num_kept` in shards over 10 buckets, `num_rejected` as
    plain files over 5 reasons, in the documented layout (manifest rows, shards with each
    sample's `.json` from the shard writer's `manifest_record`, `_SUCCESS`, `stats.json`)."""
    import webdataset as wds

    from curation.shard.shard_writer import manifest_record, sample_key, shard_name
    from pipelines.config import dump_yaml, load_config

    bases = _base_jpegs(6)
    raw = out.parent / f"{out.name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    buckets = BUCKETS[:10]
    kept_by_shard: dict[str, list[tuple[dict[str, Any], bytes]]] = {}
    for i in range(num_kept):
        data = _variant(bases[i % len(bases)], i)
        sha = hashlib.sha256(data).hexdigest()
        bucket = buckets[i % len(buckets)]
        row = {
            schema.SOURCE: f"/gone/kept-{i:06d}.jpg", schema.SHA256: sha,
            schema.SIZE_BYTES: len(data), schema.STATUS: "kept", schema.KEY: sample_key(sha),
            schema.BUCKET: bucket, schema.EXTENSION: "jpg", schema.FORMAT: "jpeg",
            schema.WIDTH: UHD[0], schema.HEIGHT: UHD[1],
            schema.SHARPNESS: float(rng.normal(20, 5)), schema.ENTROPY: float(rng.normal(7.4, .2)),
            schema.NATIVE_SCORE: float(rng.normal(70, 8)),
            schema.FLAT_FRACTION: float(rng.uniform(0, .4)),
        }  # fmt: skip
        row[schema.SHARD] = shard_name(bucket, (i // len(buckets)) // per_shard)
        kept_by_shard.setdefault(row[schema.SHARD], []).append((row, data))
        rows.append(row)
    reasons = ["upscaled", "blurry", "flat", "low_entropy", "duplicate"]
    for i in range(num_rejected):
        data = _variant(bases[(i + 3) % len(bases)], 10**6 + i)
        path = raw / f"rejected-{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(data)
        rows.append(
            {
                schema.SOURCE: str(path), schema.SHA256: hashlib.sha256(data).hexdigest(),
                schema.SIZE_BYTES: len(data), schema.STATUS: "rejected",
                schema.REASON: reasons[i % len(reasons)], schema.DETAIL: "bench",
                schema.FORMAT: "jpeg", schema.WIDTH: UHD[0], schema.HEIGHT: UHD[1],
                schema.SHARPNESS: float(rng.normal(8, 4)),
                schema.NATIVE_SCORE: float(rng.normal(40, 15)),
            }
        )  # fmt: skip
    table = schema.conform(
        pa.table(
            {
                c: pa.array([r.get(c) for r in rows], schema.FIELDS[c])
                for c in schema.MANIFEST_COLUMNS
            }
        )
    )
    full = {r[schema.KEY]: r for r in table.to_pylist() if r[schema.KEY]}
    for shard, members in sorted(kept_by_shard.items()):
        (out / shard).parent.mkdir(parents=True, exist_ok=True)
        with open(out / shard, "wb") as fh:
            w = wds.TarWriter(fh, encoder=False, mtime=0.0)
            for row, data in sorted(members, key=lambda m: m[0][schema.KEY]):
                rec = manifest_record(full[row[schema.KEY]])
                w.write({"__key__": row[schema.KEY], "jpg": data,
                         "json": json.dumps(rec, sort_keys=True).encode()})  # fmt: skip
            w.close()
    write_finished(out, table, parts=2)
    stats = {
        "manifest_version": schema.MANIFEST_VERSION, "total": len(rows), "kept": num_kept,
        "rejected": num_rejected,
        "reasons": {r: sum(1 for x in rows if x.get(schema.REASON) == r) for r in reasons},
        "buckets": {
            b: {
                "count": sum(len(m) for s, m in kept_by_shard.items() if s.split("/")[1] == b),
                "bytes": sum(len(d) for s, m in kept_by_shard.items() if s.split("/")[1] == b
                             for _, d in m),
                "shards": sum(1 for s in kept_by_shard if s.split("/")[1] == b),
                "captioned": 0, "scores": {},
            }
            for b in sorted({s.split("/")[1] for s in kept_by_shard})
        },
    }  # fmt: skip
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    (out / "config.yaml").write_text(dump_yaml(load_config()))


def _cpu() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn: Any) -> tuple[Any, float, float]:
    t, c = time.perf_counter(), _cpu()
    res = fn()
    return res, round(time.perf_counter() - t, 2), round(_cpu() - c, 2)


def bench_images(what: str, images: int, repeats: int, scratch: Path) -> dict[str, Any]:
    """Time `report` (every image thumbnailed, and the default sample) or `verify`."""
    out = scratch / f"images-{images}"
    if not (out / "_SUCCESS").exists():
        _, wall, _ = _timed(lambda: build_image_job(out, images, images))
        print(f"built {2 * images} 4K JPEGs in {wall} s", file=sys.stderr)
    result: dict[str, Any] = {"images": images, "machine": _machine(), "runs": []}
    if what == "report":
        from pipelines.report import reduced_image, write_report

        sample = [p.read_bytes() for p in sorted((scratch / f"{out.name}-raw").iterdir())[:30]]
        from PIL import Image

        def full() -> None:
            for d in sample:
                with Image.open(io.BytesIO(d)) as im:
                    im.convert("RGB").thumbnail((240, 240))

        def reduced() -> None:
            for d in sample:
                reduced_image(d)

        for name, fn in (("full decode + thumbnail", full), ("draft decode", reduced)):
            _, wall, cpu = _timed(fn)
            result[f"one core, {name}, ms per image"] = round(1000 * wall / len(sample), 1)
        # every kept (10 buckets x images/10) and rejected (5 reasons x images/5) image
        for samples in (images // 5, 8):
            for _ in range(repeats):
                _, wall, cpu = _timed(lambda s=samples: write_report(str(out), samples=s))
                thumbs = min(samples, images // 10) * 10 + min(samples, images // 5) * 5
                result["runs"].append({"samples": samples, "thumbnails": thumbs,
                                       "wall_s": wall, "cpu_s": cpu,
                                       "s_per_1000": round(1000 * wall / thumbs, 1)})  # fmt: skip
        result["report_mb"] = round((out / "report.html").stat().st_size / 1e6, 1)
    else:
        from pipelines.verify import run_verify

        for deep in (False, True):
            for _ in range(repeats):
                res, wall, cpu = _timed(lambda d=deep: run_verify(str(out), deep=d, workers=2))
                assert res.ok, res.findings[:5]
                per = round(1000 * wall / res.samples, 1)
                result["runs"].append(
                    {"deep": deep, "samples": res.samples, "wall_s": wall, "cpu_s": cpu,
                     "s_per_1000": per}
                )  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark and print its JSON result."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["stats", "report", "verify"])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/native4k-audit-bench"))
    args = p.parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.what == "stats":
        res = bench_stats(args.rows, args.repeats, args.scratch)
    else:
        res = bench_images(args.what, args.images, args.repeats, args.scratch)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
