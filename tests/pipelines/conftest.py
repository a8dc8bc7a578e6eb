"""A finished job's output built directly in the documented layout (no Ray), for the audit
tools' tests: manifest parts, WebDataset shards (written by webdataset's TarWriter, each
sample's `.json` from the shard writer's own `manifest_record`), `config.yaml`, `stats.json`
and `_SUCCESS`, exactly as `data-contract.md` lays them out.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A small, non-trivial JPEG (noise over a gradient)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width), yy * 255 // max(1, height), (xx + yy) % 256], -1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_audit_output(
    out: Path,
    kept: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    *,
    per_shard: int = 2,
    config_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Write a finished job to `out`; return {"rows": manifest rows, "stats": stats.json}.

    Args:
        out: the folder (created).
        kept: one dict per kept sample: `data` (bytes), `ext`, `bucket`, and any manifest
            column (`source`, scores, `caption_en`, `width`, `height`, ...).
        rejected: one dict per rejected input: `reason`, `source` and any manifest column.
        per_shard: samples per shard (shards cut per bucket, in key order).
        config_overrides: `--set`-style overrides for `config.yaml`.
    """
    import webdataset as wds

    from curation import schema
    from curation.shard.shard_writer import manifest_record, sample_key, shard_name
    from pipelines.config import dump_yaml, load_config

    rows: list[dict[str, Any]] = []
    by_bucket: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, k in enumerate(kept):
        data = k["data"]
        sha = hashlib.sha256(data).hexdigest()
        row = {c: v for c, v in k.items() if c not in ("data", "ext")}
        row.setdefault(schema.SOURCE, f"/in/kept-{i}.{k['ext']}")
        row.update(
            {
                schema.SHA256: sha,
                schema.SIZE_BYTES: len(data),
                schema.STATUS: schema.STATUS_KEPT,
                schema.KEY: sample_key(sha),
                schema.EXTENSION: k["ext"],
                schema.FORMAT: "jpeg" if k["ext"] == "jpg" else k["ext"],
            }
        )
        row["_data"] = data
        by_bucket[k["bucket"]].append(row)
    shards: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bucket, members in by_bucket.items():
        for j, row in enumerate(sorted(members, key=lambda r: r[schema.KEY])):
            row[schema.SHARD] = shard_name(bucket, j // per_shard)
            shards[row[schema.SHARD]].append(row)
            rows.append(row)
    for r in rejected:
        row = dict(r)
        row[schema.STATUS] = schema.STATUS_REJECTED
        row.setdefault(schema.DETAIL, f"rejected as {row[schema.REASON]}")
        rows.append(row)
    cols = schema.MANIFEST_COLUMNS
    table = schema.conform(
        pa.table({c: pa.array([r.get(c) for r in rows], schema.FIELDS[c]) for c in cols})
    )
    final = table.to_pylist()
    for shard, members in shards.items():
        path = out / shard
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            writer = wds.TarWriter(fh, encoder=False, mtime=0.0)
            for row in members:
                full = next(f for f in final if f[schema.KEY] == row[schema.KEY])
                sample = {"__key__": row[schema.KEY], row[schema.EXTENSION]: row["_data"]}
                sample["json"] = json.dumps(manifest_record(full), sort_keys=True).encode()
                if full.get(schema.CAPTION_EN):
                    sample["txt"] = full[schema.CAPTION_EN].encode()
                writer.write(sample)
            writer.close()
    (out / "manifest").mkdir(parents=True, exist_ok=True)
    half = max(1, table.num_rows // 2)
    pq.write_table(table.slice(0, half), out / "manifest" / "part-00000.parquet")
    pq.write_table(table.slice(half), out / "manifest" / "part-00001.parquet")
    reasons: dict[str, int] = defaultdict(int)
    for r in final:
        if r[schema.STATUS] != schema.STATUS_KEPT:
            reasons[r[schema.REASON]] += 1
    buckets = {
        b: {
            "count": len(m),
            "bytes": sum(r[schema.SIZE_BYTES] for r in m),
            "shards": len({r[schema.SHARD] for r in m}),
            "captioned": sum(1 for r in m if r.get(schema.CAPTION_EN)),
            "scores": {},
        }
        for b, m in sorted(by_bucket.items())
    }
    stats = {
        "manifest_version": schema.MANIFEST_VERSION,
        "total": len(final),
        "kept": len(kept),
        "rejected": len(final) - len(kept),
        "reasons": dict(sorted(reasons.items())),
        "buckets": buckets,
        "empty_buckets": 0,
        "stage_seconds": {"read": 0.1},
        "wall_seconds": 1.0,
    }
    (out / "config.yaml").write_text(dump_yaml(load_config(None, config_overrides)))
    names = sorted({r["bucket"] for r in kept if r.get("bucket")})
    table = [{"name": n, "width": int(n.split("x")[0]), "height": int(n.split("x")[1])}
             for n in names]  # fmt: skip
    (out / "buckets.json").write_text(json.dumps({"buckets": table}, indent=1))
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    (out / "_SUCCESS").write_text(
        json.dumps({"manifest_version": schema.MANIFEST_VERSION, "rows": len(final)})
    )
    return {"rows": final, "stats": stats}


@pytest.fixture
def audit_output(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """A factory: `audit_output(kept, rejected, name=..., **kw)` → (OUT, written rows/stats)."""

    def make(
        kept: list[dict[str, Any]], rejected: list[dict[str, Any]], name: str = "out", **kw: Any
    ) -> tuple[Path, dict[str, Any]]:
        out = tmp_path / name
        return out, write_audit_output(out, kept, rejected, **kw)

    return make


@pytest.fixture
def audit_jpeg() -> Callable[..., bytes]:
    """`audit_jpeg(width, height, seed)`: a small, non-trivial JPEG."""
    return jpeg


def _job_outcome(out: Path) -> tuple[dict, dict]:
    """(manifest rows by source, shard bytes' sha256 by path): what must not change."""
    rows = {
        r["source"]: (r["status"], r["reason"], r["key"], r["shard"], r["duplicate_of"])
        for r in pq.read_table(out / "manifest").to_pylist()
    }
    shards = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (out / "shards").rglob("*")
        if p.is_file()
    }
    return rows, shards


@pytest.fixture
def job_outcome() -> Callable[[Path], tuple[dict, dict]]:
    """What a job's output must keep across interruptions and clusters (see `_job_outcome`)."""
    return _job_outcome
