"""The bucketed streaming loader: curated WebDataset shards in, single-bucket pixel batches out.

A curation output (`native4k curate`, local or `s3://`) has a Parquet manifest that names every
kept sample's key, bucket, shard, crop box and scores. The loader plans each epoch from that
manifest alone, identically on every rank, then streams only the shards that hold this rank's
samples:

1. **Select** rows (`status == "kept"`), optionally the top share by a manifest column.
2. **Draw** each bucket's samples for the epoch: `bucket_weights[b]` copies of every sample (a
   fraction draws a seeded random subset), in shard order (shards shuffled by `(seed, epoch)`),
   shuffled within windows of `shuffle_window` consecutive draws, then cut into batches of
   `batch_size`. A bucket's last, partial batch is filled by repeating samples of its last window
   (flagged `padded`). Buckets with fewer samples than `max(batch_size, min_bucket_samples)` are
   handled by `small_buckets`: an error, dropped (reported), or kept and padded (reported).
3. **Split** every bucket's batch sequence into `world_size` contiguous parts whose sizes differ by
   at most one, the extra batches going to the ranks with the fewest so far, so every rank gets
   the same number of batches up to one; ranks one short repeat their first batch (`padded`).
   This also holds when there are fewer shards (or buckets) than ranks: ranks share shards and
   each reads only its own members.
4. **Interleave** a rank's parts in a seeded random order that keeps each bucket's order, so a
   rank streams each of its shard ranges front to back (a sample needed again beyond the shuffle
   window, an extra weight round or a padding repeat reopens a shard), skipping other ranks'
   members without copying them.
5. **Workers** (`num_workers > 0`, started with `worker_start`, `spawn` by default): a rank's
   batch `j` is built by torch DataLoader worker `j % num_workers`; the DataLoader returns them
   in order, so the batch sequence does not depend on the number of workers. Each worker streams
   the rank's shard ranges and decodes only its own batches.

The position (epoch and batches consumed on this rank) is the loader's whole state: a loader
restored from `state_dict()` yields exactly the batches an uninterrupted one would have yielded
after the last consumed batch. Iterating the loader yields the rest of the current epoch; the
next iteration starts the next epoch.

Shards are read with webdataset's tar iterator over a plain byte stream (fsspec: local paths and
`s3://` through s3fs). Only `<key>.<ext>` (decoded by PIL), `<key>.json` (`json.loads`) and
caption text members are read; a member that could hold a pickle (`.pyd`, `.pickle`, `.pth`, …)
stops the loader with an error naming it, and nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, PngImagePlugin

from training.colour import as_shown, converts, embedded_profile, to_srgb

log = logging.getLogger(__name__)

MODES = ("bucket", "crop")
SMALL_BUCKET_POLICIES = ("error", "drop", "pad")
WORKER_STARTS = ("spawn", "forkserver", "fork")
RESAMPLERS = ("lanczos", "area")
CAPTIONS = {"en": ("caption_en", "txt"), "zh": ("caption_zh", "zh.txt")}
# Suffixes whose usual readers unpickle (webdataset's `.pyd`/`.pickle`, torch's `.pth`/`.pt`, …).
PICKLE_SUFFIXES = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
BAD_SAMPLES = ("stop", "skip")
SKIPPED_LISTED = 100
"""Skipped samples the loader's report names (it counts them all)."""
SIDE_MULTIPLE = 32
"""Training sizes below the bucket size are rounded down to multiples of this."""
_WDS_SUFFIX = re.compile(r" @ <[^>]*>$")
"""What webdataset appends to a tar error's message: the file object it read."""

_BUCKET_RE = re.compile(r"^(\d+)x(\d+)$")
_MANIFEST_COLUMNS = (
    "status",
    "key",
    "bucket",
    "shard",
    "extension",
    "crop_left",
    "crop_top",
    "crop_right",
    "crop_bottom",
    "width",
    "height",
    "orientation",
    "aesthetic",
    "caption_en",
    "caption_zh",
)


