"""`native4k verify`: re-read every shard and check it against the manifest."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from typing import Any

import fsspec
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from curation import schema
from curation.io.atomic import join

SLIM = (
    schema.SOURCE,
    schema.STATUS,
    schema.REASON,
    schema.KEY,
    schema.SHARD,
    schema.SHA256,
    schema.BUCKET,
    schema.EXTENSION,
    schema.CAPTION_EN,
    schema.CAPTION_ZH,
)


def read_manifest(output: str, columns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """All manifest rows (selected columns) of a finished job."""
    fs, root = fsspec.core.url_to_fs(output)
    files = sorted(fs.glob(root.rstrip("/") + "/manifest/*.parquet"))
    rows: list[dict[str, Any]] = []
    for f in files:
        with fs.open(f, "rb") as fh:
            rows.extend(pq.read_table(fh, columns=list(columns) if columns else None).to_pylist())
    return rows


def verify(output: str, *, max_problems: int = 50) -> list[str]:
    """Every disagreement between the shards and the manifest, in words (empty: they agree).

    Checks: `_SUCCESS` present; one row per source; kept rows have unique keys of
    `[0-9a-z_-]`, a bucket and a shard; rejected rows have a reason and no shard; every
    shard on disk is in the manifest and vice versa; every sample's image bytes match its
    sha256, its JSON member matches its row, its captions match; no member is unexpected.
    """
    problems: list[str] = []

    def problem(msg: str) -> None:
        if len(problems) < max_problems:
            problems.append(msg)

    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/_SUCCESS"):
        problem("_SUCCESS is missing: the job did not complete")
    rows = read_manifest(output, SLIM)
    if not rows:
        problem("the manifest is empty or missing")
    for src, n in Counter(r[schema.SOURCE] for r in rows).items():
        if n > 1:
            problem(f"source {src} has {n} manifest rows")
    expected: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r[schema.STATUS] == schema.STATUS_KEPT:
            key = r[schema.KEY] or ""
            if not key or any(c not in "0123456789abcdefghijklmnopqrstuvwxyz_-" for c in key):
                problem(f"kept row {r[schema.SOURCE]} has an invalid key {key!r}")
            if not r[schema.SHARD] or not r[schema.BUCKET]:
                problem(f"kept row {r[schema.SOURCE]} has no shard or bucket")
                continue
            if key in expected[r[schema.SHARD]]:
                problem(f"key {key} appears twice in {r[schema.SHARD]}")
            expected[r[schema.SHARD]][key] = r
        elif r[schema.STATUS] == schema.STATUS_REJECTED:
            if not r[schema.REASON]:
                problem(f"rejected row {r[schema.SOURCE]} has no reason")
            if r[schema.SHARD]:
                problem(f"rejected row {r[schema.SOURCE]} names shard {r[schema.SHARD]}")
        else:
            problem(f"row {r[schema.SOURCE]} has status {r[schema.STATUS]!r}")
    on_disk = {
        f[len(root) + 1 :]
        for f in (fs.find(f"{root}/shards") if fs.exists(f"{root}/shards") else [])
    }
    for extra in sorted(on_disk - set(expected)):
        problem(f"{extra} is on disk but not in the manifest")
    for shard in sorted(expected):
        if shard not in on_disk:
            problem(f"{shard} is in the manifest but missing on disk")
            continue
        _verify_shard(fs, f"{root}/{shard}", shard, expected[shard], problem)
    return problems


def _verify_shard(
    fs: Any, path: str, shard: str, rows: dict[str, dict[str, Any]], problem: Any
) -> None:
    seen: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with fs.open(path, "rb") as fh:
            for item in tar_file_iterator(fh):
                key, ext = base_plus_ext(item["fname"])
                seen[key][ext] = item["data"]
    except Exception as e:
        problem(f"{shard} cannot be read: {type(e).__name__}: {e}")
        return
    for key in sorted(set(seen) - set(rows)):
        problem(f"{shard} holds sample {key} that the manifest does not place there")
    for key, row in rows.items():
        members = seen.get(key)
        if members is None:
            problem(f"{shard} lacks sample {key} ({row[schema.SOURCE]})")
            continue
        ext = row[schema.EXTENSION]
        data = members.get(ext)
        if data is None:
            problem(f"{shard}: sample {key} has no .{ext} member")
        elif hashlib.sha256(data).hexdigest() != row[schema.SHA256]:
            problem(f"{shard}: sample {key} image bytes differ from the manifest's sha256")
        try:
            meta = json.loads(members.get("json", b"null"))
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            problem(f"{shard}: sample {key} has no readable .json member")
        else:
            for c in (schema.SOURCE, schema.SHA256, schema.KEY, schema.BUCKET, schema.SHARD):
                if meta.get(c) != row[c]:
                    problem(f"{shard}: sample {key} json {c}={meta.get(c)!r}, manifest {row[c]!r}")
        for ext_, col in (("txt", schema.CAPTION_EN), ("zh.txt", schema.CAPTION_ZH)):
            got = members.get(ext_)
            want = row[col]
            if (got.decode() if got is not None else None) != want:
                problem(f"{shard}: sample {key} .{ext_} differs from the manifest's {col}")
        unexpected = set(members) - {ext, "json", "txt", "zh.txt"}
        if unexpected:
            problem(f"{shard}: sample {key} has unexpected members {sorted(unexpected)}")


def manifest_path(output: str) -> str:
    """Where the manifest of OUT lives."""
    return join(output, "manifest")
