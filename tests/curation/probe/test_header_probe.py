import io
import os

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, features

from curation import schema
from curation.probe import header_probe
from curation.probe.header_probe import HEIF_BRANDS, HeaderProbe, probe
from pipelines.samples import png_bomb
from training.colour import MAX_PROFILE_BYTES


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
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    assert probe(buf.getvalue())["detail"] == "multi-page tiff (2 pages)"
    # A first page with smaller pages after it (previews, reduced-resolution copies) is read
    # as its first page, as an MPO is; a larger later page leaves the file unsupported.
    big, small = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (16, 12), "blue")
    buf = io.BytesIO()
    big.save(buf, "TIFF", save_all=True, append_images=[small, small])
    assert probe(buf.getvalue()) | {"color_profile": None} == {
        "format": "tiff", "width": 64, "height": 48, "mode": "RGB", "num_frames": 3,
        "orientation": 1, "color_profile": None}
    buf = io.BytesIO()
    small.save(buf, "TIFF", save_all=True, append_images=[big])
    assert probe(buf.getvalue())["detail"] == "multi-page tiff (2 pages)"
    import gzip
    import tarfile

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    tgz = probe(gzip.compress(tar.getvalue()))  # a compressed WebDataset shard
    assert tgz["reason"] == "unsupported_format" and ".tar.gz" in tgz["detail"]


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


def _ftyp(major: bytes, compatible: list[bytes], rest: bytes) -> bytes:
    body = major + b"\0\0\0\0" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + rest


BRANDS = st.lists(
    st.sampled_from([b"mif1", b"miaf", b"MiHB", b"heic", b"MiPr", b"tmap"]), max_size=5
)


@given(st.sampled_from(sorted(HEIF_BRANDS)), BRANDS, st.binary(max_size=300))
def test_heif_and_jpeg_xl_are_named_not_called_corrupt(major, compatible, rest):
    heif = probe(_ftyp(major, compatible, rest))
    assert heif["reason"] == "unsupported_format"
    assert heif["detail"].startswith("HEIF/HEIC image")
    for head in (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        jxl = probe(head + rest)
        assert (jxl["reason"], jxl["detail"][:10]) == ("unsupported_format", "JPEG XL im")


def test_an_avif_brand_is_not_taken_for_heif():
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "AVIF", quality=60)
    assert buf.getvalue()[4:8] == b"ftyp"
    assert probe(buf.getvalue())["format"] == "avif"  # Pillow reads it
    broken = probe(_ftyp(b"mif1", [b"mif1", b"avif"], b"\0" * 64))
    assert not broken.get("detail", "").startswith("HEIF")


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow reads no AVIF")
@pytest.mark.parametrize("keep", [0.5, 0.1, 2000])
def test_a_truncated_avif_is_a_decode_error_where_pillow_reads_avif(keep, monkeypatch):
    """A partial download of an AVIF was `unsupported_format`, telling the user to get a
    decoder this Pillow already has."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "AVIF")
    whole = buf.getvalue()
    cut = whole[: keep if isinstance(keep, int) else int(len(whole) * keep)]
    assert probe(whole)["format"] == "avif"
    row = probe(cut)
    assert row["reason"] == "decode_error", row
    assert "AVIF" in row["detail"] and "truncated or corrupt" in row["detail"]
    # where Pillow has no AVIF decoder, the same bytes name the missing decoder instead
    monkeypatch.setattr(header_probe.features, "check", lambda name: False)
    assert probe(cut) == {
        "reason": "unsupported_format",
        "detail": "AVIF image: this Pillow build has no AVIF decoder",
    }


@pytest.mark.parametrize(
    ("dtype", "channels", "words"),
    [
        (np.float32, 3, "3 sample(s) of 32-bit floating point"),
        (np.float64, 1, "1 sample(s) of 64-bit floating point"),
        (np.int16, 3, "3 sample(s) of 16-bit signed integer"),
    ],
)
def test_a_valid_tiff_in_a_layout_pillow_cannot_decode_is_named_not_called_corrupt(
    dtype, channels, words
):
    # OpenCV and scientific tools write these; they were "not a recognisable image format"
    pixels = (np.random.default_rng(0).random((40, 60, channels)) * 100).astype(dtype)
    ok, tif = cv2.imencode(".tif", pixels)
    assert ok
    row = probe(tif.tobytes())
    assert row["reason"] == "unsupported_format"
    assert row["detail"].startswith(f"TIFF image with {words}")
    for cut in (20, 200):  # a TIFF whose header is cut short is still a broken file
        assert probe(tif.tobytes()[:cut])["reason"] == "decode_error"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_a_text_file_is_named_whatever_its_encoding(encoding):
    """A list or caption saved by Notepad (UTF-8 with a byte-order mark) or PowerShell (UTF-16)
    inside an image folder was `decode_error` "not a recognisable image format"; so was UTF-8
    text whose 4,096-byte head ended inside a character."""
    text = "photo_1.jpg\r\nфото_2.jpg\r\n写真_3.jpg\r\n" * 200
    row = probe(text.encode(encoding))
    assert row == {"reason": "unsupported_format", "detail": "text file, not an image"}
    for shift in range(4):  # the head cut at every byte of a 3-byte character
        row = probe(("x" * shift + "写" * 3000).encode())
        assert row["reason"] == "unsupported_format", shift


def test_archives_and_videos_in_a_scraped_pool_are_named(tmp_path):
    """A zip, an mp4 or a WebM among the images was decode_error "not a recognisable image
    format", as if an image were broken."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.jpg", _png(8, 8))
    words = {"zip": probe(buf.getvalue())["detail"]}
    for ext, fourcc in (("mp4", "mp4v"), ("mkv", "MJPG"), ("avi", "MJPG")):
        path = tmp_path / f"v.{ext}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5, (64, 48))
        for i in range(3):
            writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
        writer.release()
        row = probe(path.read_bytes())
        assert row["reason"] == "unsupported_format", (ext, row)
        words[ext] = row["detail"]
    assert words["zip"].startswith("archive") and "unpack" in words["zip"]
    assert "brand 'isom'" in words["mp4"] and "not an image" in words["mp4"]
    assert words["mkv"].startswith("video file") and words["avi"].startswith("video file")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    assert probe(heic)["detail"].startswith("HEIF/HEIC")  # still named as the image it is


GS_PROFILES = "/usr/share/color/icc/ghostscript"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_color_profile_is_the_embedded_profiles_description(fmt):
    """Every format that carries an ICC profile gives its description; none gives null."""
    path = os.path.join(GS_PROFILES, "a98.icc")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing: apt-get install libgs-common")
    with open(path, "rb") as f:
        a98 = f.read()
    img = Image.new("RGB", (64, 48), (90, 140, 90))
    tagged, plain = io.BytesIO(), io.BytesIO()
    img.save(tagged, fmt, icc_profile=a98)
    img.save(plain, fmt)
    assert probe(tagged.getvalue())["color_profile"] == "Artifex Software A98 ICC Profile"
    assert probe(plain.getvalue())["color_profile"] is None


def test_color_profile_of_a_broken_or_huge_profile():
    """A profile littlecms cannot read, or one over the size cap, is named as unreadable and
    costs the image nothing."""
    img = Image.new("RGB", (64, 48))
    for icc in (b"not a profile at all" * 10, b"\0" * (MAX_PROFILE_BYTES + 1)):
        buf = io.BytesIO()
        img.save(buf, "JPEG", icc_profile=icc)
        row = probe(buf.getvalue())
        assert row["color_profile"] == "(unreadable)" and "reason" not in row
