"""Header probe: format, oriented size, mode and frame count, without decoding pixels."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
from PIL import Image, TiffImagePlugin, UnidentifiedImageError, features

from curation import schema
from curation.base import Stage, column, pending_mask, set_columns
from training.colour import embedded_profile, profile_name

SUPPORTED_FORMATS = ("jpeg", "mpo", "png", "webp", "tiff", "bmp", "gif", "avif", "jpeg2000")
"""PIL formats the job decodes; anything else is `unsupported_format`."""

EXTENSIONS = {
    "jpeg": "jpg",
    "mpo": "jpg",
    "png": "png",
    "webp": "webp",
    "tiff": "tif",
    "bmp": "bmp",
    "gif": "gif",
    "avif": "avif",
    "jpeg2000": "jp2",
}
"""Shard member extension for each format (the bytes are stored unchanged)."""

PNG_TEXT_BYTES = 64 * 2**20
"""Largest decompressed PNG text chunk (XMP, ICC-like or a generator's metadata) read. Pillow's
own cap is 1 MB, which made such PNGs undecodable; its 64 MB cap on all of a file's text
stays (a compressed chunk cannot expand without bound)."""


def allow_png_text() -> None:
    """Let Pillow read PNG text chunks up to `PNG_TEXT_BYTES` (process-wide; idempotent)."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, PNG_TEXT_BYTES)


allow_png_text()

ROTATING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION_TAG = 0x0112
SELF_ORIENTING_FORMATS = ("tiff",)
"""Formats whose Pillow decoder applies the orientation tag itself: the header size Pillow
reports is already oriented and the decoded pixels already turned, so `probe` records
orientation 1 (nothing left to apply) for them."""


def sniff_non_image(data: bytes) -> str | None:
    """Words for bytes that are plainly not a raster image (SVG, HTML, text, archives,
    video), else None."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "SVG vector image (not a raster format)"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML document, not an image"
    if head.startswith(b"%pdf"):
        return "PDF document, not an image"
    if data[:2] == b"\x1f\x8b":
        return "gzip-compressed file (a .tar.gz shard?): not read; give it uncompressed (.tar)"
    if data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00" or data[:4] == b"\x28\xb5\x2f\xfd":
        return "compressed file (bzip2, xz or zstd): not read; give it uncompressed"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06") or data[:6] in (
        b"Rar!\x1a\x07",
        b"7z\xbc\xaf\x27\x1c",
    ):
        return "archive (zip, rar or 7z): not read; unpack it"
    if data[4:8] == b"ftyp":  # ISO media that is no HEIF/AVIF image (`sniff_unread_format`)
        brand = data[8:12].decode("latin-1").strip()
        return f"video or audio file (ISO media, brand {brand!r}), not an image"
    if data[:4] == b"\x1a\x45\xdf\xa3" or (data[:4] == b"RIFF" and data[8:12] == b"AVI "):
        return "video file (Matroska/WebM or AVI), not an image"
    text = _text_head(data[:4096])
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "text file, not an image"
    return None


def _text_head(head: bytes) -> str | None:
    """The first bytes of a file as text: UTF-8 (a byte-order mark dropped, a character cut
    at the end forgiven) or UTF-16 with its mark, as Windows tools write; else None."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return head[: len(head) // 2 * 2].decode("utf-16", "replace").rstrip("\ufffd")
    for cut in range(4):  # a multi-byte character may straddle the end of the head
        try:
            return head[: len(head) - cut].decode("utf-8-sig")
        except UnicodeDecodeError:
            continue
    return None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, from header metadata only.

    PIL's `getexif()` decodes a whole PNG whose header holds no EXIF (to look for an eXIf
    chunk after the pixels): a 1 x 2^30 PNG took 66 s and 8 GB there. PNGs are therefore
    read only from an eXIf chunk before the pixel data (where the PNG spec places it).
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        return int(exif.get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block does not make the image unusable
        return 1


HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                         b"mif1", b"msf1"})
"""ISOBMFF brands of HEIF/HEIC files (``mif1``/``msf1`` only when no AVIF brand is listed)."""


