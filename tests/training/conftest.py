"""Training fixtures: a small curation output written by the real `native4k curate`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

# Small renders so that training tests decode fast: the job's pixel floor and bucket tiers are
# lowered to fit them (the bucket table then holds 1024x576-class buckets).
CURATE_SETTINGS = [
    "probe.min_pixels=921600",
    "bucket.tier_scales=[0.25,0.1875]",
    "shard.max_samples=2",  # several shards per bucket
]
LANDSCAPE, PORTRAIT, SQUARE, ROTATED = "1024x576", "576x1024", "1024x1024", "640x960"
EXPECTED_BUCKETS = {LANDSCAPE: 6, PORTRAIT: 3, SQUARE: 1, ROTATED: 1}
CAPTION = "A small procedural scene, landscape."


def write_inputs(folder: Path) -> None:
    """Eleven keepable images over four buckets, with a caption, CMYK, 16-bit (with a large
    text chunk) and EXIF cases."""
    from pipelines.samples import _gray16_png, encode, render

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        rgb = render(1280, 720, 7000 + i)
        data = _cmyk(rgb) if i == 1 else encode(rgb, "JPEG", quality=95)
        (folder / f"land_{i}.jpg").write_bytes(data)
    (folder / "land_0.txt").write_text(CAPTION)
    for i in range(3):
        (folder / f"port_{i}.jpg").write_bytes(
            encode(render(720, 1280, 7100 + i), "JPEG", quality=95)
        )
    # ...whose metadata is a 2 MB compressed text chunk (over Pillow's 1 MB default cap)
    png = _with_text_chunk(_gray16_png(render(1024, 1024, 7200)), 2_000_000)
    (folder / "square_gray16.png").write_bytes(png)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1280x854, displayed 854x1280
    (folder / "rotated.jpg").write_bytes(
        encode(render(1280, 854, 7300), "JPEG", quality=95, exif=exif)
    )


def _with_text_chunk(png: bytes, size: int) -> bytes:
    """`png` with a zTXt chunk of `size` bytes of text (compressed) after its header."""
    import struct
    import zlib

    body = b"XML:com.adobe.xmp\0\0" + zlib.compress(b"<x:xmpmeta/> " * (size // 13))
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + body))
    end_of_ihdr = 8 + 4 + 4 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def _cmyk(rgb) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="session")
def curated_shards(local_ray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished curation output (manifest, shards, `_SUCCESS`) from the real CLI.

    Eleven samples in four buckets (`EXPECTED_BUCKETS`), two per shard: 1024x576 (six, three
    shards, one captioned, one CMYK), 576x1024 (three, two shards), 1024x1024 (one 16-bit gray
    PNG) and 640x960 (one EXIF-rotated JPEG). Read-only: copy it before changing anything.
    """
    from pipelines.cli import main

    inputs = tmp_path_factory.mktemp("train_inputs")
    write_inputs(inputs)
    out = tmp_path_factory.mktemp("train_curated")
    args = ["curate", str(inputs), "--output", str(out)]
    for s in CURATE_SETTINGS:
        args += ["--set", s]
    assert main(args) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "manifest").to_pylist()
    kept: dict[str, int] = {}
    for r in rows:
        if r["status"] == "kept":
            kept[r["bucket"]] = kept.get(r["bucket"], 0) + 1
    assert kept == EXPECTED_BUCKETS, [(r["source"], r["reason"], r["detail"]) for r in rows]
    return out
