"""`native4k stats`: per-bucket, per-reason (or per any column) tables from a job's manifest.

Everything is computed from `manifest/part-*.parquet` with pyarrow and numpy over whole
columns: group codes from a dictionary encoding, counts and sums by `bincount`, exact medians
by one `lexsort` per score. No Python loop touches a row, so a million-row manifest answers
in about a second (`bench/audit_tools.py stats`).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema

NULL_LABEL = "(null)"
"""How a group of null values is named in the text table."""


def finished_fs(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a finished job.

    Raises:
        ValueError: OUT holds no finished job (no `_SUCCESS` or no manifest).
    """
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/_SUCCESS"):
        output_folder(output)  # a path that is not there, or a file, is named as such
        raise ValueError(f"{output} holds no finished curation job (no _SUCCESS)")
    return fs, root


def output_folder(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of OUT, a folder (local or a prefix).

    Raises:
        ValueError: OUT does not exist or is a file.
    """
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ValueError(f"{output} is a file, not a job's folder" if fs.exists(root)
                         else f"{output} does not exist")  # fmt: skip
    return fs, root


def _read_text(fs: Any, path: str) -> str | None:
    try:
        with fs.open(path, "r") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def read_document(fs: Any, path: str, parse: Any, output: str) -> dict[str, Any]:
    """OUT's `config.yaml` or `stats.json` as a mapping ({} when absent or empty).

    Raises:
        ValueError: the file is there but is not a YAML/JSON mapping (the message names it).
    """
    import yaml

    name = path.rsplit("/", 1)[-1]
    try:
        text = _read_text(fs, path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{output}: {name} cannot be read (not UTF-8 text: {e.reason} at "
                         f"byte {e.start})") from e  # fmt: skip
    if not text:
        return {}
    try:
        data = parse(text)
    except (ValueError, yaml.YAMLError) as e:  # JSON's errors are ValueErrors
        where = getattr(e, "problem_mark", None)  # YAML's: a multi-line text with a caret
        why = f"{e.problem} at line {where.line + 1}" if where is not None else str(e)
        raise ValueError(f"{output}: {name} cannot be read ({why})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{output}: {name} is not a mapping")
    return data


_T = TypeVar("_T")


def manifest_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The manifest's Parquet files, sorted: listed, not globbed (OUT may be `run [v2]`), and
    without hidden files (`._part-0.parquet`, the AppleDouble copy macOS writes beside each
    file it copies onto exFAT or SMB)."""
    folder = f"{root.rstrip('/')}/manifest"
    names = fs.ls(folder, detail=False) if fs.isdir(folder) else []
    return sorted(
        f for f in names
        if (name := f.rstrip("/").rsplit("/", 1)[-1]).endswith(".parquet")
        and not name.startswith(".")
    )  # fmt: skip


def _parquet(fs: fsspec.AbstractFileSystem, files: list[str], read: Callable[[], _T]) -> _T:
    """`read()` of the manifest's parts; when it fails, the error names the first part that
    is no Parquet file (cut short, replaced): Arrow's own ('Parquet magic bytes not found in
    footer') names none."""
    try:
        return read()
    except (pa.ArrowException, OSError):
        for f in files:
            try:
                pq.read_metadata(f, filesystem=fs)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{f} is no readable Parquet file ({e})") from None
        raise


def read_manifest(output: str, columns: list[str] | None = None) -> pa.Table:
    """The manifest of a finished job as one table (local or s3://).

    Args:
        output: OUT, a folder or an s3:// prefix.
        columns: the columns to read (None: all). A column the manifest lacks comes back as
            nulls of its `schema.py` type (or string when undeclared).

    Raises:
        ValueError: no finished job, no manifest file, a manifest without `source` or
            `status`, or one whose row count is not the one `_SUCCESS` records (a part added
            or removed after the job: its counts would be wrong).
    """
    fs, root = finished_fs(output)
    files = manifest_files(fs, root)
    if not files:
        raise ValueError(f"{output} has no manifest (manifest/*.parquet)")
    present = set(_parquet(fs, files, lambda: pq.read_schema(files[0], filesystem=fs)).names)
    for required in (schema.SOURCE, schema.STATUS):
        if required not in present:
            raise ValueError(f"{files[0]} is not a manifest: it has no '{required}' column")
    wanted = columns if columns is not None else sorted(present)
    read = [c for c in wanted if c in present]
    table = _parquet(fs, files, lambda: pq.ParquetDataset(files, filesystem=fs).read(columns=read))
    recorded = _success_rows(fs, root)
    if recorded is not None and recorded != table.num_rows:
        raise ValueError(
            f"{output}: the manifest holds {table.num_rows} rows but _SUCCESS records {recorded} "
            f"(a manifest file added or removed since the job); `native4k verify {output}` "
            "names the difference"
        )
    for c in wanted:
        if c not in present:
            table = table.append_column(
                c, pa.nulls(table.num_rows, schema.FIELDS.get(c, pa.string()))
            )
    return table.select(wanted)


def _success_rows(fs: fsspec.AbstractFileSystem, root: str) -> int | None:
    """The manifest row count `_SUCCESS` records (None when it records none)."""
    try:
        with fs.open(f"{root}/_SUCCESS", "rb") as fh:
            rows = json.loads(fh.read()).get("rows")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return None
    return rows if isinstance(rows, int) else None


def score_columns(table: pa.Table) -> list[str]:
    """The scores of a manifest: its floating-point columns, the declared scores first."""
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    return [c for c in schema.SCORE_COLUMNS if c in floats] + sorted(
        c for c in floats if c not in schema.SCORE_COLUMNS
    )


def _codes(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[Any]]:
    """Dense integer codes of a column (nulls get their own code) and the label per code."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    enc = pc.dictionary_encode(arr, null_encoding="encode")
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, enc.dictionary.to_pylist()


def _floats(values: pa.ChunkedArray) -> np.ndarray:
    """A float column as numpy with NaN for null."""
    return pc.fill_null(values.cast(pa.float64()), math.nan).to_numpy()


PER_GROUP_MEDIANS = 2000
"""Up to this many groups, medians come from one partition per group; beyond, one lexsort."""


def _group_scores(
    codes: np.ndarray, values: np.ndarray, num_groups: int, order: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Exact mean and median of `values` per group code, ignoring NaN (NaN where empty).

    Args:
        codes: group code per row.
        values: the score per row (NaN: none).
        num_groups: number of codes.
        order: `argsort(codes, kind="stable")` when already computed (shared by all scores).
    """
    ok = np.isfinite(values)
    counts = np.bincount(codes[ok], minlength=num_groups)
    sums = np.bincount(codes[ok], weights=values[ok], minlength=num_groups)
    has = counts > 0
    mean = np.full(num_groups, math.nan)
    mean[has] = sums[has] / counts[has]
    median = np.full(num_groups, math.nan)
    if num_groups <= PER_GROUP_MEDIANS:  # a partition per group over the rows sorted by group
        if order is None:
            order = np.argsort(codes, kind="stable")
        by_group = values[order]
        ends = np.cumsum(np.bincount(codes, minlength=num_groups))
        starts = ends - np.bincount(codes, minlength=num_groups)
        for g in np.flatnonzero(has):
            chunk = by_group[starts[g] : ends[g]]
            median[g] = np.median(chunk[np.isfinite(chunk)])
        return {"mean": mean, "median": median}
    c, v = codes[ok], values[ok]
    sv = v[np.lexsort((v, c))]
    starts = np.cumsum(counts) - counts
    lo = starts + (counts - 1) // 2
    hi = starts + counts // 2
    median[has] = (sv[lo[has]] + sv[hi[has]]) / 2
    return {"mean": mean, "median": median}


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def group_stats(
    table: pa.Table, by: str, *, scores: list[str] | None = None, denominator: int | None = None
) -> list[dict[str, Any]]:
    """One summary per value of column `by`, most samples first.

    Each summary holds the value (`by`), `samples`, `kept`, `rejected`, `shards` (distinct
    non-null), `bytes` (sum of `size_bytes`), `share` (samples / `denominator`, default all
    rows), `bytes_share`, and per score its `mean` and `median` over non-null values.
    """
    n = table.num_rows
    if n == 0:
        return []
    codes, labels = _codes(table.column(by))
    g = len(labels)
    samples = np.bincount(codes, minlength=g)
    kept_mask = pc.fill_null(pc.equal(table.column(schema.STATUS), schema.STATUS_KEPT), False)
    kept = np.bincount(codes, weights=kept_mask.to_numpy(zero_copy_only=False), minlength=g)
    size = pc.fill_null(table.column(schema.SIZE_BYTES), 0).to_numpy().astype(np.float64)
    nbytes = np.bincount(codes, weights=size, minlength=g)
    shard_codes, shard_labels = _codes(table.column(schema.SHARD))
    valid = np.array([s is not None for s in shard_labels], dtype=bool)[shard_codes]
    pairs = np.unique(codes[valid] * (len(shard_labels) + 1) + shard_codes[valid])
    shards = np.bincount(pairs // (len(shard_labels) + 1), minlength=g)
    order = np.argsort(codes, kind="stable") if g <= PER_GROUP_MEDIANS else None
    per_score = {
        s: _group_scores(codes, _floats(table.column(s)), g, order)
        for s in (scores if scores is not None else score_columns(table))
    }
    total = denominator if denominator is not None else n
    all_bytes = float(nbytes.sum())
    out = []
    for i in sorted(range(g), key=lambda i: (-samples[i], str(labels[i]))):
        entry: dict[str, Any] = {
            by: labels[i],
            "samples": int(samples[i]),
            "kept": int(kept[i]),
            "rejected": int(samples[i] - kept[i]),
            "shards": int(shards[i]),
            "bytes": int(nbytes[i]),
            "share": round(float(samples[i]) / max(1, total), 6),
            "bytes_share": round(float(nbytes[i]) / all_bytes, 6) if all_bytes else 0.0,
            "scores": {
                s: {"mean": _round(v["mean"][i]), "median": _round(v["median"][i])}
                for s, v in per_score.items()
                if math.isfinite(v["mean"][i])
            },
        }
        out.append(entry)
    return out


def job_stats(table: pa.Table, by: str | None = None) -> dict[str, Any]:
    """The `native4k stats` summary of a manifest table.

    Args:
        table: manifest rows (at least `status`, `reason`, `bucket`, `shard`, `size_bytes`,
            the scores, and `by`).
        by: a manifest column to cut every row by; None: kept rows by bucket.

    Returns:
        `total`, `kept`, `rejected`, `bytes`, `kept_bytes`, `by`, `groups` (see
        `group_stats`; by bucket their share is of the kept samples, else of all rows) and
        `reasons` (rejected rows by reason, share of all rows).

    Raises:
        ValueError: `by` is not a column of the manifest.
    """
    if by is not None and by not in table.column_names:
        raise ValueError(
            f"--by {by}: no such manifest column (columns: {', '.join(table.column_names)})"
        )
    status = pc.fill_null(pc.equal(table.column(schema.STATUS), schema.STATUS_KEPT), False)
    kept_rows = table.filter(status)
    rejected_rows = table.filter(pc.invert(status))
    scores = score_columns(table)
    size = table.column(schema.SIZE_BYTES)
    if by is None:
        groups = group_stats(kept_rows, schema.BUCKET, scores=scores)
    else:
        groups = group_stats(table, by, scores=scores)
    return {
        "total": table.num_rows,
        "kept": kept_rows.num_rows,
        "rejected": rejected_rows.num_rows,
        "bytes": int(pc.sum(size).as_py() or 0),
        "kept_bytes": int(pc.sum(kept_rows.column(schema.SIZE_BYTES)).as_py() or 0),
        "by": by or schema.BUCKET,
        "rows": "kept" if by is None else "all",  # which rows the groups cut
        "groups": groups,
        "reasons": group_stats(
            rejected_rows, schema.REASON, scores=scores, denominator=table.num_rows
        ),
    }


def stats_columns(output: str, by: str | None) -> list[str]:
    """The manifest columns `job_stats` needs (the scores: every float column present)."""
    fs, root = finished_fs(output)
    files = manifest_files(fs, root)
    if not files:
        raise ValueError(f"{output} has no manifest (manifest/*.parquet)")
    sch = _parquet(fs, files, lambda: pq.read_schema(files[0], filesystem=fs))
    base = [schema.STATUS, schema.REASON, schema.BUCKET, schema.SHARD, schema.SIZE_BYTES]
    floats = [f.name for f in sch if pa.types.is_floating(f.type)]
    if by is not None and by not in sch.names:
        raise ValueError(f"--by {by}: no such manifest column (columns: {', '.join(sch.names)})")
    return list(dict.fromkeys([*base, *floats, *([by] if by else [])]))


def output_stats(output: str, by: str | None = None) -> dict[str, Any]:
    """`job_stats` of the manifest of OUT (local or s3://), reading only the needed columns."""
    return job_stats(read_manifest(output, stats_columns(output, by)), by)


# --- text -----------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _score_cell(entry: dict[str, Any], score: str) -> str:
    s = entry["scores"].get(score)
    return f"{s['mean']:.3g}/{s['median']:.3g}" if s else "-"


def count_text(n: int, noun: str) -> str:
    """`1 shard`, `2 shards`: a count and its noun (plural by an `s`) for a sentence."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def inputs_text(n: int) -> str:
    """`1 input`, `2 inputs`: a count of inputs for a sentence."""
    return count_text(n, "input")


_UNPRINTABLE = ("Cc", "Zl", "Zp", "Cs")
"""Control characters, line/paragraph separators, and lone surrogates (a name's bytes that are
not UTF-8, as Python decodes file and tar member names: a strict UTF-8 terminal refuses them)."""
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Bidirectional overrides and isolates, which would reorder the rest of a printed line."""


def printable(text: str) -> str:
    """`text` for a terminal: control characters (a crawled name's escape codes or line
    breaks), bytes that are not UTF-8 and bidirectional overrides shown as escapes, never sent
    to the terminal."""
    return "".join(c.encode("unicode_escape").decode()
                   if unicodedata.category(c) in _UNPRINTABLE or c in _BIDI else c
                   for c in text)  # fmt: skip


def _label(v: Any) -> str:
    return NULL_LABEL if v is None else printable(str(v))


def display_width(text: str) -> int:
    """Terminal columns `text` takes: 2 for a wide (CJK) character, 0 for a combining mark."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
               for c in text)  # fmt: skip


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns (by display width: a CJK name takes two
    columns a character)."""
    table = [[str(x) for x in r] for r in [header, *rows]]
    widths = [max(display_width(x) for x in col) for col in zip(*table, strict=True)]
    pad = lambda x, w: x + " " * (w - display_width(x))  # noqa: E731
    return "\n".join(
        "  ".join(pad(x, w) for x, w in zip(r, widths, strict=True)).rstrip()
        for r in [table[0], ["-" * w for w in widths], *table[1:]]
    )


def stats_text(stats: dict[str, Any]) -> str:
    """The tables `native4k stats` prints: the groups, then the rejection reasons.

    Score cells are `mean/median`; a score that no row of the job has is left out.
    """
    by = stats["by"]
    kept_only = stats["rows"] == "kept"
    scores = list(
        dict.fromkeys(s for e in (*stats["groups"], *stats["reasons"]) for s in e["scores"])
    )
    lines = [
        f"{inputs_text(stats['total'])} ({_mb(stats['bytes'])} MB): {stats['kept']} kept "
        f"({_mb(stats['kept_bytes'])} MB), {stats['rejected']} rejected",
        "",
    ]
    share_of = "kept" if kept_only else "all"
    head = [by, "samples", f"share ({share_of})", "MB", "shards"]
    if not kept_only:
        head[2:2] = ["kept", "rejected"]
    head += [f"{s} mean/med" for s in scores]
    rows = []
    for e in stats["groups"]:
        row = [_label(e[by]), str(e["samples"])]
        if not kept_only:
            row += [str(e["kept"]), str(e["rejected"])]
        row += [f"{100 * e['share']:.1f}%", _mb(e["bytes"]), str(e["shards"])]
        rows.append(row + [_score_cell(e, s) for s in scores])
    if rows:
        lines.append(format_table(head, rows))
    else:
        lines.append(f"(no {'kept images' if kept_only else 'rows'})")
    lines.append("")
    rhead = ["reason", "samples", "share (all)", "MB"] + [f"{s} mean/med" for s in scores]
    rrows = [
        [_label(e[schema.REASON]), str(e["samples"]), f"{100 * e['share']:.1f}%", _mb(e["bytes"])]
        + [_score_cell(e, s) for s in scores]
        for e in stats["reasons"]
    ]
    lines.append(format_table(rhead, rrows) if rrows else "(nothing rejected)")
    return "\n".join(lines)


def stats_json(stats: dict[str, Any]) -> str:
    """`stats` as JSON for machines (NaN never appears: empty summaries are left out)."""
    return json.dumps(stats, indent=2, sort_keys=False, allow_nan=False)
