"""The curation job: stages composed on Ray Data, in three passes with barriers between.

0. list (in Ray): the driver only classifies its INPUT arguments and drops those another
   INPUT covers (`drop_covered_inputs`: a subfolder, a file in a folder); one Ray task per INPUT
   expands it (folder walk, URI list file) into listing blocks, and what an earlier run
   analysed is subtracted by joins in Ray, so the driver holds no per-input state; what it
   could not read (`unreadable`: `read_failed_mask`) is not, and is read again;
1. analyse (streaming): read → header probe → header thresholds → one decode with the pixel
   analyses, cheapest first, up to the first rule an image fails → pixel thresholds →
   `_work/analysis/part-*.parquet` (no bytes), one atomic file per batch named by its inputs,
   so a rerun skips what an interrupted run finished (and analyses again the images whose
   analyses stopped at a rule its thresholds now let them pass: `stale_mask`);
2. dedup (global, distributed): one stored row per source (`one_row_per_source`: a killed
   run's worker may finish a batch after the rerun listed the work) → pigeonhole bands of
   the pHash → group-by band → edges to better copies → best parent per row → pointer
   jumping to the kept copy;
3. write: decisions joined back → buckets → shard plan per bucket (deterministic) → one
   atomic tar per shard (bytes re-read, sha256 checked) → manifest, buckets.json,
   config.yaml, stats.json and `_SUCCESS` last.

This module is the only place that knows Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource.filename_provider import FilenameProvider

from curation import schema
from curation.analyze.pixel_analyzer import COMPLETE_MARKS, DECODED_MARK, PixelAnalyzer
from curation.analyze.thumbnail_maker import ThumbnailMaker
from curation.base import ModelFileError, Stage, column, pending_mask, reject, set_columns
from curation.bucket.bucketer import Bucket, Bucketer, coverage_gaps, default_table
from curation.dedup.near_dup import (
    BAND,
    CAPTIONED,
    HASH_COLUMNS,
    PARENT,
    PARENT_SHA256,
    BandSplitter,
    captioned,
    match_band,
    pick_parent,
    with_captioned,
)
from curation.io.atomic import atomic_write, is_local, join, part_name, storage_errors
from curation.io.listing import (
    TAR_EXTENSIONS,
    InputSpec,
    drop_covered_inputs,
    expand_input,
    few_local_files,
    local_path,
    plan_inputs,
    split_tar_source,
)
from curation.io.readers import (
    DONE_MEMBERS,
    META,
    NOT_REGULAR,
    SIDECAR,
    SIDECAR_ZH,
    FileReader,
    TarReader,
)
from curation.probe.header_probe import EXTENSIONS, HeaderProbe
from curation.shard.shard_writer import (
    CHANGED_FOLDER,
    REREAD_FAILED,
    ShardWriter,
    plan_bucket,
    sample_key,
)
from curation.threshold_filter import ASPECT, PIXELS, Rule, ThresholdFilter
from pipelines import grouping
from pipelines.config import ConfigError, JobConfig, dump_yaml, to_dict
from pipelines.grouping import column_sum, group_map
from pipelines.model_pass import (
    WARM_MAX_INPUTS,
    ThumbnailSink,
    WarmWorker,
    plan_models,
    run_model_pass,
    thumbnail_folder,
    thumbnail_size,
)
from pipelines.model_pass import rule_summary as model_rule_summary
from pipelines.stats import count_text, inputs_text

log = logging.getLogger("native4k")

ANALYSIS_COLUMNS = tuple(c for c in schema.MANIFEST_COLUMNS if c != schema.KEY)
KIND = "kind"  # listing column: "file" or "tar"
TAR = "tar"  # the tar URI of an analysed tar member (resume)
LISTING_SCHEMA = pa.schema(
    [(schema.SOURCE, pa.string()), (SIDECAR, pa.string()), (META, pa.string()),
     (SIDECAR_ZH, pa.string()), (KIND, pa.string())]
)
AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",  # botocore's per-service endpoint, preferred over the one above
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)
"""Non-secret S3 settings handed to a cluster's workers. Credentials are not: Ray puts a
runtime environment's variables on every worker's command line (visible in `ps` and Ray's
logs); cluster nodes take theirs from their own environment or instance role, and a local
instance's workers inherit the driver's."""


@dataclass
class JobResult:
    """What a finished job wrote and counted."""

    output: str
    stats: dict[str, Any]
    seconds: float
    skipped_inputs: int = 0
    notes: list[str] = field(default_factory=list)


# --- the recipe ---------------------------------------------------------------------------


def header_rules(cfg: JobConfig) -> list[Rule]:
    """Thresholds decided from the header, before any decode (bombs are never decoded)."""
    p = cfg.probe
    return [
        Rule(column=PIXELS, reason="too_large", max=p.max_pixels, setting="probe.max_pixels"),
        Rule(column=PIXELS, reason="too_small", min=p.min_pixels, setting="probe.min_pixels"),
        Rule(
            column=ASPECT,
            reason="aspect_ratio",
            min=p.min_aspect,
            max=p.max_aspect,
            setting="probe.min_aspect / probe.max_aspect",
        ),
    ]


def pixel_rules(cfg: JobConfig) -> list[Rule]:
    """Thresholds over the pixel scores, in the order their reasons take precedence.

    The order `PixelAnalyzer` computes the scores in (`SCORE_ORDER`: focus, the paper's
    flatness and entropy, then the native check), so that it can stop at the first rule an
    image fails: a blurred photograph is `blurry` (not `flat`, which blur also makes it), an
    enlargement of a smooth picture `flat`.
    """
    a = cfg.analyze
    return [
        Rule(
            column=schema.SHARPNESS,
            reason="blurry",
            min=a.min_sharpness,
            setting="analyze.min_sharpness",
        ),
        Rule(
            column=schema.FLAT_FRACTION,
            reason="flat",
            max=a.max_flat_fraction,
            setting="analyze.max_flat_fraction",
        ),
        Rule(
            column=schema.ENTROPY,
            reason="low_entropy",
            min=a.min_entropy,
            setting="analyze.min_entropy",
        ),
        Rule(
            column=schema.NATIVE_SCORE,
            reason="upscaled",
            min=a.min_native_score,
            setting="analyze.min_native_score",
        ),
    ]


def analysis_stages(cfg: JobConfig) -> list[Stage]:
    """The streaming stages after reading, in order.

    JPEG thumbnails are made after the pixel thresholds, for the rows the models will see
    (every decoded row with `score.score_all`): most of a real pool is rejected there.
    """
    size = thumbnail_size(cfg)
    stages: list[Stage] = [
        HeaderProbe(),
        ThresholdFilter(rules=header_rules(cfg)),
        PixelAnalyzer(
            flat_patch=cfg.analyze.flat_patch,
            flat_variance=cfg.analyze.flat_variance,
            thumbnail_size=size,
            jpeg_thumbnails=False,
            rules=pixel_rules(cfg),
            complete=cfg.analyze.score_all,
        ),
        ThresholdFilter(rules=pixel_rules(cfg)),
    ]
    if size:
        rows = "decoded" if cfg.score.score_all else "pending"
        stages.append(ThumbnailMaker(size=size, rows=rows))
    return stages


def bucket_table(cfg: JobConfig) -> list[Bucket]:
    """The configured bucket table, checked to hold every acceptable image without upscaling."""
    if cfg.bucket.buckets:
        table = sorted({Bucket.parse(b) for b in cfg.bucket.buckets})
    else:
        table = default_table(cfg.bucket.tier_scales)
    gaps = coverage_gaps(table, cfg.probe.min_pixels, cfg.probe.min_aspect, cfg.probe.max_aspect)
    if gaps:
        w, h = gaps[0]
        raise ConfigError(
            f"config key 'bucket' leaves {len(gaps)} image shapes without a bucket that needs no "
            f"upscaling (e.g. {w}x{h}); add lower-area buckets or a smaller tier scale"
        )
    return table


# --- stages that only exist to move data between passes ------------------------------------


@dataclass(kw_only=True)
class ParquetSink(Stage):
    """Write each batch (manifest columns only, no bytes) to one atomic Parquet file.

    The file is named by a digest of the batch's sources, so a retried batch rewrites the
    same file and a rerun can tell which inputs are done. Returns one row: the count.
    """

    name = "sink"
    batch_size = None  # one file per block; a batch size would re-bundle the fused pass 1
    folder: str = ""

    def process(self, t: pa.Table) -> pa.Table:
        out = schema.conform(t, ANALYSIS_COLUMNS)
        with atomic_write(join(self.folder, part_name(column(t, schema.SOURCE)))) as fh:
            pq.write_table(out, fh)
        return pa.table({"rows": [t.num_rows]})

    def __call__(self, batch: Any) -> pa.Table:  # no timing column on the count row
        return (
            self.process(batch) if batch.num_rows else pa.table({"rows": pa.array([], pa.int64())})
        )


@dataclass(kw_only=True)
class Retune(Stage):
    """Clear earlier pixel-threshold verdicts and decide them again with the current rules."""

    name = "retune"
    batch_size = None
    rules: list[Rule] = field(default_factory=list)

    def process(self, t: pa.Table) -> pa.Table:
        retunable = {r.reason for r in self.rules}
        status, reason, detail = (
            column(t, c) for c in (schema.STATUS, schema.REASON, schema.DETAIL)
        )
        for i, r in enumerate(reason):
            if r in retunable:
                status[i] = reason[i] = detail[i] = None
        t = set_columns(t, {schema.STATUS: status, schema.REASON: reason, schema.DETAIL: detail})
        return ThresholdFilter(rules=self.rules).process(t)


def stale_mask(t: pa.Table, score_all: bool) -> pa.ChunkedArray | pa.Array:
    """Rows (after `Retune`) whose stored analysis stopped early but is now needed in full.

    A decoded image whose analyses stopped at a rule it then failed, when the current
    thresholds let it pass that rule (or `analyze.score_all` asks for every score): the
    analysis pass analyses it again, and its stored row is superseded (`_drop_superseded`).
    """
    decoded = pc.is_valid(t[DECODED_MARK])
    partial_scores = pc.is_null(t[COMPLETE_MARKS[0]])
    for name in COMPLETE_MARKS[1:]:
        partial_scores = pc.or_(partial_scores, pc.is_null(t[name]))
    stale = pc.and_(decoded, partial_scores)
    if score_all:  # every score is needed, whatever the row's verdict
        return stale
    return pc.and_(stale, pc.is_null(t[schema.STATUS]))


def read_failed_mask(t: pa.Table) -> pa.ChunkedArray | pa.Array:
    """Rows of inputs that could not be read (`unreadable`), which a rerun reads again.

    A permission, I/O or network error (S3's 503 SlowDown, a connection reset), a missing
    file or a dangling link, a folder that could not be listed, a tar that could not be
    opened or that ends in error (its `#<rest>` row), a truncated tar member. Not an input
    that is no regular file (a named pipe, a device: `NOT_REGULAR`): that is what it is, and
    a rerun does not open it again. The shard writer's failed re-reads (`REREAD_FAILED`)
    are manifest rows, never analysis rows: its change records bring those inputs back
    (`_read_analysis`).
    """
    unreadable = pc.fill_null(pc.equal(t[schema.REASON], "unreadable"), False)
    special = pc.match_substring(pc.fill_null(t[schema.DETAIL], ""), f"OSError: {NOT_REGULAR}")
    return pc.and_(unreadable, pc.invert(special))


def _not_stale(t: pa.Table, rules: list[Rule], score_all: bool) -> pa.Table:
    """The stored rows whose analysis stands under the current rules (sources of `t`): not
    stale (`stale_mask`), and not a read that failed (`read_failed_mask`)."""
    t = t.filter(pc.invert(read_failed_mask(t)))
    return _only(Retune(rules=rules).process(t), score_all, stale=False).select([schema.SOURCE])


def _only(t: pa.Table, score_all: bool, stale: bool) -> pa.Table:
    """The stale rows of `t` (`stale_mask`), or the others."""
    mask = stale_mask(t, score_all)
    return t.filter(mask if stale else pc.invert(mask))


def _incomplete(t: pa.Table) -> pa.Table:
    """Stale rows no newer analysis replaced (the file could not be read again): rejected."""
    return reject(
        t,
        {
            i: ("analysis_error", "pixel analyses incomplete: the file was not analysed again")
            for i in range(t.num_rows)
        },
    )


def _drop_superseded(rows: Any, cfg: JobConfig, num_partitions: int) -> Any:
    """The stored rows without those a newer analysis of the same source replaced."""
    rows = rows.materialize()  # read three times below
    part = partial(_only, score_all=cfg.analyze.score_all)
    stale = rows.map_batches(partial(part, stale=True), batch_format="pyarrow")
    fresh = rows.map_batches(partial(part, stale=False), batch_format="pyarrow")
    sources = fresh.select_columns([schema.SOURCE])
    lone, _ = nonempty(
        grouping.join(stale, sources, "left_anti", num_partitions, on=(schema.SOURCE,))
    )
    if lone is None:
        return fresh
    return fresh.union(lone.map_batches(_incomplete, batch_format="pyarrow"))


def one_row_per_source(
    rows: Any, num_rows: int, partitions_for: Partitioning
) -> tuple[Any, int, int]:
    """`rows` (materialised, non-empty) with one row per source; also the rows left out.

    Each analysis part file is named by its batch's sources, so two runs that batch the same
    inputs differently write them twice: a killed job's worker that finishes its task after
    the rerun listed the stored work, or two jobs started on one output. The fullest row of
    each repeated source is kept (`_fullest_row`).
    """
    parts = partitions_for(num_rows)
    repeated, _ = nonempty(grouping.repeated_keys(rows, schema.SOURCE, parts))
    if repeated is None:
        return rows, num_rows, 0
    on = (schema.SOURCE,)
    single, _ = nonempty(grouping.join(rows, repeated, "left_anti", parts, on=on))
    multi, num_multi = nonempty(grouping.join(rows, repeated, "left_semi", parts, on=on))
    assert multi is not None
    chosen = group_map(multi, schema.SOURCE, _fullest_row, partitions_for(num_multi))
    out, num_out = nonempty(chosen if single is None else single.union(chosen))
    assert out is not None
    return out, num_out, num_rows - num_out


def _repeat_cause(listing: Listing, partitions_for: Partitioning) -> str:
    """Why analysis rows repeat a source: inputs listed more than once by this run, else
    work stored twice (looked for only when rows repeat)."""
    assert listing.rows is not None
    parts = partitions_for(listing.count)
    _, relisted = nonempty(grouping.repeated_keys(listing.rows, schema.SOURCE, parts))
    if relisted:
        inputs = "1 input was" if relisted == 1 else f"{relisted} inputs were"
        return f"{inputs} listed more than once: a URI list names files another INPUT lists too"
    return (
        "a worker of an interrupted run finished after the rerun listed its work, or two runs "
        "shared this output"
    )


def _fullest_row(t: pa.Table) -> pa.Table:
    """The row of one source's group with the most values set (a complete analysis wins)."""
    filled = np.zeros(t.num_rows, dtype=np.int64)
    for col in t.columns:
        filled += pc.is_valid(col).to_numpy(zero_copy_only=False)
    return t.slice(int(np.argmax(filled)), 1)


def expand_listing(
    batch: pa.Table,
    *,
    sidecar_extensions: tuple[str, ...],
    chunk: int = 100_000,
    exclude: str | None = None,
) -> Iterator[pa.Table]:
    """Ray task body: expand planned INPUTs (`uri`, `kind`) into listing rows, in chunks.

    A folder or a URI list file of millions of entries streams out in blocks of `chunk`
    rows; nothing per input reaches the driver. Files under `exclude` (the job's OUT) are
    not listed.
    """
    out: dict[str, list[Any]] = {
        schema.SOURCE: [], SIDECAR: [], META: [], SIDECAR_ZH: [], KIND: []
    }
    sent = False
    for uri, kind in zip(column(batch, "uri"), column(batch, "kind"), strict=True):
        spec = InputSpec(uri, kind)
        for item in expand_input(spec, sidecar_extensions=sidecar_extensions, exclude=exclude):
            out[schema.SOURCE].append(item.uri)
            out[SIDECAR].append(item.sidecar)
            out[META].append(item.meta)
            out[SIDECAR_ZH].append(item.sidecar_zh)
            out[KIND].append(item.kind)
            if len(out[KIND]) >= chunk:
                yield pa.table(out, schema=LISTING_SCHEMA)
                sent = True
                out = {c: [] for c in out}
    if out[KIND] or not sent:
        yield pa.table(out, schema=LISTING_SCHEMA)


def tar_notes_folder(analysis: str) -> str:
    """`_work/tars`, next to pass 1's `_work/analysis`: notes of tars read to their end
    (`TarReader.done_folder`)."""
    return join(analysis.rstrip("/").rsplit("/", 1)[0], "tars")


def _with_tar(t: pa.Table) -> pa.Table:
    """Analysis rows of tar members (and of unreadable tars), with their tar's URI."""
    tars = []
    for s in column(t, schema.SOURCE):
        if "#" in s:
            tars.append(split_tar_source(s)[0])
        elif s.lower().endswith(TAR_EXTENSIONS):
            tars.append(s)
        else:
            tars.append(None)
    t = t.select([schema.SOURCE]).append_column(TAR, pa.array(tars, pa.string()))
    return t.filter(pc.is_valid(t[TAR]))


def _done_members(g: pa.Table) -> pa.Table:
    """One row per tar: the sources an earlier run analysed from it."""
    return pa.table(
        {TAR: [column(g, TAR)[0]], DONE_MEMBERS: [column(g, schema.SOURCE)]},
        schema=pa.schema([(TAR, pa.string()), (DONE_MEMBERS, pa.list_(pa.string()))]),
    )


def _apply(ds: Any, stage: Stage) -> Any:
    return ds.map_batches(
        stage, batch_format="pyarrow", zero_copy_batch=True, **stage.ray_options()
    )


# --- pass helpers --------------------------------------------------------------------------


def _finalize(t: pa.Table) -> pa.Table:
    """Pending rows become kept, with their content key and shard member extension."""
    pending = pending_mask(t)
    status = [
        schema.STATUS_KEPT if p else s
        for p, s in zip(pending, column(t, schema.STATUS), strict=True)
    ]
    keys = [
        sample_key(h) if p else None for p, h in zip(pending, column(t, schema.SHA256), strict=True)
    ]
    exts = [
        EXTENSIONS.get(f or "", None) if p else None
        for p, f in zip(pending, column(t, schema.FORMAT), strict=True)
    ]
    return set_columns(t, {schema.STATUS: status, schema.KEY: keys, schema.EXTENSION: exts})


EXACT_COPY_OF = "exact copy of "
NEAR_DUPLICATE_OF = "near duplicate of "
"""How a `duplicate` row's detail begins (pass 2); the model pass's own begin otherwise."""


def _apply_duplicates(t: pa.Table) -> pa.Table:
    """Rows with a resolved parent become `duplicate` rejections pointing at its key."""
    parents = column(t, "root")
    join_cols = [c for c in ("root", "root_sha256") if c in t.column_names]
    if not any(parents):
        return t.drop_columns(join_cols)
    roots_sha = column(t, "root_sha256")
    shas = column(t, schema.SHA256)
    status, reason, detail = (column(t, c) for c in (schema.STATUS, schema.REASON, schema.DETAIL))
    dup_of = column(t, schema.DUPLICATE_OF)
    for i, root in enumerate(parents):
        if root is None or status[i] is not None:
            continue
        kind = EXACT_COPY_OF if roots_sha[i] == shas[i] else NEAR_DUPLICATE_OF
        status[i], reason[i] = schema.STATUS_REJECTED, "duplicate"
        detail[i] = f"{kind}{root}"
        dup_of[i] = sample_key(roots_sha[i])
    t = set_columns(
        t,
        {
            schema.STATUS: status,
            schema.REASON: reason,
            schema.DETAIL: detail,
            schema.DUPLICATE_OF: dup_of,
        },
    )
    return t.drop_columns(join_cols)


def _jump(t: pa.Table) -> pa.Table:
    """One pointer-jumping step: a row whose parent has a parent takes the grandparent."""
    moved = pc.is_valid(t["gp"])
    t = t.set_column(t.schema.get_field_index(PARENT), PARENT, pc.coalesce(t["gp"], t[PARENT]))
    t = t.set_column(
        t.schema.get_field_index(PARENT_SHA256),
        PARENT_SHA256,
        pc.coalesce(t["gp_sha256"], t[PARENT_SHA256]),
    )
    t = t.drop_columns([c for c in ("gp", "gp_sha256", "gp_source") if c in t.column_names])
    return t.append_column("moved", moved)


@contextlib.contextmanager
def no_operator_reservation(rd: Any) -> Iterator[None]:
    """Turn off Ray Data's per-operator resource reservation while pass 1 runs.

    Pass 1 is one fused operator per input stream. The reservation, which keeps the operators
    of a longer pipeline from starving one another, here only leaves CPUs idle: 16 tasks of
    0.5 s on 2 CPUs took 5.7 s with it and 4.2 s without (Ray 2.60).
    """
    ctx = rd.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


def configure_progress(rd: Any, interactive: bool) -> None:
    """Progress bars on a terminal; in a log, only the job's total progress.

    Without a terminal Ray Data logs every operator's state every 10 s (about 15 lines per
    dataset), which buries the job's own lines in batch and cluster logs.
    """
    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.enable_operator_progress_bars = interactive


@contextlib.contextmanager
def quiet_ray_data(interactive: bool) -> Iterator[None]:
    """In a log, no per-dataset lines from Ray Data during the short metadata passes.

    Passes 2-4 run a dozen small datasets that finish in well under a second each; their
    start and finish lines would bury the job's own lines. On a terminal, bars stay.
    """
    consoles = [
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and "File" not in type(h).__name__  # Ray's session log file keeps every line
    ]
    saved = [h.level for h in consoles]
    if not interactive:
        for h in consoles:
            h.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h, level in zip(consoles, saved, strict=True):
            h.setLevel(level)


def input_blocks(num_inputs: int, cpus: int) -> int:
    """Blocks of the listing: pass 1 is fused into one task per block.

    At least 8 per CPU, so that the last wave of tasks leaves little idle time; beyond that,
    one per 64 inputs, so that the resume files (one per block) stay few. A block holds at
    least `FileReader.batch_size` inputs: Ray Data bundles smaller blocks up to a stage's batch
    size, which would undo the split.
    """
    per_block = FileReader.batch_size
    return max(1, min(num_inputs // per_block, max(cpus * 8, num_inputs // 64)))


@dataclass(frozen=True)
class Partitioning:
    """Shuffle partitions that fit the job: one per `rows_per_partition`, at most 2 per CPU."""

    cpus: int
    rows_per_partition: int

    def __call__(self, num_rows: int) -> int:
        return max(1, min(max(1, self.cpus * 2), -(-num_rows // self.rows_per_partition)))


def nonempty(ds: Any) -> tuple[Any | None, int]:
    """Materialise `ds` and keep only the blocks that hold rows; (None, 0) when none does.

    Ray Data does not call a map's function on an empty block, so an empty block keeps its
    input's columns rather than the ones the map adds; a hash shuffle whose map task meets
    such a block first plans every partition without the key column. Every shuffle of the
    job therefore reads a dataset passed through here, and a pass with no rows is skipped.
    """
    import ray

    refs: list[Any] = []
    rows = 0
    for bundle in ds.materialize().iter_internal_ref_bundles():
        for entry in bundle.blocks:
            if entry.metadata.num_rows:
                refs.append(entry.ref)
                rows += entry.metadata.num_rows
    if not refs:
        return None, 0
    return ray.data.from_arrow_refs(refs), rows


def _kept(t: pa.Table) -> pa.Table:
    return t.filter(pc.fill_null(pc.equal(t[schema.STATUS], schema.STATUS_KEPT), False))


def _not_kept(t: pa.Table) -> pa.Table:
    return t.filter(pc.invert(pc.fill_null(pc.equal(t[schema.STATUS], schema.STATUS_KEPT), False)))


CAPTION_COLUMNS = (schema.CAPTION_EN, schema.CAPTION_ZH)


def _hashed_pending(t: pa.Table) -> pa.Table:
    return with_captioned(
        t.filter(pc.and_(pc.is_null(t[schema.STATUS]), pc.is_valid(t[schema.PHASH])))
    )


def dedup_decisions(
    rows: Any,
    cfg: JobConfig,
    partitions_for: Partitioning,
    not_roots: frozenset[str] = frozenset(),
) -> Any | None:
    """Distributed duplicate resolution: (source → root source, root sha256) per duplicate.

    `not_roots`: sample keys that may stand for nothing but their exact copies (a model rule
    rejected them: their near duplicates are judged in their place).
    Returns None when the job has no duplicate (nothing to join back).
    """
    k = cfg.dedup.max_hamming
    hashed, num_hashed = nonempty(
        rows.select_columns([*HASH_COLUMNS, *CAPTION_COLUMNS, schema.STATUS]).map_batches(
            _hashed_pending, batch_format="pyarrow"
        )
    )
    if hashed is None or num_hashed < 2:
        return None
    banded, num_banded = nonempty(_apply(hashed, BandSplitter(max_distance=k)))
    edges, num_edges = nonempty(
        group_map(banded, BAND, lambda g: match_band(g, k), partitions_for(num_banded))
    )
    if edges is not None and not_roots:
        edges, num_edges = nonempty(
            edges.map_batches(_other_parents(not_roots), batch_format="pyarrow")
        )
    if edges is None:
        return None
    parts = partitions_for(num_edges)
    parents = group_map(edges, schema.SOURCE, pick_parent, parts).select_columns(
        [schema.SOURCE, PARENT, PARENT_SHA256]
    )
    parents, _ = nonempty(parents)
    assert parents is not None  # every edge's source keeps one parent
    for _ in range(64):  # pointer jumping halves every chain; 64 rounds cover any job
        grand = parents.select_columns([schema.SOURCE, PARENT, PARENT_SHA256]).rename_columns(
            {schema.SOURCE: "gp_source", PARENT: "gp", PARENT_SHA256: "gp_sha256"}
        )
        joined = grouping.join(
            parents, grand, "left_outer", parts, on=(PARENT,), right_on=("gp_source",)
        )
        stepped, _ = nonempty(joined.map_batches(_jump, batch_format="pyarrow"))
        assert stepped is not None  # a left join keeps every row
        moved = column_sum(stepped, "moved")
        parents, _ = nonempty(stepped.drop_columns(["moved"]))
        if moved == 0:
            break
    return parents.rename_columns({PARENT: "root", PARENT_SHA256: "root_sha256"})


def _other_parents(not_roots: frozenset[str]) -> Callable[[pa.Table], pa.Table]:
    """Drop the edges to a parent in `not_roots` (sample keys) but from its exact copies."""

    def run(t: pa.Table) -> pa.Table:
        shas, parents = column(t, schema.SHA256), column(t, PARENT_SHA256)
        keep = [p == s or sample_key(p) not in not_roots for s, p in zip(shas, parents,
                                                                          strict=True)]
        return t.filter(pa.array(keep, pa.bool_()))

    return run


def _near_duplicate_pointers(t: pa.Table) -> pa.Table:
    """`duplicate_of` of pass 2's near duplicates (not exact copies, not the model pass's)."""
    detail = column(t, schema.DETAIL)
    near = [
        r == "duplicate" and (d or "").startswith(NEAR_DUPLICATE_OF)
        for r, d in zip(column(t, schema.REASON), detail, strict=True)
    ]
    return t.filter(pa.array(near, pa.bool_())).select([schema.DUPLICATE_OF])


def _rejected_keys(reasons: frozenset[str]) -> Callable[[pa.Table], pa.Table]:
    """The sample keys of the rows the model pass rejected for one of `reasons`."""

    def run(t: pa.Table) -> pa.Table:
        keys = [
            sample_key(sha)
            for st, r, sha in zip(column(t, schema.STATUS), column(t, schema.REASON),
                                  column(t, schema.SHA256), strict=True)
            if st == schema.STATUS_REJECTED and r in reasons and sha
        ]
        return pa.table({"rejected_key": pa.array(keys, pa.string())})

    return run


def orphaned_roots(rows: Any, cfg: JobConfig, partitions_for: Partitioning) -> set[str]:
    """Sample keys that pass 2 kept for near duplicates and a model rule then rejected.

    Those duplicates were never scored, and one of them may pass every rule: the job judges
    them again without that root (`dedup_decisions(not_roots=...)`).
    """
    reasons = frozenset(model_rule_summary(cfg))
    if not reasons:
        return set()
    near, num_near = nonempty(rows.map_batches(_near_duplicate_pointers, batch_format="pyarrow"))
    if near is None:
        return set()
    rejected, num_rejected = nonempty(
        rows.select_columns([schema.STATUS, schema.REASON, schema.SHA256]).map_batches(
            _rejected_keys(reasons), batch_format="pyarrow"
        )
    )
    if rejected is None:
        return set()
    hit = grouping.join(
        near, rejected, "left_semi", partitions_for(num_near + num_rejected),
        on=(schema.DUPLICATE_OF,), right_on=("rejected_key",),
    )
    return {r[schema.DUPLICATE_OF] for r in hit.take_all()}


_ROOT_SCHEMA = pa.schema(
    [(schema.SOURCE, pa.string()), ("root", pa.string()), ("root_sha256", pa.string())]
)


def _pending_with_sha256(t: pa.Table) -> pa.Table:
    t = t.filter(pc.and_(pc.is_null(t[schema.STATUS]), pc.is_valid(t[schema.SHA256])))
    has = pa.array(captioned(t), pa.int64())
    return t.select([schema.SOURCE, schema.SHA256]).append_column(CAPTIONED, has)


def _exact_copies(g: pa.Table) -> pa.Table:
    """One sha256's rows: every source but the kept one points at it (a copy with a caption
    first, then the smallest source, as the near-duplicate ranking orders identical copies)."""
    sources = column(g, schema.SOURCE)
    ranked = zip(column(g, CAPTIONED), sources, strict=True)
    root, sha = min(ranked, key=lambda r: (-r[0], r[1]))[1], column(g, schema.SHA256)[0]
    others = [s for s in sources if s != root]
    return pa.table(
        {schema.SOURCE: others, "root": [root] * len(others), "root_sha256": [sha] * len(others)},
        schema=_ROOT_SCHEMA,
    )


def exact_copy_decisions(rows: Any, partitions_for: Partitioning) -> Any | None:
    """(source → root source, root sha256) for byte-identical copies only (`dedup.enabled`
    false): a key names its content, so copies of the same bytes are one sample: one with a
    caption kept, then the smallest source (as the near-duplicate ranking orders identical
    copies).

    Returns None when no two candidates share their bytes.
    """
    pending, num_pending = nonempty(
        rows.select_columns(
            [schema.SOURCE, schema.SHA256, *CAPTION_COLUMNS, schema.STATUS]
        ).map_batches(_pending_with_sha256, batch_format="pyarrow")
    )
    if pending is None or num_pending < 2:
        return None
    parts = partitions_for(num_pending)
    repeated, _ = nonempty(grouping.repeated_keys(pending, schema.SHA256, parts))
    if repeated is None:
        return None
    copies = grouping.join(pending, repeated, "left_semi", parts, on=(schema.SHA256,))
    decisions, _ = nonempty(group_map(copies, schema.SHA256, _exact_copies, parts))
    return decisions


# --- the job -------------------------------------------------------------------------------


def local_ray_system_config(num_cpus: int) -> dict[str, int]:
    """Ray settings for a local instance: keep idle workers instead of restarting them.

    Ray keeps one idle worker per CPU and kills the others after a second; Ray Data's shuffles
    run in a worker pool of their own (another runtime environment), so every pass of the job
    swapped one pool out for the other and paid a Python worker start (1-2 s with this
    project's imports) per task. Four map + group-by rounds on 2 CPUs: 34.9 s with Ray's
    defaults, 10.3 s with these (bench/fixed_cost.py has the job-level figures).
    """
    return {
        "num_workers_soft_limit": max(4, 3 * num_cpus),
        "idle_worker_killing_time_threshold_ms": 120_000,
    }


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a joined cluster's workers are given: `AWS_ENV`'s, never credentials."""
    return {k: environ[k] for k in AWS_ENV if k in environ}


class ClusterUnreachable(ValueError):
    """`--ray-address` names no Ray cluster that answers (a user's error: exit 2)."""


CLUSTER_PROBE_SECONDS = 10.0
"""How long `--ray-address HOST:PORT` may take to accept a connection before the job stops."""


def check_ray_address(address: str, timeout: float = CLUSTER_PROBE_SECONDS) -> None:
    """Raise `ClusterUnreachable` when `HOST:PORT` accepts no connection: Ray itself retries
    an unreachable address for more than 10 minutes (Ray 2.60), a warning every few seconds.
    Other forms (`auto`, `ray://…`) are left to Ray."""
    import socket

    match = re.fullmatch(r"([^:/\s]+):(\d+)", address.strip())
    if match is None:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout).close()
    except OSError as e:
        raise ClusterUnreachable(
            f"no Ray cluster answers at --ray-address {address} ({e.strerror or e}); give the "
            "head node's address (ray start --head prints it), or leave --ray-address out for "
            "a local Ray instance"
        ) from None


def gpu_shortfall(cfg: JobConfig, gpus: float) -> str:
    """Words for the model stages' GPUs (`score.num_gpus`, `caption.num_gpus`) that a cluster
    with `gpus` GPUs in all cannot give; "" when it can (or no stage that runs asks)."""
    plan = plan_models(cfg)
    asks = [
        (key, n)
        for key, n, runs in (
            ("score.num_gpus", cfg.score.num_gpus, plan.scores),
            ("caption.num_gpus", cfg.caption.num_gpus, plan.caption or plan.translate),
        )
        if runs and n > gpus
    ]
    return "; ".join(
        f"{key}={n:g} asks for GPUs the cluster lacks ({gpus:g} in all)" for key, n in asks
    )


def init_ray(cfg: JobConfig, address: str | None) -> Any:
    """Connect to a cluster (`address`) or start a local Ray instance."""
    import ray

    if address:
        check_ray_address(address)
    if ray.is_initialized():
        return ray
    env = worker_env(os.environ)
    runtime_env = {"env_vars": env} if env and address else None
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError as e:  # `auto` on a machine that runs no Ray
            raise ClusterUnreachable(f"--ray-address {address}: {e}") from None
    else:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.object_store_memory:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory
        cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        ray.init(runtime_env=runtime_env, _system_config=local_ray_system_config(cpus), **kwargs)
    _stop_on_sigterm()
    return ray


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), raised where the driver is, as Ctrl-C is."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _stop_on_sigterm() -> None:
    """After `ray.init`: SIGTERM stops the job the way Ctrl-C does (one line, a rerun resumes).

    `ray.init` leaves a SIGTERM handler of its own (`sys.exit(15)`: no word, and a teardown of
    about 30 s), and Ray's core then aborts with a stack dump on SIGTERM.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _arrow_fs(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for Ray's Parquet I/O, through the same fsspec settings."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    if is_local(uri):
        return None, path
    return PyFileSystem(FSSpecHandler(fs)), path


def _read_parquet(rd: Any, uri: str, **kwargs: Any) -> Any:
    """Ray Data's Parquet reader, its first (V1) datasource.

    The V2 datasource starts an actor to read the files' footers on every read: 4-5 s per
    read of a one-file folder on this project's 2-core machine, against 0.1-0.2 s for V1, and
    Ray Data does not retry that actor when its node dies (found by the two-node test). V1
    samples a few files when called, under a progress bar of its own: silenced (a job's
    output in a log keeps one line per event).
    """
    fs, fs_path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(fs_path)  # written by Ray workers: this process's listing may be stale
    filesystem, path = _arrow_fs(uri)
    ctx = rd.DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2 = ctx.enable_progress_bars = False
    try:
        return rd.read_parquet(path, filesystem=filesystem, **kwargs)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved


def _remove(uri: str) -> bool:
    """Remove a file or folder if it exists; whether it did."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return False
    fs.rm(path, recursive=True)
    return True


def _write_text(uri: str, text: str) -> None:
    with atomic_write(uri, "w") as fh:
        fh.write(text)


@dataclass
class Listing:
    """The job's inputs as a Ray dataset (`LISTING_SCHEMA`); the driver keeps only counts."""

    rows: Any | None
    count: int
    tars: int


def _kind_counts(t: pa.Table) -> pa.Table:
    return pa.table({"tars": [int(pc.sum(pc.equal(t[KIND], "tar")).as_py() or 0)]})


def _only_kind(t: pa.Table, kind: str) -> pa.Table:
    return t.filter(pc.equal(t[KIND], kind))


def list_job(
    rd: Any,
    specs: Sequence[InputSpec],
    cfg: JobConfig,
    *,
    chunk: int = 100_000,
    output: str | None = None,
) -> Listing:
    """Expand the planned INPUTs in Ray tasks (one per INPUT); see `expand_listing`.

    A folder INPUT that holds `output` (the job's OUT) does not list it.
    """
    plan = rd.from_items(
        [{"uri": s.uri, "kind": s.kind} for s in specs], override_num_blocks=max(1, len(specs))
    )
    expand = partial(
        expand_listing,
        sidecar_extensions=tuple(e.lower() for e in cfg.input.sidecar_extensions),
        chunk=chunk,
        exclude=output,
    )
    rows, count = nonempty(plan.map_batches(expand, batch_format="pyarrow", batch_size=1))
    if rows is None:
        return Listing(None, 0, 0)
    kinds = rows.map_batches(_kind_counts, batch_format="pyarrow")
    return Listing(rows, count, column_sum(kinds, "tars"))


_STALE_COLUMNS = (
    schema.SOURCE,
    schema.STATUS,
    schema.REASON,
    schema.DETAIL,
    DECODED_MARK,
    *COMPLETE_MARKS,
)


def _parquet_files(fs: Any, folder: str) -> dict[str, dict[str, Any]]:
    """File name -> fsspec details of the Parquet files in `folder` (one fresh listing)."""
    fs.invalidate_cache(folder)  # written by Ray workers, not through this process's listing
    out = {}
    for info in fs.ls(folder, detail=True):
        name = str(info["name"]).rsplit("/", 1)[-1]
        if name.endswith(".parquet"):
            out[name] = info
    return out


def _mtime(info: Mapping[str, Any]) -> float:
    """A file's modification time (s) from its fsspec details."""
    t = info.get("mtime", info.get("LastModified"))
    return t.timestamp() if hasattr(t, "timestamp") else float(t or 0.0)


def _mtimes(fs: Any, folder: str) -> dict[str, float]:
    """File name -> modification time (s) of the Parquet files in `folder` (one listing)."""
    return {name: _mtime(info) for name, info in _parquet_files(fs, folder).items()}


def _versions(fs: Any, folder: str) -> dict[str, str]:
    """File name -> version of the Parquet files in `folder` (one listing): its time, size
    and inode (ETag in an object store), which an atomic rewrite changes."""
    return {
        name: f"{_mtime(info)!r}:{info.get('size')}:{info.get('ino', info.get('ETag'))}"
        for name, info in _parquet_files(fs, folder).items()
    }


def _changed_records(output: str) -> dict[str, float]:
    """The shard writer's change records in OUT (name -> time; one listing): a pass that adds
    or rewrites one found a kept input whose bytes changed since its analysis."""
    fs, path = fsspec.core.url_to_fs(join(output, CHANGED_FOLDER))
    fs.invalidate_cache(path)  # written by Ray workers, not through this process's listing
    return _mtimes(fs, path) if fs.exists(path) else {}


def _changed_at(analysis: str) -> dict[str, float]:
    """Source -> the latest time its re-read bytes were found to differ from its analysis.

    From the shard writer's records (`CHANGED_FOLDER`, a sibling of `analysis`), dated by
    their files, as the analysis parts are: one clock, the storage's.
    """
    output = analysis.rsplit("/", 2)[0]  # `analysis` is OUT/_work/analysis
    fs, path = fsspec.core.url_to_fs(join(output, CHANGED_FOLDER))
    if not fs.exists(path):
        return {}
    out: dict[str, float] = {}
    for name, t in _mtimes(fs, path).items():
        with fs.open(f"{path.rstrip('/')}/{name}", "rb") as fh:
            for source in pq.read_table(fh, columns=[schema.SOURCE]).column(0).to_pylist():
                out[source] = max(out.get(source, t), t)
    return out


_PATH = "path"  # Ray Data's column of the file a row was read from (`include_paths`)
PART = "part"  # the name of the analysis part a stored row is in

READ_AGAIN = "read_again.json"
"""Under OUT's `_work`: the analysis parts (name -> version, `_versions`) whose failed reads
(`read_failed_mask`) a rerun read again; those rows of those versions are left out
(`_read_analysis`), so the newer row of each input stands alone."""


def _read_again_uri(analysis: str) -> str:
    """`_work/read_again.json`, next to `_work/analysis`."""
    return join(analysis.rstrip("/").rsplit("/", 1)[0], READ_AGAIN)


def _read_again_record(analysis: str) -> dict[str, str]:
    """The recorded part versions whose failed reads were read again (`READ_AGAIN`)."""
    fs, path = fsspec.core.url_to_fs(_read_again_uri(analysis))
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as fh:
        return dict(json.load(fh))


def _record_read_again(analysis: str, parts: set[str]) -> None:
    """Record the current versions of `parts` as read again, before they are (`READ_AGAIN`).

    Versions since rewritten or removed hold no row any more: their entries are dropped.
    A part rewritten by this run's analysis (a batch of the same inputs) is a new version,
    whose rows stand.
    """
    fs, path = fsspec.core.url_to_fs(analysis)
    current = _versions(fs, path)
    record = {n: v for n, v in _read_again_record(analysis).items() if current.get(n) == v}
    record.update({n: current[n] for n in parts if n in current})
    _write_text(_read_again_uri(analysis), json.dumps(record, indent=0, sort_keys=True))


def _read_again_parts(analysis: str) -> frozenset[str]:
    """The analysis parts whose failed reads a rerun read again, as they are now."""
    record = _read_again_record(analysis)
    if not record:
        return frozenset()
    fs, path = fsspec.core.url_to_fs(analysis)
    current = _versions(fs, path)
    return frozenset(n for n, v in record.items() if current.get(n) == v)


def _drop_older(
    t: pa.Table,
    *,
    changed: dict[str, float],
    parts: dict[str, float],
    read_again: frozenset[str],
    keep_part: bool,
) -> pa.Table:
    """Rows not analysed before their source's bytes were found changed, and not failed
    reads of a part a rerun read again. `keep_part`: a failed read names its part (`PART`;
    null on the other rows)."""
    names = [path.rsplit("/", 1)[-1] for path in column(t, _PATH)]
    keep = [
        source not in changed or parts.get(name, 0.0) > changed[source]
        for source, name in zip(column(t, schema.SOURCE), names, strict=True)
    ]
    failed = read_failed_mask(t)
    again = pa.array([name in read_again for name in names], pa.bool_())
    mask = pc.and_(pa.array(keep, pa.bool_()), pc.invert(pc.and_(again, failed)))
    t = t.drop_columns([_PATH])
    if keep_part:
        part = pc.if_else(failed, pa.array(names, pa.string()), pa.scalar(None, pa.string()))
        t = t.append_column(PART, part)
    return t.filter(mask)


def _read_analysis(rd: Any, analysis: str, *, keep_part: bool = False, **kwargs: Any) -> Any:
    """The stored analysis rows, less those analysed before their input's bytes changed, and
    less the failed reads a rerun read again (`READ_AGAIN`): the newer row stands.

    The shard writer re-reads each kept input and records those whose bytes no longer match
    their analysis; their older rows are left out here, so a rerun analyses the new bytes and
    keeps that row alone (a file replaced, even by its earlier self, is analysed again).
    `keep_part`: each failed read also names its part (`PART`). The columns read must
    include `reason` and `detail`.
    """
    changed = _changed_at(analysis)
    read_again = _read_again_parts(analysis)
    if not changed and not read_again and not keep_part:
        return _read_parquet(rd, analysis, **kwargs)
    fs, path = fsspec.core.url_to_fs(analysis)
    parts = _mtimes(fs, path) if changed else {}
    stored = _read_parquet(rd, analysis, include_paths=True, **kwargs)
    drop = partial(
        _drop_older, changed=changed, parts=parts, read_again=read_again, keep_part=keep_part
    )
    return stored.map_batches(drop, batch_format="pyarrow")


@dataclass
class StoredWork:
    """What earlier runs of this job analysed (`_analysed_sources`)."""

    done: Any | None  # the sources whose analysis stands (`source`), or None
    num_done: int
    num_stale: int  # stored rows to analyse again under the current thresholds
    failed: Any | None  # the stored failed reads (`source`, `part`), read again; or None


def _failed_reads(t: pa.Table) -> pa.Table:
    """The failed reads of stored rows read with their part (`keep_part`)."""
    return t.filter(read_failed_mask(t)).select([schema.SOURCE, PART])


def _parts_of(t: pa.Table) -> pa.Table:
    """The parts the rows of `t` are in, once each."""
    return pa.table({PART: pc.unique(t[PART])})


def _analysed_sources(rd: Any, analysis: str, cfg: JobConfig) -> StoredWork:
    """The sources an earlier run of this job analysed (its Parquet parts), as a dataset.

    Left out, to be analysed again: the stored rows that are stale under the current
    thresholds (`stale_mask`), and the inputs that could not be read (`read_failed_mask`),
    whose parts are recorded as read again (`READ_AGAIN`) before this run reads them.
    """
    fs, path = fsspec.core.url_to_fs(analysis)
    if not fs.exists(path) or not fs.glob(path.rstrip("/") + "/part-*.parquet"):
        return StoredWork(None, 0, 0, None)
    stored = _read_analysis(rd, analysis, keep_part=True, columns=list(_STALE_COLUMNS))
    stored = stored.materialize()  # read three times below
    num_stored = stored.count()
    done, num_done = nonempty(
        stored.map_batches(
            partial(_not_stale, rules=pixel_rules(cfg), score_all=cfg.analyze.score_all),
            batch_format="pyarrow",
        )
    )
    failed, num_failed = nonempty(stored.map_batches(_failed_reads, batch_format="pyarrow"))
    if failed is not None:
        parts = failed.map_batches(_parts_of, batch_format="pyarrow")
        _record_read_again(analysis, {r[PART] for r in parts.take_all()})
    return StoredWork(done, num_done, num_stored - num_done - num_failed, failed)


def _analyse(
    rd: Any,
    listing: Listing,
    stored: StoredWork,
    analysis: str,
    partitions_for: Partitioning,
    cfg: JobConfig,
) -> tuple[int, int]:
    """Pass 1: read, probe and analyse every input not analysed yet; rows go to `analysis`.

    What an earlier run analysed is subtracted in Ray (an anti-join for files, per-tar lists
    of done members for tars); inputs it could not read are not, and are read again (a tar
    from the members it could not read). Returns the number of inputs analysed in this run,
    and of inputs read again (a tar counts once).
    """
    assert listing.rows is not None
    analysed = stored.done
    reader_cap = cfg.probe.max_file_bytes
    parts = partitions_for(listing.count)
    streams = []
    read_again = 0
    files, num_files = nonempty(
        listing.rows.map_batches(partial(_only_kind, kind="file"), batch_format="pyarrow")
    )
    if files is not None and analysed is not None:
        files, num_files = nonempty(
            grouping.join(files, analysed, "left_anti", parts, on=(schema.SOURCE,))
        )
    if files is not None and stored.failed is not None:
        on = (schema.SOURCE,)
        read_again += nonempty(grouping.join(files, stored.failed, "left_semi", parts, on=on))[1]
    if files is not None:
        ds = files.repartition(input_blocks(num_files, partitions_for.cpus))
        streams.append(_apply(ds, FileReader(max_file_bytes=reader_cap)))
    if listing.tars:
        tars, num_tars = nonempty(
            listing.rows.map_batches(partial(_only_kind, kind="tar"), batch_format="pyarrow")
        )
        assert tars is not None
        members = None
        if analysed is not None:
            members, _ = nonempty(analysed.map_batches(_with_tar, batch_format="pyarrow"))
        if stored.failed is not None:
            failed, _ = nonempty(stored.failed.map_batches(_with_tar, batch_format="pyarrow"))
            if failed is not None:
                again = grouping.join(
                    tars, failed, "left_semi", parts, on=(schema.SOURCE,), right_on=(TAR,)
                )
                read_again += nonempty(again)[1]
        if members is not None:
            done = group_map(members, TAR, _done_members, parts)
            tars = grouping.join(
                tars, done, "left_outer", parts, on=(schema.SOURCE,), right_on=(TAR,)
            )
        reader = TarReader(max_file_bytes=reader_cap, done_folder=tar_notes_folder(analysis))
        streams.append(  # a tar's rows leave in blocks as it is read (`TarReader.blocks`)
            tars.repartition(num_tars).map_batches(
                reader.blocks, batch_format="pyarrow", zero_copy_batch=True, **reader.ray_options()
            )
        )
    analysed_now = 0
    if streams:
        sunk = []
        for ds in streams:  # stages per stream, so Ray fuses read → analyse → sink in one task
            for stage in analysis_stages(cfg):
                ds = _apply(ds, stage)
            ds = _apply(ds, ThumbnailSink(folder=thumbnail_folder(analysis)))
            sunk.append(_apply(ds, ParquetSink(folder=analysis)))
        counts = sunk[0] if len(sunk) == 1 else sunk[0].union(*sunk[1:])
        analysed_now = column_sum(counts, "rows")
    return analysed_now, read_again


def keep_listed(rows: Any, listing: Listing, num_partitions: int) -> Any:
    """Stored analysis rows of inputs this run still lists (semi-joins in Ray).

    A rerun into the same output after an input was deleted must not keep its row. Rows of
    tar members are kept when their tar is listed.
    """
    assert listing.rows is not None
    sources = listing.rows.select_columns([schema.SOURCE])
    direct = grouping.join(rows, sources, "left_semi", num_partitions, on=(schema.SOURCE,))
    if not listing.tars:
        return direct
    rest, _ = nonempty(
        grouping.join(rows, sources, "left_anti", num_partitions, on=(schema.SOURCE,))
    )
    if rest is None:
        return direct
    with_tar = rest.map_batches(_member_tar, batch_format="pyarrow")
    tars = listing.rows.map_batches(partial(_only_kind, kind="tar"), batch_format="pyarrow")
    tars = tars.select_columns([schema.SOURCE]).rename_columns({schema.SOURCE: TAR})
    members = grouping.join(with_tar, tars, "left_semi", num_partitions, on=(TAR,))
    return direct.union(members.drop_columns([TAR]))


def _member_tar(t: pa.Table) -> pa.Table:
    """The tar URI of each row that names a tar member (`tar-uri#member`), else null."""
    tars = [split_tar_source(s)[0] if "#" in s else None for s in column(t, schema.SOURCE)]
    return t.append_column(TAR, pa.array(tars, pa.string()))


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): \S")


def _task_error(text: str) -> str | None:
    """The first `Type: message` line of a Ray task error's text that is not Ray's own.

    A task's exception reaches the driver as text inside Ray's wrapper (its type is lost).
    """
    for line in text.splitlines():
        m = _RAISED.match(line)
        if m and not m.group(1).startswith("ray."):
            return line.strip()
    return None


def _model_file_error(text: str) -> str | None:
    """The message of a `ModelFileError` (a configured model that does not load) in a task's
    error text (`curation.base.ModelFileError: ...`, after the error that caused it)."""
    m = re.search(r"^(?:[\w.]*\.)?ModelFileError: (.*)$", text, re.MULTILINE)
    return m.group(1).strip()[:600] if m else None


class JobFailed(RuntimeError):
    """A pass of the job failed unexpectedly; the full traceback is in `log_path`."""

    def __init__(self, step: str, num_inputs: int, log_path: str, cause: BaseException) -> None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause))  # Ray colours its task names
        first = (text.strip().splitlines() or [""])[0][:200]
        what = f"{type(cause).__name__}: {first}"
        raised = _task_error(text) if first.startswith("ray::") else None
        if raised:  # the error raised in the task (a full disk), not Ray's wrapper
            what = f"{raised[:200]}, in {first.split(' (pid=')[0]}"
        model = _model_file_error(text)  # in a task's error text (a Ray error may also be
        if model is None and isinstance(cause, ModelFileError):  # an instance of it)
            model = str(cause)
        if model:  # the same command would fail the same way: the setting must change
            message = (
                f"the {step} pass could not load a model: {model}; correct that setting "
                f"(`native4k models` lists them) and rerun: the work done so far is kept; "
                f"full traceback in {log_path}"
            )
        else:
            message = (
                f"the {step} pass failed on {inputs_text(num_inputs)} ({what}); "
                f"full traceback in {log_path}; rerun the same command to resume"
            )
        super().__init__(message)
        self.step, self.num_inputs, self.log_path = step, num_inputs, log_path


FAULT_ENV = "NATIVE4K_FAULT"
"""Fault injection for tests: `<pass>` raises when that pass starts on the driver;
`<pass>:kill` kills the driver there with SIGKILL (as a lost node or an OOM kill would);
`<pass>:interrupt` sends it SIGINT there (Ctrl-C);
`<pass>:lost` raises a Ray worker crash there once (as a lost node would)."""
CLUSTER_ATTEMPTS = 3  # passes 1-4 run again (resuming) when the cluster loses a node


def _log_failure(output: str, step: str, exc: BaseException) -> str:
    """Write the traceback to a log file (under OUT/_work/logs when OUT is local)."""
    import tempfile
    import traceback

    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    if is_local(output):
        folder = os.path.join(output, "_work", "logs")
        os.makedirs(folder, exist_ok=True)
    else:
        folder = tempfile.gettempdir()
    path = os.path.join(folder, f"native4k-{step}-failed-{stamp}-{os.getpid()}.log")
    text = "".join(traceback.format_exception(exc))
    with open(path, "w") as fh:
        fh.write(f"native4k curate: the {step} pass failed\n\n{text}")
    return path


@dataclass
class _Passes:
    """Runs the job's passes: times each, and turns an unexpected error into `JobFailed`."""

    output: str
    echo: Callable[[str], None]
    seconds: dict[str, float] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)

    @contextlib.contextmanager
    def run(
        self, step: str, num_inputs: int, user_errors: tuple[type[Exception], ...] = ()
    ) -> Iterator[None]:
        """Time one pass; errors other than `user_errors` become `JobFailed`."""
        start = time.perf_counter()
        try:
            fault = os.environ.get(FAULT_ENV)
            if fault in (f"{step}:kill", f"{step}:interrupt", f"{step}:term"):
                import signal

                sig = {"kill": signal.SIGKILL, "interrupt": signal.SIGINT, "term": signal.SIGTERM}
                os.kill(os.getpid(), sig[fault.rsplit(":", 1)[1]])
            if fault == step:
                raise RuntimeError(f"fault injected by {FAULT_ENV}={step}")
            if fault == f"{step}:lost" and step not in self.lost:
                self.lost.add(step)  # once: the retry must get through
                import ray

                raise ray.exceptions.WorkerCrashedError()
            yield
        except (JobFailed, ConfigError, *user_errors):
            raise
        except Exception as e:
            raise JobFailed(step, num_inputs, _log_failure(self.output, step, e), e) from e
        self.seconds[step] = round(self.seconds.get(step, 0.0) + time.perf_counter() - start, 3)


def _union(parts: Sequence[Any]) -> Any:
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _check_output_apart(specs: Sequence[InputSpec], output: str) -> None:
    """OUT may sit inside a folder INPUT (it is not listed), but not be one.

    Raises:
        ValueError: a local folder INPUT is OUT itself (by real path).
    """
    if not is_local(output):
        return
    real = os.path.realpath(local_path(output))
    for spec in specs:
        if (spec.kind == "folder" and is_local(spec.uri)
                and os.path.realpath(local_path(spec.uri)) == real):
            raise ValueError(
                f"the output folder {output} is the input folder {spec.uri}: its shards and "
                "manifest would mix with the inputs; give OUT a folder of its own (a "
                "subfolder of the input is fine)"
            )


def _check_output_folder(output: str) -> None:
    """A local OUT must be a folder this job can create and write, checked before Ray starts.

    Raises:
        ValueError: OUT, or a folder above it, is a file; or the nearest existing folder
            is not writable.
    """
    if not is_local(output):
        _check_output_store(output)
        return
    path = local_path(output)
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.islink(existing) and not os.path.exists(existing):
        raise ValueError(
            f"the output {output} cannot be created: {existing} is a link to "
            f"{os.readlink(existing)}, which does not exist (a storage not mounted?)"
        )
    if os.path.exists(existing) and not os.path.isdir(existing):
        where = "it is a file" if existing == path else f"{existing} is a file"
        raise ValueError(f"the output {output} is not a folder ({where}); give OUT a folder")
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"the output {output} cannot be written ({existing} is read-only)")
    try:  # the job creates it anyway; a system folder (/proc, /sys) says no only here
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"the output {output} cannot be created: {e.strerror or e}") from None


