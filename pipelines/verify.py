"""`native4k verify`: re-read every shard of a finished job and check it against the manifest.

What is checked, each finding naming the shard, the sample and the value that disagrees:

- the manifest: one row per source; status `kept` or `rejected`; kept rows have a unique key
  of `[0-9a-z_-]`, a sha256, a bucket and a shard in that bucket's folder; rejected rows have
  a reason and no shard;
- every file under `shards/` is a shard the manifest names, and every named shard exists;
- in every shard (checked in parallel, one process per CPU, with a progress bar): each member
  is a regular file named `<key>.<ext>` with no path, an expected extension (the image's,
  `json`, `txt`, `zh.txt`) and nothing that could hold code (`.pyd`, `.pickle`, `.pth`, ...);
  each kept row's key is in exactly one shard, the one the manifest names; the image bytes
  match its sha256; its `.json` member equals its manifest row; captions match; with `--deep`
  every image also decodes whole, to the manifest's size;
- `_SUCCESS` and `stats.json` agree with the manifest and with what the shards hold (rows,
  kept, rejected, reasons, per-bucket samples, bytes and shards);
- `buckets.json` and `config.yaml` are there (`config.yaml` a YAML mapping, as `report` reads
  it), and every kept sample's bucket is in the table.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from curation import schema
from curation.io.atomic import join
from curation.io.readers import check_tar_end
from curation.probe.header_probe import allow_png_text
from curation.shard.shard_writer import sample_key
from pipelines.stats import manifest_files, output_folder, read_document

KEY_RE = re.compile(r"^[0-9a-z_-]+$")
TEXT_MEMBERS = {"json": None, "txt": schema.CAPTION_EN, "zh.txt": schema.CAPTION_ZH}
UNSAFE_EXTENSIONS = frozenset(
    [
        "pyd",
        "pickle",
        "pkl",
        "pck",
        "pth",
        "pt",
        "ckpt",
        "bin",
        "npy",
        "npz",
        "joblib",
        "dill",
        "so",
        "dll",
        "dylib",
        "exe",
        "sh",
        "bat",
        "py",
        "pyc",
        "whl",
        "egg",
    ]
)
"""Member extensions that can carry code or pickled objects: never allowed in a shard."""
IMAGE_EXTENSIONS = frozenset(
    ["jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "avif", "jp2", "jxl", "heic"]
)
MAX_PER_SHARD = 200
"""Findings kept per shard (a shard that is wholly wrong says so without flooding)."""
JSON_SKIP = {schema.STAGE_SECONDS}
"""Manifest columns a shard's `.json` member leaves out (run timings)."""


@dataclass
class ShardResult:
    """What one shard holds and what is wrong with it."""

    shard: str
    keys: list[str] = field(default_factory=list)
    image_bytes: int = 0
    findings: list[str] = field(default_factory=list)


