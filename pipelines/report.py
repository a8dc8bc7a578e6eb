"""`native4k report`: one self-contained `report.html` for auditors, and the end-of-job tables.

The page holds everything it shows (plots and thumbnails as `data:` URIs, styles and a small
script inline) and a Content-Security-Policy that forbids any request, so it opens offline
and never calls out. Sections: the funnel from inputs through each rejection reason to kept;
per-bucket counts and bytes; for every score a histogram of kept against rejected with the
configured threshold (`OUT/config.yaml`); width × height coloured by outcome; contact sheets
per bucket and per rejection reason (a deterministic sample, each thumbnail labelled with key,
source and scores); the lineage source → key → shard, searchable.

Thumbnails come from reduced-size decoding: JPEGs in draft mode (the decoder's own 1/2, 1/4,
1/8 scaling), other formats decoded once and shrunk with `reduce` + `thumbnail`. Kept images
are read from their shard (a tar member), rejected ones from their source (a path, `s3://`, or
`tar-uri#member`); an input that cannot be read, or is too large to decode safely, gets a
labelled placeholder. Thumbnails are made in a process pool.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.analyze.native import CODECS, TESTS
from curation.io.atomic import atomic_write, is_local, join
from curation.io.listing import local_path, split_tar_source
from curation.io.readers import open_input
from curation.probe.header_probe import allow_png_text
from pipelines.stats import (
    count_text,
    finished_fs,
    format_table,
    inputs_text,
    job_stats,
    read_document,
    read_manifest,
    score_columns,
)

THUMB_SIDE = 240
"""Longest side of a contact-sheet thumbnail, in pixels."""
DEFAULT_SAMPLES = 8
"""Thumbnails per bucket and per rejection reason."""
SCATTER_POINTS = 20_000
"""At most this many points in the width × height plot (a deterministic subset)."""
LINEAGE_ROWS = 100_000
"""At most this many rows in the searchable lineage table (the manifest has them all)."""
NOT_DECODED = {"too_large": "not decoded: over the decompression-bomb cap"}
"""Reasons whose inputs are never decoded for a thumbnail, and why."""
NOT_READ = "not read: over the file-size cap (probe.max_file_bytes)"
"""Why a `too_large` row with no size has no thumbnail: the reader's byte cap rejected it."""


def _not_decoded(row: dict[str, Any]) -> str:
    """Why `row` (of a `NOT_DECODED` reason) has no thumbnail."""
    if row.get(schema.WIDTH) is None and row[schema.REASON] == "too_large":
        return NOT_READ
    return NOT_DECODED[row[schema.REASON]]

# --- the end-of-job tables (from stats.json, used by `native4k curate`) ----------------------


def load_stats(output: str) -> dict[str, Any]:
    """The `stats.json` of a finished job.

    Raises:
        ValueError: OUT holds no finished job.
    """
    fs, root = finished_fs(output)
    if not fs.exists(f"{root}/stats.json"):
        raise ValueError(f"{output} holds no stats.json")
    with fs.open(f"{root}/stats.json", "r") as fh:
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


NATIVE_FIRED = tuple(x for x in TESTS if x != "cfa")
"""The tests whose firing rejects an image as ``upscaled`` (`native_test` of such a row)."""


def native_rows(t: pa.Table) -> list[list[Any]]:
    """Per block-structure model (`native_codec`): images judged, rejected as ``upscaled`` (all,
    then by the test that fired) and kept by a camera's Bayer lattice although a test fired."""
    codec, test, reason = schema.NATIVE_CODEC, schema.NATIVE_TEST, schema.REASON
    judged = t.select([codec, test, reason]).filter(pc.is_valid(t.column(codec)))
    upscaled = pc.fill_null(pc.equal(judged.column(reason), "upscaled"), False)
    is_cfa = pc.fill_null(pc.equal(judged.column(test), "cfa"), False)
    lattice = pc.and_(pc.invert(upscaled), is_cfa)

    def count(rows: pa.Table, keys: list[str]) -> dict[tuple[Any, ...], int]:
        g = rows.group_by(keys).aggregate([([], "count_all")]).to_pylist()
        return {tuple(r[k] for k in keys): r["count_all"] for r in g}

    rejected = judged.filter(upscaled)
    n = count(judged, [codec])
    up = count(rejected, [codec])
    by = count(rejected, [codec, test])
    cfa = count(judged.filter(lattice), [codec])
    names = {c for (c,) in n}
    order = [c for c in CODECS if c in names] + sorted(names - set(CODECS))
    return [
        [c, n[(c,)], up.get((c,), 0), *(by.get((c, x)) or "" for x in NATIVE_FIRED),
         cfa.get((c,)) or ""]
        for c in order
    ]  # fmt: skip


