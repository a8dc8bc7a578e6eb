"""One full decode per image, and every pixel analysis from that one decode."""

from __future__ import annotations

import ctypes
import functools
import io
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from curation import schema
from curation.analyze.jpeg_scans import without_luma_ac
from curation.analyze.native import native_score
from curation.analyze.sharpness import sharpness_score
from curation.analyze.texture import flat_fraction, gray_entropy
from curation.base import Stage, column, pending_mask, set_columns
from curation.probe.header_probe import allow_png_text
from curation.threshold_filter import Rule
from training.colour import as_shown

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


PILLOW_BLOCK_BYTES = 256 * 1024**2
"""Pillow's allocation block size in analysis workers: an image up to this size is one block,
which Pillow can export to Arrow (and so to numpy) without a copy."""


MMAP_THRESHOLD_BYTES = 32 * 1024**2
"""Heap blocks up to this size in analysis workers (glibc's largest mmap threshold)."""
TRIM_THRESHOLD_BYTES = 256 * 1024**2
"""Free memory at the heap's top that analysis workers keep for the next image."""


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep a decode's freed buffers in this process for the next image (glibc only).

    A 4K decode allocates tens of MB (Pillow's image block, libjpeg's buffers, a progressive
    JPEG's whole coefficient buffer). On a mix of files glibc keeps serving such blocks by
    mmap and unmapping them when freed, so an image page-faults its buffers in afresh (about
    2,000 pages per 8 MP luma plane): a fifth of the luma decode of 3840x2160 baseline and
    progressive JPEGs (24 -> 19 ms on this project's VM), 3 % of a 1,000-image job's analysis
    pass. With these thresholds blocks of up to 32 MB come from the heap, and up to 256 MB
    freed at its top stay there; the workers' peak memory did not change. Returns whether
    glibc took the settings.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: every image maps its buffers afresh, as before
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)
        and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD_BYTES)
    )


def _view(img: Image.Image) -> np.ndarray:
    """An 'L' image as h×w, an 'RGB' one as h×w×4 (RGBX), without a copy where possible.

    Pillow exports an image whose rows lie in one memory block as an Arrow array that shares
    its memory; `np.asarray` would copy it through `tobytes` (about 6 ms per 8 MP). Images
    spread over several blocks fall back to that copy.
    """
    try:
        flat = pa.array(img)
    except ValueError:  # rows not contiguous: more than one block
        return np.asarray(img)
    if img.mode == "RGB":
        return flat.values.to_numpy(zero_copy_only=True).reshape(img.height, img.width, 4)
    return flat.to_numpy(zero_copy_only=True).reshape(img.height, img.width)


def decode_gray(data: bytes, orientation: int = 1) -> np.ndarray:
    """Decode to an oriented 8-bit grayscale array (the full-resolution luma).

    JPEGs decode their luma plane only (no colour conversion); every other format and
    mode (8/16-bit, gray, palette, alpha, CMYK, CIELab, float) is converted to 8-bit gray,
    16-bit data by its high byte; an image with transparency is seen over white, as the
    training loader and a viewer show it (not its hidden colours). EXIF orientation is applied.

    Raises:
        Exception: whatever the decoder raises for truncated or corrupt data.
    """
    return decode(data, orientation)[0]


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
THUMBNAIL_QUALITY = 90
"""JPEG quality of the thumbnails handed to the model stages."""