@dataclass
class VerifyResult:
    """Every finding (empty: OUT agrees with itself) and what was checked."""

    findings: list[str]
    shards: int
    samples: int
    rows: int

    @property
    def ok(self) -> bool:
        """True when nothing disagrees."""
        return not self.findings


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and not math.isfinite(a):
        a = None
    if isinstance(b, float) and not math.isfinite(b):
        b = None
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _decoded_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    allow_png_text()
    # The job's `probe.max_pixels` admitted this image; Pillow's own bomb limit (179 MP) would
    # call a kept 182 MP photograph undecodable.
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def check_shard(uri: str, shard: str, rows: pa.Table | None, deep: bool = False) -> ShardResult:
    """Read one shard from start to end and check every member against `rows`.

    Args:
        uri: where the shard is (local path or s3:// URI).
        shard: its path relative to OUT (as the manifest names it).
        rows: the kept manifest rows the manifest places in this shard (None: a shard the
            manifest does not name; its keys are still collected).
        deep: also decode every image and compare its size with the manifest's.
    """
    res = ShardResult(shard)

    def find(msg: str) -> None:
        if len(res.findings) < MAX_PER_SHARD:
            res.findings.append(f"{shard}: {msg}")

    expected = {r[schema.KEY]: r for r in rows.to_pylist()} if rows is not None else {}
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with fsspec.open(uri, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
            for m in tf:
                name = m.name
                if not m.isreg():
                    kind = "link" if m.issym() or m.islnk() else "non-file"
                    find(f"member {name!r} is a {kind} (only regular files are allowed)")
                    continue
                if "/" in name or "\\" in name or ".." in name or not name or name[0] == ".":
                    find(f"member {name!r} has an unsafe path (no folders, no '..')")
                    continue
                key, ext = name.split(".", 1) if "." in name else (name, "")
                ext_l = ext.lower()
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                if not ext:
                    find(f"member {name!r} has no extension")
                    continue
                if ext_l.rsplit(".", 1)[-1] in UNSAFE_EXTENSIONS:
                    find(f"member {name!r} is unsafe: .{ext} can hold code or pickled objects")
                    continue
                if ext in members[key]:
                    find(f"member {name!r} appears twice")
                members[key][ext] = data
            check_tar_end(fh, tf.offset)  # a stream read ends quietly at a corrupt header
    except Exception as e:  # a truncated or corrupt tar is a finding, not a crash
        find(f"cannot be read as a tar: {type(e).__name__}: {e}")
    res.keys = sorted(members)
    for key in res.keys:
        try:
            got = members[key]
            if not KEY_RE.match(key):
                find(f"sample key {key!r} is not [0-9a-z_-]")
            row = expected.get(key)
            if row is None:
                res.image_bytes += sum(
                    len(d) for e, d in got.items() if e.lower() in IMAGE_EXTENSIONS
                )
                if rows is not None:
                    find(f"holds sample {key} that the manifest does not place here")
                continue
            img_ext = row[schema.EXTENSION]
            allowed = {img_ext, *TEXT_MEMBERS}
            for ext in sorted(set(got) - allowed):
                kind = "image" if ext.lower() in IMAGE_EXTENSIONS else "unknown"
                find(f"sample {key} has an unexpected {kind} member .{ext}")
            data = got.get(img_ext)
            if data is None:
                find(f"sample {key} has no .{img_ext} image member")
            else:
                res.image_bytes += len(data)
                digest = hashlib.sha256(data).hexdigest()
                if digest != row[schema.SHA256]:
                    find(
                        f"sample {key}: .{img_ext} bytes have sha256 {digest[:16]}…, "
                        f"the manifest says {str(row[schema.SHA256])[:16]}…"
                    )
                if deep:
                    try:
                        w, h = _decoded_size(data)
                    except Exception as e:
                        find(f"sample {key}: .{img_ext} does not decode: {type(e).__name__}: {e}")
                    else:
                        if row.get(schema.ORIENTATION) in (5, 6, 7, 8):
                            w, h = h, w
                        if (w, h) != (row[schema.WIDTH], row[schema.HEIGHT]):
                            find(
                                f"sample {key}: decodes to {w}x{h}, the manifest says "
                                f"{row[schema.WIDTH]}x{row[schema.HEIGHT]}"
                            )
            _check_json(key, got.get("json"), row, find)
            for ext, col in (("txt", schema.CAPTION_EN), ("zh.txt", schema.CAPTION_ZH)):
                text = got.get(ext)
                want = row.get(col)
                if text is None and want:
                    find(f"sample {key} lacks its .{ext} member ({col} is set)")
                elif text is not None and text.decode("utf-8", "replace") != want:
                    find(f"sample {key}: .{ext} differs from the manifest's {col}")
        except Exception as e:  # any other surprise in a member is a finding, not a crash
            find(f"sample {key!r} cannot be checked: {type(e).__name__}: {e}")
    for key, row in expected.items():
        if key not in members:
            find(f"lacks sample {key} ({row[schema.SOURCE]})")
    return res


def _check_json(key: str, raw: bytes | None, row: dict[str, Any], find: Callable) -> None:
    if raw is None:
        find(f"sample {key} has no .json member")
        return
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        find(f"sample {key}: .json is not JSON ({type(e).__name__}: {e})")
        return
    if not isinstance(meta, dict):
        find(f"sample {key}: .json is not an object")
        return
    for c, want in row.items():
        if c in JSON_SKIP:
            continue
        if c not in meta:
            if want is not None:
                find(f"sample {key}: .json lacks {c} (manifest: {want!r})")
        elif not _same(meta[c], want):
            find(f"sample {key}: .json {c}={meta[c]!r}, manifest {want!r}")
    for c in sorted(set(meta) - set(row) - JSON_SKIP):
        if meta[c] is not None:
            find(f"sample {key}: .json has {c}={meta[c]!r}, which the manifest lacks")


def _manifest_findings(t: pa.Table) -> Iterable[str]:
    """Row-level checks of the manifest, vectorised; only offending rows are formatted."""
    counts = t.group_by(schema.SOURCE).aggregate([(schema.SOURCE, "count")])
    dup = counts.filter(pc.greater(counts.column(f"{schema.SOURCE}_count"), 1))
    for r in dup.to_pylist()[:MAX_PER_SHARD]:
        yield f"manifest: source {r[schema.SOURCE]} has {r[f'{schema.SOURCE}_count']} rows"
    status = t.column(schema.STATUS)
    kept = pc.fill_null(pc.equal(status, schema.STATUS_KEPT), False)
    rejected = pc.fill_null(pc.equal(status, schema.STATUS_REJECTED), False)
    other = pc.invert(pc.or_(kept, rejected))
    for r in t.filter(other).select([schema.SOURCE, schema.STATUS]).to_pylist()[:MAX_PER_SHARD]:
        yield f"manifest: row {r[schema.SOURCE]} has status {r[schema.STATUS]!r}"
    k = t.filter(kept)
    key = k.column(schema.KEY)
    bad_key = pc.invert(pc.fill_null(pc.match_substring_regex(key, KEY_RE.pattern), False))
    for r in k.filter(bad_key).select([schema.SOURCE, schema.KEY]).to_pylist()[:MAX_PER_SHARD]:
        yield f"manifest: kept row {r[schema.SOURCE]} has an invalid key {r[schema.KEY]!r}"
    wrong_place = pc.invert(
        pc.fill_null(
            pc.and_(
                pc.is_valid(k.column(schema.SHA256)),
                pc.starts_with(k.column(schema.SHARD), "shards/"),
            ),
            False,
        )
    )
    for r in k.filter(wrong_place).to_pylist()[:MAX_PER_SHARD]:
        yield (
            f"manifest: kept row {r[schema.SOURCE]} lacks a sha256, bucket or shard "
            f"(sha256={r[schema.SHA256]!r}, bucket={r[schema.BUCKET]!r}, shard={r[schema.SHARD]!r})"
        )
    keys = k.group_by(schema.KEY).aggregate([(schema.KEY, "count")])
    for r in keys.filter(pc.greater(keys.column(f"{schema.KEY}_count"), 1)).to_pylist()[:50]:
        yield f"manifest: key {r[schema.KEY]} is given to {r[f'{schema.KEY}_count']} kept rows"
    pairs = k.group_by([schema.SHARD, schema.BUCKET]).aggregate([]).to_pylist()
    for r in pairs:
        shard, bucket = r[schema.SHARD], r[schema.BUCKET]
        if shard and bucket and not shard.startswith(f"shards/{bucket}/"):
            yield f"manifest: shard {shard} holds bucket {bucket} rows, outside shards/{bucket}/"
    rj = t.filter(rejected)
    for r in rj.filter(pc.is_null(rj.column(schema.REASON))).to_pylist()[:MAX_PER_SHARD]:
        yield f"manifest: rejected row {r[schema.SOURCE]} has no reason"
    for r in rj.filter(pc.is_valid(rj.column(schema.SHARD))).to_pylist()[:MAX_PER_SHARD]:
        yield f"manifest: rejected row {r[schema.SOURCE]} names shard {r[schema.SHARD]}"
    yield from _duplicate_findings(t)


def _duplicate_findings(t: pa.Table) -> Iterable[str]:
    """Every `duplicate` row names, in `duplicate_of`, the key of another row of the manifest
    (the copy kept; for an exact copy, or a semantic duplicate whose copy a top-share rule
    then cut and none of whose group passed the cut, one a later rule rejected: its key is
    still its content's)."""
    if schema.DUPLICATE_OF not in t.column_names:
        return
    reason = t.column(schema.REASON)
    dups = t.filter(pc.fill_null(pc.equal(reason, "duplicate"), False))
    if dups.num_rows == 0:
        return
    hashes = t.column(schema.SHA256).drop_null()
    keys = pc.utf8_slice_codeunits(hashes, 0, len(sample_key("0" * 64))).unique()
    cols = [schema.SOURCE, schema.SHA256, schema.DUPLICATE_OF]
    named = pc.fill_null(pc.is_in(dups.column(schema.DUPLICATE_OF), value_set=keys), False)
    for r in dups.filter(pc.invert(named)).select(cols).to_pylist()[:MAX_PER_SHARD]:
        yield (f"manifest: duplicate row {r[schema.SOURCE]} names duplicate_of "
               f"{r[schema.DUPLICATE_OF]!r}, the key of no row of the manifest")


_JOB_ENTRIES = ("_SUCCESS", "stats.json", "manifest", "shards", "_work")
"""What a curation job writes into OUT; a folder with none of them is not an output."""


def _bucket_table_findings(table: dict[str, Any] | None, kept: pa.Table) -> Iterable[str]:
    """Every kept sample's bucket is one of `buckets.json`'s (the table the job used)."""
    if table is None:
        return
    entries = table.get("buckets")
    if not isinstance(entries, list) or not all(isinstance(b, dict) for b in entries):
        yield "buckets.json's buckets are not a list of objects"
        return
    known = {b.get("name") for b in entries}
    for bucket in sorted(set(kept.column(schema.BUCKET).to_pylist()) - known, key=str):
        yield f"kept samples are in bucket {bucket}, which buckets.json does not hold"


def _read_json(fs: Any, path: str, what: str, findings: list[str]) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        findings.append(f"{what} is missing")
        return None
    except IsADirectoryError:
        findings.append(f"{what} is a folder, not a file")
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        findings.append(f"{what} is not JSON: {e}")
        return None
    if not isinstance(data, dict):
        findings.append(f"{what} is not a JSON object")
        return None
    return data


def _summary_findings(
    success: dict[str, Any] | None,
    stats: dict[str, Any] | None,
    t: pa.Table,
    results: dict[str, ShardResult],
    on_disk: set[str],
) -> Iterable[str]:
    """`_SUCCESS` and `stats.json` against the manifest and the shards as found."""
    kept = t.filter(pc.fill_null(pc.equal(t.column(schema.STATUS), schema.STATUS_KEPT), False))
    if success is not None:
        rows = success.get("rows")
        if rows != t.num_rows or not isinstance(rows, int):
            yield f"_SUCCESS says {rows!r} rows, the manifest has {t.num_rows}"
        v = success.get("manifest_version")
        if not isinstance(v, int) or not 1 <= v <= schema.MANIFEST_VERSION:
            yield (
                f"_SUCCESS has manifest_version {v!r}; this native4k reads 1 to "
                f"{schema.MANIFEST_VERSION}"
            )
        if stats is not None and stats.get("manifest_version") != v:
            yield (
                f"_SUCCESS has manifest_version {v!r}, stats.json {stats.get('manifest_version')!r}"
            )
    if stats is None:
        return
    want = {"total": t.num_rows, "kept": kept.num_rows, "rejected": t.num_rows - kept.num_rows}
    for k, v in want.items():
        if stats.get(k) != v:
            yield f"stats.json says {k}={stats.get(k)!r}, the manifest has {v}"
    reasons = Counter(
        t.filter(pc.invert(pc.fill_null(pc.equal(t.column(schema.STATUS), "kept"), False)))
        .column(schema.REASON)
        .to_pylist()
    )
    got = stats.get("reasons", {})
    if not isinstance(got, dict):
        yield f"stats.json's reasons are {type(got).__name__}, not an object"
        got = {}
    for r in sorted(set(reasons) | set(got), key=str):
        if got.get(r, 0) != reasons.get(r, 0):
            yield f"stats.json says {got.get(r, 0)} rejected as {r}, the manifest has {reasons[r]}"
    # per bucket, from the shards as found on disk
    found: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0, "shards": 0})
    for shard in on_disk:
        parts = shard.split("/")
        if len(parts) == 3 and shard.endswith(".tar"):
            found[parts[1]]["shards"] += 1
    for res in results.values():
        parts = res.shard.split("/")
        if len(parts) == 3:
            found[parts[1]]["count"] += len(res.keys)
            found[parts[1]]["bytes"] += res.image_bytes
    buckets = stats.get("buckets", {})
    if not isinstance(buckets, dict):
        yield f"stats.json's buckets are {type(buckets).__name__}, not an object"
        buckets = {}
    for b in sorted(set(found) | set(buckets)):
        s = buckets.get(b, {"count": 0, "bytes": 0, "shards": 0})
        if not isinstance(s, dict):
            yield f"stats.json's bucket {b} is {type(s).__name__}, not an object"
            s = {}
        f = found.get(b, {"count": 0, "bytes": 0, "shards": 0})
        for k, what in (("count", "samples"), ("shards", "shards"), ("bytes", "image bytes")):
            if s.get(k) != f[k]:
                yield f"stats.json says bucket {b} has {s.get(k)} {what}, the shards hold {f[k]}"