def _check_output_store(output: str) -> None:
    """An object-store OUT must answer (credentials, endpoint, bucket) before Ray starts.

    Raises:
        ValueError: one line with the store's own words.
    """
    try:
        fs, path = fsspec.core.url_to_fs(output)
        bucket = path.split("/", 1)[0]
        try:
            fs.info(bucket)  # `exists` says False for missing credentials too
        except FileNotFoundError:
            raise FileNotFoundError(f"no bucket {bucket!r} there") from None
        except PermissionError:  # a policy for some prefixes only: the writes will tell
            pass
    except (ImportError, *storage_errors()) as e:
        words = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"the output {output} cannot be used: {words}") from None


LOCK = "lock"
"""Under a local OUT's `_work`: the file a running job holds an exclusive `flock` on."""


def _lock_output(output: str) -> Any | None:
    """Hold an exclusive lock on a local OUT while this job runs (None for object stores).

    Two jobs writing one output remove each other's shards and temporaries, and the last
    manifest may name shards that are gone. The lock is a `flock` on `_work/lock`: the
    system drops it when the process ends however it ends (a SIGKILL too), so a rerun after
    a killed job is never refused.

    Raises:
        ValueError: another process holds the lock (its pid and host are named).
    """
    if not is_local(output):
        return None
    import fcntl
    import socket

    folder = os.path.join(local_path(output), "_work")
    os.makedirs(folder, exist_ok=True)
    fh = open(os.path.join(folder, LOCK), "a+")  # noqa: SIM115 (held for the whole job)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()[:200] or "a process that holds its lock"
        fh.close()
        raise ValueError(
            f"another curate job is writing {output} ({holder}); wait for it to finish or "
            "stop it, then rerun"
        ) from None
    except OSError as e:  # a filesystem without locks (some network mounts): run unlocked
        fh.close()
        log.warning("cannot lock %s (%s): make sure no other job writes it", output, e)
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
    fh.flush()
    return fh