@dataclass(kw_only=True)
class DataConfig:
    """What the training loader reads and how it batches it (validated on construction)."""

    root: str
    """A curation output: a folder or `s3://` prefix holding `manifest/` and `shards/` (a
    `pathlib.Path` is taken too, as its text)."""
    mode: str = "bucket"
    """`bucket`: crop each image to its recorded box and resize it down to its bucket's size;
    `crop`: random `crop_size`² crops of the native (oriented) pixels, for VAE training
    (`train-vae`'s default and only mode)."""
    crop_size: int = 512
    """Side of the random crops in `crop` mode (a multiple of 16)."""
    batch_size: int = 1
    """Samples per batch on each rank; every batch holds one bucket."""
    resolution_divisor: int = 1
    """Train below the bucket size (CPU demos and tests): the target is the bucket's sides
    divided by this, rounded down to multiples of 32, and the crop box is trimmed (centred) to
    the target's shape, so the picture is not stretched. `crop` mode has no bucket size and
    takes `crop_size` as it is."""
    select_column: str | None = None
    """A numeric manifest column to select by (e.g. `aesthetic`, `flat_fraction`)."""
    select_top: float | None = None
    """Keep this top share of the kept rows by `select_column` (0.05: the top 5 %); rows
    without a value are left out and counted in the report."""
    select_ascending: bool = False
    """True: the smallest values count as the top (e.g. the least flat)."""
    bucket_weights: dict[str, float] = field(default_factory=dict)
    """Per-bucket sampling weight (default 1): draws of each sample per epoch; 2 repeats every
    sample twice, 0.5 draws a seeded random half each epoch, 0 leaves the bucket out."""
    min_bucket_samples: int = 0
    """A bucket with fewer selected samples than `max(batch_size, this)` is small."""
    small_buckets: str = "error"
    """What to do with small buckets: `error` (stop, naming them), `drop` (leave them out,
    reported and logged) or `pad` (keep them, repeating samples to fill a batch; reported)."""
    seed: int = 0
    """Seed of every random choice; epoch `e` is planned from `(seed, e)`. A DiT curriculum's
    first stage uses it as is, each later stage a seed drawn from `(seed, stage)`."""
    num_workers: int = 0
    """torch DataLoader worker processes decoding batches (0: decode in this process)."""
    worker_start: str = "spawn"
    """How DataLoader workers start: `spawn` (default; safe whatever threads this process runs:
    Ray, S3 clients, OpenCV and OpenMP pools), `forkserver`, or `fork` (fastest start, but a
    lock held by another thread at the fork can hang a worker)."""
    caption_language: str = "en"
    """Which caption the batches carry: `en` or `zh` (empty string when a sample has none)."""
    shuffle_window: int = 32
    """Consecutive draws of a bucket (in shard order) shuffled together. Larger mixes more;
    a worker holds up to this many encoded images per bucket in memory."""
    resample: str = "lanczos"
    """Downscaling filter in `bucket` mode: `lanczos` (PIL) or `area` (OpenCV INTER_AREA)."""
    jpeg_draft: bool = True
    """Let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale when the target is at least twice that
    much smaller than the crop box (`bucket` mode with `lanczos`; Lanczos then finishes)."""
    bad_samples: str = "stop"
    """A sample that cannot be read or decoded (a corrupt member, a shard cut short): `stop`
    ends training with one line naming it (`native4k verify` lists every such sample); `skip`
    leaves it out, a repeat of another sample of its batch taking its place (flagged
    `padded`), warns naming it, and counts it in the loader's report (`skipped`). A shard that
    fails is not read again in that epoch: its later samples are skipped at once."""

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"data config key '{key}' {msg}")

        for name, typ in (
            ("crop_size", int),
            ("batch_size", int),
            ("resolution_divisor", int),
            ("min_bucket_samples", int),
            ("seed", int),
            ("num_workers", int),
            ("shuffle_window", int),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, typ):
                raise bad(name, f"must be an integer, got {v!r}")
        if isinstance(self.root, os.PathLike):  # a pathlib.Path names a folder as well
            self.root = os.fspath(self.root)
        if not isinstance(self.root, str) or not self.root:
            raise bad("root", "must name a curation output (folder or s3:// prefix)")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.bad_samples not in BAD_SAMPLES:
            raise bad("bad_samples", f"must be one of {BAD_SAMPLES}, got {self.bad_samples!r}")
        if self.crop_size <= 0 or self.crop_size % 16:
            raise bad("crop_size", f"must be a positive multiple of 16, got {self.crop_size}")
        if self.batch_size < 1:
            raise bad("batch_size", "must be at least 1")
        if self.resolution_divisor < 1:
            raise bad("resolution_divisor", "must be at least 1")
        if (self.select_column is None) != (self.select_top is None):
            raise bad(
                "select_top" if self.select_top is None else "select_column",
                "must be set together with "
                + ("select_column" if self.select_top is None else "select_top"),
            )
        if self.select_top is not None:
            if isinstance(self.select_top, bool) or not isinstance(self.select_top, int | float):
                raise bad("select_top", f"must be a number, got {self.select_top!r}")
            if not 0 < self.select_top <= 1:
                raise bad("select_top", f"must be in (0, 1], got {self.select_top}")
        if not isinstance(self.select_ascending, bool):
            raise bad("select_ascending", "must be true or false")
        if self.select_ascending and self.select_column is None:
            raise bad("select_ascending", "ranks select_column, which is not set")
        if not isinstance(self.bucket_weights, dict):
            raise bad("bucket_weights", "must map 'WxH' bucket names to weights")
        for b, w in self.bucket_weights.items():
            if not isinstance(b, str) or not _BUCKET_RE.match(b):
                raise bad("bucket_weights", f"has {b!r}: expected a bucket name 'WxH'")
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise bad(f"bucket_weights.{b}", f"must be a finite number, got {w!r}")
            if w < 0:
                raise bad(f"bucket_weights.{b}", f"must be >= 0, got {w}")
        if self.min_bucket_samples < 0:
            raise bad("min_bucket_samples", "must be >= 0")
        if self.small_buckets not in SMALL_BUCKET_POLICIES:
            raise bad("small_buckets", f"must be one of {SMALL_BUCKET_POLICIES}")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if self.worker_start not in WORKER_STARTS:
            raise bad("worker_start", f"must be one of {WORKER_STARTS}")
        if self.caption_language not in CAPTIONS:
            raise bad("caption_language", f"must be one of {tuple(CAPTIONS)}")
        if self.shuffle_window < 1:
            raise bad("shuffle_window", "must be at least 1")
        if self.resample not in RESAMPLERS:
            raise bad("resample", f"must be one of {RESAMPLERS}")
        if not isinstance(self.jpeg_draft, bool):
            raise bad("jpeg_draft", "must be true or false")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a plain mapping (e.g. a YAML section); an unknown key raises ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            if k not in names:
                raise ValueError(f"data config has an unknown key '{k}'")
        return cls(**d)

    def target_size(self, bucket: str) -> tuple[int, int]:
        """The (width, height) a batch of `bucket` has in `bucket` mode."""
        w, h = parse_bucket(bucket)
        if self.resolution_divisor == 1:
            return w, h
        tw = w // self.resolution_divisor // SIDE_MULTIPLE * SIDE_MULTIPLE
        th = h // self.resolution_divisor // SIDE_MULTIPLE * SIDE_MULTIPLE
        if tw < SIDE_MULTIPLE or th < SIDE_MULTIPLE:
            raise ValueError(
                f"data config key 'resolution_divisor' ({self.resolution_divisor}) shrinks bucket "
                f"{bucket} below {SIDE_MULTIPLE} pixels"
            )
        return tw, th


