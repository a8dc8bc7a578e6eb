"""Every column name and Arrow type of the curation job, defined once.

The manifest columns follow `data-contract.md`; the working columns (bytes, hashes,
thumbnails) travel between stages but never reach the manifest.
"""

from __future__ import annotations

import pyarrow as pa

MANIFEST_VERSION = 5
"""2: model columns `character`, `person_score`, `nsfw`, `caption_source` (issue 12).
3: the native evidence columns `native_period`, `native_strength`, `native_test`,
`native_codec` (issue 11) and the reason `analysis_error`.
4: `source_meta`, the input's own JSON metadata (URL, license, ... of a web crawl), verbatim.
5: `color_profile`, the description of the file's embedded ICC profile.

Readers of an earlier version find every earlier column unchanged; the new ones are
nullable."""

# --- identity and input -------------------------------------------------------------------
SOURCE = "source"  # URI as found: path, s3://..., or tar-uri#member
SIZE_BYTES = "size_bytes"  # bytes of the input file (null if unreadable)
SHA256 = "sha256"
CAPTION_EN = "caption_en"
CAPTION_ZH = "caption_zh"
CAPTION_SOURCE = "caption_source"  # sidecar | tar | the captioning model's name
# The input's own metadata: the text of its `<stem>.json` sidecar or of its sample's `.json`
# tar member (img2dataset and WebDataset crawls keep the URL, licence, ... there), verbatim when
# it is one JSON object of at most `readers.META_MAX_BYTES` bytes; null otherwise.
SOURCE_META = "source_meta"

# --- decision -----------------------------------------------------------------------------
STATUS = "status"  # "kept" | "rejected"; null while undecided inside the job
REASON = "reason"
DETAIL = "detail"

# --- header probe -------------------------------------------------------------------------
FORMAT = "format"  # lower-case PIL format name: jpeg, png, webp, ...
WIDTH = "width"  # after EXIF orientation
HEIGHT = "height"
NUM_FRAMES = "num_frames"
MODE = "mode"  # PIL mode as stored in the file (RGB, L, P, CMYK, I;16, ...)
ORIENTATION = "orientation"  # EXIF orientation to apply after Pillow's decode (1: none; TIFF: 1)
# The embedded ICC profile's own description ("Adobe RGB (1998)", "sRGB IEC61966-2.1", a CMYK
# press profile), null without one; "(unreadable)" when littlecms cannot read it; for a camera
# JPEG that marks Adobe RGB in its EXIF instead (DCF), `training.colour.ADOBE_RGB_DCF_NAME`.
# The training loader converts the pixels of any profile but sRGB's to sRGB (training/colour.py).
COLOR_PROFILE = "color_profile"

# --- pixel analysis (scores) ----------------------------------------------------------------
SHARPNESS = "sharpness"
FLAT_FRACTION = "flat_fraction"
ENTROPY = "entropy"
NATIVE_SCORE = "native_score"
UPSCALE_FACTOR = "upscale_factor"
NATIVE_DETAIL = "native_detail"
# the native verdict's evidence (issue 11), nullable: see docs/native-detection.md
NATIVE_PERIOD = "native_period"  # px: period of the strongest resampling trace (null: none; cfa: 2)
NATIVE_STRENGTH = "native_strength"  # strongest test's statistic / threshold (score = 2^-x;
# for cfa, the Bayer lattice's own statistic / threshold: kept, score = 1 - 2^-x / 2)
NATIVE_TEST = "native_test"  # that test: spectral | fold | harmonic | grid | quarter | cfa
NATIVE_CODEC = "native_codec"  # block structure modelled: one of native.CODECS (jpeg, vp8, ...)
PHASH = "phash"  # 64-bit perceptual hash as signed int64 (bit pattern of imagehash.phash)
THUMBNAIL = "thumbnail"  # small JPEG for the model scorers (working column)
AESTHETIC = "aesthetic"
QUALITY = "quality"
NSFW = "nsfw"  # safety score in [0, 1] from the configured safety model
PERSON_SCORE = "person_score"  # person/face evidence in [0, 1] behind `character`
CHARACTER = "character"  # a person is visible (the paper's human channel)
EMBEDDING = "embedding"  # image embedding (working column; written to OUT/embeddings)

# --- dedup, bucket, shard -------------------------------------------------------------------
KEY = "key"
DUPLICATE_OF = "duplicate_of"
BUCKET = "bucket"
CROP_LEFT = "crop_left"
CROP_TOP = "crop_top"
CROP_RIGHT = "crop_right"
CROP_BOTTOM = "crop_bottom"
SHARD = "shard"
EXTENSION = "extension"  # member extension in the shard (jpg, png, webp, ...)

