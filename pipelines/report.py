"""Tables and the auditor's HTML report, all from a finished job's `stats.json`."""

from __future__ import annotations

import html
import json
from typing import Any

import fsspec

from curation.io.atomic import atomic_write, join


def load_stats(output: str) -> dict[str, Any]:
    """The `stats.json` of a finished job.

    Raises:
        ValueError: OUT holds no finished job.
    """
    fs, root = fsspec.core.url_to_fs(output)
    path = root.rstrip("/") + "/stats.json"
    if not fs.exists(root.rstrip("/") + "/_SUCCESS") or not fs.exists(path):
        raise ValueError(f"{output} holds no finished curation job (no _SUCCESS / stats.json)")
    with fs.open(path, "r") as fh:
        return json.load(fh)


def _median(b: dict[str, Any], score: str) -> str:
    s = b.get("scores", {}).get(score)
    return f"{s['p50']:.3g}" if s else "-"


def bucket_rows(stats: dict[str, Any]) -> list[list[str]]:
    """One row per non-empty bucket: name, count, share, bytes, shards, median scores."""
    kept = max(1, stats["kept"])
    rows = []
    for name, b in stats["buckets"].items():
        rows.append(
            [
                name,
                str(b["count"]),
                f"{100 * b['count'] / kept:.1f}%",
                f"{b['bytes'] / 1e6:.1f}",
                str(b["shards"]),
                str(b["captioned"]),
                _median(b, "sharpness"),
                _median(b, "native_score"),
                _median(b, "entropy"),
                _median(b, "flat_fraction"),
            ]
        )
    return rows


BUCKET_HEADER = [
    "bucket",
    "kept",
    "share",
    "MB",
    "shards",
    "captioned",
    "sharpness",
    "native",
    "entropy",
    "flat",
]


def reason_rows(stats: dict[str, Any]) -> list[list[str]]:
    """One row per outcome: kept first, then each rejection reason."""
    total = max(1, stats["total"])
    rows = [["kept", str(stats["kept"]), f"{100 * stats['kept'] / total:.1f}%"]]
    for reason, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]):
        rows.append([reason, str(n), f"{100 * n / total:.1f}%"])
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def summary_text(stats: dict[str, Any]) -> str:
    """The end-of-job summary: per-bucket and per-reason tables."""
    parts = [
        f"{stats['total']} inputs: {stats['kept']} kept, {stats['rejected']} rejected "
        f"({stats.get('wall_seconds', 0):.1f} s)",
        "",
        format_table(BUCKET_HEADER, bucket_rows(stats)) if stats["buckets"] else "(no kept images)",
        "",
        format_table(["outcome", "count", "share"], reason_rows(stats)),
    ]
    return "\n".join(parts)


def write_report(output: str) -> str:
    """Write `OUT/report.html` for auditors and return its URI."""
    stats = load_stats(output)

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    stages = [[k, f"{v:.2f}"] for k, v in stats.get("stage_seconds", {}).items()]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>native4k report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}</style>
</head><body><h1>native4k curation report</h1>
<p>{stats["total"]} inputs, {stats["kept"]} kept, {stats["rejected"]} rejected;
{len(stats["buckets"])} buckets used, {stats.get("empty_buckets", 0)} empty.
Manifest version {stats.get("manifest_version")}.</p>
<h2>Outcomes</h2>{table(["outcome", "count", "share"], reason_rows(stats))}
<h2>Buckets</h2>{table(BUCKET_HEADER, bucket_rows(stats))}
<h2>CPU seconds per stage</h2>{table(["stage", "seconds"], stages)}
</body></html>"""
    uri = join(output, "report.html")
    with atomic_write(uri, "w") as fh:
        fh.write(doc)
    return uri
