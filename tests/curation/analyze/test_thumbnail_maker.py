"""`ThumbnailMaker`: thumbnails for the rows the models will see, from bytes or read again."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation import schema
from curation.analyze.pixel_analyzer import decode
from curation.analyze.thumbnail_maker import ThumbnailMaker


def _jpeg(seed: int, size: tuple[int, int] = (640, 400), **kw: object) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=85, **kw)
    return buf.getvalue()


def _table(rows: list[dict]) -> pa.Table:
    """A batch with every column the stage reads, null where a row does not give it."""
    return pa.table(
        {n: pa.array([r.get(n) for r in rows], schema.arrow_type(n)) for n in ThumbnailMaker.reads}
    )


def test_only_rows_still_pending_get_one_and_existing_ones_stay():
    a, b, c = _jpeg(1), _jpeg(2, progressive=True), _jpeg(3)
    kept_thumb = b"an earlier thumbnail"
    table = _table(
        [
            {schema.SOURCE: "a", schema.DATA: a, schema.SHARPNESS: 0.1},
            {schema.SOURCE: "b", schema.DATA: b, schema.SHARPNESS: 0.2, schema.ORIENTATION: 6},
            {
                schema.SOURCE: "c",
                schema.DATA: c,
                schema.SHARPNESS: 0.3,
                schema.STATUS: "rejected",
            },
            {
                schema.SOURCE: "d",
                schema.DATA: a,
                schema.SHARPNESS: 0.4,
                schema.THUMBNAIL: kept_thumb,
            },
            {schema.SOURCE: "e", schema.STATUS: "rejected"},  # never decoded
        ]
    )
    out = ThumbnailMaker(size=128)(table).column(schema.THUMBNAIL).to_pylist()
    assert out[0] == decode(a, 1, 128)[1]  # what the analysis would have made itself
    assert out[1] == decode(b, 6, 128)[1]  # oriented, progressive
    assert Image.open(io.BytesIO(out[1])).size == (80, 128)
    assert out[2] is None and out[3] == kept_thumb and out[4] is None
    audit = ThumbnailMaker(size=128, rows="decoded")(table).column(schema.THUMBNAIL).to_pylist()
    assert audit[2] == decode(c, 1, 128)[1] and audit[4] is None  # score.score_all


def test_bytes_are_read_again_from_a_file_or_a_tar_member(tmp_path: Path):
    a, b = _jpeg(4), _jpeg(5)
    (tmp_path / "a.jpg").write_bytes(a)
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("x/b.jpg")
        info.size = len(b)
        tf.addfile(info, io.BytesIO(b))
    with tarfile.open(tar) as tf:
        offset = tf.getmember("x/b.jpg").offset_data
    table = _table(
        [
            {schema.SOURCE: str(tmp_path / "a.jpg")},
            {schema.SOURCE: f"{tar}#x/b.jpg", schema.TAR_OFFSET: offset, schema.SIZE_BYTES: len(b)},
            {schema.SOURCE: str(tmp_path / "gone.jpg")},  # deleted since the analysis
        ]
    ).drop_columns([schema.DATA])
    out = ThumbnailMaker(size=96, rows="all")(table).column(schema.THUMBNAIL).to_pylist()
    assert out[0] == decode(a, 1, 96)[1]
    assert out[1] == decode(b, 1, 96)[1]
    assert out[2] is None


def test_an_empty_batch_gets_the_column_and_bad_settings_are_refused():
    out = ThumbnailMaker(size=64)(_table([]))
    assert out.num_rows == 0 and schema.THUMBNAIL in out.column_names
    with pytest.raises(ValueError, match="rows"):
        ThumbnailMaker(size=64, rows="some")
    with pytest.raises(ValueError, match="size"):
        ThumbnailMaker(size=0)