def decode(
    data: bytes, orientation: int = 1, thumbnail_size: int = 0, *, jpeg_thumbnail: bool = True
) -> tuple[np.ndarray, bytes | None]:
    """The full-resolution luma (as `decode_gray`) and, when asked, a small RGB JPEG.

    The thumbnail (longest side `thumbnail_size`, oriented, JPEG q90) comes from the same
    decoded image for every format but JPEG; a JPEG's luma is decoded without its colour
    planes, so its thumbnail is a reduced-size DCT decode (libjpeg's 1/2-1/8 scaling:
    about a third of a full decode's time at 4K) and never a second full decode. With
    `jpeg_thumbnail` False a JPEG gets none here (`ThumbnailMaker` makes it later, for the
    images that pass the thresholds).
    """
    thumb = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
            if not jpeg_thumbnail:
                thumbnail_size = 0  # left to ThumbnailMaker: none from the luma below either
            elif thumbnail_size:
                thumb = _safe_thumbnail(data, orientation, thumbnail_size)
            img.draft("L", img.size)
        img.load()
    alpha = _alpha(img)
    if thumbnail_size and thumb is None and img.mode not in _HIGH_BIT_MODES:
        factor = max(1, max(img.size) // (2 * thumbnail_size))
        try:
            small = img.reduce(factor) if img.mode in ("L", "RGB", "RGBA", "LA", "CMYK") else img
            thumb = _thumbnail(as_shown(small), orientation, thumbnail_size)
        except (ValueError, OSError):  # a mode without an RGB conversion: from the luma below
            thumb = None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if img.mode == "I" and arr.max(initial=0) <= 255:
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(arr * scale, 0, 255).astype(np.uint8)
    elif img.mode == "L":
        gray = _view(img)
    elif img.mode == "RGB":
        rgb = _view(img)
        code = cv2.COLOR_RGBA2GRAY if rgb.shape[2] == 4 else cv2.COLOR_RGB2GRAY
        gray = cv2.cvtColor(rgb, code)
    else:
        try:
            gray = np.asarray(img.convert("L"))
        except ValueError:  # no direct conversion to gray (CIELab TIFFs): through RGB
            gray = np.asarray(img.convert("RGB").convert("L"))
    if alpha is not None:
        gray = _luma_over_white(gray, alpha)
    if thumbnail_size and thumb is None:  # high bit depth, odd modes: from the 8-bit luma
        thumb = _thumbnail(Image.fromarray(gray).convert("RGB"), orientation, thumbnail_size)
    if orientation in _TRANSPOSE:
        gray = np.asarray(Image.fromarray(gray).transpose(_TRANSPOSE[orientation]))
    return np.ascontiguousarray(gray), thumb


def _alpha(img: Image.Image) -> np.ndarray | None:
    """The alpha plane (h×w uint8) of an image with a pixel that is not opaque, else None."""
    if img.mode in ("RGBA", "LA", "PA"):
        plane = img.getchannel("A")
    elif img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        with warnings.catch_warnings():  # Pillow's advice to store such palettes as RGBA
            warnings.simplefilter("ignore")
            plane = img.convert("RGBA").getchannel("A")
    else:
        return None
    return None if plane.getextrema()[0] == 255 else np.asarray(plane)


def _luma_over_white(gray: np.ndarray, alpha: np.ndarray, rows: int = 512) -> np.ndarray:
    """The luma of the image composited over white (luma is linear in RGB), in row stripes so
    that an image's temporaries stay small."""
    out = np.empty_like(gray)
    for y in range(0, gray.shape[0], rows):
        a = alpha[y : y + rows].astype(np.uint32)
        out[y : y + rows] = (gray[y : y + rows] * a + 255 * (255 - a) + 127) // 255
    return out


def is_jpeg_thumbnail_deferred(data: bytes) -> bool:
    """Whether `decode(..., jpeg_thumbnail=False)` leaves this file without a thumbnail."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L")
    except Exception:  # unreadable: decode fails first and no thumbnail is due
        return False


def make_thumbnail(data: bytes, orientation: int, size: int) -> bytes | None:
    """The thumbnail `decode` would make (a reduced-size decode for JPEG); None if undecodable."""
    try:
        if is_jpeg_thumbnail_deferred(data):
            return _safe_thumbnail(data, orientation, size)
        return decode(data, orientation, size)[1]
    except Exception:  # the analysis records the image's verdict; here it just gets none
        return None


def _safe_thumbnail(data: bytes, orientation: int, size: int) -> bytes | None:
    """A JPEG's thumbnail by a reduced-size DCT decode; None when that decode fails.

    A progressive JPEG decoded at 1/8 scale is decoded without its luma AC scans
    (`jpeg_scans.without_luma_ac`): the same pixels for a fraction of the entropy decoding."""
    try:
        small = Image.open(io.BytesIO(data))
        box = thumbnail_box(small.size, size)
        drafted = small.draft("RGB", box)
        if (drafted is not None and small.format == "JPEG" and small.info.get("progressive")
                and small.decoderconfig[:1] == (8,)):  # libjpeg decodes at 1/8 scale
            small = _without_luma_ac(data, small, box)
        return _thumbnail(as_shown(small), orientation, size)
    except (ValueError, OSError):  # the full decode below decides the image's verdict
        return None


def _without_luma_ac(data: bytes, drafted: Image.Image, box: tuple[int, int]) -> Image.Image:
    """The 1/8-scale decode of `data` (drafted for `box`, not loaded, as `drafted`) without its
    luma AC scans, loaded; `drafted` itself when the file cannot be shortened or the result
    differs in size or mode."""
    short = without_luma_ac(data)
    if short is None:
        return drafted
    try:
        head = Image.open(io.BytesIO(short))
        head.draft("RGB", box)
        if (head.size, head.mode, head.decoderconfig) != (
                drafted.size, drafted.mode, drafted.decoderconfig):
            return drafted
        head.load()
    except (ValueError, OSError):  # the whole file decides, as for any other JPEG
        return drafted
    return head


def thumbnail_box(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """The thumbnail's own width and height (longest side `size`, never up): the request for
    a reduced-size JPEG decode, so libjpeg may scale by 1/8 wherever the result still covers
    it (a 4096x2304 photograph decodes at 512x288, not at 1024x576 as a square request gives)."""
    w, h = image_size
    s = min(1.0, size / max(w, h, 1))
    return max(1, round(w * s)), max(1, round(h * s))


def _thumbnail(img: Image.Image, orientation: int, size: int) -> bytes:
    """Resize an RGB image to longest side `size` (never up), orient it, encode as JPEG."""
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


# libjpeg's luminance quantisation table at quality 50 (natural order), which its quality
# setting scales by 5000/q (q < 50) or 200 - 2q percent.
_STD_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40,
             57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35,
             55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112,
             100, 103, 99)
JPEG_LOW_SCALE = 31.0
"""Quantisation scale (percent of libjpeg's quality-50 table; 30.1 at quality 85, 32 at 84,
50 at 75) above which a JPEG is judged with the ``jpeg_low`` model: the detector was calibrated
at q85-q100, and at q75 the 8×8 grid alone trips the fold and grid tests
(docs/native-detection.md, "Codecs")."""
JPEG_COARSE_SCALE = 52.0
"""Scale above which (quality 73 and coarser: 54.1 at q73, 51.9 at q74) a JPEG is judged with the
``jpeg_coarse`` model: ``jpeg_low``'s thresholds, set on q75 natives, reject 5-15 % of the
natives saved at q72-q60."""
JPEG_COARSEST_SCALE = 81.0
"""Scale above which (below quality 60: 80.04 at q60, 81.9 at q59, 100 at q50, 125 at q40) a
JPEG is judged with the ``jpeg_coarsest`` model."""


MAX_HEADER_STEPS = 65_536
"""Marker segments (JPEG) or chunks (WebP) walked before the image data, at most: the walk
hops from header to header, so metadata of any size in front of the image (a multi-MB ICC
profile or Photoshop XMP) costs a few steps, and a file of nothing but markers a bounded
few milliseconds."""


def _jpeg_quant_scale(data: bytes) -> float | None:
    """The luma quantisation table's scale in percent of libjpeg's quality-50 table.

    Walks the JPEG's marker segments up to the first scan (at most `MAX_HEADER_STEPS`); None
    when no table 0 is found. A table's order (zigzag or natural) does not change its sum,
    which is what is compared.
    """
    pos, n = 2, len(data)
    for _ in range(MAX_HEADER_STEPS):
        if not (pos + 4 <= n and data[pos] == 0xFF):
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA or length < 2:  # start of scan: no table follows
            return None
        if marker == 0xDB:
            i, end = pos + 4, min(pos + 2 + length, n)
            while i < end:
                precision, table = data[i] >> 4, data[i] & 15
                size = 128 if precision else 64
                if table == 0 and i + 1 + size <= end:
                    raw = data[i + 1 : i + 1 + size]
                    values = ([int.from_bytes(raw[k : k + 2], "big") for k in range(0, 128, 2)]
                              if precision else list(raw))
                    return 100.0 * sum(values) / sum(_STD_LUMA)
                i += 1 + size
        pos += 2 + length
    return None


VP8_FINE_QUANTISER = 12
"""Largest VP8 luma AC quantiser index (over the frame's segments) of a lossy WebP judged with
the ``vp8_fine`` model: libwebp writes 12 at quality 90 (6 at 95, 0 at 100, 20 at 85, 36 at
75), whatever the picture."""


class _BoolDecoder:
    """VP8's boolean entropy decoder (RFC 6386, section 7), for the frame header's literals."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 2
        self.value = int.from_bytes(data[:2], "big")
        self.range, self.bits = 255, 0

    def bit(self) -> int:
        split = 1 + (((self.range - 1) * 128) >> 8)
        big = split << 8
        out = int(self.value >= big)
        if out:
            self.range -= split
            self.value -= big
        else:
            self.range = split
        while self.range < 128:
            self.value <<= 1
            self.range <<= 1
            self.bits += 1
            if self.bits == 8:
                self.bits = 0
                if self.pos >= len(self.data):
                    raise ValueError("VP8 header truncated")
                self.value |= self.data[self.pos]
                self.pos += 1
        return out

    def literal(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | self.bit()
        return value

    def optional_signed(self, n: int) -> int:
        """A flagged, signed n-bit value (0 when the flag is off)."""
        if not self.bit():
            return 0
        value = self.literal(n)
        return -value if self.bit() else value


def vp8_quantiser(frame: bytes) -> int | None:
    """The coarsest luma AC quantiser index (0-127) of a VP8 key frame, from its header.

    Reads the frame header up to the quantiser indices (RFC 6386, sections 9.2-9.6 and 19.2):
    the base index, or with segmentation the largest of the segments' (absolute or base +
    delta). None for anything that is not a readable key frame.
    """
    if len(frame) < 12 or frame[0] & 1 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    try:
        b = _BoolDecoder(bytes(frame[10:]))
        b.literal(2)  # colour space, clamping
        segments: tuple[bool, list[int]] | None = None
        if b.bit():  # segmentation enabled
            update_map, update_data = b.bit(), b.bit()
            if update_data:
                absolute = bool(b.bit())
                quants = [b.optional_signed(7) for _ in range(4)]
                for _ in range(4):
                    b.optional_signed(6)  # loop-filter levels
                segments = (absolute, quants)
            if update_map:
                for _ in range(3):
                    if b.bit():
                        b.literal(8)  # tree probabilities
        b.literal(1 + 6 + 3)  # filter type, level, sharpness
        if b.bit() and b.bit():  # loop-filter deltas present and updated
            for _ in range(8):
                b.optional_signed(6)
        b.literal(2)  # partitions
        base = b.literal(7)
    except ValueError:
        return None
    if segments is None:
        return base
    absolute, quants = segments
    return max(min(max(q if absolute else base + q, 0), 127) for q in quants)


def _webp_lossy_frame(data: bytes) -> bytes | None:
    """The first 4 KB of a WebP file's ``VP8 `` chunk (enough for its frame header).

    None for a lossless file (``VP8L``) or one without an image chunk; ``b""`` for an
    animation, whose frames are treated as lossy without reading their headers.
    """
    pos = 12
    for _ in range(MAX_HEADER_STEPS):  # chunks: ALPH, ICCP, ... come first
        if pos + 8 > len(data):
            break
        fourcc = bytes(data[pos : pos + 4])
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if fourcc == b"VP8 ":
            return bytes(data[pos + 8 : pos + 8 + min(size, 4096)])
        if fourcc in (b"VP8L", b"ANIM", b"ANMF"):
            return b"" if fourcc != b"VP8L" else None
        pos += 8 + size + (size & 1)
    return None


def block_codec(data: bytes) -> str:
    """The block structure of an encoded image, from its first bytes (see `native.CODECS`).

    ``jpeg`` for JPEG (and MPO), ``jpeg_low`` for a JPEG whose luma quantisation table is
    coarser than libjpeg's at quality 85 (`JPEG_LOW_SCALE`), ``jpeg_coarse`` and
    ``jpeg_coarsest`` coarser still (`JPEG_COARSE_SCALE`, `JPEG_COARSEST_SCALE`), ``vp8`` for
    lossy WebP (a ``VP8 `` chunk, also inside an extended ``VP8X`` file; animations too),
    ``vp8_fine`` for a lossy WebP whose quantiser is at most `VP8_FINE_QUANTISER`, ``av1`` for
    AVIF, ``lossless`` for everything else (PNG, lossless WebP, TIFF, ...: no block grid of
    their own).
    """
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        scale = _jpeg_quant_scale(data)
        if scale is None or scale <= JPEG_LOW_SCALE:
            return "jpeg"
        if scale > JPEG_COARSEST_SCALE:
            return "jpeg_coarsest"
        return "jpeg_coarse" if scale > JPEG_COARSE_SCALE else "jpeg_low"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        frame = _webp_lossy_frame(data)
        if frame is None:
            return "lossless"
        quantiser = vp8_quantiser(frame)
        fine = quantiser is not None and quantiser <= VP8_FINE_QUANTISER
        return "vp8_fine" if fine else "vp8"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "av1"
    if head[4:8] == b"ftyp" and b"avif" in head[16:64]:  # avif as a compatible brand
        return "av1"
    return "lossless"


def _native_columns(gray: np.ndarray, codec: str) -> dict[str, Any]:
    """`native_score` and its evidence columns."""
    native = native_score(gray, codec=codec)
    return {
        schema.NATIVE_SCORE: float(native.score),
        schema.UPSCALE_FACTOR: None if np.isnan(native.factor) else float(native.factor),
        schema.NATIVE_DETAIL: native.detail,
        schema.NATIVE_PERIOD: None if np.isnan(native.period) else float(native.period),
        schema.NATIVE_STRENGTH: float(native.strength),
        schema.NATIVE_TEST: native.test,
        schema.NATIVE_CODEC: native.codec,
    }


def perceptual_hash(gray: np.ndarray) -> int:
    """imagehash's 64-bit pHash as a signed int64 (computed on an area-reduced copy)."""
    h, w = gray.shape
    small = gray
    factor = min(h, w) // 256
    if factor >= 2:
        small = cv2.resize(gray, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    bits = imagehash.phash(Image.fromarray(small)).hash.ravel()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= (1 << 63) else value


SCORE_ORDER = (
    schema.SHARPNESS,
    schema.FLAT_FRACTION,
    schema.ENTROPY,
    schema.NATIVE_SCORE,
    schema.PHASH,
)
"""The order `PixelAnalyzer` computes its scores in: cheapest and most often decisive first
(the focus measure, 2 ms at 8 MP; the paper's flatness rule, which rejects most real
photographs; entropy; the native check, about half of the analysis time; the pHash). A job's
pixel rules take precedence in this order, so stopping at the first rule an image fails gives
the same verdict and reason as computing everything."""

DECODED_MARK = SCORE_ORDER[0]
"""The score computed for every decoded image: not null exactly where the pixels decoded."""

COMPLETE_MARKS = SCORE_ORDER[1:]
"""Columns that are null for a decoded image whose analyses stopped early."""


@dataclass(kw_only=True)
class PixelAnalyzer(Stage):
    """Decode each pending image once and compute its pixel scores from that decode.

    Reads: `data`, `orientation`. Writes: `native_score`, `upscale_factor`, `native_detail`,
    the native evidence (`native_period`, `native_strength`, `native_test`, `native_codec`:
    the codec comes from the file's first bytes, `block_codec`), `sharpness`, `flat_fraction`,
    `entropy`, `phash`, and `thumbnail` (a small RGB JPEG for the model stages, when
    `thumbnail_size` > 0). Rejects: `decode_error` (truncated or
    corrupt pixels), `analysis_error` (decoded pixels an analysis failed on: the image, not
    the job, gets the verdict). Thresholds are decided by `ThresholdFilter`.

    Scores are computed in `SCORE_ORDER`. Given the job's pixel `rules` and `complete` False,
    the analyses stop at the first score that one of them rejects: the later scores, whose
    values could not change the verdict, stay null (`DECODED_MARK` is always computed). The
    stage still decides nothing. Resources: 1 CPU; peak
    memory about 4 bytes per pixel of the largest image allowed (`probe.max_pixels`).
    """

    name: ClassVar[str] = "analyze"
    batch_size: ClassVar[int] = 4
    # Peak about 4 bytes per pixel of the largest image allowed (0.5 GB at 120 MP), declared
    # in words rather than as `memory`: a memory request would stop Ray from fusing the reader
    # and this stage into one task, and the image bytes would cross the object store.
    reads: ClassVar[tuple[str, ...]] = (schema.DATA, schema.ORIENTATION)
    writes: ClassVar[tuple[str, ...]] = (
        schema.NATIVE_SCORE,
        schema.UPSCALE_FACTOR,
        schema.NATIVE_DETAIL,
        schema.NATIVE_PERIOD,
        schema.NATIVE_STRENGTH,
        schema.NATIVE_TEST,
        schema.NATIVE_CODEC,
        schema.SHARPNESS,
        schema.FLAT_FRACTION,
        schema.ENTROPY,
        schema.PHASH,
        schema.THUMBNAIL,
    )
    flat_patch: int = 240
    flat_variance: float = 800.0
    thumbnail_size: int = 0
    """Longest side of the thumbnail (0: none)."""
    jpeg_thumbnails: bool = True
    """False leaves a JPEG's thumbnail, a second (reduced-size) decode, to `ThumbnailMaker`
    after the thresholds, so that rejected JPEGs cost no thumbnail."""
    rules: list[Rule] = field(default_factory=list)
    """The job's pixel rules, in the order their reasons take precedence (`SCORE_ORDER`)."""
    complete: bool = True
    """Compute every score of every decoded image, also after a rule rejected it (audits)."""

    def __post_init__(self) -> None:
        ranks = [SCORE_ORDER.index(r.column) for r in self.rules if r.column in SCORE_ORDER]
        if ranks != sorted(ranks):
            raise ValueError(
                f"pixel rules must take precedence in the order scores are computed "
                f"({', '.join(SCORE_ORDER)}), not {[r.column for r in self.rules]}"
            )

    def setup(self) -> None:
        Image.MAX_IMAGE_PIXELS = None  # the header filter already capped the size
        allow_png_text()  # as the probe read it
        Image.core.set_block_size(PILLOW_BLOCK_BYTES)  # one block per image: no-copy export
        reuse_freed_memory()
        cv2.setNumThreads(1)  # one CPU per task, as declared

    def analyze(self, gray: np.ndarray, codec: str = "jpeg") -> dict[str, Any]:
        """The scores of one decoded image; `codec` is its file's `block_codec`.

        In `SCORE_ORDER`, stopping after a score a rule rejects unless `complete`.
        """
        scores: dict[str, Any] = {}
        for name in SCORE_ORDER:
            scores.update(self._score(name, gray, codec))
            if not self.complete and any(
                r.column == name and r.violation(scores[name]) is not None for r in self.rules
            ):
                break
        return scores

    def _score(self, name: str, gray: np.ndarray, codec: str) -> dict[str, Any]:
        """One score of `SCORE_ORDER` (the native check with its evidence columns)."""
        if name == schema.SHARPNESS:
            return {name: float(sharpness_score(gray))}
        if name == schema.FLAT_FRACTION:
            patch, variance = self.flat_patch, self.flat_variance
            return {name: flat_fraction(gray, patch=patch, flat_variance=variance)}
        if name == schema.ENTROPY:
            return {name: gray_entropy(gray)}
        if name == schema.NATIVE_SCORE:
            return _native_columns(gray, codec)
        assert name == schema.PHASH, name
        return {name: perceptual_hash(gray)}

    def process(self, table: pa.Table) -> pa.Table:
        out: dict[str, list[Any]] = {c: [] for c in self.writes}
        status = column(table, schema.STATUS)
        reason = column(table, schema.REASON)
        detail = column(table, schema.DETAIL)
        rows = zip(
            pending_mask(table),
            column(table, schema.DATA),
            column(table, schema.ORIENTATION, 1),
            strict=True,
        )
        for i, (pending, data, orientation) in enumerate(rows):
            scores: dict[str, Any] = {}
            if pending:
                try:
                    gray, thumb = decode(
                        data,
                        orientation or 1,
                        self.thumbnail_size,
                        jpeg_thumbnail=self.jpeg_thumbnails,
                    )
                except Exception as e:  # corrupt pixels are this image's verdict
                    status[i], reason[i] = schema.STATUS_REJECTED, "decode_error"
                    detail[i] = f"pixels undecodable: {type(e).__name__}: {e}"[:300]
                else:
                    try:
                        scores = {**self.analyze(gray, block_codec(data)), schema.THUMBNAIL: thumb}
                    except Exception as e:  # a decoded image an analysis cannot handle
                        status[i], reason[i] = schema.STATUS_REJECTED, "analysis_error"
                        detail[i] = f"pixel analysis failed: {type(e).__name__}: {e}"[:300]
                    del gray
            for c in self.writes:
                out[c].append(scores.get(c))
        return set_columns(
            table, {**out, schema.STATUS: status, schema.REASON: reason, schema.DETAIL: detail}
        )