def _clear_work(work: str) -> None:
    """Remove an earlier run's `_work`, all but the lock this job holds in it."""
    fs, path = fsspec.core.url_to_fs(work)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        if str(entry).rstrip("/").rsplit("/", 1)[-1] != LOCK:
            fs.rm(entry, recursive=True)


def run_curate(
    inputs: Sequence[str],
    output: str,
    cfg: JobConfig,
    *,
    ray_address: str | None = None,
    echo: Callable[[str], None] = print,
) -> JobResult:
    """Run the whole curation job; see the module docstring for its passes.

    Raises:
        ValueError: no inputs, or a wrong configuration (before any work).
        JobFailed: a pass failed; what was finished stays for a rerun to resume.
    """
    start = time.perf_counter()
    table = bucket_table(cfg)
    output = output if not is_local(output) else os.path.abspath(output.removeprefix("file://"))
    passes = _Passes(output, echo)
    with passes.run("listing", len(inputs), user_errors=(ValueError, *storage_errors())):
        specs = plan_inputs(inputs, list_extensions=cfg.input.list_extensions)
        _check_output_apart(specs, output)
        specs, covered = drop_covered_inputs(
            specs, sidecar_extensions=cfg.input.sidecar_extensions, exclude=output
        )
        if covered:
            echo(f"native4k: {covered}")
        _check_output_folder(output)
        lock = _lock_output(output)
    try:
        with passes.run("start-up", len(specs), user_errors=(ClusterUnreachable,)):
            ray = init_ray(cfg, ray_address)
            rd = ray.data
            configure_progress(rd, sys.stdout.isatty())
            cpus = int(ray.cluster_resources().get("CPU", 1))
            short = gpu_shortfall(cfg, ray.cluster_resources().get("GPU", 0.0))
            if short and not ray_address:  # a local instance never grows: its actors would wait
                raise ClusterUnreachable(f"{short}; this machine's Ray has none to give")
            if short:
                echo(f"native4k: {short}: the model pass waits for a node that has them (an "
                     "autoscaler adds one if the cluster config names GPU nodes)")
            partitions_for = Partitioning(cpus, cfg.ray.rows_per_partition)
            # A small job's actor starts now: its imports overlap the listing and the analysis.
            warm = WarmWorker.start(cfg) if few_local_files(specs, WARM_MAX_INPUTS) else None
        try:
            return _run_passes(
                rd, inputs, output, cfg, table, passes, partitions_for, specs, warm, start, echo
            )
        finally:
            if warm is not None:
                warm.stop()
    finally:
        if lock is not None:
            lock.close()  # releases the flock