def summary_text(stats: dict[str, Any]) -> str:
    """The end-of-job summary: per-bucket and per-reason tables."""
    parts = [
        f"{inputs_text(stats['total'])}: {stats['kept']} kept, {stats['rejected']} rejected "
        f"({stats.get('wall_seconds', 0):.1f} s)",
        "",
        format_table(BUCKET_HEADER, bucket_rows(stats)) if stats["buckets"] else "(no kept images)",
        "",
        format_table(["outcome", "count", "share"], reason_rows(stats)),
    ]
    return "\n".join(parts)


# --- thumbnails -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThumbJob:
    """Where one thumbnail's bytes are: a member of a tar, or a whole file."""

    uri: str  # the file to open (a shard, a source tar, or the source itself)
    member: str | None = None  # tar member name (None: the whole file)
    offset: int | None = None  # member data offset when known (no tar index needed)
    size: int | None = None  # member size with `offset`
    orientation: int | None = None  # the manifest's EXIF orientation (None: the file's own)


def open_reduced(data: bytes, side: int, max_pixels: int | None = None) -> Any:
    """Open and load `data`, JPEGs at the smallest DCT scale (1/1…1/8) that still covers `side`.

    Raises:
        ValueError: the image has more than `max_pixels` pixels (never decoded).
    """
    from PIL import Image

    allow_png_text()
    Image.MAX_IMAGE_PIXELS = None  # the cap is `max_pixels` (the job's), not Pillow's 179 MP
    im = Image.open(io.BytesIO(data))
    if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
        raise ValueError(f"{im.size[0]}x{im.size[1]} is over the decode cap")
    if im.format in ("JPEG", "MPO"):  # Pillow's name for a JPEG with an MPF preview
        im.draft("RGB", (side, side))
    im.load()
    return im


def reduced_image(
    data: bytes, side: int = THUMB_SIDE, max_pixels: int | None = None,
    orientation: int | None = None,
) -> Any:
    """Decode `data` at reduced size: at most `side` px on the longest side, RGB, upright, sRGB.

    Upright by `orientation` (1..8), the one curation recorded and the loader applies, when
    given; else by the file's EXIF (a PNG's `eXIf` after its pixels counts only there).

    JPEGs decode in draft mode (DCT scaling to the smallest of 1/1…1/8 that still covers
    `side`); other formats decode once and shrink by `reduce` then `thumbnail`.

    Raises:
        ValueError: the image has more than `max_pixels` pixels (never decoded).
        OSError / PIL errors: the bytes do not decode.
    """
    from PIL import Image, ImageOps

    from training.colour import embedded_profile, to_srgb

    im = open_reduced(data, side, max_pixels)
    icc = embedded_profile(im)
    im.thumbnail((side, side), reducing_gap=2.0)
    if orientation in range(1, 9):
        from training.data import orient

        im = orient(im, orientation)
    else:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (128, 128, 128, 255))
        im = Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")
    elif im.mode not in ("RGB", "CMYK", "L"):
        im = im.convert("RGB")
    return to_srgb(im, icc).convert("RGB")


def thumbnail_bytes(
    data: bytes, side: int = THUMB_SIDE, max_pixels: int | None = None,
    orientation: int | None = None,
) -> bytes:
    """A JPEG thumbnail of `data` (see `reduced_image`)."""
    buf = io.BytesIO()
    reduced_image(data, side, max_pixels, orientation).save(buf, "JPEG", quality=82,
                                                            optimize=True)  # fmt: skip
    return buf.getvalue()


def _read_job(job: ThumbJob, tar: tarfile.TarFile | None, fh: Any) -> bytes:
    if job.member is None:
        return fh.read()
    if job.offset is not None and job.size is not None:
        fh.seek(job.offset)
        data = fh.read(job.size)
        if len(data) != job.size:
            raise OSError(f"member truncated: {len(data)} of {job.size} bytes")
        return data
    assert tar is not None
    f = tar.extractfile(job.member)
    if f is None:
        raise OSError(f"{job.member} is not a file in the tar")
    return f.read()


