"""Shard planning and writing: WebDataset tars per bucket, original bytes unchanged."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from curation import schema
from curation.base import Stage, column, set_columns
from curation.io.atomic import atomic_write, join
from curation.io.readers import read_bytes

CHANGED_FOLDER = "_work/changed"
"""Under OUT: Parquet files of (`source`, `sha256`) pairs whose bytes changed after their
analysis; a rerun analyses those sources again (`pipelines.curate`)."""

REREAD_FAILED = "cannot re-read for writing"
"""How the `detail` of a row the writer could not read again as analysed begins."""

KEY_HEX = 32
"""Hex digits of sha256 in a sample key (128 bits: unique within any real job)."""


def sample_key(sha256: str) -> str:
    """The content-derived key of a kept sample: only [0-9a-z], stable across reruns."""
    return sha256[:KEY_HEX]


def shard_name(bucket: str, index: int) -> str:
    """Path of a shard relative to OUT, as the data contract lays it out."""
    return f"shards/{bucket}/{bucket}-{index:06d}.tar"


def plan_bucket(rows: pa.Table, max_samples: int, max_bytes: int) -> pa.Table:
    """Cut one bucket's kept rows, sorted by key, into shards by count and bytes.

    The cut depends only on the keys and sizes, so a rerun over the same inputs writes the
    same shards with the same members.
    """
    if rows.num_rows == 0:
        return rows
    rows = rows.sort_by(schema.KEY)
    buckets, sizes = column(rows, schema.BUCKET), column(rows, schema.SIZE_BYTES, 0)
    names, index, count, used = [], 0, 0, 0
    for bucket, size in zip(buckets, sizes, strict=True):
        member = (size or 0) + 2048  # the image, its JSON and tar headers
        if count and (count >= max_samples or used + member > max_bytes):
            index, count, used = index + 1, 0, 0
        names.append(shard_name(bucket, index))
        count, used = count + 1, used + member
    return set_columns(rows, {schema.SHARD: names})


def manifest_record(row: dict[str, Any]) -> dict[str, Any]:
    """A manifest row as plain JSON data for the shard (NaN scores become null).

    Run timings are left out, so a rerun writes byte-identical shards.
    """
    out = {}
    for c in schema.MANIFEST_COLUMNS:
        if c == schema.STAGE_SECONDS:
            continue
        v = row.get(c)
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[c] = v
    return out


@dataclass(kw_only=True)
class ShardWriter(Stage):
    """Write one planned shard (all rows of one `shard` value) atomically.

    Each sample's bytes are read again from its source and checked against the manifest's
    sha256, then written unchanged as `<key>.<ext>` next to `<key>.json` (its manifest row),
    `<key>.txt` and `<key>.zh.txt` (captions, when present). Reads: the manifest columns.
    Rejects: `unreadable` when a source vanished or changed since it was analysed (the row
    leaves the shard; the pair (source, old sha256) goes to `CHANGED_FOLDER`, so that a rerun
    analyses the new bytes). Resources: 1 CPU, memory of one image at a time.
    """

    name: ClassVar[str] = "write"
    batch_size: ClassVar[int] = 0  # one shard per call (map_groups)
    output: str = ""

    def process(self, t: pa.Table) -> pa.Table:
        t = t.sort_by(schema.KEY)
        shards = set(column(t, schema.SHARD))
        assert len(shards) == 1, f"one shard per call, got {shards}"
        shard = shards.pop()
        rows = t.to_pylist()
        changed: list[tuple[str, str]] = []
        import webdataset as wds  # here, not at module level: it imports torch

        with atomic_write(join(self.output, shard)) as fh:
            writer = wds.TarWriter(fh, encoder=False, mtime=0.0)
            for row in rows:
                try:
                    data = read_bytes(
                        row[schema.SOURCE], row.get(schema.TAR_OFFSET), row[schema.SIZE_BYTES]
                    )
                    if hashlib.sha256(data).hexdigest() != row[schema.SHA256]:
                        raise OSError("content changed since it was analysed")
                except Exception as e:  # a vanished input is this row's verdict
                    # ... and a rerun analyses it again: its bytes (or its tar) changed, or
                    # it cannot be read as it was (a rewritten tar moves every later member)
                    changed.append((row[schema.SOURCE], row[schema.SHA256]))
                    row.update(
                        {
                            schema.STATUS: schema.STATUS_REJECTED,
                            schema.REASON: "unreadable",
                            schema.DETAIL: (
                                f"{REREAD_FAILED}: {e}"[:260]
                                + "; rerun to analyse it again"
                            ),
                            schema.SHARD: None,
                            schema.KEY: None,
                            schema.BUCKET: None,
                        }
                    )
                    continue
                sample = {"__key__": row[schema.KEY], row[schema.EXTENSION]: data}
                sample["json"] = json.dumps(manifest_record(row), sort_keys=True).encode()
                if row.get(schema.CAPTION_EN):
                    sample["txt"] = row[schema.CAPTION_EN].encode()
                if row.get(schema.CAPTION_ZH):
                    sample["zh.txt"] = row[schema.CAPTION_ZH].encode()
                writer.write(sample)
            writer.close()
        if changed:
            self._record_changed(shard, changed)
        fields = list(t.schema)
        for c in (schema.STATUS, schema.REASON, schema.DETAIL):
            if c not in t.column_names:
                fields.append(pa.field(c, schema.arrow_type(c)))
        return pa.Table.from_pylist(rows, schema=pa.schema(fields))

    def _record_changed(self, shard: str, changed: list[tuple[str, str]]) -> None:
        """One new file per record (named by its content: never overwritten by a rerun)."""
        table = pa.table({schema.SOURCE: [s for s, _ in changed],
                          schema.SHA256: [h for _, h in changed]})
        digest = hashlib.sha256("\n".join(f"{s}\t{h}" for s, h in changed).encode()).hexdigest()
        stem = shard.rsplit("/", 1)[-1].removesuffix(".tar")
        import pyarrow.parquet as pq

        with atomic_write(join(self.output, CHANGED_FOLDER, f"{stem}-{digest[:16]}.parquet")) as fh:
            pq.write_table(table, fh)
