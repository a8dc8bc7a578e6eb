"""A progressive JPEG without its luma AC scans: the same 1/8-scale image, for less decoding.

The model pass's thumbnail is a reduced-size decode, and for a progressive JPEG even a 1/8-scale
decode entropy-decodes every scan, so it costs about what the analysis's luma decode costs. At
1/8 scale libjpeg's IDCT reads only the DC of each luma block (the chroma blocks of a
subsampled file are scaled by a larger IDCT that reads their AC too), and in a progressive
file the luma AC coefficients travel in scans of their own, most of the file's bytes.
`without_luma_ac` drops those scans and keeps every other one (the DC scans with their
refinements, the chroma scans), so the 1/8-scale decode is the whole file's, pixel for pixel:

- libjpeg smooths the blocks of a progressive image whose AC coefficients it has not received
  (estimating AC terms, and the DC too when a component has no AC at all); it skips smoothing
  when a quantiser it needs is 0. The first AC quantiser of the luma table is set to 0: the luma
  AC coefficients are all 0 here anyway. A file whose luma table also serves a chroma
  component is left whole.
- Anything else (baseline or arithmetic-coded files, a marker that cannot be followed) is left
  whole too: `without_luma_ac` returns None and the caller decodes the file as it is.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

PROGRESSIVE_HUFFMAN = 0xC2
"""SOF2: progressive DCT, Huffman-coded (the only frame type shortened)."""
OTHER_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC, PROGRESSIVE_HUFFMAN}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""A marker after entropy-coded data (not a stuffed 0xFF00, a restart marker or a fill byte)."""
SOS, DQT, EOI = 0xDA, 0xDB, 0xD9


def segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment after SOI, up to EOI; a scan's
    end includes its entropy-coded data. Raises ValueError where the markers cannot be
    followed."""
    i, n = 2, len(data)
    while i + 2 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker == EOI:
            return
        if i + 4 > n:
            raise ValueError("a segment header cut short")
        header_end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if header_end > n:
            raise ValueError("a segment runs past the end of the data")
        end = header_end
        if marker == SOS:
            found = _MARKER.search(data, header_end)
            if found is None:
                raise ValueError("a scan without an end")
            end = found.start()
        yield marker, i, end
        i = end
    raise ValueError("no end-of-image marker")


def without_luma_ac(data: bytes) -> bytes | None:
    """`data` without the luma AC scans and with the luma table's first AC quantiser 0, when it
    is a progressive Huffman-coded JPEG whose 1/8-scale decode is then the same; else None.
    Never raises on malformed data."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        return _shorten(data)
    except (ValueError, IndexError):
        return None


def _shorten(data: bytes) -> bytes | None:
    """`without_luma_ac` on data that starts with SOI."""
    parts = list(segments(data))
    frames = [(m, s) for m, s, _ in parts if m == PROGRESSIVE_HUFFMAN or m in OTHER_FRAMES]
    if len(frames) != 1 or frames[0][0] != PROGRESSIVE_HUFFMAN:
        return None
    start = frames[0][1]
    count = data[start + 9]
    components = [(data[start + 10 + 3 * k], data[start + 12 + 3 * k]) for k in range(count)]
    luma_id, luma_table = components[0]
    if any(table == luma_table for _, table in components[1:]):
        return None  # zeroing its AC quantiser would change a chroma component
    out, dropped, zeroed = [data[:2]], 0, False
    for marker, start, end in parts:
        chunk = data[start:end]
        if marker == SOS:
            ids = list(data[start + 5 : start + 5 + 2 * data[start + 4] : 2])
            first_coefficient = data[start + 5 + 2 * data[start + 4]]
            if first_coefficient > 0 and ids == [luma_id]:
                dropped += 1
                continue
        elif marker == DQT:
            chunk, hit = zero_first_ac(chunk, luma_table)
            zeroed |= hit
        out.append(chunk)
    if not dropped or not zeroed:
        return None
    out.append(b"\xff\xd9")
    return b"".join(out)


def zero_first_ac(segment: bytes, table_id: int | None = None) -> tuple[bytes, bool]:
    """A DQT segment with entry 1 (zigzag order) of table `table_id` (None: of every table)
    set to 0, and whether the segment defines such a table. Raises ValueError for a segment
    of the wrong length."""
    out, j, hit = bytearray(segment), 4, False
    while j < len(out):
        precision, table = out[j] >> 4, out[j] & 0x0F
        width = 2 if precision else 1
        if j + 1 + 64 * width > len(out):
            raise ValueError("a quantisation segment of the wrong length")
        if table_id is None or table == table_id:
            out[j + 1 + width : j + 1 + 2 * width] = bytes(width)
            hit = True
        j += 1 + 64 * width
    return bytes(out), hit