def _run_passes(
    rd: Any,
    inputs: Sequence[str],
    output: str,
    cfg: JobConfig,
    table: list[Bucket],
    passes: _Passes,
    partitions_for: Partitioning,
    specs: list[InputSpec],
    warm: WarmWorker | None,
    start: float,
    echo: Callable[[str], None],
) -> JobResult:
    """`run_curate` after Ray's start: listing, then the passes (resumed after a lost node)."""

    with (
        passes.run("listing", len(specs), user_errors=(OSError,)),
        quiet_ray_data(sys.stdout.isatty()),
    ):
        listing = list_job(rd, specs, cfg, output=output)
    if not listing.count:
        raise ValueError(f"no input files found in {', '.join(inputs)}")
    work = join(output, "_work")
    analysis = join(work, "analysis")
    _remove(join(output, "_SUCCESS"))
    notes = _reset_if_changed(work, inputs, cfg)
    if _remove(join(output, "report.html")):  # it described the earlier run
        notes.append(f"removed the earlier run's report.html (native4k report {output})")
    skipped = read_again = None
    attempt, retry_changed = 1, True
    while True:
        try:
            with passes.run("listing", listing.count), quiet_ray_data(sys.stdout.isatty()):
                stored = _analysed_sources(rd, analysis, cfg)
            num_done = stored.num_done
            skipped = num_done if skipped is None else skipped
            echo(
                f"native4k: {inputs_text(listing.count)} listed; {num_done} "
                f"{'row' if num_done == 1 else 'rows'} already analysed by an earlier run"
            )

            # Pass 1: analyse, streaming, resumable; what could not be read is read again.
            with passes.run("analysis", listing.count), no_operator_reservation(rd):
                analysed_now, again = _analyse(rd, listing, stored, analysis, partitions_for, cfg)
            read_again = again if read_again is None else read_again
            echo(f"native4k: analysed {inputs_text(analysed_now)} in this run")

            with quiet_ray_data(sys.stdout.isatty()):
                stats = _decide_and_write(
                    rd,
                    cfg,
                    table,
                    output,
                    analysis,
                    listing,
                    passes,
                    partitions_for,
                    start,
                    warm,
                    superseded=stored.num_stale,
                    retry_changed=retry_changed,
                )
            break
        except InputsChanged as e:
            retry_changed = False  # once: an input that keeps changing keeps its verdict
            echo(f"native4k: {e}")
        except JobFailed as e:
            if attempt == CLUSTER_ATTEMPTS or not lost_to_the_cluster(e.__cause__):
                raise
            echo(
                f"native4k: the {e.step} pass lost a Ray node, worker or object "
                f"({type(e.__cause__).__name__}); resuming from the stored analysis "
                f"(attempt {attempt + 1} of {CLUSTER_ATTEMPTS})"
            )
            attempt += 1
            if warm is not None:
                warm.stop()  # it may be what was lost: the next attempt uses Ray Data's pools
    if read_again:
        notes.append(read_again_text(read_again))
    return JobResult(
        output, stats, time.perf_counter() - start, skipped_inputs=skipped or 0, notes=notes
    )


