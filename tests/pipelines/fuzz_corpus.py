"""A deterministic corpus of malformed image files: mutations of valid JPEG, PNG, WebP, TIFF.

`build_corpus(folder)` writes ≥ 200 files and returns their names. Mutations: random bit
flips, truncations, corrupted segments and chunks (lengths, markers, CRCs), absurd
dimensions in headers (with valid CRCs, so only the size is wrong), huge EXIF / ICC / text
metadata (a zTXt decompression bomb among them), TIFF IFD loops and out-of-range strips,
zero-byte files and mislabelled extensions.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 384, 256
"""Base image size: small, so that every mutant that still decodes is decoded cheaply."""

MIN_PIXELS_FOR_BASE = 65536
"""`probe.min_pixels` for the job over the corpus, so that the base images reach the decoder;
with `TIER_SCALES` as `bucket.tier_scales` every admitted size has a bucket."""
TIER_SCALES = "[1.0,0.5,0.25,0.125,0.0625,0.05]"


def _base_pixels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([(x * 3 + y) % 256, (y * 5) % 256, (x ^ y) % 256], axis=-1).astype(np.float32)
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def base_files() -> dict[str, bytes]:
    """One valid file per format (plus variants with metadata to corrupt)."""
    img = Image.fromarray(_base_pixels(1))
    out = {}
    for fmt, ext, kw in (
        ("JPEG", "jpg", {"quality": 90}),
        ("PNG", "png", {}),
        ("WEBP", "webp", {"quality": 80}),
        ("TIFF", "tif", {}),
    ):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[ext] = buf.getvalue()
    return out


def _png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    c = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", c & 0xFFFFFFFF)


def _png_with_ihdr(png: bytes, width: int, height: int, *, fix_crc: bool = True) -> bytes:
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    chunk = _png_chunk(b"IHDR", bytes(ihdr[:13]), None if fix_crc else 0)
    return png[:8] + chunk + png[33:]


def _png_insert(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]


def _jpeg_sof_dims(jpg: bytes, width: int, height: int) -> bytes:
    i = 2
    data = bytearray(jpg)
    while i < len(data) - 9:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    return bytes(data)


def _jpeg_insert(jpg: bytes, segment_marker: int, payload: bytes) -> bytes:
    seg = bytes([0xFF, segment_marker]) + struct.pack(">H", len(payload) + 2) + payload
    return jpg[:2] + seg + jpg[2:]


def _jpeg_bad_length(jpg: bytes, marker: int, length: int) -> bytes:
    i = 2
    data = bytearray(jpg)
    while i < len(data) - 4:
        if data[i] != 0xFF:
            break
        if data[i + 1] == marker:
            data[i + 2 : i + 4] = struct.pack(">H", length)
            return bytes(data)
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return bytes(data)


def _webp_dims(webp: bytes, width: int, height: int) -> bytes:
    """A VP8X header claiming a canvas of width x height in front of the real bitstream."""
    flags = b"\x00\x00\x00\x00"
    vp8x = b"VP8X" + struct.pack("<I", 10) + flags + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    body = vp8x + webp[12:]
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def _tiff_tag(tif: bytes, tag: int, value: int) -> bytes:
    """Set a SHORT/LONG tag's value in the first IFD of a little-endian TIFF."""
    data = bytearray(tif)
    assert data[:2] == b"II"
    ifd = struct.unpack("<I", data[4:8])[0]
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for k in range(count):
        e = ifd + 2 + 12 * k
        t, typ = struct.unpack("<HH", data[e : e + 4])
        if t == tag:
            if typ == 3:
                data[e + 4 : e + 8] = struct.pack("<I", 1)
                data[e + 8 : e + 12] = struct.pack("<HH", value & 0xFFFF, 0)
            else:
                data[e + 4 : e + 8] = struct.pack("<I", 1)
                data[e + 8 : e + 12] = struct.pack("<I", value)
    return bytes(data)


def _tiff_ifd_loop(tif: bytes) -> bytes:
    data = bytearray(tif)
    ifd = struct.unpack("<I", data[4:8])[0]
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    nxt = ifd + 2 + 12 * count
    data[nxt : nxt + 4] = struct.pack("<I", ifd)  # the next IFD is this one: a loop
    return bytes(data)