def make_thumbnails(
    jobs: Sequence[ThumbJob], side: int = THUMB_SIDE, max_pixels: int | None = None
) -> list[tuple[str | None, str | None]]:
    """Thumbnails of jobs that share one `uri` (the file opened once): (data URI, error)."""
    out: list[tuple[str | None, str | None]] = []
    try:
        fh = open_input(jobs[0].uri)  # never a named pipe or device (it would block)
    except Exception as e:
        return [(None, f"cannot open: {type(e).__name__}: {e}")] * len(jobs)
    tar = None
    try:
        for job in jobs:
            try:
                if job.member is not None and job.offset is None and tar is None:
                    tar = tarfile.open(fileobj=fh, mode="r:")  # noqa: SIM115 (closed below)
                data = _read_job(job, tar, fh)
                thumb = thumbnail_bytes(data, side, max_pixels, job.orientation)
                out.append(("data:image/jpeg;base64," + base64.b64encode(thumb).decode(), None))
            except Exception as e:  # the report shows why, it never fails on one image
                # PIL names the buffer it read by its memory address: no words for a reader
                said = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
                out.append((None, f"{type(e).__name__}: {said[:160]}"))
    finally:
        if tar is not None:
            tar.close()
        fh.close()
    return out


def _thumbnails_all(
    jobs: Sequence[ThumbJob], workers: int | None, max_pixels: int | None
) -> list[tuple[str | None, str | None]]:
    """Every job's thumbnail, files opened once each, in a process pool when worthwhile."""
    by_uri: dict[str, list[int]] = {}
    for i, j in enumerate(jobs):
        by_uri.setdefault(j.uri, []).append(i)
    groups = [[jobs[i] for i in idx] for idx in by_uri.values()]
    # Large groups (many members of one shard) are split so that they spread over workers.
    chunks: list[tuple[list[int], list[ThumbJob]]] = []
    for idx, grp in zip(by_uri.values(), groups, strict=True):
        for k in range(0, len(grp), 16):
            chunks.append((idx[k : k + 16], grp[k : k + 16]))
    results: list[tuple[str | None, str | None]] = [(None, None)] * len(jobs)
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) < 8:
        done = [make_thumbnails(grp, THUMB_SIDE, max_pixels) for _, grp in chunks]
    else:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(chunks)), mp_context=get_context("spawn")
        ) as pool:
            done = list(
                pool.map(
                    make_thumbnails,
                    [g for _, g in chunks],
                    [THUMB_SIDE] * len(chunks),
                    [max_pixels] * len(chunks),
                )
            )
    for (idx, _), res in zip(chunks, done, strict=True):
        for i, r in zip(idx, res, strict=True):
            results[i] = r
    return results


def _is_file(source: str) -> bool:
    """A local file of that very name (`a.tar#b.jpg` can be a file, not a tar member)."""
    return is_local(source) and os.path.isfile(local_path(source))


def thumb_job(output: str, row: dict[str, Any]) -> ThumbJob:
    """Where a manifest row's image is: its shard member when kept, else its source."""
    turn = row.get(schema.ORIENTATION)
    if row[schema.STATUS] == schema.STATUS_KEPT and row.get(schema.SHARD):
        return ThumbJob(join(output, row[schema.SHARD]), f"{row[schema.KEY]}.{row['extension']}",
                        orientation=turn)  # fmt: skip
    source = row[schema.SOURCE]
    offset = row.get(schema.TAR_OFFSET)
    # A tar member: read from a tar (its offset), or named `….tar#member` (an older manifest);
    # a file's own name may hold `#`.
    if offset is not None or (".tar#" in source.lower() and not _is_file(source)):
        uri, member = split_tar_source(source)
        return ThumbJob(uri, member, offset, row.get(schema.SIZE_BYTES) if offset else None,
                        orientation=turn)  # fmt: skip
    return ThumbJob(source, orientation=turn)


# --- plots --------------------------------------------------------------------------------------