# --- working columns (never written to the manifest) ----------------------------------------
DATA = "data"  # the input's bytes
TAR_OFFSET = "tar_offset"  # byte offset of a tar member's data inside its tar (re-read later)
STAGE_SECONDS = "stage_seconds"  # JSON text: seconds spent per stage on this row

STATUS_KEPT = "kept"
STATUS_REJECTED = "rejected"

REASONS = (
    "unreadable",
    "decode_error",
    "analysis_error",
    "unsupported_format",
    "too_large",
    "too_small",
    "aspect_ratio",
    "blurry",
    "flat",
    "low_entropy",
    "upscaled",
    "low_quality",
    "low_aesthetic",
    "duplicate",
    "unsafe",
)

FIELDS: dict[str, pa.DataType] = {
    SOURCE: pa.string(),
    SIZE_BYTES: pa.int64(),
    SHA256: pa.string(),
    STATUS: pa.string(),
    REASON: pa.string(),
    DETAIL: pa.string(),
    FORMAT: pa.string(),
    WIDTH: pa.int64(),
    HEIGHT: pa.int64(),
    NUM_FRAMES: pa.int64(),
    MODE: pa.string(),
    ORIENTATION: pa.int64(),
    COLOR_PROFILE: pa.string(),
    KEY: pa.string(),
    BUCKET: pa.string(),
    SHARD: pa.string(),
    EXTENSION: pa.string(),
    CROP_LEFT: pa.int64(),
    CROP_TOP: pa.int64(),
    CROP_RIGHT: pa.int64(),
    CROP_BOTTOM: pa.int64(),
    DUPLICATE_OF: pa.string(),
    SHARPNESS: pa.float64(),
    FLAT_FRACTION: pa.float64(),
    ENTROPY: pa.float64(),
    NATIVE_SCORE: pa.float64(),
    UPSCALE_FACTOR: pa.float64(),
    NATIVE_DETAIL: pa.string(),
    NATIVE_PERIOD: pa.float64(),
    NATIVE_STRENGTH: pa.float64(),
    NATIVE_TEST: pa.string(),
    NATIVE_CODEC: pa.string(),
    AESTHETIC: pa.float64(),
    QUALITY: pa.float64(),
    PHASH: pa.int64(),
    CAPTION_EN: pa.string(),
    CAPTION_ZH: pa.string(),
    CAPTION_SOURCE: pa.string(),
    SOURCE_META: pa.string(),
    NSFW: pa.float64(),
    PERSON_SCORE: pa.float64(),
    CHARACTER: pa.bool_(),
    TAR_OFFSET: pa.int64(),
    STAGE_SECONDS: pa.string(),
    DATA: pa.binary(),
    THUMBNAIL: pa.binary(),
    EMBEDDING: pa.list_(pa.float32()),
}

DECISION_COLUMNS = (STATUS, REASON, DETAIL)
READ_COLUMNS = (DATA, SIZE_BYTES, SHA256, CAPTION_EN, CAPTION_ZH, SOURCE_META)
"""What a reader adds to each input row."""

WORKING_COLUMNS = (DATA, THUMBNAIL, EMBEDDING)
"""Columns dropped before anything is written to disk."""

SCORE_COLUMNS = (
    SHARPNESS,
    FLAT_FRACTION,
    ENTROPY,
    NATIVE_SCORE,
    AESTHETIC,
    QUALITY,
    NSFW,
    PERSON_SCORE,
)

MANIFEST_COLUMNS = tuple(c for c in FIELDS if c not in WORKING_COLUMNS)
MANIFEST_SCHEMA = pa.schema([(c, FIELDS[c]) for c in MANIFEST_COLUMNS])


def arrow_type(column: str) -> pa.DataType:
    """The Arrow type of a column; unknown columns are a programming error."""
    assert column in FIELDS, f"column {column!r} is not declared in curation/schema.py"
    return FIELDS[column]


def conform(table: pa.Table, columns: tuple[str, ...] = MANIFEST_COLUMNS) -> pa.Table:
    """Return `table` with exactly `columns`, in order, cast to their types (missing → nulls)."""
    arrays = []
    for name in columns:
        typ = arrow_type(name)
        if name in table.column_names:
            col = table.column(name)
            arrays.append(col if col.type == typ else col.cast(typ))
        else:
            arrays.append(pa.nulls(table.num_rows, typ))
    return pa.Table.from_arrays(arrays, schema=pa.schema([(c, arrow_type(c)) for c in columns]))