def mutants(bases: dict[str, bytes]) -> dict[str, bytes]:
    """Name → bytes of every malformed file."""
    rng = np.random.default_rng(2026)
    out: dict[str, bytes] = {}
    for ext, data in bases.items():
        n = len(data)
        for k in range(14):  # bit flips, from a single bit to many, anywhere
            buf = bytearray(data)
            flips = int(rng.integers(1, 1 + 4 * (k + 1)))
            lo = 0 if k % 3 == 0 else min(64, n - 1)
            for pos in rng.integers(lo, n, flips):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
            out[f"flip_{ext}_{k:02d}.{ext}"] = bytes(buf)
        for k, cut in enumerate((1, 2, 4, 8, 12, 16, 24, 33, 64, n // 4, n // 2, n - 1)):
            out[f"trunc_{ext}_{k:02d}.{ext}"] = data[:cut]
        for k in range(6):  # a random span overwritten with random bytes
            buf = bytearray(data)
            a = int(rng.integers(0, n - 32))
            b = a + int(rng.integers(8, min(4096, n - a)))
            buf[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
            out[f"span_{ext}_{k:02d}.{ext}"] = bytes(buf)
        out[f"zero_{ext}.{ext}"] = b""
        out[f"magic_only_{ext}.{ext}"] = data[:16] + rng.integers(0, 256, 4096, np.uint8).tobytes()
        out[f"doubled_{ext}.{ext}"] = data + data
    png, jpg, webp, tif = bases["png"], bases["jpg"], bases["webp"], bases["tif"]
    # absurd dimensions (valid CRCs: only the size is a lie)
    for w, h in ((0, 0), (1, 1 << 30), (100_000, 100_000), (0x7FFFFFFF, 0x7FFFFFFF), (65535, 1)):
        out[f"dims_png_{w}x{h}.png"] = _png_with_ihdr(png, w, h)
        out[f"dims_png_badcrc_{w}x{h}.png"] = _png_with_ihdr(png, w, h, fix_crc=False)
    for w, h in ((0, 0), (65535, 65535), (65535, 1), (1, 65535), (20000, 12000), (4000, 3000)):
        out[f"dims_jpg_{w}x{h}.jpg"] = _jpeg_sof_dims(jpg, w, h)
    for w, h in ((16384, 16384), (1, 1), (16384, 1), (5000, 3000)):
        out[f"dims_webp_{w}x{h}.webp"] = _webp_dims(webp, w, h)
    for tag, v in ((256, 0), (257, 0), (256, 65535), (257, 65535), (256, 0x7FFFFFFF),
                   (273, 0x7FFFFFF0), (279, 0x7FFFFFF0), (259, 77), (277, 300), (258, 64)):
        out[f"tag_tif_{tag}_{v}.tif"] = _tiff_tag(tif, tag, v)
    out["ifd_loop.tif"] = _tiff_ifd_loop(tif)
    # corrupted segments and chunks
    for marker in (0xC0, 0xC4, 0xDB, 0xDA, 0xE0):
        for length in (0, 1, 0xFFFF):
            out[f"seglen_jpg_{marker:02x}_{length}.jpg"] = _jpeg_bad_length(jpg, marker, length)
    out["no_eoi.jpg"] = jpg[:-2]
    out["only_soi_eoi.jpg"] = b"\xff\xd8\xff\xd9"
    out["png_bad_idat_crc.png"] = png[:-20] + b"\x00" * 8 + png[-12:]
    out["png_no_iend.png"] = png[:-12]
    out["png_chunk_len_huge.png"] = png[:33] + struct.pack(">I", 0x7FFFFFF0) + png[37:]
    out["webp_riff_size_huge.webp"] = webp[:4] + struct.pack("<I", 0x7FFFFFF0) + webp[8:]
    out["webp_riff_size_zero.webp"] = webp[:4] + struct.pack("<I", 0) + webp[8:]
    out["webp_chunk_size_huge.webp"] = webp[:16] + struct.pack("<I", 0x7FFFFFF0) + webp[20:]
    # huge metadata
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + rng.integers(0, 256, 65000, np.uint8).tobytes()
    out["huge_exif.jpg"] = _jpeg_insert(jpg, 0xE1, exif[:65530])
    icc = b"ICC_PROFILE\x00\x01\x01" + b"\x00" * 65000
    out["huge_icc_jpg.jpg"] = _jpeg_insert(jpg, 0xE2, icc[:65530])
    many = jpg
    for _ in range(64):  # 4 MB of application segments
        many = _jpeg_insert(many, 0xE9, b"\x00" * 65000)
    out["many_app_segments.jpg"] = many
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MB of text from 64 KB
    out["ztxt_bomb.png"] = _png_insert(png, _png_chunk(b"zTXt", b"Comment\x00\x00" + bomb))
    out["itxt_huge.png"] = _png_insert(
        png, _png_chunk(b"iTXt", b"Comment\x00\x00\x00\x00\x00" + b"x" * (8 << 20))
    )
    out["iccp_bomb.png"] = _png_insert(png, _png_chunk(b"iCCP", b"icc\x00\x00" + bomb))
    garbage_exif = _png_chunk(b"eXIf", b"MM\x00*" + b"\xff" * 4096)
    out["exif_chunk_garbage.png"] = _png_insert(png, garbage_exif)
    # mislabelled: the bytes of one format under another's extension, and non-images
    exts = list(bases)
    for i, ext in enumerate(exts):
        other = exts[(i + 1) % len(exts)]
        out[f"mislabel_{ext}_as_{other}.{other}"] = bases[ext]
        out[f"text_as_{ext}.{ext}"] = b"definitely not an image\n" * 20
        out[f"html_as_{ext}.{ext}"] = b"<!doctype html><html><body>404</body></html>"
        out[f"random_{ext}.{ext}"] = rng.integers(0, 256, 2048, np.uint8).tobytes()
    out["svg_as.png"] = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'
    out["gif_animated_as.jpg"] = _animated_gif()
    return out


def _animated_gif() -> bytes:
    frames = [Image.new("P", (300, 300), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def build_corpus(folder: Path) -> list[str]:
    """Write the corpus (valid bases excluded) into `folder`; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    files = mutants(base_files())
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)
