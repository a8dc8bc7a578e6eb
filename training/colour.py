"""Embedded colour profiles: pixels as sRGB, the way a browser or photo viewer shows them.

A camera or editor often stores pixels in another colour space and says so in an ICC profile
inside the file: Adobe RGB (1998) and ProPhoto/ROMM RGB from cameras and raw converters, Display
P3 from phones, a press profile (SWOP, FOGRA) for a CMYK JPEG. Read as if they were sRGB, such
pixels look washed out (wide-gamut RGB) or wrong altogether (CMYK through PIL's naive
conversion). A model is trained and scored on what people see, so every decode that feeds a
model (the training loader, curation's thumbnails for the model stages, the auditors' report)
converts through the profile with littlecms (`PIL.ImageCms`). The shards keep the original
bytes, profile included.

A profile that is sRGB in all but name (any of the many "sRGB IEC61966-2.1" copies, Facebook's
"c2", a camera's "sRGB built-in") converts to the same pixels give or take one level; such
profiles are found once, by converting a colour lattice, and skipped. A profile littlecms cannot
read, or one whose colour space is not the image's (an RGB profile on a grey image), is ignored:
the pixels are then used as they are, as before this module existed. The forensic analyses
(native resolution, focus, flatness) never convert: they judge the stored signal.

Pillow only; importing this module loads no torch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageCms

logger = logging.getLogger(__name__)

_SPACES: dict[str, tuple[str, str]] = {
    # image mode -> (the profile's colour space it needs, the transform's input mode)
    "RGB": ("RGB ", "RGB"),
    "CMYK": ("CMYK", "CMYK"),
    "L": ("GRAY", "L"),
}
SAME_AS_SRGB = 1
"""A profile whose conversion of the test lattice moves no channel by more than this many
levels (of 255) is taken as sRGB and not applied."""
_LATTICE_STEPS = 9  # test colours per channel (RGB: 729 colours; grey: 256 levels)


def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _lattice(mode: str) -> Image.Image:
    if mode == "L":
        return Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    v = np.linspace(0, 255, _LATTICE_STEPS).round().astype(np.uint8)
    rgb = np.stack(np.meshgrid(v, v, v, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    return Image.fromarray(rgb)


MAX_PROFILE_BYTES = 4 * 2**20
"""Profiles larger than this are ignored (real ones, CMYK press profiles included, stay under
2 MB; a PNG's compressed iCCP chunk could otherwise unpack to tens of MB per image)."""
_CACHED = 32  # profiles remembered per process, by digest: the caches hold no profile bytes
_transforms: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
_names: OrderedDict[bytes, str | None] = OrderedDict()
_lock = threading.Lock()


def _remember(cache: OrderedDict, key: Any, make: Callable[[], Any]) -> Any:
    """`cache[key]`, made by `make()` on a miss; the least recently used entry goes first."""
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = make()
    with _lock:
        cache[key] = value
        if len(cache) > _CACHED:
            cache.popitem(last=False)
    return value


def _digest(icc: bytes) -> bytes:
    return hashlib.blake2b(icc, digest_size=16).digest()


def _usable(icc: Any) -> bool:
    """Whether `icc` is profile bytes worth reading: present and at most `MAX_PROFILE_BYTES`."""
    return isinstance(icc, bytes) and 0 < len(icc) <= MAX_PROFILE_BYTES


def _transform(icc: Any, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from `icc` to sRGB for an image of `mode`, or None when there is none to
    apply (no profile, sRGB already, unreadable, too large, a mode or colour space it does not
    fit)."""
    if not _usable(icc) or mode not in _SPACES:
        return None
    return _remember(_transforms, (_digest(icc), mode), lambda: _build(icc, mode))


def _build(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    space, in_mode = _SPACES[mode]
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if source.profile.xcolor_space != space:
            return None
        # NOCACHE: littlecms's one-pixel cache makes a transform unsafe to share between
        # threads; without it the speed is the same (121 ms for 8 MP either way).
        transform = ImageCms.buildTransform(source, _srgb(), in_mode, "RGB",
                                            flags=ImageCms.Flags.NOCACHE)
        if mode != "CMYK":  # CMYK is always converted: PIL's own conversion ignores the inks
            probe = _lattice(mode)
            shown = np.asarray(ImageCms.applyTransform(probe, transform), dtype=np.int16)
            plain = np.asarray(probe.convert("RGB"), dtype=np.int16)
            if np.abs(shown - plain).max() <= SAME_AS_SRGB:
                return None
        return transform
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        logger.debug("ignoring an embedded colour profile littlecms cannot use: %s", e)
        return None


def profile_name(icc: bytes | None) -> str | None:
    """The description an ICC profile gives itself ("Adobe RGB (1998)"), or None if unreadable
    or larger than `MAX_PROFILE_BYTES`."""
    if not _usable(icc):
        return None
    return _remember(_names, _digest(icc), lambda: _name(icc))


def _name(icc: bytes) -> str | None:
    try:
        name = ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.profile_description
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    return (name or "").strip() or None


_D50 = (0.96420, 1.0, 0.82491)  # the ICC's connection-space white
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
"""sRGB's tone curve (IEC 61966-2-1) as the parameters of an ICC parametric curve of type 3."""
ADOBE_RGB_DCF_NAME = "Adobe RGB (1998), from EXIF (DCF option colour space)"
# Adobe RGB (1998)'s colorants adapted to D50 and its gamma of 563/256 (Adobe's specification).
_ADOBE_COLORANTS = ((0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087),
                    (0.14919, 0.06322, 0.74457))
_EXIF_COLOR_SPACE, _UNCALIBRATED, _INTEROP_INDEX = 0xA001, 0xFFFF, 0x0001


def matrix_profile(name: str, colorants: tuple[tuple[float, float, float], ...],
                   curve: tuple[float, ...]) -> bytes:
    """An ICC v2 RGB display profile of the matrix/TRC kind, from a colour space's numbers.

    Args:
        name: the profile's description.
        colorants: the red, green and blue primaries' XYZ, adapted to D50.
        curve: one tone curve for the three channels, as ICC parametric-curve parameters:
            ``(gamma,)`` (type 0) or ``(g, a, b, c, d)`` (type 3, e.g. `SRGB_CURVE`).
    """

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(v: tuple[float, float, float]) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    text = name.encode("ascii", "replace") + b"\0"
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + bytes(67))
    kind = {1: 0, 5: 3}[len(curve)]
    trc = b"para\0\0\0\0" + struct.pack(">HH", kind, 0) + b"".join(s15(v) for v in curve)
    tags = [(b"desc", desc), (b"wtpt", xyz(_D50)), (b"rXYZ", xyz(colorants[0])),
            (b"gXYZ", xyz(colorants[1])), (b"bXYZ", xyz(colorants[2])),
            (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc),
            (b"cprt", b"text\0\0\0\0No copyright, use freely\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = [], b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table.append(struct.pack(">4sII", sig, offset + len(data), len(body)))
        data += body
    header = (struct.pack(">I4sI4s4s4s", offset + len(data), bytes(4), 0x02100000, b"mntr",
                          b"RGB ", b"XYZ ")
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(28)
              + b"".join(s15(c) for c in _D50))
    return header + bytes(128 - len(header)) + struct.pack(">I", len(tags)) + b"".join(table) + data


@functools.cache
def adobe_rgb_dcf_profile() -> bytes:
    """The profile a camera JPEG means when it marks Adobe RGB the DCF way, without one."""
    return matrix_profile(ADOBE_RGB_DCF_NAME, _ADOBE_COLORANTS, (563 / 256,))


def embedded_profile(im: Image.Image) -> bytes | None:
    """The ICC profile an image's file gives its pixels, or None.

    That is the embedded profile; failing one, Adobe RGB (1998) for a camera JPEG set to
    Adobe RGB that marks it the DCF way (EXIF ColorSpace "uncalibrated" and interoperability
    index ``R03``, as Canon, Nikon and Sony cameras write it) instead of embedding a profile,
    as colour-managed editors read such files.
    """
    icc = im.info.get("icc_profile")
    if isinstance(icc, bytes) and icc:
        return icc
    raw = im.info.get("exif")
    if not isinstance(raw, bytes) or b"R03" not in raw:
        return None
    try:
        exif = Image.Exif()
        exif.load(raw)
        marked = (exif.get_ifd(ExifTags.IFD.Exif).get(_EXIF_COLOR_SPACE) == _UNCALIBRATED
                  and exif.get_ifd(ExifTags.IFD.Interop).get(_INTEROP_INDEX) == "R03")
    except Exception:  # a malformed EXIF block: no colour space can be read from it
        return None
    return adobe_rgb_dcf_profile() if marked else None


def converts(icc: bytes | None, mode: str = "RGB") -> bool:
    """Whether `to_srgb` would convert an image of `mode` carrying the profile `icc`."""
    return _transform(icc, mode) is not None


def to_srgb(im: Image.Image, icc: bytes | None = None) -> Image.Image:
    """`im` converted from an ICC profile to sRGB, when the profile differs from sRGB.

    ``icc`` is the profile, by default the decoded image's own (`embedded_profile`); pass it
    explicitly for an image made from the decoded one (PIL drops ``info`` on most conversions,
    e.g. after compositing transparency over white, which callers do first). An RGB, CMYK or
    grey (``L``) image with such a profile comes back as RGB; any other image, and any image
    without a profile to apply, comes back unchanged (the same object) for the caller's own
    conversion. Never raises for a bad profile.
    """
    if icc is None:
        icc = embedded_profile(im)
    transform = _transform(icc, im.mode)
    if transform is None:
        return im
    try:
        return ImageCms.applyTransform(im, transform)
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        logger.debug("colour profile not applied: %s", e)
        return im


_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def as_shown(im: Image.Image, profile: bool = True) -> Image.Image:
    """An 8-bit image as a viewer shows it: RGB in sRGB, transparency composited over white.

    The compositing comes first, in the file's own colour space (its white is sRGB's white),
    then `to_srgb` with the file's profile (none with ``profile=False``: the caller converts
    later); without a profile to apply, CMYK, grey and palette images go through PIL's
    conversions. High-bit modes (``I;16``, ``I``, ``F``) are the caller's to reduce first.
    """
    icc = embedded_profile(im) if profile else None
    if im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        with warnings.catch_warnings():  # Pillow's advice to store such palettes as RGBA
            warnings.simplefilter("ignore")
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    elif im.mode not in _SPACES:
        im = im.convert("RGB")
    if icc is not None:
        im = to_srgb(im, icc)
    return im if im.mode == "RGB" else im.convert("RGB")
