import io

import numpy as np
from PIL import Image

from curation import schema
from curation.probe.header_probe import HeaderProbe, probe
from pipelines.samples import png_bomb


def _png(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_probe_reads_header_facts_and_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "JPEG", exif=exif)
    row = probe(buf.getvalue())
    assert (row["format"], row["width"], row["height"], row["orientation"]) == ("jpeg", 200, 300, 6)
    assert "reason" not in row


def test_probe_names_what_is_wrong():
    assert probe(b"")["detail"].startswith("empty file")
    assert probe(b"\x00\x01garbage" * 100)["reason"] == "decode_error"
    assert probe(b"hello, I am text\n" * 10) == {
        "reason": "unsupported_format",
        "detail": "text file, not an image",
    }
    assert "SVG" in probe(b'<?xml version="1.0"?><svg xmlns="x"/>')["detail"]
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = probe(buf.getvalue())
    assert gif["reason"] == "unsupported_format" and "animated" in gif["detail"]


def test_decompression_bomb_is_sized_from_its_header_without_decoding():
    bomb = png_bomb(30000, 30000)  # 900 MP of zeros in well under a megabyte
    assert len(bomb) < 2_000_000
    row = probe(bomb)
    assert (row["width"], row["height"]) == (30000, 30000) and "reason" not in row


def test_stage_leaves_rejected_rows_alone():
    t = HeaderProbe()(
        {
            schema.DATA: [_png(64, 32), b"", None],
            schema.STATUS: [None, None, "rejected"],
            schema.REASON: [None, None, "unreadable"],
        }
    )
    assert t.column(schema.WIDTH).to_pylist() == [64, None, None]
    assert t.column(schema.REASON).to_pylist() == [None, "decode_error", "unreadable"]
    assert np.array_equal(t.column(schema.NUM_FRAMES).to_pylist()[:1], [1])