def fit_aspect(box: tuple[int, ...], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred part of a crop `box` with the aspect ratio of `target` (width, height).

    Below the bucket size (`resolution_divisor`), each side is rounded down to a multiple of
    32 on its own, so the target's shape differs from the bucket's (4 turns 1024×576 into
    256×128): resizing the whole box would stretch the picture. Never smaller than `target`
    when the box is not.
    """
    left, top, right, bottom = box
    bw, bh = right - left, bottom - top
    tw, th = target
    if bw * th > bh * tw:  # wider than the target: trim the sides
        w = max(min(bw, round(bh * tw / th)), 1)
        left += (bw - w) // 2
        return left, top, left + w, bottom
    if bw * th < bh * tw:  # taller: trim top and bottom
        h = max(min(bh, round(bw * th / tw)), 1)
        top += (bh - h) // 2
        return left, top, right, top + h
    return left, top, right, bottom


def parse_bucket(name: str) -> tuple[int, int]:
    """`"WxH"` -> (W, H)."""
    m = _BUCKET_RE.match(name)
    if not m:
        raise ValueError(f"not a bucket name 'WxH': {name!r}")
    return int(m.group(1)), int(m.group(2))


# --- the manifest ---------------------------------------------------------------------------


@dataclass
class _Samples:
    """The kept, selected manifest rows as columns (row index = sample id)."""

    key: list[str]
    bucket: list[str]
    shard: list[str]
    extension: list[str]
    box: np.ndarray  # [N, 4] int64 (left, top, right, bottom) in oriented pixels
    size: np.ndarray  # [N, 2] int64 (width, height) oriented
    orientation: np.ndarray  # [N] int64: the EXIF orientation curation used (0: not recorded)
    aesthetic: np.ndarray  # [N] float64, nan when null
    caption: list[str]

    def subset(self, plan: list[_Batch]) -> tuple[_Samples, list[_Batch]]:
        """Only the rows `plan` uses, and the plan renumbered to them (what workers receive)."""
        ids = sorted({i for b in plan for i in b.ids})
        new = {i: j for j, i in enumerate(ids)}
        rows = _Samples(
            key=[self.key[i] for i in ids],
            bucket=[self.bucket[i] for i in ids],
            shard=[self.shard[i] for i in ids],
            extension=[self.extension[i] for i in ids],
            box=self.box[ids],
            size=self.size[ids],
            orientation=self.orientation[ids],
            aesthetic=self.aesthetic[ids],
            caption=[self.caption[i] for i in ids],
        )
        renumbered = [_Batch(b.uid, tuple(new[i] for i in b.ids), b.padded, b.bucket) for b in plan]
        return rows, renumbered


def read_manifest(root: str, columns: tuple[str, ...]) -> pa.Table:
    """The manifest of a finished curation output (only `columns` that exist).

    Raises:
        ValueError: not a finished output, or its storage refused a read (an S3 403 is a
            PermissionError) or failed: one line naming `root`.
    """
    try:
        return _read_manifest(root, columns)
    except OSError as e:
        raise ValueError(f"cannot read {root}: {type(e).__name__}: {e}") from e


def _read_manifest(root: str, columns: tuple[str, ...]) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(root)
    path = path.rstrip("/")
    if not fs.exists(f"{path}/_SUCCESS"):
        raise ValueError(
            f"{root} is not a finished curation output: _SUCCESS is missing "
            "(run `native4k curate ... --output` to completion first)"
        )
    # Listed, not globbed: a folder name may hold glob characters ("run [v2]", "a*b").
    manifest = f"{path}/manifest"
    names = fs.ls(manifest, detail=False) if fs.isdir(manifest) else []
    files = sorted(
        f for f in names  # not hidden: macOS's `._part-0.parquet` copies are no Parquet
        if (name := f.rstrip("/").rsplit("/", 1)[-1]).endswith(".parquet")
        and not name.startswith(".")
    )  # fmt: skip
    if not files:
        raise ValueError(f"{root} has no manifest/*.parquet")
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            have = set(pf.schema_arrow.names)
            tables.append(pf.read(columns=[c for c in columns if c in have]))
    return pa.concat_tables(tables, promote_options="default")


def _column(t: pa.Table, name: str, default: Any = None) -> list[Any]:
    if name not in t.column_names:
        return [default] * t.num_rows
    return t.column(name).to_pylist()


# --- the epoch plan -------------------------------------------------------------------------


def _once_per_batch(seq: list[int], batch_size: int) -> list[int]:
    """`seq` with a sample that repeats inside a batch (where two rounds of a bucket weighted
    above 1 meet) swapped with the nearest later (else earlier) draw whose batch does not hold
    it and that its own batch does not hold; unchanged where there is none (a bucket smaller
    than a batch)."""
    seq = list(seq)
    n = len(seq)

    def members(q: int) -> set[int]:
        lo = q // batch_size * batch_size
        return set(seq[lo : lo + batch_size])

    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        held: set[int] = set()
        for p in range(lo, hi):
            if seq[p] in held:
                here = set(seq[lo:hi])
                for q in (*range(hi, n), *range(lo - 1, -1, -1)):
                    if seq[q] not in here and seq[p] not in members(q):
                        seq[p], seq[q] = seq[q], seq[p]
                        break
            held.add(seq[p])
    return seq


@dataclass(frozen=True)
class _Batch:
    """One planned batch: sample ids, which of them are padding, and a plan-wide id."""

    uid: int
    ids: tuple[int, ...]
    padded: tuple[bool, ...]
    bucket: str


class BucketedLoader:
    """Single-bucket batches of decoded pixels from a curation output, for one rank.

    Args:
        cfg: the data configuration.
        rank: this process's rank in `[0, world_size)`.
        world_size: the number of ranks; every rank yields `len(self)` batches per epoch.

    Yields (per batch) a dict: `pixels` float32 `[B, 3, H, W]` in [-1, 1]; `keys` (sample keys);
    `bucket` (`"WxH"`); `captions` (`""` when none); `aesthetic` float32 `[B]` (nan when null);
    `padded` bool `[B]` (a repeat that fills a batch or evens out the ranks); `epoch`, `index`
    (the batch's position in this rank's epoch).

    Raises:
        ValueError: unknown bucket or column in the config, no samples left, small buckets under
            `small_buckets: error`, a shard that disagrees with the manifest or holds a member
            that could be a pickle.
    """

    def __init__(self, cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._epoch, self._consumed = 0, 0
        self._report: dict[str, Any] = {}
        self._samples = self._select()
        self._draws_per_bucket = self._bucket_draw_counts()
        total = sum(math.ceil(n / cfg.batch_size) for n in self._draws_per_bucket.values())
        if total == 0:
            left_out = ", ".join(f"{b}: {r['dropped']}" for b, r in self._report["buckets"].items())
            raise ValueError(f"no samples left to train on in {cfg.root}: every bucket is left "
                             f"out ({left_out})")
        self._batches_total = total
        self._len = math.ceil(total / world_size)
        self._report["skipped"] = {"samples": 0, "first": []}  # `bad_samples: skip`
        self._report["epoch"] = {
            "batches_total": total,
            "batches_per_rank": self._len,
            "rank_padding_batches": self._len * world_size - total,
            "world_size": world_size,
        }
        self._plan_cache: tuple[int, list[_Batch]] | None = None
        self._selection_digest = self._digest()

    def _digest(self) -> str:
        """What orders an epoch's batches, as a digest: the selected samples (key, bucket) and
        the settings that group and shuffle them; the seed and world size are stated apart."""
        h = hashlib.sha256()
        cfg = self.cfg
        plan = (cfg.batch_size, cfg.shuffle_window, sorted(cfg.bucket_weights.items()),
                cfg.min_bucket_samples, cfg.small_buckets)  # fmt: skip
        h.update(repr(plan).encode())
        for key, bucket in zip(self._samples.key, self._samples.bucket, strict=True):
            h.update(f"\n{bucket}\t{key}".encode())
        return h.hexdigest()[:16]

    # ----- selection and small buckets --------------------------------------------------

    def _check_sizes(self, t: pa.Table, buckets: dict[str, int]) -> None:
        """What the manifest already tells about the decoded sizes, before the first batch.

        Raises:
            ValueError: in `bucket` mode, `resolution_divisor` shrinks a bucket to nothing; in
                `crop` mode, selected images are smaller than `crop_size`.
        """
        cfg = self.cfg
        if cfg.mode == "bucket":
            for b in buckets:
                cfg.target_size(b)
            return
        if "width" not in t.column_names or "height" not in t.column_names:
            return  # another producer's manifest: the decoder will say
        sizes = np.array([[v or 0 for v in _column(t, c)] for c in ("width", "height")],
                         np.int64)
        small = np.flatnonzero((sizes.min(axis=0) < cfg.crop_size) & (sizes.min(axis=0) > 0))
        if len(small):
            i = int(small[np.argmin(sizes[:, small].min(axis=0))])
            raise ValueError(
                f"data config key 'crop_size' ({cfg.crop_size}): {len(small)} of the "
                f"{t.num_rows} selected images are smaller (the smallest "
                f"{sizes[0, i]}x{sizes[1, i]}); lower it, or select larger images"
            )

    def _select(self) -> _Samples:
        cfg = self.cfg
        cols = _MANIFEST_COLUMNS + ((cfg.select_column,) if cfg.select_column else ())
        t = read_manifest(cfg.root, cols)
        for c in ("status", "key", "bucket", "shard", "extension", "crop_left"):
            if c not in t.column_names:
                raise ValueError(f"{cfg.root}: the manifest has no '{c}' column")
        t = t.filter(pc.equal(t.column("status"), "kept"))
        if t.num_rows == 0:
            raise ValueError(f"{cfg.root} kept no image: nothing to train on (see its stats.json)")
        available = _count(_column(t, "bucket"))
        selection: dict[str, Any] = {"column": None}
        if cfg.select_column:
            col = cfg.select_column
            if col not in t.column_names:
                raise ValueError(f"data config key 'select_column': the manifest has no '{col}'")
            if not pa.types.is_integer(t.schema.field(col).type) and not pa.types.is_floating(
                t.schema.field(col).type
            ):
                raise ValueError(f"data config key 'select_column': '{col}' is not numeric")
            values = np.array([np.nan if v is None else v for v in _column(t, col)], np.float64)
            valid = np.flatnonzero(np.isfinite(values))
            if len(valid) == 0:
                raise ValueError(
                    f"data config key 'select_column': '{col}' is null in all {t.num_rows} kept "
                    f"rows of {cfg.root} (was its scorer enabled when it was curated?)"
                )
            n_keep = math.ceil(cfg.select_top * len(valid) - 1e-9) if len(valid) else 0
            keys = np.array(_column(t, "key"), dtype=object)
            # Top by value, ties broken by key, so the selection does not depend on row order.
            sign = 1.0 if cfg.select_ascending else -1.0
            order = sorted(valid.tolist(), key=lambda i: (sign * values[i], keys[i]))
            keep = sorted(order[:n_keep])
            selection = {
                "column": col,
                "top": cfg.select_top,
                "ascending": cfg.select_ascending,
                "candidates": len(valid),
                "without_value": int(t.num_rows - len(valid)),
                "selected": n_keep,
                "cutoff": float(values[order[n_keep - 1]]) if n_keep else None,
            }
            t = t.take(pa.array(keep, pa.int64()))
        selected = _count(_column(t, "bucket"))
        weights = cfg.bucket_weights
        unknown = sorted(set(weights) - set(available))
        if unknown:
            raise ValueError(
                f"data config key 'bucket_weights' names buckets with no kept samples in "
                f"{cfg.root}: {unknown} (buckets there: {sorted(available)})"
            )
        small_at = max(cfg.batch_size, cfg.min_bucket_samples)
        small = sorted(b for b, n in selected.items() if n < small_at and weights.get(b, 1.0) > 0)
        if small and cfg.small_buckets == "error":
            raise ValueError(
                f"buckets with fewer than {small_at} selected samples: "
                + ", ".join(f"{b} ({selected[b]})" for b in small)
                + "; set data config key 'small_buckets' to 'drop' or 'pad'"
            )
        dropped: dict[str, str] = {}
        for b in sorted(available):
            if selected.get(b, 0) == 0:
                dropped[b] = "none selected"
            elif weights.get(b, 1.0) == 0:
                dropped[b] = "weight 0"
            elif b in small and cfg.small_buckets == "drop":
                dropped[b] = f"small ({selected[b]} < {small_at})"
        gone = [b for b, why in dropped.items() if why.startswith("small")]
        if gone:  # one line for them all (a large dataset may have hundreds)
            named = ", ".join(f"{b} ({selected[b]})" for b in gone[:8])
            more = f" and {len(gone) - 8} more" if len(gone) > 8 else ""
            log.warning("dropping %d small bucket%s (< %d samples): %s%s", len(gone),
                        "" if len(gone) == 1 else "s", small_at, named, more)
        if dropped:
            keep_mask = pc.invert(pc.is_in(t.column("bucket"), pa.array(sorted(dropped))))
            t = t.filter(keep_mask)
        # the buckets it trains on: one left out (weight 0, dropped) may be any size
        self._check_sizes(t, {b: n for b, n in selected.items() if b not in dropped})
        t = t.sort_by([("bucket", "ascending"), ("shard", "ascending"), ("key", "ascending")])
        self._report["buckets"] = {
            b: {
                "available": available[b],
                "selected": selected.get(b, 0),
                "weight": float(weights.get(b, 1.0)),
                "dropped": dropped.get(b),
                "small": b in small,
            }
            for b in sorted(available)
        }
        self._report["selection"] = selection
        self._report["small_buckets"] = {
            "policy": cfg.small_buckets,
            "threshold": small_at,
            "buckets": small,
        }
        cap_col = CAPTIONS[cfg.caption_language][0]
        box = np.stack(
            [np.array(_column(t, c, 0), np.int64) for c in CROP_COLUMNS], axis=1
        ).reshape(-1, 4)
        size = np.stack(
            [np.array(_column(t, c, 0), np.int64) for c in ("width", "height")], axis=1
        ).reshape(-1, 2)
        aesthetic = np.array(
            [np.nan if v is None else v for v in _column(t, "aesthetic")], np.float64
        )
        orientation = np.array([v or 0 for v in _column(t, "orientation")], np.int64)
        return _Samples(
            key=_column(t, "key"),
            bucket=_column(t, "bucket"),
            shard=_column(t, "shard"),
            extension=_column(t, "extension"),
            box=box,
            size=size,
            orientation=orientation,
            aesthetic=aesthetic,
            caption=[c or "" for c in _column(t, cap_col)],
        )

    def _bucket_draw_counts(self) -> dict[str, int]:
        """Draws per bucket per epoch (before batch padding): the same every epoch."""
        counts = _count(self._samples.bucket)
        out = {}
        for b, n in sorted(counts.items()):
            w = float(self.cfg.bucket_weights.get(b, 1.0))
            whole, frac = int(w), w - int(w)
            d = whole * n + round(frac * n)
            out[b] = max(d, 1)
            nb = math.ceil(out[b] / self.cfg.batch_size)
            rep = self._report["buckets"][b]
            rep["draws_per_epoch"] = out[b]
            rep["batches_per_epoch"] = nb
            rep["padded_per_epoch"] = nb * self.cfg.batch_size - out[b]
        return out

    # ----- planning ---------------------------------------------------------------------

    def _bucket_batches(self, epoch: int) -> dict[str, list[_Batch]]:
        """Every bucket's batches of `epoch`, in the bucket's streaming order."""
        cfg, s = self.cfg, self._samples
        rng = np.random.default_rng([cfg.seed, epoch])
        by_bucket: dict[str, dict[str, list[int]]] = {}
        for i, (b, sh) in enumerate(zip(s.bucket, s.shard, strict=True)):
            by_bucket.setdefault(b, {}).setdefault(sh, []).append(i)  # rows sorted by key
        out: dict[str, list[_Batch]] = {}
        uid = 0
        for b in sorted(by_bucket):
            shards = sorted(by_bucket[b])
            order = [shards[j] for j in rng.permutation(len(shards))]
            one_pass = [i for sh in order for i in by_bucket[b][sh]]
            n = len(one_pass)
            whole = int(float(cfg.bucket_weights.get(b, 1.0)))
            rounds = [one_pass] * whole
            k = self._draws_per_bucket[b] - whole * n
            if k > 0:  # a seeded subset, kept in shard order
                pick = np.sort(rng.choice(n, size=k, replace=False))
                rounds.append([one_pass[j] for j in pick])
            win = cfg.shuffle_window
            shuffled: list[int] = []
            for seq in rounds:  # each round on its own: a sample once per round
                start = int(rng.integers(0, win)) if len(seq) > win else 0
                bounds = [0, *range(start or win, len(seq), win), len(seq)]
                for lo, hi in itertools.pairwise(bounds):
                    part = seq[lo:hi]
                    shuffled += [part[j] for j in rng.permutation(len(part))]
            if len(rounds) > 1:
                shuffled = _once_per_batch(shuffled, cfg.batch_size)
            padded = [False] * len(shuffled)
            short = -len(shuffled) % cfg.batch_size
            if short:
                tail = shuffled[-win:]
                extra = rng.choice(len(tail), size=short, replace=short > len(tail))
                shuffled += [tail[j] for j in extra]
                padded += [True] * short
            bs = cfg.batch_size
            batches = []
            for j in range(0, len(shuffled), bs):
                batches.append(
                    _Batch(uid, tuple(shuffled[j : j + bs]), tuple(padded[j : j + bs]), b)
                )
                uid += 1
            out[b] = batches
        return out

    def _rank_plan(self, epoch: int) -> list[_Batch]:
        """This rank's batches of `epoch`, in order (`len(self)` of them)."""
        if self._plan_cache and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        cfg, world = self.cfg, self.world_size
        per_bucket = self._bucket_batches(epoch)
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        counts = [0] * world
        parts: list[dict[str, list[_Batch]]] = [{} for _ in range(world)]
        for b in sorted(per_bucket):
            batches = per_bucket[b]
            q, rem = divmod(len(batches), world)
            tie = rng.permutation(world)
            extra = set(sorted(range(world), key=lambda r: (counts[r], tie[r]))[:rem])
            lo = 0
            for r in range(world):
                n = q + (r in extra)
                if n:
                    parts[r][b] = batches[lo : lo + n]
                lo += n
                counts[r] += n
        mine = parts[self.rank]
        labels = [b for b in sorted(mine) for _ in mine[b]]
        order = np.random.default_rng([cfg.seed, epoch, 2, self.rank]).permutation(len(labels))
        cursor = dict.fromkeys(mine, 0)
        plan = []
        for j in order:
            b = labels[j]
            plan.append(mine[b][cursor[b]])
            cursor[b] += 1
        source = plan or [x for p in parts for b in sorted(p) for x in p[b]]
        i = 0
        while len(plan) < self._len:  # even out: repeat this rank's first batches
            x = source[i % len(source)]
            plan.append(_Batch(x.uid, x.ids, (True,) * len(x.ids), x.bucket))
            i += 1
        assert len(plan) == self._len
        self._plan_cache = (epoch, plan)
        return plan

    # ----- the public API ---------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        """The key of every selected sample (of all ranks), ordered by bucket, shard and key."""
        return list(self._samples.key)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank and every epoch)."""
        return self._len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch (all of the next one when the current is done)."""
        if self._consumed >= self._len:
            self._epoch, self._consumed = self._epoch + 1, 0
        epoch, start = self._epoch, self._consumed
        plan = self._rank_plan(epoch)[start:]
        samples = self._samples
        if self.cfg.num_workers > 0:  # workers get this rank's rows only, not the manifest
            samples, plan = samples.subset(plan)
        stream = _EpochStream(
            cfg=self.cfg, samples=samples, plan=plan, epoch=epoch, first_index=start
        )
        if self.cfg.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=min(self.cfg.num_workers, max(len(plan), 1)),
                worker_init_fn=_worker_init,
                multiprocessing_context=self.cfg.worker_start,
            )
            with _worker_signals_blocked():
                it = iter(loader)  # starts the workers
        else:
            it = iter(stream)
        try:
            for raw in it:
                assert raw["index"] == self._consumed, (raw["index"], self._consumed)
                if "error" in raw:  # a worker's data error (see `_EpochStream.__iter__`)
                    storage, message = raw["error"]
                    raise (OSError if storage else ValueError)(message)
                self._consumed += 1
                self._note_skipped(raw["skipped"])
                yield _finish(raw, epoch)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown:
                shutdown()

    def _note_skipped(self, skipped: list[str]) -> None:
        """Warn about and count the samples a batch left out (`bad_samples: skip`)."""
        report = self._report["skipped"]
        for why in skipped:
            report["samples"] += 1
            if len(report["first"]) < SKIPPED_LISTED:
                report["first"].append(why)
            log.warning("skipped a sample that cannot be used (data.bad_samples=skip): %s", why)

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches consumed on this rank, plus what must not change."""
        return {
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "batches_per_epoch": self._len,
            "selection": self._selection_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: the next batch is the one after the last consumed.

        Raises:
            ValueError: the state comes from another seed, world size or data selection.
        """
        for k in ("seed", "world_size", "selection", "batches_per_epoch"):
            mine = self.state_dict()[k]
            if k in state and state[k] != mine:
                what = (
                    "selected samples or batching settings (select_*, bucket_weights, "
                    "batch_size, shuffle_window, small_buckets) differ"
                    if k == "selection"
                    else f"loader state has {k}={state[k]} but this loader has {k}={mine}"
                )
                raise ValueError(
                    f"{what}: an exact resume needs the same seed, world size and data "
                    "selection"
                )
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= self._len:
            raise ValueError(f"loader state has batches_consumed={consumed} > {self._len}")
        self._epoch, self._consumed = int(state["epoch"]), consumed

    def report(self) -> dict[str, Any]:
        """Per-bucket counts (available, selected, dropped, small, draws, batches, padded), the
        selection summary, the small-bucket policy and the epoch's batch counts."""
        return json.loads(json.dumps(self._report))

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (before a completed epoch rolls over)."""
        return self._epoch


CROP_COLUMNS = ("crop_left", "crop_top", "crop_right", "crop_bottom")


def _count(values: list[Any]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


WORKER_IGNORED_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
"""Signals a loader's worker processes ignore. A preemption that signals the whole process group
(Slurm's `--signal`, systemd's stop) is the main process's to act on: the trainer checkpoints
the step in progress (`trainer.STOP_SIGNALS`), which a worker killed by the same signal turned
into a crash with no checkpoint. A worker still ends with its main process."""


def _ignored_signals() -> list[signal.Signals]:
    return [s for n in WORKER_IGNORED_SIGNALS if (s := getattr(signal, n, None)) is not None]


@contextlib.contextmanager
def _worker_signals_blocked() -> Iterator[None]:
    """Block `WORKER_IGNORED_SIGNALS` in this thread while it starts workers.

    A started process inherits the mask (through fork and exec), so a stop signal that comes
    while a worker is still importing, before `_worker_init` ignores it, waits instead of
    killing the worker; ignoring it then discards it. The main process gets its own copy when
    the block ends. (A `forkserver` started before the first loader does not inherit it.)

    The standard library's resource tracker unblocks SIGTERM in the calling thread after it
    launches (`spawn`'s first queue or process does that), which left the second worker
    unguarded; it is started first.
    """
    sigs = _ignored_signals()
    if not sigs or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _worker_init(_: int) -> None:
    import cv2
    cv2.setNumThreads(1)
    sigs = _ignored_signals()
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)  # discards one already pending
    if sigs and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def _finish(raw: dict[str, Any], epoch: int) -> dict[str, Any]:
    """uint8 `[B, H, W, 3]` from the stream -> float32 `[B, 3, H, W]` in [-1, 1]."""
    u8 = raw["pixels"]
    pixels = u8.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    pixels.div_(127.5).sub_(1.0)
    return {
        "pixels": pixels,
        "keys": list(raw["keys"]),
        "bucket": raw["bucket"],
        "captions": list(raw["captions"]),
        "aesthetic": raw["aesthetic"],
        "padded": raw["padded"],
        "epoch": epoch,
        "index": raw["index"],
    }


# --- streaming and decoding -----------------------------------------------------------------


class _EpochStream(torch.utils.data.IterableDataset):
    """Decodes planned batches; in a DataLoader worker, only batches `j % num_workers == id`."""

    def __init__(
        self,
        *,
        cfg: DataConfig,
        samples: _Samples,
        plan: list[_Batch],
        epoch: int,
        first_index: int,
    ) -> None:
        super().__init__()
        self.cfg, self.samples, self.plan = cfg, samples, plan
        self.epoch, self.first_index = epoch, first_index
        self.last_good: dict[str, tuple[np.ndarray, str, int]] = {}  # per bucket, for `skip`

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = [(j, b) for j, b in enumerate(self.plan) if j % nw == wid]
        reader = _MemberReader(self.cfg, self.samples, [b for _, b in mine])
        try:
            for j, batch in mine:
                try:
                    yield self._decode(j, batch, reader)
                except (ValueError, OSError) as e:
                    if info is None:
                        raise
                    # torch re-raises a worker's error with its whole traceback as the
                    # message: hand the message back and let the main process raise it.
                    yield {"error": (isinstance(e, OSError), str(e)), "index": self.first_index + j}
                    return
        finally:
            reader.close()

    def _decode(self, j: int, batch: _Batch, reader: _MemberReader) -> dict[str, Any]:
        s = self.samples
        images: list[np.ndarray | None] = []
        captions: list[str] = []
        ids, padded = list(batch.ids), list(batch.padded)
        skipped: list[str] = []
        for slot, i in enumerate(batch.ids):
            try:
                img, caption = self._sample(i, slot, batch, reader)
            except ValueError as e:
                if self.cfg.bad_samples != "skip":
                    raise ValueError(f"{e} (data.bad_samples=skip trains on without such a "
                                     "sample)") from e  # fmt: skip
                skipped.append(str(e))
                img, caption = None, ""
            else:
                self.last_good[batch.bucket] = (img, caption, i)
            images.append(img)
            captions.append(caption)
        good = [k for k, img in enumerate(images) if img is not None]
        for n, k in enumerate(k for k, img in enumerate(images) if img is None):
            if good:  # a repeat of a sample of this batch, as the `pad` policy repeats
                src = good[n % len(good)]
                images[k], captions[k], ids[k] = images[src], captions[src], ids[src]
            elif batch.bucket in self.last_good:  # every sample failed: this bucket's last
                images[k], captions[k], ids[k] = self.last_good[batch.bucket]
            else:
                raise ValueError(
                    f"every sample of a {batch.bucket} batch failed and none of that bucket "
                    f"was read before to take their place; the first: {skipped[0]}"
                )
            padded[k] = True
        return {
            "pixels": torch.from_numpy(np.stack(images)),
            "keys": [s.key[i] for i in ids],  # a skipped sample's slot: its stand-in's key
            "bucket": batch.bucket,
            "captions": captions,
            "aesthetic": torch.tensor(s.aesthetic[ids], dtype=torch.float32),
            "padded": torch.tensor(padded, dtype=torch.bool),
            "skipped": skipped,
            "index": self.first_index + j,
        }

    def _sample(
        self, i: int, slot: int, batch: _Batch, reader: _MemberReader
    ) -> tuple[np.ndarray, str]:
        """Sample `i`'s pixels (uint8 `[H, W, 3]`) and caption; ValueError names what failed."""
        cfg, s = self.cfg, self.samples
        members = reader.get(i)
        data = members.get(s.extension[i])
        if data is None:
            raise ValueError(
                f"{s.shard[i]}: sample {s.key[i]} has no '.{s.extension[i]}' member"
            )
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except ValueError as e:  # not JSON, or not UTF-8
                raise ValueError(
                    f"{s.shard[i]}: member {s.key[i]}.json is not JSON ({e}); run "
                    "`native4k verify`"
                ) from e
            if not isinstance(meta, dict):
                raise ValueError(
                    f"{s.shard[i]}: member {s.key[i]}.json is not a JSON object; run "
                    "`native4k verify`"
                )
            if meta.get("key") != s.key[i] or meta.get("bucket") != s.bucket[i]:
                raise ValueError(
                    f"{s.shard[i]}: member {s.key[i]}.json disagrees with the manifest "
                    "(run `native4k verify`)"
                )
        if cfg.mode == "bucket":
            target = cfg.target_size(s.bucket[i])
            box = tuple(int(v) for v in s.box[i])
            img = decode_bucket(
                data,
                box if cfg.resolution_divisor == 1 else fit_aspect(box, target),
                target,
                resample=cfg.resample,
                draft=cfg.jpeg_draft,
                name=f"{s.shard[i]}:{s.key[i]}",
                orientation=int(s.orientation[i]) or None,
            )
        else:
            rng = np.random.default_rng([cfg.seed, self.epoch, batch.uid, slot])
            img = decode_crop(data, cfg.crop_size, rng, name=f"{s.shard[i]}:{s.key[i]}",
                              orientation=int(s.orientation[i]) or None)
        suffix = CAPTIONS[cfg.caption_language][1]
        text = members.get(suffix)
        try:
            return img, text.decode("utf-8") if text is not None else s.caption[i]
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{s.shard[i]}: member {s.key[i]}.{suffix} is not UTF-8 text ({e.reason} "
                f"at byte {e.start}); run `native4k verify`"
            ) from e


class _MissingSample(ValueError):
    """A sample the manifest places in a shard that the shard does not hold (its others may)."""


class _MemberReader:
    """Fetches samples' members from their shards, one forward pass per shard where it can.

    One open tar stream per bucket. A sample read on the way to another one is kept when this
    reader needs it again within `shuffle_window` of its bucket's draws; anything else is
    skipped (its bytes are not even copied). A sample needed behind the stream's position
    reopens the shard.
    """

    def __init__(self, cfg: DataConfig, samples: _Samples, batches: list[_Batch]) -> None:
        self.cfg, self.s = cfg, samples
        self.fs, self.root = fsspec.core.url_to_fs(cfg.root)
        self.root = self.root.rstrip("/")
        self.wanted = {samples.key[i] for b in batches for i in b.ids}
        suffixes = {"json", "txt", "zh.txt"} | {
            samples.extension[i] for i in set(self._ids(batches))
        }
        self.suffixes = suffixes
        # Per bucket: the positions (in this reader's draws of that bucket) where each id occurs.
        self.pos: dict[int, list[int]] = {}
        self.count: dict[str, int] = {}
        self.draw_pos: list[int] = []
        for i in self._ids(batches):
            b = samples.bucket[i]
            p = self.count.get(b, 0)
            self.count[b] = p + 1
            self.pos.setdefault(i, []).append(p)
            self.draw_pos.append(p)
        self.next_draw = 0
        self.id_of_key = {samples.key[i]: i for i in set(self._ids(batches))}
        self.streams: dict[str, tuple[str, Iterator[dict[str, Any]]]] = {}  # bucket -> shard
        self.stash: dict[int, dict[str, bytes]] = {}
        self.opened = 0  # shard opens (a reopen counts again)
        self.broken: dict[str, str] = {}  # shard -> why it could not be read (not read again)

    @staticmethod
    def _ids(batches: list[_Batch]) -> Iterator[int]:
        for b in batches:
            yield from b.ids

    def close(self) -> None:
        for _, it in self.streams.values():
            close = getattr(it, "close", None)
            if close:
                close()
        self.streams.clear()

    def _needed_soon(self, i: int, here: int) -> bool:
        """Is sample `i` drawn again by this reader within `shuffle_window` draws of `here`?"""
        p = self.pos.get(i)
        if not p:
            return False
        j = bisect.bisect_right(p, here)
        return j < len(p) and p[j] <= here + self.cfg.shuffle_window

    def get(self, i: int) -> dict[str, bytes]:
        """The members (suffix -> bytes) of sample `i`, the next draw of this reader."""
        here = self.draw_pos[self.next_draw]
        self.next_draw += 1
        if i in self.stash:
            members = self.stash[i]
            if not self._needed_soon(i, here):
                del self.stash[i]
            return members
        s = self.s
        bucket, shard, key = s.bucket[i], s.shard[i], s.key[i]
        if shard in self.broken:
            raise ValueError(f"{self.broken[shard]} (sample {key} is in it)")
        try:
            return self._find(i, here, bucket, shard, key)
        except _MissingSample:
            raise
        except ValueError as e:  # cut short, refused, unsafe: the rest of it would fail too
            self.broken[shard] = str(e)
            self.streams.pop(bucket, None)
            raise

    def _find(self, i: int, here: int, bucket: str, shard: str, key: str) -> dict[str, bytes]:
        for attempt in range(2):
            current = self.streams.get(bucket)
            if current is None or current[0] != shard or attempt:
                if current is not None:
                    getattr(current[1], "close", lambda: None)()
                self.streams[bucket] = (shard, self._open(shard))
                self.opened += 1
            _, it = self.streams[bucket]
            for sample in it:
                k = sample["__key__"]
                members = {x: v for x, v in sample.items() if not x.startswith("__")}
                if k == key:
                    if self._needed_soon(i, here):
                        self.stash[i] = members
                    return members
                j = self.id_of_key.get(k)
                if j is not None and self._needed_soon(j, here):
                    self.stash[j] = members
            self.streams.pop(bucket)  # exhausted without finding it: reopen once
        raise _MissingSample(
            f"{shard}: sample {key} is in the manifest but not in the shard (cut short or "
            "rewritten? `native4k verify` checks every shard)"
        )

    def _open(self, shard: str) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        url = f"{self.root}/{shard}"
        wanted, suffixes = self.wanted, self.suffixes

        def select(fname: str) -> bool:
            key, _, suffix = fname.partition(".")
            if suffix.lower().rsplit(".", 1)[-1] in PICKLE_SUFFIXES:
                raise ValueError(
                    f"{url}: member {fname!r} could hold a pickled object; native4k shards "
                    "never do, and this loader never unpickles. Remove it (`native4k verify` "
                    "lists unexpected members)."
                )
            return key in wanted and suffix.lower() in suffixes

        def samples() -> Iterator[dict[str, Any]]:
            try:
                with self.fs.open(url, "rb", block_size=8 * 1024 * 1024) as fh:
                    files = wds.tariterators.tar_file_iterator(fh, select_files=select)
                    files = ({**f, "__url__": url} for f in files)
                    yield from wds.tariterators.group_by_keys(files)
            except tarfile.TarError as e:
                # webdataset appends " @ <file object>" to the message: the URL says more
                text = _WDS_SUFFIX.sub("", str(e.args[0]) if e.args else str(e))
                raise ValueError(
                    f"{url}: cannot read the shard ({text}); cut short? `native4k verify` "
                    "checks every shard"
                ) from e
            except OSError as e:  # the store refused (an S3 403) or failed the read
                raise ValueError(f"{url}: cannot read the shard: {type(e).__name__}: {e}") from e

        return samples()


# --- decoding -------------------------------------------------------------------------------

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_T = Image.Transpose
# The transpose that shows a stored image in its EXIF orientation (as ImageOps.exif_transpose).
_ORIENT = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}