def read_again_text(n: int) -> str:
    """The note that `n` inputs whose read had failed were read again by this run."""
    were = "was" if n == 1 else "were"
    return f"{inputs_text(n)} that could not be read before {were} read again"


_CLUSTER_ERRORS = (
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "WorkerCrashedError",
    "ObjectLostError",
    "ObjectReconstructionFailedError",
    "OwnerDiedError",
    "RaySystemError",
)


def lost_to_the_cluster(exc: BaseException | None) -> bool:
    """Whether a failure came from the cluster losing a node, worker or object.

    Ray Data retries tasks, but not every actor it starts for itself (e.g. the Parquet footer
    readers), and an error raised on a dying node can arrive only as text (an exception
    Ray could not deserialise), so both the exception types and their text are checked.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {t.__name__ for t in type(exc).__mro__}
        if names & set(_CLUSTER_ERRORS):
            return True
        if any(n in str(exc) for n in _CLUSTER_ERRORS) or "node has died" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


MAX_DEDUP_ROUNDS = 4
"""Model passes at most per job: each after the first judges the near duplicates of roots the
one before rejected (`orphaned_roots`); a model pass takes the earlier rounds' scores from its
cache."""


def _with_decisions(rows: Any, decisions: Any | None, parts: int) -> Any:
    """The rows with pass 2's duplicates rejected (`decisions`: source → root)."""
    if decisions is None:
        return rows
    rows = grouping.join(rows, decisions, "left_outer", parts, on=(schema.SOURCE,))
    return rows.map_batches(_apply_duplicates, batch_format="pyarrow")