def _iso_brands(data: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO media file's `ftyp` box (empty if none)."""
    if data[4:8] != b"ftyp":
        return set()
    size = int.from_bytes(data[:4], "big")
    end = min(len(data), size if 16 <= size <= 4096 else 64)
    return {data[8:12], *(data[i : i + 4] for i in range(16, end - 3, 4))}


def is_avif(data: bytes) -> bool:
    """Whether the bytes begin as an AVIF image (brand `avif` or `avis`)."""
    return bool(_iso_brands(data) & {b"avif", b"avis"})


def sniff_unread_format(data: bytes) -> str | None:
    """Words for raster formats the job does not read (HEIF/HEIC, JPEG XL), else None.

    Why they are not read: ``docs/native-detection.md``, *Codecs*. An AVIF whose Pillow has
    no AVIF decoder is named too.
    """
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL image: not read"
    brands = _iso_brands(data)
    if brands & {b"avif", b"avis"}:  # (where Pillow reads AVIF, `probe` calls it broken first)
        return "AVIF image: this Pillow build has no AVIF decoder"
    if brands & HEIF_BRANDS:
        return "HEIF/HEIC image (HEVC-coded): not read"
    return None


TIFF_SAMPLE_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "floating point"}


def sniff_tiff_layout(data: bytes) -> str | None:
    """Words for a TIFF whose header reads but whose pixel layout Pillow does not decode.

    Pillow opens only the layouts it has a mode for; a valid file in another (RGB of 32-bit
    floats as OpenCV and scientific tools write, 12-bit samples, ...) is refused as an
    unidentified image. None for anything else (not a TIFF, or a header that does not read).
    """
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TiffImagePlugin.TiffImageFile(io.BytesIO(data))
        except SyntaxError as e:  # Pillow's words for a layout it has no mode for
            if "unknown pixel mode" not in str(e):
                return None
        except Exception:
            return None
        else:
            return None
        try:
            ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
            fp = io.BytesIO(data)
            fp.seek(ifd.next)
            ifd.load(fp)
            samples = int(ifd.get(277, 1))
            bits = ifd.get(258, (1,))
            kind = TIFF_SAMPLE_FORMATS.get(int(ifd.get(339, (1,))[0]), "undefined")
        except Exception:
            return "TIFF image in a pixel layout Pillow cannot decode"
    return (
        f"TIFF image with {samples} sample(s) of {bits[0]}-bit {kind} per pixel: a pixel "
        "layout Pillow cannot decode"
    )


PROFILE_NAME_CHARS = 120
"""Longest ICC profile description kept in the manifest (a hostile file may hold any text)."""


def _profile(icc: Any) -> str | None:
    """The manifest's `color_profile`: the profile's description, or None without one."""
    if not icc or not isinstance(icc, bytes):
        return None
    name = profile_name(icc)
    return "(unreadable)" if name is None else name[:PROFILE_NAME_CHARS]