# PNG text chunks (XMP, a generator's metadata) are read up to 64 MB each, as curation reads
# them: Pillow's own 1 MB cap made a kept PNG with a larger chunk undecodable here.
PNG_TEXT_BYTES = 64 * 2**20
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, PNG_TEXT_BYTES)
# Curation's `probe.max_pixels` admitted every kept image (up to 120 MP by default, more when
# set): Pillow's own bomb limit would warn above 89 MP and refuse a kept image above 179 MP.
Image.MAX_IMAGE_PIXELS = None


def _open(data: bytes, name: str, orientation: int | None = None) -> tuple[Image.Image, int]:
    """A PIL image (header read, pixels not yet) and its orientation (1..8).

    ``orientation`` is the one curation recorded in the manifest, which its crop box and sizes
    are in (curation reads a PNG's EXIF only from before the pixel data); without it, the
    file's EXIF orientation, except for a TIFF, whose decoder applies its orientation tag
    itself (Pillow reports the oriented size and turns the pixels on load; curation records 1).
    """
    try:
        im = Image.open(io.BytesIO(data))
        if orientation is None:
            orientation = 1 if im.format == "TIFF" else int(im.getexif().get(0x0112, 1) or 1)
    except Exception as e:
        raise ValueError(f"{name}: cannot decode image: {e}") from e
    return im, orientation if orientation in range(1, 9) else 1


