"""A progressive JPEG without its luma AC scans: the same 1/8-scale image, for less decoding.

The model pass's thumbnail is a reduced-size decode, and for a progressive JPEG even a 1/8-scale
decode entropy-decodes every scan, so it costs about what the analysis's luma decode costs. At
1/8 scale libjpeg's IDCT reads only the DC of each luma block (the chroma blocks of a
subsampled file are scaled by a larger IDCT that reads their AC too), and in a progressive
file the luma AC coefficients travel in scans of their own, most of the file's bytes.
`without_luma_ac` drops those scans and keeps every other one (the DC scans with their
refinements, the chroma scans), so the 1/8-scale decode is the whole file's, pixel for pixel,
where these conditions hold (each is checked; otherwise the result is None):

- libjpeg smooths the blocks of a progressive image whose AC coefficients it has not received
  (estimating AC terms, and the DC too when a component has no AC at all); it skips smoothing
  when a quantiser it needs is 0. The first AC quantiser of the luma table is set to 0: the luma
  AC coefficients are all 0 here anyway. A file whose luma table also serves a chroma
  component is left whole.
- The whole file must send every coefficient of every component to its last bit: libjpeg also
  smooths a file whose scans stop short (a cut download with an end marker, a custom scan
  script), and the shortened one would not be. The luma must be sampled at the largest
  factors: a luma sampled below a chroma component is scaled by a larger IDCT, which reads AC.
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
    # (id, sampling factors h << 4 | v, quantisation table) of each component
    components = [tuple(data[start + 10 + 3 * k : start + 13 + 3 * k])
                  for k in range(data[start + 9])]
    luma_id, luma_sampling, luma_table = components[0]
    if any(table == luma_table for _, _, table in components[1:]):
        return None  # zeroing its AC quantiser would change a chroma component
    if (luma_sampling >> 4 < max(c[1] >> 4 for c in components)
            or luma_sampling & 0x0F < max(c[1] & 0x0F for c in components)):
        return None  # a luma sampled below a chroma is scaled by a larger IDCT, which reads AC
    out, dropped, zeroed = [data[:2]], 0, False
    missing = {(c[0], k): 99 for c in components for k in range(64)}  # low bits not yet sent
    for marker, start, end in parts:
        chunk = data[start:end]
        if marker == SOS:
            count = data[start + 4]
            ids = list(data[start + 5 : start + 5 + 2 * count : 2])
            first, last, bits = data[start + 5 + 2 * count : start + 8 + 2 * count]
            for c in ids:
                for k in range(first, min(last, 63) + 1):
                    if (c, k) in missing:
                        missing[(c, k)] = min(missing[(c, k)], bits & 0x0F)
            if first > 0 and ids == [luma_id]:
                dropped += 1
                continue
        elif marker == DQT:
            chunk, hit = zero_first_ac(chunk, luma_table)
            zeroed |= hit
        out.append(chunk)
    if not dropped or not zeroed or any(missing.values()):
        return None  # an incomplete file is smoothed by libjpeg; the shortened one would not be
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