def run_verify(
    output: str,
    *,
    deep: bool = False,
    workers: int | None = None,
    progress: bool = False,
    max_findings: int = 1000,
) -> VerifyResult:
    """Check a finished job's shards, manifest, `_SUCCESS` and `stats.json` against each other.

    Args:
        output: OUT, a local folder or an s3:// prefix.
        deep: also decode every image in full.
        workers: processes reading shards (None: one per CPU; 1: in this process).
        progress: show a progress bar over shards on stderr.
        max_findings: stop listing findings after this many.

    Returns:
        The findings (precise sentences; empty when everything agrees) and the counts checked.

    Raises:
        ValueError: OUT does not exist, is a file, or holds nothing a curation job writes.
    """
    findings: list[str] = []
    fs, root = output_folder(output)
    present = {name for name in _JOB_ENTRIES if fs.exists(f"{root}/{name}")}
    if not present:
        raise ValueError(
            f"{output} is not a curation job's output (none of {', '.join(_JOB_ENTRIES)})"
        )
    if present == {"_work"}:  # a run that stopped before writing anything, e.g. no inputs
        raise ValueError(f"{output} holds no finished curation job (only an unfinished run's "
                         "_work: `native4k curate` with the same inputs and OUT finishes it)")
    success = _read_json(fs, f"{root}/_SUCCESS", "_SUCCESS", findings)
    if success is None and findings:
        findings[-1] += ": the job did not complete"
    stats = _read_json(fs, f"{root}/stats.json", "stats.json", findings)
    table = _read_json(fs, f"{root}/buckets.json", "buckets.json", findings)
    if not fs.isfile(f"{root}/config.yaml"):
        findings.append("config.yaml is missing (a finished job writes its configuration)")
    else:
        try:
            read_document(fs, f"{root}/config.yaml", yaml.safe_load, output)
        except ValueError as e:  # `report` reads the thresholds from it
            findings.append(str(e).removeprefix(f"{output}: "))
    files = manifest_files(fs, root)
    # Every row with the columns the checks need; whole rows only for kept ones (which the
    # shards' JSON members are compared with): most rows of a job are rejected.
    t = _read_rows(fs, files, findings, SLIM_COLUMNS)
    findings.extend(_manifest_findings(t))

    # Hidden files are no shards (nothing reads them): a `.DS_Store` that Finder leaves in a
    # folder it showed was a stray shard that could not be read as a tar. Nor is an object
    # store's folder marker (a 0-byte key ending in `/`, the console's "Create folder").
    on_disk = (
        {
            f[len(root) + 1 :]
            for f in fs.find(f"{root}/shards")
            if not f.endswith("/") and not f.rsplit("/", 1)[-1].startswith(".")
        }
        if fs.exists(f"{root}/shards")
        else set()
    )
    kept = _read_rows(fs, files, [], None, kept_only=True) if files and t.num_rows else t
    is_kept = pc.fill_null(pc.equal(kept.column(schema.STATUS), schema.STATUS_KEPT), False)
    kept = kept.filter(is_kept).filter(pc.is_valid(kept.filter(is_kept).column(schema.SHARD)))
    named = set(kept.column(schema.SHARD).to_pylist())
    findings.extend(_bucket_table_findings(table, kept))
    for extra in sorted(on_disk - named):
        findings.append(f"{extra} is under shards/ but the manifest names no sample in it")
    for missing in sorted(named - on_disk):
        findings.append(f"{missing} is named by the manifest but missing on disk")

    jobs: dict[str, pa.Table | None] = {s: None for s in on_disk - named}
    kept = kept.sort_by(schema.SHARD)
    kept = kept.append_column("_row", pa.array(range(kept.num_rows), pa.int64()))
    spans = kept.group_by(schema.SHARD).aggregate([("_row", "min"), ("_row", "count")])
    kept = kept.drop_columns(["_row"])
    for r in spans.to_pylist():  # one slice of the sorted rows per shard
        if r[schema.SHARD] in on_disk:
            jobs[r[schema.SHARD]] = kept.slice(r["_row_min"], r["_row_count"])
    results = _run_shards(output, jobs, deep, workers, progress)
    for s in sorted(results):
        findings.extend(results[s].findings)

    where: dict[str, list[str]] = defaultdict(list)
    for res in results.values():
        for k in res.keys:
            where[k].append(res.shard)
    placed = dict(
        zip(kept.column(schema.KEY).to_pylist(), kept.column(schema.SHARD).to_pylist(), strict=True)
    )
    for key, shards in sorted(where.items()):
        if len(shards) > 1:
            findings.append(f"sample {key} is in {len(shards)} shards: {', '.join(sorted(shards))}")
    for key, shard in sorted(placed.items()):
        elsewhere = [s for s in where.get(key, []) if s != shard]
        if elsewhere and shard in on_disk:
            findings.append(f"sample {key} is in {elsewhere[0]}, the manifest places it in {shard}")
    findings.extend(_summary_findings(success, stats, t, results, on_disk))
    if len(findings) > max_findings:
        more = len(findings) - max_findings
        findings = [*findings[:max_findings], f"... and {more} more findings"]
    return VerifyResult(
        findings=findings,
        shards=len(results),
        samples=sum(len(r.keys) for r in results.values()),
        rows=t.num_rows,
    )