def _figure(
    width: float,
    height: float,
    *,
    left: float = 0.9,
    top: float = 0.35,
    bottom: float = 0.55,
    right: float = 0.2,
) -> Any:
    """A figure with fixed margins in inches (a layout engine costs ~0.3 s per plot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height
    )
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def reason_order(reasons: Iterable[str]) -> list[str]:
    """Rejection reasons in the order the job decides them (unknown ones last)."""
    known = [r for r in schema.REASONS if r in set(reasons)]
    return known + sorted(set(reasons) - set(known))


def funnel_steps(total: int, reasons: dict[str, int]) -> list[tuple[str, int, int]]:
    """(step, removed, remaining): inputs, then one step per reason in job order, then kept."""
    steps = [("inputs", 0, total)]
    left = total
    for r in reason_order(reasons):
        left -= reasons[r]
        steps.append((r, reasons[r], left))
    steps.append(("kept", 0, left))
    return steps


def funnel_plot(steps: list[tuple[str, int, int]]) -> str:
    """Horizontal bars: what remains after each step, with what the step removed."""
    longest = max((len(s[0]) for s in steps), default=0)  # "unsupported_format" was cut off
    fig = _figure(8, 0.42 * len(steps) + 1.0, left=max(1.3, 0.085 * longest + 0.25), top=0.15)
    ax = fig.add_subplot()
    names = [s[0] for s in steps]
    remaining = [s[2] for s in steps]
    removed = [s[1] for s in steps]
    y = np.arange(len(steps))[::-1]
    ax.barh(y, remaining, color="#4c72b0", label="remaining")
    ax.barh(y, removed, left=remaining, color="#dd8452", label="removed by this step")
    ax.set_yticks(y, names)
    top = max(1, steps[0][2])
    for yi, rem, rm in zip(y, remaining, removed, strict=True):
        ax.text(rem + rm + top * 0.01, yi, f"{rem}" + (f"  (−{rm})" if rm else ""), va="center")
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("inputs")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def bucket_plot(groups: list[dict[str, Any]], limit: int = 30) -> str | None:
    """Samples and bytes per bucket (the largest `limit` buckets)."""
    if not groups:
        return None
    g = groups[:limit]
    fig = _figure(8, 0.28 * len(g) + 1.4, left=1.0, top=0.7)
    ax = fig.add_subplot()
    y = np.arange(len(g))[::-1]
    ax.barh(y, [e["samples"] for e in g], color="#55a868")
    ax.set_yticks(y, [str(e["bucket"]) for e in g], fontsize=8)
    ax.set_xlabel("kept samples")
    ax2 = ax.twiny()
    ax2.plot([e["bytes"] / 1e6 for e in g], y, "o", color="#c44e52", ms=4)
    ax2.set_xlabel("MB (dots)")
    return _png(fig)


def thresholds(config: dict[str, Any], score: str) -> list[tuple[str, float]]:
    """(setting, value) of every `min_<score>` / `max_<score>` in any section of config.yaml."""
    found = []
    for section, values in sorted(config.items()):
        if not isinstance(values, dict):
            continue
        for bound in ("min", "max"):
            v = values.get(f"{bound}_{score}")
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                found.append((f"{section}.{bound}_{score}", float(v)))
    return found


def score_histogram(
    kept: np.ndarray, rejected: np.ndarray, score: str, lines: list[tuple[str, float]]
) -> str:
    """Kept and rejected values of one score on shared bins, with the thresholds drawn."""
    fig = _figure(5.2, 3.0, left=0.7, top=0.3, bottom=0.4)
    ax = fig.add_subplot()
    both = np.concatenate([kept, rejected])
    lo, hi = np.quantile(both, [0.005, 0.995]) if both.size else (0.0, 1.0)
    for _, v in lines:
        lo, hi = min(lo, v), max(hi, v)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.03
    bins = np.linspace(lo - pad, hi + pad, 41)
    ax.hist(
        np.clip(rejected, bins[0], bins[-1]),
        bins,
        color="#dd8452",
        alpha=0.75,
        label=f"rejected ({rejected.size})",
    )
    ax.hist(
        np.clip(kept, bins[0], bins[-1]),
        bins,
        color="#4c72b0",
        alpha=0.75,
        label=f"kept ({kept.size})",
    )
    for name, v in lines:
        ax.axvline(v, color="#c00000", ls="--", lw=1.5)
        ax.text(
            v,
            0.98,
            f" {name} = {v:g}",
            color="#c00000",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
        )
    ax.set_title(score, fontsize=10)
    ax.set_ylabel("inputs")
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1, 0.88))
    return _png(fig)


OUTCOME_COLORS = [
    "#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
]  # fmt: skip


def size_scatter(t: pa.Table, config: dict[str, Any]) -> str | None:
    """Width × height of every decodable input (a deterministic subset), coloured by outcome."""
    ok = pc.and_(pc.is_valid(t.column(schema.WIDTH)), pc.is_valid(t.column(schema.HEIGHT)))
    t = t.filter(ok)
    if t.num_rows == 0:
        return None
    if t.num_rows > SCATTER_POINTS:
        t = t.take(np.linspace(0, t.num_rows - 1, SCATTER_POINTS).astype(np.int64))
    w = t.column(schema.WIDTH).to_numpy()
    h = t.column(schema.HEIGHT).to_numpy()
    outcome = pc.if_else(
        pc.fill_null(pc.equal(t.column(schema.STATUS), schema.STATUS_KEPT), False),
        "kept",
        pc.fill_null(t.column(schema.REASON), "unknown"),
    ).to_numpy(zero_copy_only=False)
    fig = _figure(7, 5, left=0.8, bottom=0.6, top=0.2)
    ax = fig.add_subplot()
    names = ["kept", *reason_order(set(outcome) - {"kept"})]
    for i, name in enumerate(names):
        m = outcome == name
        if m.any():
            color = "#2ca02c" if name == "kept" else OUTCOME_COLORS[i % len(OUTCOME_COLORS)]
            ax.scatter(
                w[m],
                h[m],
                s=(40 if w.size < 300 else 8) * (1.3 if name == "kept" else 1),
                color=color,
                alpha=0.7,
                label=f"{name} ({int(m.sum())})",
                rasterized=True,
                linewidths=0,
                zorder=3 if name == "kept" else 2,  # over the duplicates of its own size
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    min_px = _section(config, "probe").get("min_pixels")
    if isinstance(min_px, int | float) and min_px > 0:
        xs = np.geomspace(max(16, w.min() * 0.8), w.max() * 1.25, 200)
        ax.plot(xs, min_px / xs, color="#555555", ls=":", lw=1, label=f"w×h = {min_px:g}")
        ax.set_ylim(max(16, h.min() * 0.8), h.max() * 1.25)
    ax.set_xlabel("width (px, after EXIF orientation)")
    ax.set_ylabel("height (px)")
    ax.legend(fontsize=7, loc="upper left", markerscale=2)
    return _png(fig)


# --- sampling and HTML -----------------------------------------------------------------------


def sample_rows(t: pa.Table, group: str, n: int) -> dict[Any, list[int]]:
    """Row indices of up to `n` rows per value of `group`, a deterministic sample.

    Rows are ordered by sha256 (source when null), which is a content hash: the sample does
    not depend on the manifest's row order, and reruns show the same thumbnails.
    """
    if t.num_rows == 0 or n <= 0:
        return {}
    order_key = pc.coalesce(t.column(schema.SHA256), t.column(schema.SOURCE))
    idx = pa.array(np.arange(t.num_rows))
    small = pa.table({"g": t.column(group), "k": order_key, "i": idx})
    small = small.sort_by([("g", "ascending"), ("k", "ascending")])
    g_codes = pc.dictionary_encode(small.column("g").combine_chunks(), null_encoding="encode")
    codes = g_codes.indices.to_numpy(zero_copy_only=False)
    labels = g_codes.dictionary.to_pylist()
    start = np.r_[0, np.flatnonzero(np.diff(codes)) + 1]
    rank = np.arange(codes.size) - np.repeat(start, np.diff(np.r_[start, codes.size]))
    take = rank < n
    rows = small.column("i").to_numpy()[take]
    out: dict[Any, list[int]] = {}
    for c, r in zip(codes[take], rows, strict=True):
        out.setdefault(labels[c], []).append(int(r))
    return out


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _card(row: dict[str, Any], thumb: tuple[str | None, str | None], scores: list[str]) -> str:
    uri, error = thumb
    if uri is not None:
        img = f'<img src="{uri}" alt="{_e(row.get(schema.KEY) or row[schema.SOURCE])}">'
    else:
        img = f'<div class="ph">no thumbnail<br><small>{_e(error)}</small></div>'
    vals = ", ".join(
        f"{s} {_fmt(row[s])}"
        for s in scores
        if isinstance(row.get(s), float) and math.isfinite(row[s])
    )
    key = row.get(schema.KEY) or "—"
    src = row[schema.SOURCE]
    short = src if len(src) <= 60 else "…" + src[-59:]
    size = (
        f"{row[schema.WIDTH]}×{row[schema.HEIGHT]}"
        if row.get(schema.WIDTH) and row.get(schema.HEIGHT)
        else "size unknown"
    )
    why = ""
    if row[schema.STATUS] != schema.STATUS_KEPT:
        why = f'<div class="why">{_e(row.get(schema.REASON))}: {_e(row.get(schema.DETAIL))}</div>'
    return (
        f'<figure class="card">{img}<figcaption><div class="key">{_e(key)}</div>'
        f'<div class="src" title="{_e(src)}">{_e(short)}</div><div>{_e(size)}</div>'
        f'<div class="scores">{_e(vals)}</div>{why}</figcaption></figure>'
    )


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element (no `</script>`, no line separators)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (
        text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    )  # fmt: skip


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:1.5em 2em;color:#222;background:#fafafa}
h1{margin-top:0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;background:#fff}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}
nav a{margin-right:1em}.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots img,.plot{background:#fff;border:1px solid #ddd}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}
.card{margin:0;background:#fff;border:1px solid #ddd;padding:5px;font-size:11px;overflow:hidden}
.card img{display:block;max-width:240px;max-height:240px;margin:0 auto}
.ph{height:135px;display:flex;align-items:center;justify-content:center;flex-direction:column;
background:repeating-linear-gradient(45deg,#eee,#eee 8px,#e4e4e4 8px,#e4e4e4 16px);
color:#555;text-align:center;padding:0 6px;word-break:break-word}
.key{font-family:monospace;font-weight:bold}.src{color:#555;word-break:break-all}
.why{color:#a00}.note{color:#666}#lineage td{font-family:monospace;font-size:12px}
#lineage-filter{width:40em;padding:4px;font-size:14px}#lineage td{text-align:left}
"""

SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('lineage-data').textContent);
  var input = document.getElementById('lineage-filter');
  var body = document.querySelector('#lineage tbody');
  var count = document.getElementById('lineage-count');
  var LIMIT = 300;
  function render(){
    var q = input.value.trim().toLowerCase();
    var terms = q ? q.split(/\\s+/) : [];
    var shown = 0, matched = 0, frag = document.createDocumentFragment();
    for (var i = 0; i < data.length; i++) {
      var r = data[i], hay = r.join(' ').toLowerCase(), ok = true;
      for (var j = 0; j < terms.length && ok; j++) ok = hay.indexOf(terms[j]) >= 0;
      if (!ok) continue;
      matched++;
      if (shown >= LIMIT) continue;
      var tr = document.createElement('tr');
      for (var k = 0; k < r.length; k++) {
        var td = document.createElement('td'); td.textContent = r[k] === null ? '' : r[k];
        tr.appendChild(td);
      }
      frag.appendChild(tr); shown++;
    }
    body.textContent = '';
    body.appendChild(frag);
    count.textContent = matched + ' of ' + data.length + ' rows match' +
      (matched > shown ? ' (first ' + shown + ' shown)' : '');
  }
  input.addEventListener('input', render);
  render();
})();
"""


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of OUT's `config.yaml`; {} where it is missing or no mapping (edited)."""
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def write_report(output: str, *, samples: int = DEFAULT_SAMPLES, workers: int | None = None) -> str:
    """Write `OUT/report.html` for auditors and return its URI.

    Args:
        output: a finished job's folder or s3:// prefix.
        samples: thumbnails per bucket and per rejection reason.
        workers: processes making thumbnails (None: one per CPU).

    Raises:
        ValueError: OUT holds no finished job.
    """
    import yaml

    fs, root = finished_fs(output)
    t = read_manifest(output)
    for c in schema.MANIFEST_COLUMNS:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, schema.FIELDS[c]))
    config = read_document(fs, f"{root}/config.yaml", yaml.safe_load, output)
    job = read_document(fs, f"{root}/stats.json", json.loads, output)
    for key, valid in (("rules", lambda v: isinstance(v, dict)),
                       ("stage_seconds", lambda v: isinstance(v, int | float))):  # fmt: skip
        section = job.get(key, {})
        if not isinstance(section, dict) or not all(map(valid, section.values())):
            raise ValueError(f"{output}: stats.json's {key} is not the mapping a job writes")
    s = job_stats(t)
    scores = score_columns(t)
    kept_mask = pc.fill_null(pc.equal(t.column(schema.STATUS), schema.STATUS_KEPT), False)
    kept_t, rej_t = t.filter(kept_mask), t.filter(pc.invert(kept_mask))
    reasons = {e["reason"] or "unknown": e["samples"] for e in s["reasons"]}
    steps = funnel_steps(s["total"], reasons)

    # plots
    hist_html = []
    for score in scores:
        k = pc.drop_null(kept_t.column(score)).to_numpy()
        r = pc.drop_null(rej_t.column(score)).to_numpy()
        k, r = k[np.isfinite(k)], r[np.isfinite(r)]
        if k.size + r.size == 0:
            continue
        lines = thresholds(config, score)
        cuts = job.get("share_cuts")
        cut = cuts.get(score) if isinstance(cuts, dict) else None
        if isinstance(cut, int | float) and math.isfinite(cut):  # a top-share rule's cut
            lines.append((f"score.{score}_top_share cut", float(cut)))
        caption = ", ".join(f"{n} = {v:g}" for n, v in lines) or "no threshold configured"
        unscored = rej_t.num_rows - r.size
        if unscored and r.size:  # e.g. analyses that stopped at an earlier rule
            caption += f"; {unscored} rejected rows have no {score}"
        hist_html.append(
            f'<figure class="plot"><img src="{score_histogram(k, r, score, lines)}" '
            f'alt="{_e(score)} histogram"><figcaption>{_e(score)}: {_e(caption)}</figcaption>'
            "</figure>"
        )
    scatter = size_scatter(t, config)
    bplot = bucket_plot(s["groups"])

    # contact sheets: kept by bucket, rejected by reason
    max_px = _section(config, "probe").get("max_pixels")
    max_px = int(max_px) if isinstance(max_px, int | float) else None
    sheets: list[tuple[str, str, list[dict[str, Any]]]] = []
    for title, table, col in (("bucket", kept_t, schema.BUCKET), ("reason", rej_t, schema.REASON)):
        picked = sample_rows(table, col, samples)
        order = (
            [e["bucket"] for e in s["groups"]]
            if col == schema.BUCKET
            else reason_order([k for k in picked if k is not None])
            + ([None] if None in picked else [])
        )
        for value in order:
            if value in picked:
                rows = table.take(picked[value]).to_pylist()
                sheets.append((title, value if value is not None else "unknown", rows))
    jobs: list[ThumbJob] = []
    slots: list[int | None] = []
    for _, _, rows in sheets:
        for row in rows:
            if row.get(schema.REASON) in NOT_DECODED:
                slots.append(None)
            else:
                slots.append(len(jobs))
                jobs.append(thumb_job(output, row))
    made = _thumbnails_all(jobs, workers, max_px)
    sheet_html = []
    i = 0
    for title, value, rows in sheets:
        cards = []
        for row in rows:
            slot = slots[i]
            i += 1
            thumb = made[slot] if slot is not None else (None, _not_decoded(row))
            cards.append(_card(row, thumb, scores))
        total = next(
            (e["samples"] for e in (s["groups"] if title == "bucket" else s["reasons"])
             if (e[title] or "unknown") == value),
            len(rows),
        )  # fmt: skip
        anchor = f"{title}-{value}"
        sheet_html.append(
            f'<h3 id="{_e(anchor)}">{_e(title)} {_e(value)} '
            f'<span class="note">({len(rows)} of {total} shown)</span></h3>'
            f'<div class="sheet">{"".join(cards)}</div>'
        )

    # lineage
    lin_cols = [schema.SOURCE, schema.KEY, schema.SHARD, schema.STATUS, schema.REASON]
    lin = t.select(lin_cols)
    lin = lin.sort_by([(schema.STATUS, "ascending"), (schema.SOURCE, "ascending")])
    truncated = lin.num_rows > LINEAGE_ROWS
    lin = lin.slice(0, LINEAGE_ROWS)
    lineage_rows = [
        list(r) for r in zip(*(lin.column(c).to_pylist() for c in lin_cols), strict=True)
    ]

    # tables
    shown = [c for c in scores if any(c in e["scores"] for e in s["groups"])]
    bucket_table = _table(
        ["bucket", "samples", "share of kept", "MB", "share of bytes", "shards"]
        + [f"{c} median" for c in shown],
        [
            [
                e["bucket"], e["samples"], f"{100 * e['share']:.1f}%", f"{e['bytes'] / 1e6:.1f}",
                f"{100 * e['bytes_share']:.1f}%", e["shards"],
                *(_fmt(e["scores"][c]["median"]) if c in e["scores"] else "-" for c in shown),
            ]
            for e in s["groups"]
        ],
    )  # fmt: skip
    funnel_table = _table(
        ["step", "removed", "remaining", "share of inputs"],
        [[n, rm or "", left, f"{100 * left / max(1, s['total']):.1f}%"] for n, rm, left in steps],
    )
    stage_table = _table(
        ["stage", "CPU seconds"], [[k, f"{v:.2f}"] for k, v in job.get("stage_seconds", {}).items()]
    )
    native = native_rows(t)
    native_table = _table(
        ["model (native_codec)", "judged", "rejected as upscaled",
         *(f"by {x}" for x in NATIVE_FIRED), "kept by a camera lattice"],
        native,
    ) if native else (
        '<p class="note">No manifest row carries native evidence (native_codec): no image '
        "reached the resolution analysis, or the manifest predates the column.</p>"
    )  # fmt: skip
    rules = job.get("rules", {})
    rule_rows = [[r, v.get("rule", ""), v.get("setting", "")] for r, v in sorted(rules.items())]

    def img(uri: str | None, alt: str) -> str:
        return (
            f'<img class="plot" src="{uri}" alt="{_e(alt)}">'
            if uri
            else (f'<p class="note">({_e(alt)}: nothing to plot)</p>')
        )

    nav = " ".join(
        f'<a href="#{a}">{n}</a>'
        for a, n in (("funnel", "funnel"), ("buckets", "buckets"), ("scores", "scores"),
                     ("native", "native evidence"), ("sizes", "sizes"),
                     ("sheets", "contact sheets"), ("lineage", "lineage"))
    )  # fmt: skip
    csp = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
    )
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>native4k report: {_e(output)}</title><style>{CSS}</style></head><body>
<h1>native4k curation report</h1>
<p><b>{_e(output)}</b>: {inputs_text(s["total"])} ({s["bytes"] / 1e6:.1f} MB),
<b>{s["kept"]} kept</b>
({s["kept_bytes"] / 1e6:.1f} MB) in {count_text(len(s["groups"]), "bucket")},
{s["rejected"]} rejected.
Manifest version {_e(job.get("manifest_version", "?"))}; wall time
{_e(job.get("wall_seconds", "?"))} s.</p>
<nav>{nav}</nav>
<h2 id="funnel">Funnel: inputs through each filter to kept</h2>
{img(funnel_plot(steps), "funnel")}
{funnel_table}
{_table(["reason", "rule", "setting"], rule_rows) if rule_rows else ""}
<h2 id="buckets">Buckets</h2>
{img(bplot, "kept samples per bucket")}
{bucket_table if s["groups"] else '<p class="note">No image was kept.</p>'}
<h2 id="scores">Scores: kept against rejected, thresholds from config.yaml</h2>
<div class="plots">{"".join(hist_html) or '<p class="note">No scores in the manifest.</p>'}</div>
<h2 id="native">Native-resolution evidence</h2>
<p class="note">Per block-structure model the detector used (the manifest's native_codec):
images it judged, those rejected as upscaled with the test that fired (native_test; the
evidence is in native_detail, native_period and native_strength; the method in
docs/native-detection.md), and those a camera's intact Bayer lattice kept although a test
fired.</p>
{native_table}
<h2 id="sizes">Width × height by outcome</h2>
{img(scatter, "width by height")}
<h2 id="sheets">Contact sheets</h2>
<p class="note">Up to {samples} per bucket and per rejection reason, chosen by content hash
(the same on every run). Kept images are read from their shard, rejected ones from their
source.</p>
{"".join(sheet_html) or '<p class="note">Nothing to show.</p>'}
<h2 id="lineage">Lineage: source → key → shard</h2>
<p><input id="lineage-filter" type="search" placeholder="filter: words of source, key, shard,
status or reason" aria-label="filter the lineage"> <span id="lineage-count"></span></p>
{
        '<p class="note">Only the first '
        + str(LINEAGE_ROWS)
        + " rows are in this page; the manifest "
        "has them all.</p>"
        if truncated
        else ""
    }
<table id="lineage"><thead><tr><th>source</th><th>key</th><th>shard</th><th>status</th>
<th>reason</th></tr></thead><tbody></tbody></table>
<h2>CPU seconds per stage</h2>
{stage_table}
<script type="application/json" id="lineage-data">{_script_json(lineage_rows)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    uri = join(output, "report.html")
    with atomic_write(uri, "w") as fh:
        fh.write(doc)
    return uri
