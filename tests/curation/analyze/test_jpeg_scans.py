"""Progressive JPEGs without their luma AC scans decode to the same 1/8-scale image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from native_images import texture
from PIL import Image

from curation.analyze.jpeg_scans import SOS, segments, without_luma_ac
from curation.analyze.pixel_analyzer import (
    _safe_thumbnail,
    _thumbnail,
    make_thumbnail,
    thumbnail_box,
)
from training.colour import as_shown


def _picture(seed: int, w: int, h: int) -> Image.Image:
    """A colour picture with 1/f texture in every channel (AC energy in every component)."""
    return Image.fromarray(np.dstack([texture(h, w, seed + k) for k in range(3)]))


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **kw)
    return out.getvalue()


def _eighth(data: bytes, box: tuple[int, int]) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", box)
    return np.asarray(img.convert("RGB"))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    width=st.integers(520, 900),
    height=st.integers(64, 700),
    quality=st.integers(30, 88),  # above, Pillow's progressive writer overflows on 4:4:4 noise
    subsampling=st.sampled_from([0, 1, 2]),
)
def test_the_eighth_scale_image_is_the_whole_files(
    seed: int, width: int, height: int, quality: int, subsampling: int
) -> None:
    data = _jpeg(_picture(seed, width, height), quality=quality, progressive=True,
                 subsampling=subsampling)
    short = without_luma_ac(data)
    assert short is not None and len(short) < len(data)
    box = thumbnail_box((width, height), 64)
    probe = Image.open(io.BytesIO(data))
    probe.draft("RGB", box)
    assume(probe.decoderconfig[:1] == (8,))  # the scale the job uses the shortcut at
    assert np.array_equal(_eighth(short, box), _eighth(data, box))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), orientation=st.integers(1, 8))
def test_a_progressive_thumbnail_is_byte_for_byte_the_whole_files(
    seed: int, orientation: int
) -> None:
    data = _jpeg(_picture(seed, 1100, 620), quality=92, progressive=True)
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", thumbnail_box(img.size, 128))  # the whole file, drafted as the job did
    reference = _thumbnail(as_shown(img), orientation, 128)
    assert without_luma_ac(data) is not None
    assert _safe_thumbnail(data, orientation, 128) == reference
    assert make_thumbnail(data, orientation, 128) == reference


def test_only_progressive_huffman_files_with_a_luma_table_of_their_own_are_shortened() -> None:
    img = _picture(3, 640, 480)
    assert without_luma_ac(_jpeg(img, quality=90)) is None  # baseline
    png = io.BytesIO()
    img.save(png, format="PNG")
    assert without_luma_ac(png.getvalue()) is None
    gray = _jpeg(img.convert("L"), quality=90, progressive=True)
    short = without_luma_ac(gray)  # one component: every AC scan is the luma's
    assert short is not None
    assert np.array_equal(_eighth(short, (80, 60)), _eighth(gray, (80, 60)))
    table = list(range(1, 65))
    shared = _jpeg(img, progressive=True, qtables=[table], subsampling=0)
    assert Image.open(io.BytesIO(shared)).quantization.keys() == {0}
    assert without_luma_ac(shared) is None  # zeroing its AC quantiser would touch chroma


@pytest.mark.parametrize("cut", [2, 3, 11, 200, 0.3, 0.6, -2])
def test_cut_or_garbled_files_give_none_or_a_decodable_file_never_an_error(
    cut: int | float,
) -> None:
    data = _jpeg(_picture(5, 800, 600), quality=90, progressive=True)
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    cut_data = data[:end]
    out = without_luma_ac(cut_data)
    assert out is None  # no end-of-image marker: the markers cannot be followed to the end
    garbled = bytearray(data)
    garbled[len(data) // 2 : len(data) // 2 + 40] = b"\xff\x12" * 20
    short = without_luma_ac(bytes(garbled))
    assert short is None or short.endswith(b"\xff\xd9")
    assert without_luma_ac(b"") is None and without_luma_ac(b"\xff\xd8\xff") is None


_PROGRESSIVE = _jpeg(_picture(7, 640, 400), quality=85, progressive=True)


@settings(max_examples=200, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_PROGRESSIVE) - 1), st.integers(0, 255)),
                   max_size=6),
    cut=st.integers(0, len(_PROGRESSIVE)),
)
def test_edited_files_never_raise(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_PROGRESSIVE)
    for at, value in edits:
        data[at] = value
    for candidate in (bytes(data), bytes(data[:cut])):
        out = without_luma_ac(candidate)
        assert out is None or (out.startswith(b"\xff\xd8") and out.endswith(b"\xff\xd9"))
        thumb = make_thumbnail(candidate, 1, 64)  # None or a thumbnail, never an error
        assert thumb is None or thumb.startswith(b"\xff\xd8")


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), subsampling=st.sampled_from([0, 2]))
def test_a_file_whose_scans_stop_short_is_left_whole(
    seed: int, subsampling: int
) -> None:
    """A download cut at a scan boundary and closed with an end marker: libjpeg smooths what
    its missing scans leave out, so the shortcut must not change that decode."""
    data = _jpeg(_picture(seed, 900, 560), quality=85, progressive=True, subsampling=subsampling)
    starts = [s for m, s, _ in segments(data) if m == SOS]
    assert len(starts) > 3
    box = thumbnail_box((900, 560), 64)
    for start in starts[1:]:
        cut = data[:start] + b"\xff\xd9"
        short = without_luma_ac(cut)
        assert short is None  # an incomplete file: every coefficient is not yet at its last bit
        assert _eighth(cut, box).shape == (70, 113, 3)  # and it still decodes, as a preview
    assert without_luma_ac(data) is not None


def test_a_luma_sampled_below_a_chroma_component_is_left_whole() -> None:
    data = bytearray(_jpeg(_picture(9, 640, 400), quality=90, progressive=True, subsampling=0))
    frame = data.index(b"\xff\xc2")
    assert data[frame + 11] == 0x11 and data[frame + 14] == 0x11  # 4:4:4 as saved
    assert without_luma_ac(bytes(data)) is not None
    data[frame + 14] = 0x22  # Cb sampled 2x2 above a 1x1 luma (libjpeg's cjpeg -sample 1x1,2x2)
    assert without_luma_ac(bytes(data)) is None
    data[frame + 14], data[frame + 11] = 0x11, 0x12  # a luma of the largest factors stays fine
    assert without_luma_ac(bytes(data)) is not None