def probe(data: bytes) -> dict[str, Any]:
    """Header facts of one image's bytes (no pixel decode).

    Returns a dict with `format`, `width`, `height` (after EXIF orientation), `mode`,
    `num_frames`, `orientation` (the one still to apply to Pillow's decode: 1 for
    `SELF_ORIENTING_FORMATS`), `color_profile` (`schema.COLOR_PROFILE`), or with
    `reason`/`detail` when the bytes are no usable image.
    """
    if not data:
        return {"reason": "decode_error", "detail": "empty file (0 bytes)"}
    Image.MAX_IMAGE_PIXELS = None  # sizes are judged by thresholds; nothing is decoded here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt = (img.format or "").lower()
            width, height = img.size
            mode = img.mode
            frames = int(getattr(img, "n_frames", 1) or 1)
            orientation = _orientation(img)
            icc = embedded_profile(img)
            previews = fmt == "tiff" and frames > 1 and _pages_smaller_than_first(img, frames)
    except UnidentifiedImageError:
        if is_avif(data) and features.check("avif"):
            return {"reason": "decode_error", "detail": "AVIF image that does not read: "
                    "truncated or corrupt"}
        what = sniff_unread_format(data) or sniff_tiff_layout(data) or sniff_non_image(data)
        if what:
            return {"reason": "unsupported_format", "detail": what}
        return {"reason": "decode_error", "detail": "not a recognisable image format"}
    except Exception as e:
        return {
            "reason": "decode_error",
            "detail": f"header unreadable: {type(e).__name__}: {e}"[:300]
            .encode("utf-8", "backslashreplace")
            .decode("utf-8"),
        }
    if orientation not in range(1, 9) or fmt in SELF_ORIENTING_FORMATS:
        orientation = 1
    if orientation in ROTATING_ORIENTATIONS:
        width, height = height, width
    row = {
        "format": fmt,
        "width": width,
        "height": height,
        "mode": mode,
        "num_frames": frames,
        "orientation": orientation,
        "color_profile": _profile(icc),
    }
    if fmt not in SUPPORTED_FORMATS:
        row.update(
            reason="unsupported_format", detail=f"format {fmt or 'unknown'} is not supported"
        )
    elif frames > 1 and fmt != "mpo" and not previews:
        what = f"multi-page {fmt} ({frames} pages)" if fmt == "tiff" else (
            f"animated {fmt} ({frames} frames)")
        row.update(reason="unsupported_format", detail=what)
    return row


MAX_TIFF_PAGES = 64
"""Pages of a TIFF whose sizes the probe reads, at most (each is one directory, no pixels)."""


def _pages_smaller_than_first(img: Image.Image, frames: int) -> bool:
    """Whether every page of a multi-page TIFF after the first is smaller on both sides: the
    previews or reduced-resolution copies cameras, scanners and GIS tools add, as an MPO's
    preview frame. The image is then its first page (what Pillow decodes); pages of equal size
    (a document or a stack) or a larger later one leave the file unsupported."""
    if frames > MAX_TIFF_PAGES:
        return False
    width, height = img.size
    try:
        for page in range(1, frames):
            img.seek(page)
            w, h = img.size
            if w >= width or h >= height:
                return False
        return True
    except Exception:  # a later page that does not read: left unsupported, as before
        return False
    finally:
        with contextlib.suppress(Exception):
            img.seek(0)


@dataclass(kw_only=True)
class HeaderProbe(Stage):
    """Read each pending image's header: format, size after EXIF orientation, mode, frames and
    colour profile.

    Reads: `data`. Writes: `format`, `width`, `height`, `mode`, `num_frames`, `orientation`,
    `color_profile`.
    Rejects: `decode_error` (empty, unidentifiable, broken header), `unsupported_format`
    (SVG, text, animations, formats outside `SUPPORTED_FORMATS`, TIFF pixel layouts Pillow
    cannot decode). Size thresholds are decided
    by the `ThresholdFilter` after it. Resources: 1 CPU, header bytes only.
    """

    name: ClassVar[str] = "probe"
    batch_size: ClassVar[int | None] = None
    reads: ClassVar[tuple[str, ...]] = (schema.DATA,)
    writes: ClassVar[tuple[str, ...]] = (
        schema.FORMAT,
        schema.WIDTH,
        schema.HEIGHT,
        schema.MODE,
        schema.NUM_FRAMES,
        schema.ORIENTATION,
        schema.COLOR_PROFILE,
    )

    def process(self, table: pa.Table) -> pa.Table:
        keys = ("format", "width", "height", "mode", "num_frames", "orientation", "color_profile")
        cols: dict[str, list[Any]] = {k: [] for k in keys}
        status = column(table, schema.STATUS)
        reason = column(table, schema.REASON)
        detail = column(table, schema.DETAIL)
        for i, (pending, data) in enumerate(
            zip(pending_mask(table), column(table, schema.DATA), strict=True)
        ):
            row = probe(data) if pending else {}
            for k in keys:
                cols[k].append(row.get(k))
            if pending and "reason" in row:
                status[i], reason[i], detail[i] = (
                    schema.STATUS_REJECTED,
                    row["reason"],
                    row["detail"],
                )
        return set_columns(
            table,
            {**cols, schema.STATUS: status, schema.REASON: reason, schema.DETAIL: detail},
        )