def _decide_and_write(
    rd: Any,
    cfg: JobConfig,
    table: list[Bucket],
    output: str,
    analysis: str,
    listing: Listing,
    passes: _Passes,
    partitions_for: Partitioning,
    started: float,
    warm: WarmWorker | None = None,
    *,
    superseded: int = 0,
    retry_changed: bool = False,
) -> dict[str, Any]:
    """Passes 2-4 over the stored analysis: dedup, shards, manifest; returns the stats.

    `superseded`: stored rows the analysis pass of this run analysed again (`stale_mask`).
    `retry_changed`: raise `InputsChanged` before the manifest when a kept input could not be
    read again as analysed and duplicates of it would be kept nowhere. `_SUCCESS` is written
    last.
    """

    # Pass 2: dedup across the whole job.
    # Pixel thresholds are decided again from the stored scores, so re-tuning them decodes
    # only the images whose analyses had stopped at a rule they now pass.
    num_inputs = listing.count
    with passes.run("dedup", num_inputs):
        stored = _read_analysis(rd, analysis)
        rows = keep_listed(stored, listing, partitions_for(num_inputs)).map_batches(
            Retune(rules=pixel_rules(cfg)), batch_format="pyarrow"
        )
        if superseded:
            rows = _drop_superseded(rows, cfg, partitions_for(num_inputs))
        rows, num_rows = nonempty(rows)
        assert rows is not None, "the analysis pass wrote no rows"
        rows, num_rows, num_repeats = one_row_per_source(rows, num_rows, partitions_for)
        if num_repeats:
            passes.echo(
                f"native4k: {num_repeats} stored analysis rows repeated a source another row "
                f"holds ({_repeat_cause(listing, partitions_for)}): one row per source kept"
            )
        analysed = rows  # materialised (`one_row_per_source`): each round reads it again
        decisions = (
            dedup_decisions(rows, cfg, partitions_for)
            if cfg.dedup.enabled
            else exact_copy_decisions(rows, partitions_for)
        )
        rows = _with_decisions(rows, decisions, partitions_for(num_rows))

    # Model pass: scores, model rules, semantic duplicates, captions (pipelines/model_pass.py).
    # A near duplicate stands for its root; when a model rule rejects that root, its near
    # duplicates were never scored, so they are judged again without it: the best of them
    # takes its place (scores and captions of rows judged before come from the caches).
    not_roots: set[str] = set()
    for round_ in range(MAX_DEDUP_ROUNDS):
        with passes.run("models", num_rows):
            models = run_model_pass(
                rd,
                rows,
                cfg,
                output=output,
                work=join(output, "_work"),
                partitions=partitions_for,
                cpus=partitions_for.cpus,
                warm=warm,
            )
            if decisions is None or not cfg.dedup.enabled:
                break
            new = orphaned_roots(models.rows, cfg, partitions_for) - not_roots
            if not new or round_ == MAX_DEDUP_ROUNDS - 1:
                break
            not_roots |= new
            passes.echo(
                f"native4k: a model rule rejected {count_text(len(new), 'image')} that "
                "near duplicates stood for: judging those duplicates without "
                f"{'it' if len(new) == 1 else 'them'}"
            )
        with passes.run("dedup", num_inputs):
            decisions = dedup_decisions(analysed, cfg, partitions_for, frozenset(not_roots))
            rows = _with_decisions(analysed, decisions, partitions_for(num_rows))
    for note in models.notes:  # the last round's: its share cuts are the job's (stats.json)
        passes.echo(f"native4k: {note}")
    rows = models.rows

    # Pass 3: buckets, shard plan, shards.
    records = _changed_records(output) if retry_changed else {}
    with passes.run("shards", num_rows):
        rows = rows.map_batches(_finalize, batch_format="pyarrow")
        rows = _apply(rows, Bucketer(table=table)).materialize()
        kept, num_kept = nonempty(rows.map_batches(_kept, batch_format="pyarrow"))
        others, _ = nonempty(rows.map_batches(_not_kept, batch_format="pyarrow"))
        outputs = [others] if others is not None else []
        if kept is not None:
            s = cfg.shard
            planned, _ = nonempty(
                group_map(
                    kept,
                    schema.BUCKET,
                    lambda g: plan_bucket(g, s.max_samples, s.max_bytes),
                    partitions_for(num_kept),
                )
            )
            assert planned is not None
            writer = ShardWriter(output=output)
            write = warm.runs(writer) if warm is not None else writer
            written = group_map(planned, schema.SHARD, lambda g: write(g), partitions_for(num_kept))
            outputs.append(written)
        final = (
            _union(outputs)
            .map_batches(lambda t: schema.conform(t), batch_format="pyarrow")
            .materialize()
        )
    if warm is not None:
        warm.stop()  # its work is done; stopped now, it has exited by Ray's shutdown
    if retry_changed and _changed_records(output) != records:  # the writer found a change
        with passes.run("shards", num_rows):
            lost = _copies_of_unwritten(final, partitions_for)
        if lost is not None:
            raise InputsChanged(*lost)

    # Manifest, stats and the small files; `_SUCCESS` last.
    with passes.run("manifest", num_rows):
        stats = compute_stats(final, table, partitions_for, cfg.probe.min_aspect)
        _remove_stale_shards(
            output, {n for b in stats["buckets"].values() for n in b.pop("shard_names")}
        )
        _write_manifest(rd, final, output)
        _remove_leftover_temporaries(output)
        stats["rules"] = {**rule_summary(cfg, stats.pop("bound_counts")), **models.rules}
        if models.cuts:  # where a top-share rule cut each score (the report draws them)
            # null where the share keeps no value at all (the cut is ±inf: no valid JSON)
            stats["share_cuts"] = {col: float(cut) if math.isfinite(cut) else None
                                   for col, cut in sorted(models.cuts.items())}  # fmt: skip
        semantic = models.counts.get("semantic_duplicates", 0)
        if semantic:
            stats["rules"]["duplicate"] = duplicate_rule(
                cfg, semantic, stats["reasons"].get("duplicate", semantic)
            )
        stats["pass_seconds"] = passes.seconds
        stats["wall_seconds"] = round(time.perf_counter() - started, 2)
        _write_text(
            join(output, "buckets.json"),
            json.dumps(
                {
                    "buckets": [
                        {"name": b.name, "width": b.width, "height": b.height} for b in table
                    ]
                },
                indent=1,
            ),
        )
        _write_text(join(output, "config.yaml"), dump_yaml(cfg))
        _write_text(join(output, "stats.json"), json.dumps(stats, indent=2, sort_keys=True))
        _write_text(
            join(output, "_SUCCESS"),
            json.dumps({"manifest_version": schema.MANIFEST_VERSION, "rows": stats["total"]}),
        )
    stats["pass_seconds"] = passes.seconds
    return stats