def stored_box(
    box: tuple[float, float, float, float], orientation: int, size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """A box in oriented pixels -> the same pixels' box in the stored image of `size` (W, H)."""
    w, h = size
    inverse = {
        1: lambda x, y: (x, y),
        2: lambda x, y: (w - x, y),
        3: lambda x, y: (w - x, h - y),
        4: lambda x, y: (x, h - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (y, h - x),
        7: lambda x, y: (w - y, h - x),
        8: lambda x, y: (w - y, x),
    }[orientation]
    (x0, y0), (x1, y1) = inverse(box[0], box[1]), inverse(box[2], box[3])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _load(im: Image.Image, name: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Exception as e:
        raise ValueError(f"{name}: cannot decode image: {e}") from e


def to_rgb8(im: Image.Image, profile: bool = True) -> np.ndarray:
    """Any PIL mode -> uint8 RGB `[H, W, 3]`, in sRGB.

    16-bit grayscale keeps its high byte (PIL's own convert clips it); every other mode is
    shown as a viewer shows it (`training.colour.as_shown`): transparency over white, and an
    embedded ICC profile (Adobe RGB, Display P3, a CMYK press profile) converted to sRGB
    (``profile=False``: left for the caller to convert).
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif mode != "F" and (mode.startswith("I;16") or (a.size and a.max() > 255)):
            a = np.floor(a / 256.0)
        g = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    return np.asarray(as_shown(im, profile))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """A whole image as training sees its pixels: EXIF-oriented uint8 RGB `[H, W, 3]` in sRGB,
    16-bit grey by its high byte, transparency over white (`to_rgb8`).

    Raises:
        ValueError: `data` is no image Pillow decodes (the message starts with `name`).
    """
    im, orientation = _open(data, name)
    _load(im, name)
    return _orient(to_rgb8(im), orientation)


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    if orientation == 1:
        return np.ascontiguousarray(rgb)
    return np.asarray(orient(Image.fromarray(rgb), orientation))


def orient(im: Image.Image, orientation: int) -> Image.Image:
    """`im` as shown under EXIF `orientation` (1..8), as `ImageOps.exif_transpose` shows it."""
    return im if orientation == 1 else im.transpose(_ORIENT[orientation])


def decode_bucket(
    data: bytes,
    box: tuple[int, int, int, int],
    target: tuple[int, int],
    *,
    resample: str = "lanczos",
    draft: bool = True,
    name: str = "image",
    orientation: int | None = None,
) -> np.ndarray:
    """Decode, crop to `box` (oriented pixels), resize down to `target` (W, H) and orient.

    The crop and the filter work on the stored pixels, and only the small result is turned to
    its EXIF orientation; JPEGs may be decoded at 1/2..1/8 scale first (`draft`). Returns uint8
    RGB `[H, W, 3]`. A target larger than the box raises: the loader never upscales.
    `orientation`: the manifest's (see `_open`); None reads the file's EXIF.
    """
    im, orientation = _open(data, name, orientation)
    sw, sh = im.size
    ow, oh = (sh, sw) if orientation in _TRANSPOSED else (sw, sh)
    left, top, right, bottom = box
    tw, th = target
    if not (0 <= left < right <= ow and 0 <= top < bottom <= oh):
        raise ValueError(f"{name}: crop box {box} is outside the {ow}x{oh} image")
    if tw > right - left or th > bottom - top:
        raise ValueError(f"{name}: target {tw}x{th} would upscale the crop box {box}")
    sl, st, sr, sb = (int(v) for v in stored_box(box, orientation, (sw, sh)))
    stw, sth = (th, tw) if orientation in _TRANSPOSED else (tw, th)
    scale = 1
    if draft and resample == "lanczos" and im.format in ("JPEG", "MPO"):
        d = 8  # keep a reducing gap of 2 for the final filter, as PIL's thumbnail() does
        while d > 1 and (sr - sl < 2 * d * stw or sb - st < 2 * d * sth):
            d //= 2
        if d > 1:
            im.draft("RGB", (sw // d, sh // d))
            # libjpeg scales by exactly 1/2^k and rounds the sides up (partial edge blocks).
            scale = round(sw / im.size[0]) if im.size != (sw, sh) else 1
    _load(im, name)
    if scale > 1:
        fl, ft, fr, fb = sl / scale, st / scale, sr / scale, sb / scale
        il, it = math.floor(fl), math.floor(ft)
        ir, ib = min(math.ceil(fr), im.size[0]), min(math.ceil(fb), im.size[1])
        rgb, icc = _rgb_and_late_profile(im.crop((il, it, ir, ib)), stw * sth)
        sub = (fl - il, ft - it, min(fr, ir) - il, min(fb, ib) - it)
        out = Image.fromarray(rgb).resize((stw, sth), Image.Resampling.LANCZOS, box=sub)
        return _orient(np.asarray(to_srgb(out, icc)), orientation)
    rgb, icc = _rgb_and_late_profile(im.crop((sl, st, sr, sb)), stw * sth)
    if (rgb.shape[1], rgb.shape[0]) != (stw, sth):
        if resample == "area":
            import cv2

            rgb = cv2.resize(rgb, (stw, sth), interpolation=cv2.INTER_AREA)
        else:
            rgb = np.asarray(Image.fromarray(rgb).resize((stw, sth), Image.Resampling.LANCZOS))
    if icc is not None:
        rgb = np.asarray(to_srgb(Image.fromarray(rgb), icc))
    return _orient(rgb, orientation)


def _rgb_and_late_profile(crop: Image.Image, target: int) -> tuple[np.ndarray, bytes | None]:
    """`to_rgb8` of a crop, and the RGB profile it leaves for after the resize to `target`
    pixels (or None).

    Resizing and an RGB profile's conversion nearly commute (1 level, at most a few at
    high-contrast edges), so a crop much larger than its target converts the fewer resized
    pixels: a 24 MP camera crop into a 4K bucket converts 8 MP, not 24. CMYK and grey profiles
    convert here, on the inks and grey levels they describe, as does a crop about the target's
    size (converting later would only add copies).
    """
    icc = embedded_profile(crop)
    if (crop.mode in ("CMYK", "L") or crop.width * crop.height < 1.25 * target
            or not converts(icc)):
        return to_rgb8(crop), None
    return to_rgb8(crop, profile=False), icc


def decode_crop(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    *,
    name: str = "image",
    orientation: int | None = None,
) -> np.ndarray:
    """A random `size`² crop of the full-resolution, oriented image: uint8 RGB `[size, size, 3]`.

    The window is drawn in oriented pixels (x, then y, uniform), cut from the stored pixels and
    only then oriented. `orientation`: the manifest's (see `_open`); None reads the EXIF.
    """
    im, orientation = _open(data, name, orientation)
    sw, sh = im.size
    ow, oh = (sh, sw) if orientation in _TRANSPOSED else (sw, sh)
    if ow < size or oh < size:
        raise ValueError(f"{name}: {ow}x{oh} is smaller than the {size}x{size} crop")
    x = int(rng.integers(0, ow - size + 1))
    y = int(rng.integers(0, oh - size + 1))
    _load(im, name)
    sbox = tuple(int(v) for v in stored_box((x, y, x + size, y + size), orientation, (sw, sh)))
    return _orient(to_rgb8(im.crop(sbox)), orientation)