SLIM_COLUMNS = (
    schema.SOURCE,
    schema.STATUS,
    schema.REASON,
    schema.KEY,
    schema.SHA256,
    schema.SHARD,
    schema.BUCKET,
    schema.DUPLICATE_OF,
)


def _read_rows(
    fs: Any,
    files: list[str],
    findings: list[str],
    columns: tuple[str, ...] | None,
    *,
    kept_only: bool = False,
) -> pa.Table:
    """The manifest's rows (`columns`, or all), kept ones only if asked; missing columns null."""
    wanted = list(columns or schema.MANIFEST_COLUMNS)
    if not files:
        findings.append("manifest: no manifest/*.parquet")
        t = schema.MANIFEST_SCHEMA.empty_table().select(wanted)
    else:
        import pyarrow.parquet as pq

        try:
            filters = [(schema.STATUS, "=", schema.STATUS_KEPT)] if kept_only else None
            dataset = pq.ParquetDataset(files, filesystem=fs, filters=filters)
            present = set(dataset.schema.names)
            t = dataset.read(columns=[c for c in wanted if c in present] if columns else None)
        except Exception as e:
            findings.append(f"manifest: cannot be read: {type(e).__name__}: {e}")
            t = schema.MANIFEST_SCHEMA.empty_table().select(wanted)
    for c in wanted:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, schema.FIELDS[c]))
    return t


def _run_shards(
    output: str,
    jobs: dict[str, pa.Table | None],
    deep: bool,
    workers: int | None,
    progress: bool,
) -> dict[str, ShardResult]:
    """`check_shard` over every shard: in a process pool when there is more than one."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), unit="shard", desc="verify", disable=None if progress else True)
    results: dict[str, ShardResult] = {}
    order = sorted(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for s in order:
            results[s] = check_shard(join(output, s), s, jobs[s], deep)
            bar.update()
    else:
        # spawn, not fork: the caller may hold threads (Ray, an S3 client, a moto server).
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(check_shard, join(output, s), s, jobs[s], deep) for s in order]
            for fut in as_completed(futures):
                r = fut.result()
                results[r.shard] = r
                bar.update()
    bar.close()
    return results


def read_manifest(output: str, columns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """All manifest rows (selected columns) of a finished job, as dicts."""
    from pipelines.stats import read_manifest as read_table

    return read_table(output, list(columns) if columns else None).to_pylist()


def verify(output: str, *, deep: bool = False, workers: int | None = 1) -> list[str]:
    """Every disagreement in OUT, in words (empty: shards, manifest and summaries agree)."""
    return run_verify(output, deep=deep, workers=workers).findings