class InputsChanged(Exception):
    """Kept inputs changed or vanished after their analysis, and copies of them were
    rejected as their duplicates: the passes run again, analysing those inputs afresh."""

    def __init__(self, changed: int, copies: int) -> None:
        it = "it" if changed == 1 else "them"
        super().__init__(
            f"{changed} kept input{'s' if changed > 1 else ''} changed or vanished after "
            f"{'its' if changed == 1 else 'their'} analysis, and {copies} duplicate"
            f"{'s' if copies > 1 else ''} of {it} would be kept nowhere: analysing {it} again"
        )


def _unwritten_keys(t: pa.Table) -> pa.Table:
    """The keys the rows the shard writer could not read again were planned under."""
    detail = pc.fill_null(t[schema.DETAIL], "")
    mask = pc.and_(
        pc.fill_null(pc.equal(t[schema.REASON], "unreadable"), False),
        pc.starts_with(detail, REREAD_FAILED),
    )
    shas = column(t.filter(mask), schema.SHA256)
    return pa.table({schema.DUPLICATE_OF: pa.array([sample_key(h) for h in shas], pa.string())})


def _duplicate_refs(t: pa.Table) -> pa.Table:
    t = t.filter(pc.fill_null(pc.equal(t[schema.REASON], "duplicate"), False))
    return t.select([schema.DUPLICATE_OF])


def _copies_of_unwritten(final: Any, partitions_for: Partitioning) -> tuple[int, int] | None:
    """(kept inputs the shard writer could not read again, their duplicates), or None when
    no duplicate points at such an input."""
    unwritten, num_unwritten = nonempty(final.map_batches(_unwritten_keys, batch_format="pyarrow"))
    if unwritten is None:
        return None
    refs, num_refs = nonempty(final.map_batches(_duplicate_refs, batch_format="pyarrow"))
    if refs is None:
        return None
    on = (schema.DUPLICATE_OF,)
    orphans = grouping.join(refs, unwritten, "left_semi", partitions_for(num_refs), on=on)
    num_orphans = orphans.count()
    return (num_unwritten, num_orphans) if num_orphans else None


def _remove_leftover_temporaries(output: str) -> None:
    """Delete the temporary files left in a local output's `_work/tmp` (`atomic_write`),
    and the manifests and embeddings staged in `_work/manifest-*` and `_work/embeddings-*` by
    runs killed while moving them.

    Every write of this job has been renamed into place by now, so what is left there was
    left by a writer that was killed midway, or is being written by a worker of a killed run
    that has not noticed yet (its late write is then discarded: its rename fails); no other
    job writes this output meanwhile (`_lock_output`).
    """
    if not is_local(output):
        return  # object stores publish whole objects: no temporaries
    work = os.path.join(output, "_work")
    if os.path.isdir(work):  # manifests and embeddings staged by killed runs
        with os.scandir(work) as it:  # (`_write_manifest`, `model_pass._write_embeddings`)
            for entry in it:
                if (entry.name.startswith(("manifest-", "embeddings-"))
                        and entry.is_dir(follow_symlinks=False)):  # fmt: skip
                    shutil.rmtree(entry.path, ignore_errors=True)
    staging = os.path.join(work, "tmp")
    if not os.path.isdir(staging):
        return
    with os.scandir(staging) as it:
        for entry in it:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file():
                    os.remove(entry.path)


