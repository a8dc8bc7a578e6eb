import hashlib
import json
import tarfile

import pyarrow as pa

from curation import schema
from curation.shard.shard_writer import ShardWriter, plan_bucket, sample_key


def test_keys_are_content_derived_and_safe():
    k = sample_key(hashlib.sha256(b"x").hexdigest())
    assert k == sample_key(hashlib.sha256(b"x").hexdigest()) and len(k) == 32
    assert set(k) <= set("0123456789abcdef")


def test_plan_cuts_by_count_and_bytes_in_key_order():
    t = pa.table(
        {
            schema.KEY: ["c", "a", "b", "d", "e"],
            schema.BUCKET: ["64x64"] * 5,
            schema.SIZE_BYTES: [10, 10, 10, 5000, 10],
        }
    )
    by_count = plan_bucket(t, max_samples=2, max_bytes=10**9)
    assert by_count.column(schema.KEY).to_pylist() == ["a", "b", "c", "d", "e"]
    assert by_count.column(schema.SHARD).to_pylist() == ["shards/64x64/64x64-000000.tar"] * 2 + [
        "shards/64x64/64x64-000001.tar"
    ] * 2 + ["shards/64x64/64x64-000002.tar"]
    by_bytes = plan_bucket(t, max_samples=100, max_bytes=10_000)  # a+b+c | d+e
    assert by_bytes.column(schema.SHARD).to_pylist()[2:4] == [
        "shards/64x64/64x64-000000.tar",
        "shards/64x64/64x64-000001.tar",
    ]
    assert len(set(by_bytes.column(schema.SHARD).to_pylist())) == 2


def test_writer_stores_original_bytes_json_and_captions_and_drops_vanished(tmp_path):
    srcs = []
    for name, data in (("a.jpg", b"JPEGDATA"), ("b.png", b"PNGDATA")):
        (tmp_path / name).write_bytes(data)
        srcs.append((str(tmp_path / name), data))
    gone = tmp_path / "gone.jpg"
    rows = []
    for (src, data), ext in zip([*srcs, (str(gone), b"zzz")], ["jpg", "png", "jpg"], strict=True):
        sha = hashlib.sha256(data).hexdigest()
        rows.append(
            {
                schema.SOURCE: src,
                schema.SHA256: sha,
                schema.KEY: sample_key(sha),
                schema.SIZE_BYTES: len(data),
                schema.EXTENSION: ext,
                schema.STATUS: "kept",
                schema.BUCKET: "64x64",
                schema.SHARD: "shards/64x64/64x64-000000.tar",
                schema.CAPTION_EN: "hello" if ext == "jpg" else None,
                schema.CAPTION_ZH: "你好" if ext == "jpg" else None,
                schema.TAR_OFFSET: None,
            }
        )
    out = ShardWriter(output=str(tmp_path / "out"))(pa.Table.from_pylist(rows)).to_pylist()
    assert [r[schema.STATUS] for r in out].count("rejected") == 1
    assert next(r for r in out if r[schema.SOURCE] == str(gone))[schema.REASON] == "unreadable"
    with tarfile.open(tmp_path / "out/shards/64x64/64x64-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    ka, kb = rows[0][schema.KEY], rows[1][schema.KEY]
    assert members[f"{ka}.jpg"] == b"JPEGDATA" and members[f"{kb}.png"] == b"PNGDATA"
    assert members[f"{ka}.txt"] == b"hello" and members[f"{ka}.zh.txt"].decode() == "你好"
    assert json.loads(members[f"{ka}.json"])[schema.SOURCE] == srcs[0][0]
    assert len(members) == 6  # a: jpg json txt zh.txt; b: png json
    assert not list((tmp_path / "out/shards/64x64").glob("*.tmp-*"))