def _write_manifest(rd: Any, final: Any, output: str) -> None:
    """The manifest's Parquet files, written to `_work` first, then moved into place."""
    manifest_tmp = join(output, "_work", f"manifest-{os.getpid()}-{int(time.time())}")
    filesystem, tmp_path = _arrow_fs(manifest_tmp)
    final.repartition(max(1, min(64, final.count() // 50_000 + 1))).write_parquet(
        tmp_path,
        filesystem=filesystem,
        filename_provider=_PartNames(file_format="parquet"),
        mode=rd.SaveMode.OVERWRITE,
    )
    manifest = join(output, "manifest")
    _remove(manifest)
    fs, tmp_dir = fsspec.core.url_to_fs(manifest_tmp)
    dest = fsspec.core.url_to_fs(manifest)[1].rstrip("/")
    fs.makedirs(dest, exist_ok=True)
    for f in sorted(fs.find(tmp_dir)):  # file by file: a rename locally, copy+delete on S3
        fs.mv(f, f"{dest}/{f.rsplit('/', 1)[-1]}")
    _remove(manifest_tmp)


DOMINANT_SHARE = 0.5
"""A rule that rejects more than this share of a job is named in the job's summary."""


def outcome_lines(stats: dict[str, Any]) -> list[str]:
    """Plain sentences for the end of a job: nothing kept, and the rule that rejected most."""
    total, kept = stats.get("total", 0), stats.get("kept", 0)
    reasons: dict[str, int] = stats.get("reasons", {})
    rules: dict[str, dict[str, Any]] = stats.get("rules", {})
    lines = []
    if total and not kept:
        everything = "the one input was" if total == 1 else f"all {total} inputs were"
        lines.append(f"nothing kept: {everything} rejected (no shards were written)")
    if reasons:
        reason, count = max(reasons.items(), key=lambda kv: (kv[1], kv[0]))
        if count > DOMINANT_SHARE * total:
            share = f"{count} of {inputs_text(total)} ({count / total:.0%})"
            rule = rules.get(reason)
            if rule and rule.get("setting"):
                lines.append(
                    f"'{reason}' rejected {share}: the rule is {rule['rule']}; "
                    f"change it with --set {rule['setting'].split(' / ')[0]}=VALUE"
                )
            elif rule:  # no setting moves it (exact copies)
                lines.append(f"'{reason}' rejected {share}: the rule is {rule['rule']}")
            else:
                lines.append(f"'{reason}' rejected {share}")
    return lines


def rule_summary(
    cfg: JobConfig, bound_counts: Mapping[str, Mapping[str, int]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per rejection reason that a threshold decides: the rule and the settings that move it,
    for a reason with several the one that rejected most of the job's rows first
    (`bound_counts`: per reason, rows per setting, from `compute_stats`)."""
    out: dict[str, dict[str, Any]] = {}
    for r in (*header_rules(cfg), *pixel_rules(cfg)):
        entry = out.setdefault(r.reason, {"rule": r.bound_text(), "setting": r.setting})
        if entry["rule"] != r.bound_text():  # a reason with two bounds (aspect ratio)
            entry["rule"] = f"{entry['rule']} or {r.bound_text()}"
    big = out["too_large"]  # the reader's byte cap rejects unread files with the same reason
    big["rule"] += f" or file bytes > {cfg.probe.max_file_bytes:,}"
    big["setting"] += " / probe.max_file_bytes"
    for reason, counts in (bound_counts or {}).items():  # the setting that moves most first
        if reason in out:
            names = out[reason]["setting"].split(" / ")
            names.sort(key=lambda n: -counts.get(n, 0))  # stable: ties keep their order
            out[reason]["setting"] = " / ".join(names)
    out["duplicate"] = (
        {
            "rule": f"the same bytes as a better copy, or pHash within {cfg.dedup.max_hamming} "
            "bits of one",
            "setting": "dedup.max_hamming / dedup.enabled",
        }
        if cfg.dedup.enabled
        else {  # exact copies are dropped whatever the settings: nothing to change
            "rule": "the same bytes as a kept copy (near-duplicate matching is off)",
            "setting": "",
        }
    )
    return out


def bound_setting(reason: str | None, width: Any, height: Any, min_aspect: float) -> str | None:
    """The setting whose bound rejected a row of a reason with two (`rule_summary` names it
    first in a job's summary); None for the other reasons."""
    if reason == "too_large":  # the byte cap rejects a file unread: no size
        return "probe.max_file_bytes" if width is None else "probe.max_pixels"
    if reason == "aspect_ratio" and width and height:
        return "probe.min_aspect" if width / height < min_aspect else "probe.max_aspect"
    return None


def duplicate_rule(cfg: JobConfig, semantic: int, duplicates: int) -> dict[str, Any]:
    """The `duplicate` rule when the model pass found `semantic` of the job's `duplicates`:
    both tests in words, and the setting that moves most of them first."""
    base = rule_summary(cfg)["duplicate"]
    threshold = cfg.score.semantic_threshold
    rule = f"{base['rule']}, or an image embedding at cosine >= {threshold} to a better copy's"
    order = ["score.semantic_threshold", base["setting"]]
    if 2 * semantic < duplicates:
        order.reverse()
    return {"rule": rule, "setting": " / ".join(s for s in order if s)}


def _input_identity(uri: str) -> str:
    """An INPUT as a rerun must match it: a local path resolved (`in`, `./in/` and its absolute
    path are one input), an object-store URI as typed (`s3://b/a.jpg/` is a prefix, `a.jpg`
    an object)."""
    return os.path.realpath(local_path(uri)) if is_local(uri) else uri


def _reset_if_changed(work: str, inputs: Sequence[str], cfg: JobConfig) -> list[str]:
    """Forget an earlier run's analysis when it ran on other inputs or analysis settings.

    Pixel thresholds, dedup, buckets and shard sizes are applied after the analysis, so
    changing them keeps it.
    """
    settings = {
        "probe": to_dict(cfg.probe),
        "flat": [cfg.analyze.flat_patch, cfg.analyze.flat_variance],
        "thumbnails": thumbnail_size(cfg),  # the models see pass 1's: a size of their own
        "input": to_dict(cfg.input),
    }

    named = sorted({_input_identity(u) for u in inputs})

    def job(analysis: dict[str, Any], given: list[str] = named) -> str:
        return json.dumps({"inputs": given, "analysis": analysis}, sort_keys=True)

    marker = join(work, "job.json")
    fs, path = fsspec.core.url_to_fs(marker)
    notes = []
    if fs.exists(path):
        with fs.open(path, "r") as fh:
            before = fh.read()
        same = settings
        with contextlib.suppress(ValueError, TypeError, KeyError):
            # Models turned off (0) or on: the analysis stands. Thumbnails made before stay
            # for a later run with models; missing ones the model pass makes from the files.
            earlier = int(json.loads(before)["analysis"]["thumbnails"])
            if 0 in (earlier, settings["thumbnails"]):
                same = {**settings, "thumbnails": earlier}
                settings = {**settings, "thumbnails": max(earlier, settings["thumbnails"])}
        if before not in (job(same), job(same, list(inputs))):  # (as typed: before 2026-12-07)
            _clear_work(work)
            notes.append("inputs or configuration changed since the last run: analysing afresh")
    _write_text(marker, job(settings))
    return notes


class _PartNames(FilenameProvider):
    """Manifest files named `part-NNNNN.parquet`, as the data contract lays them out."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        del write_uuid
        return f"part-{task_index:05d}.{self.file_format}"


def _remove_stale_shards(output: str, keep: set[str]) -> None:
    """Remove the shards an earlier run wrote that this run's manifest does not name, and
    the bucket folders that leaves empty (a local OUT; object stores have no folders)."""
    fs, root = fsspec.core.url_to_fs(output)
    base = root.rstrip("/") + "/shards"
    if not fs.exists(base):
        return
    for f in fs.find(base):
        rel = f[len(root.rstrip("/")) + 1 :]
        if rel not in keep:
            fs.rm(f)
    if is_local(output):
        with os.scandir(base) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False) and not os.listdir(entry.path):
                    os.rmdir(entry.path)


def _summary(values: list[float]) -> dict[str, float] | None:
    arr = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return None
    q = np.quantile(arr, [0.05, 0.5, 0.95])
    return {
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "p05": float(q[0]),
        "p50": float(q[1]),
        "p95": float(q[2]),
        "max": float(arr.max()),
    }


def _bucket_summary(g: pa.Table) -> pa.Table:
    scores = {c: _summary(column(g, c)) for c in schema.SCORE_COLUMNS}
    row = {
        "bucket": column(g, schema.BUCKET)[0],
        "count": g.num_rows,
        "bytes": int(sum(v or 0 for v in column(g, schema.SIZE_BYTES))),
        "shards": len(set(column(g, schema.SHARD))),
        "shard_names": json.dumps(sorted(set(column(g, schema.SHARD)))),
        "captioned": sum(1 for v in column(g, schema.CAPTION_EN) if v),
        "scores": json.dumps({k: v for k, v in scores.items() if v}),
    }
    return pa.Table.from_pylist([row])


def _partials(t: pa.Table, min_aspect: float) -> pa.Table:
    """One row per batch: outcome counts, rows per setting of a two-bound reason
    (`bound_setting`) and CPU seconds per stage (summed on the driver)."""
    reasons: dict[str, int] = {}
    bounds: dict[str, int] = {}
    rows = zip(column(t, schema.STATUS), column(t, schema.REASON), column(t, schema.WIDTH),
               column(t, schema.HEIGHT), strict=True)  # fmt: skip
    for status, reason, width, height in rows:
        k = "kept" if status == schema.STATUS_KEPT else (reason or "unknown")
        reasons[k] = reasons.get(k, 0) + 1
        setting = None if status == schema.STATUS_KEPT else (
            bound_setting(reason, width, height, min_aspect))  # fmt: skip
        if setting is not None:
            bounds[f"{k}:{setting}"] = bounds.get(f"{k}:{setting}", 0) + 1
    stages: dict[str, float] = {}
    for text in column(t, schema.STAGE_SECONDS):
        for k, v in json.loads(text or "{}").items():
            stages[k] = stages.get(k, 0.0) + v
    counts = {"reasons": reasons, "bounds": bounds, "stages": stages}
    return pa.table({"partial": [json.dumps(counts)]})


def compute_stats(
    final: Any, table: list[Bucket], partitions_for: Partitioning, min_aspect: float
) -> dict[str, Any]:
    """Counts and score summaries per bucket and per reason, from the final manifest.

    Two distributed passes: per-batch partial counts, and one group-by bucket for the score
    quantiles. Only per-batch and per-bucket summaries reach the driver. `bound_counts` (for
    `rule_summary`, not stats.json): per two-bound reason, rows per setting.
    """
    by_reason: dict[str, int] = {}
    bounds: dict[str, dict[str, int]] = {}
    per_stage: dict[str, float] = {}
    partials = partial(_partials, min_aspect=min_aspect)
    for r in final.map_batches(partials, batch_format="pyarrow").take_all():
        part = json.loads(r["partial"])
        for k, v in part["reasons"].items():
            by_reason[k] = by_reason.get(k, 0) + v
        for k, v in part["bounds"].items():
            reason, setting = k.split(":", 1)
            bounds.setdefault(reason, {})[setting] = bounds.get(reason, {}).get(setting, 0) + v
        for k, v in part["stages"].items():
            per_stage[k] = per_stage.get(k, 0.0) + v
    total = sum(by_reason.values())
    buckets = {}
    kept, num_kept = nonempty(final.map_batches(_kept, batch_format="pyarrow"))
    if kept is not None:
        parts = partitions_for(num_kept)
        summaries = group_map(kept, schema.BUCKET, _bucket_summary, parts)
        for r in summaries.take_all():
            name = r["bucket"]
            buckets[name] = {k: r[k] for k in ("count", "bytes", "shards", "captioned")}
            buckets[name]["scores"] = json.loads(r["scores"])
            buckets[name]["shard_names"] = json.loads(r["shard_names"])
    empty = [b.name for b in table if b.name not in buckets]
    return {
        "manifest_version": schema.MANIFEST_VERSION,
        "total": total,
        "kept": by_reason.get("kept", 0),
        "rejected": total - by_reason.get("kept", 0),
        "reasons": {k: v for k, v in sorted(by_reason.items()) if k != "kept"},
        "buckets": dict(sorted(buckets.items())),
        "empty_buckets": len(empty),
        "stage_seconds": {k: round(v, 3) for k, v in sorted(per_stage.items())},
        "bound_counts": bounds,
    }


__all__ = ["JobResult", "bucket_table", "run_curate"]
