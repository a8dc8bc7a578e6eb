"""S3 in and out through a real S3 server (moto on 127.0.0.1); resuming an interrupted job."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.cli import main
from pipelines.curate import AWS_ENV, Partitioning, one_row_per_source, worker_env
from pipelines.stats import inputs_text
from pipelines.verify import read_manifest, verify

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SUBSET = [
    "native/render_0_3840x2160.jpg",
    "native/render_0_3840x2160.txt",
    "native/render_3_3072x3072.png",
    "dup/original.jpg",
    "dup/reencoded_q85.jpg",
    "broken/truncated.jpg",
    "reject/small_2560x1440.jpg",
    "shard-input-000.tar",
]


def test_curate_from_s3_to_s3(samples, local_ray, s3_server):
    folder, expected = samples
    import boto3

    client = boto3.client("s3")
    for bucket in ("raw", "curated"):
        client.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
        )
    fs = fsspec.filesystem("s3")
    for rel in SUBSET:
        fs.put_file(str(folder / rel), f"raw/in/{rel}")
    assert main(["curate", "s3://raw/in", "--output", "s3://curated/run1"]) == 0
    assert verify("s3://curated/run1") == []
    rows = {r["source"].removeprefix("s3://raw/in/"): r for r in read_manifest("s3://curated/run1")}
    want = {k: v for k, v in expected.items() if k.split("#")[0] in SUBSET}
    assert set(rows) == set(want)
    for rel, e in want.items():
        r = rows[rel]
        got = r["status"] if r["status"] == "kept" else r["reason"]
        if e["outcome"] in ("kept", "duplicate", "too_small", "decode_error"):
            assert got == e["outcome"], rel
    assert rows["native/render_0_3840x2160.jpg"]["caption_en"] == e_caption(expected)
    assert fs.exists("curated/run1/_SUCCESS") and fs.exists("curated/run1/stats.json")
    shard = rows["native/render_0_3840x2160.jpg"]["shard"]
    assert fs.exists(f"curated/run1/{shard}")
    # The tar, read to its end, is noted with its ETag, so a rerun need not download it again.
    (note,) = fs.ls("curated/run1/_work/tars")
    noted = json.loads(fs.cat_file(note))
    assert noted["source"] == "s3://raw/in/shard-input-000.tar"
    assert noted["version"] == [fs.size("raw/in/shard-input-000.tar"),
                                fs.info("raw/in/shard-input-000.tar")["ETag"]]  # fmt: skip
    assert noted["rows"] == sum(k.startswith("shard-input-000.tar#") for k in rows)


def e_caption(expected: dict) -> str:
    return expected["native/render_0_3840x2160.jpg"]["caption"]


def _manifest(out: Path) -> dict[str, tuple]:
    return {
        r["source"]: (r["status"], r["reason"], r["key"], r["shard"])
        for r in pq.read_table(out / "manifest").to_pylist()
    }


def test_killed_job_reruns_to_the_same_result(samples, curated, tmp_path):
    folder, expected = samples
    out = tmp_path / "out"
    cli = Path(sys.executable).with_name("native4k")
    proc = subprocess.Popen(
        [str(cli), "curate", str(folder), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    analysis = out / "_work" / "analysis"
    deadline = time.time() + 300
    while time.time() < deadline and not list(analysis.glob("part-*.parquet")):
        time.sleep(0.05)
    # The driver's group, mid-job; Ray's workers (groups of their own) may still finish a
    # batch after the rerun listed its work, which the rerun must absorb (one row per source).
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_SUCCESS").exists()
    assert main(["curate", str(folder), "--output", str(out)]) == 0
    sources = [r["source"] for r in pq.read_table(out / "manifest").to_pylist()]
    assert len(sources) == len(set(sources)) == len(expected)  # no duplicate, no gap
    assert verify(str(out)) == []
    assert not list(out.rglob("*.tmp-*"))
    assert _manifest(out) == _manifest(curated)  # the same as an uninterrupted run


def test_partial_analysis_is_resumed_not_redone(samples, curated, tmp_path, capsys):
    """The state an interrupted run leaves: some analysis parts, no manifest, a lost shard."""
    folder, expected = samples
    out = tmp_path / "out"
    shutil.copytree(curated, out)
    parts = sorted((out / "_work" / "analysis").glob("part-*.parquet"))
    dropped = parts[: len(parts) // 2]
    missing = sum(pq.read_metadata(p).num_rows for p in dropped)
    for p in dropped:
        p.unlink()
    for p in ("_SUCCESS", "stats.json"):
        (out / p).unlink()
    shutil.rmtree(out / "manifest")
    sorted((out / "shards").rglob("*.tar"))[0].unlink()
    (out / "shards" / "9999x64").mkdir()
    (out / "shards" / "9999x64" / "9999x64-000000.tar").write_bytes(b"stale")
    capsys.readouterr()
    assert main(["curate", str(folder), "--output", str(out)]) == 0
    assert f"analysed {inputs_text(missing)} in this run" in capsys.readouterr().out
    assert 0 < missing < len(expected)
    assert verify(str(out)) == []  # the stale shard is gone, the lost one rewritten
    assert _manifest(out) == _manifest(curated)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"] == len(expected)


def test_analysis_parts_that_repeat_sources_give_one_row_each(samples, curated, tmp_path, capsys):
    """A killed job's worker can finish after the rerun listed the work, batched otherwise,
    or die mid-write, leaving its temporary file."""
    folder, expected = samples
    out = tmp_path / "out"
    shutil.copytree(curated, out)
    parts = sorted((out / "_work" / "analysis").glob("part-*.parquet"))
    assert len(parts) >= 2
    late = pa.concat_tables([pq.read_table(parts[0]), pq.read_table(parts[-1]).slice(0, 1)])
    pq.write_table(late, out / "_work" / "analysis" / "part-late0worker000000.parquet")
    for p in ("_SUCCESS", "stats.json"):
        (out / p).unlink()
    left = out / "_work" / "tmp" / f".{parts[0].name}.tmp-0123456789ab"  # killed mid-write
    left.parent.mkdir(exist_ok=True)
    left.write_bytes(parts[0].read_bytes()[:100])
    capsys.readouterr()
    assert main(["curate", str(folder), "--output", str(out)]) == 0
    assert not left.exists()
    said = capsys.readouterr().out
    assert f"{late.num_rows} stored analysis rows repeated a source" in said
    assert "interrupted run" in said and "listed more than once" not in said
    sources = [r["source"] for r in pq.read_table(out / "manifest").to_pylist()]
    assert len(sources) == len(set(sources)) == len(expected)
    assert verify(str(out)) == []
    assert _manifest(out) == _manifest(curated)


@pytest.mark.parametrize("rows_per_partition", [1000, 2])
def test_one_row_per_source_keeps_the_fullest_row(local_ray, rows_per_partition):
    t = pa.table(
        {
            "source": ["a", "b", "a", "c", "a", "b"],
            "score": [None, 1.0, 2.0, 3.0, None, None],
            "reason": [None, None, "x", None, None, None],
        }
    )
    rows = local_ray.data.from_arrow(t).repartition(3).materialize()
    kept, num, dropped = one_row_per_source(rows, 6, Partitioning(2, rows_per_partition))
    got = sorted(kept.take_all(), key=lambda r: r["source"])
    assert (num, dropped) == (3, 3)
    assert got == [
        {"source": "a", "score": 2.0, "reason": "x"},
        {"source": "b", "score": 1.0, "reason": None},
        {"source": "c", "score": 3.0, "reason": None},
    ]
    unique = local_ray.data.from_arrow(t.slice(1, 3)).materialize()
    assert one_row_per_source(unique, 3, Partitioning(2, rows_per_partition))[1:] == (3, 0)


def test_a_file_replaced_between_runs_is_analysed_again(local_ray, tmp_path, capsys):
    """Its stored analysis no longer matches its bytes: the rerun that finds out (re-reading it
    for its shard) rejects it for now and records the change, and the next analyses the new
    bytes (it stayed `unreadable` on every rerun before); also when it is put back."""
    import hashlib

    import pyarrow.parquet as pq

    from pipelines.cli import main
    from pipelines.samples import encode, render

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i, name in enumerate(("a.jpg", "b.jpg")):
        (folder / name).write_bytes(encode(render(1280, 720, 7600 + i), "JPEG", quality=95))
    args = ["curate", str(folder), "--output", str(out), "--set", "probe.min_pixels=921600",
            "--set", "bucket.tier_scales=[0.25,0.1875]"]

    def rows() -> dict[str, dict]:
        return {r["source"].rsplit("/", 1)[-1]: r
                for r in pq.read_table(out / "manifest").to_pylist()}

    assert main(args) == 0
    assert [r["status"] for r in rows().values()] == ["kept", "kept"]
    old = (folder / "a.jpg").read_bytes()
    new = encode(render(1280, 720, 7700), "JPEG", quality=95)
    (folder / "a.jpg").write_bytes(new)
    assert main(args) == 0
    a = rows()["a.jpg"]
    assert (a["status"], a["reason"]) == ("rejected", "unreadable")
    assert "content changed since it was analysed; rerun" in a["detail"]
    capsys.readouterr()
    assert main(args) == 0
    assert "analysed 1 input in this run" in capsys.readouterr().out
    final = rows()
    assert len(final) == 2 and final["a.jpg"]["status"] == "kept"
    assert final["a.jpg"]["sha256"] == hashlib.sha256(new).hexdigest()
    assert main(["verify", str(out)]) == 0
    # Put back as it first was: its first analysis is older than the change found, so the
    # bytes are analysed once more rather than matched to a stale row (or to none).
    (folder / "a.jpg").write_bytes(old)
    assert main(args) == 0 and rows()["a.jpg"]["reason"] == "unreadable"
    assert main(args) == 0
    final = rows()
    assert len(final) == 2 and final["a.jpg"]["status"] == "kept"
    assert final["a.jpg"]["sha256"] == hashlib.sha256(old).hexdigest()


def test_copies_of_a_file_changed_before_its_shard_are_not_lost(
    local_ray, tmp_path, capsys, monkeypatch
):
    """The kept copy of a byte-identical pair changed after its analysis: its re-read for
    the shard rejected it, and its unchanged copy stayed a `duplicate` of a key no shard held
    (the photograph vanished from a job that exited 0). The job analyses the changed input
    again before its manifest, and the copy is kept."""
    from pipelines.samples import encode, render

    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "b").mkdir(parents=True)
    photo = encode(render(1280, 720, 7800), "JPEG", quality=95)
    (folder / "a.jpg").write_bytes(photo)
    (folder / "b" / "copy.jpg").write_bytes(photo)
    args = ["curate", str(folder), "--output", str(out), "--set", "probe.min_pixels=921600",
            "--set", "bucket.tier_scales=[0.25,0.1875]"]  # fmt: skip
    monkeypatch.setenv("NATIVE4K_FAULT", "shards")  # the analysis is stored, then it fails
    assert main(args) == 1
    monkeypatch.delenv("NATIVE4K_FAULT")
    (folder / "a.jpg").write_bytes(encode(render(1280, 720, 7801), "JPEG", quality=95))
    capsys.readouterr()
    assert main(args) == 0
    assert "analysing it again" in capsys.readouterr().out
    rows = {r["source"].removeprefix(str(folder) + "/"): r
            for r in pq.read_table(out / "manifest").to_pylist()}  # fmt: skip
    assert rows["b/copy.jpg"]["status"] == "kept"
    assert rows["a.jpg"]["status"] == "kept"  # its new bytes, another image
    assert verify(str(out)) == []


def test_a_rewritten_tar_is_analysed_again(local_ray, tmp_path):
    """A tar rewritten with one member changed (and shorter) moves every later member: each
    row that cannot be re-read as analysed is re-analysed by the next rerun, not stuck
    `unreadable` ('tar member truncated') on every rerun."""
    import tarfile

    import pyarrow.parquet as pq

    from pipelines.cli import main
    from pipelines.samples import encode, render

    def write_tar(seeds: list[int], quality: list[int]) -> None:
        with tarfile.open(tmp_path / "data.tar", "w") as tf:
            for i, (seed, q) in enumerate(zip(seeds, quality, strict=True)):
                data = encode(render(1280, 720, seed), "JPEG", quality=q)
                info = tarfile.TarInfo(f"k{i}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    write_tar([7800, 7801, 7802], [95, 95, 95])
    out = tmp_path / "out"
    args = ["curate", str(tmp_path / "data.tar"), "--output", str(out), "--set",
            "probe.min_pixels=921600", "--set", "bucket.tier_scales=[0.25,0.1875]"]

    def statuses() -> dict[str, str]:
        return {r["source"].rsplit("#", 1)[-1]: r["status"]
                for r in pq.read_table(out / "manifest").to_pylist()}

    assert main(args) == 0 and set(statuses().values()) == {"kept"}
    write_tar([7800, 7801, 7802], [95, 80, 95])  # k1 re-encoded smaller: k2 moves
    assert main(args) == 0
    assert statuses() == {"k0.jpg": "kept", "k1.jpg": "rejected", "k2.jpg": "rejected"}
    assert main(args) == 0
    assert statuses() == {"k0.jpg": "kept", "k1.jpg": "kept", "k2.jpg": "kept"}
    assert main(["verify", str(out)]) == 0


@given(st.dictionaries(
    st.sampled_from(["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                     "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_PROFILE", "HOME"]),
    st.text(min_size=1, max_size=8),
))  # fmt: skip
def test_a_clusters_workers_get_the_endpoint_and_region_never_keys(environ):
    """`--ray-address`: botocore's per-service endpoint (`AWS_ENDPOINT_URL_S3`) travels too."""
    env = worker_env(environ)
    assert env == {k: v for k, v in environ.items() if k in AWS_ENV}
    assert {"AWS_ENDPOINT_URL_S3", "AWS_REGION"} <= set(AWS_ENV)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)


SMALL = ["--set", "probe.min_pixels=921600", "--set", "bucket.tier_scales=[0.25,0.1875]"]
"""Settings that keep a 1280x720 photograph (`_photo`): small inputs, quick jobs."""


def _photo(seed: int) -> bytes:
    from pipelines.samples import encode, render

    return encode(render(1280, 720, seed), "JPEG", quality=95)


def _rows_by_name(out: Path, sep: str = "/") -> dict[str, dict]:
    """The manifest's rows by the last part of their source; asserts one row per source."""
    rows = pq.read_table(out / "manifest").to_pylist()
    by_name = {r["source"].rsplit(sep, 1)[-1]: r for r in rows}
    assert len(by_name) == len(rows) == len({r["source"] for r in rows})
    return by_name


def _shard_samples(out: Path) -> list[str]:
    """The key of every image member in OUT's shards (a key twice is a duplicate sample)."""
    import tarfile

    keys = []
    for shard in (out / "shards").rglob("*.tar"):
        with tarfile.open(shard) as tf:
            keys += [m.name.split(".", 1)[0] for m in tf if m.name.endswith(".jpg")]
    return keys


def _kept_once(out: Path) -> None:
    """Every kept row's sample is in the shards once, and nothing else is."""
    keys = _shard_samples(out)
    kept = [r["key"] for r in pq.read_table(out / "manifest").to_pylist() if r["status"] == "kept"]
    assert sorted(keys) == sorted(kept) and len(set(keys)) == len(keys)
    assert verify(str(out)) == []


def test_failed_reads_are_read_again_but_not_what_is_no_file():
    from pipelines.curate import read_again_text, read_failed_mask

    rows = [
        ("unreadable", "cannot read: PermissionError: [Errno 13] Permission denied: '/in/a'"),
        ("unreadable", "cannot read: ClientError: An error occurred (SlowDown) ... (503)"),
        ("unreadable", "tar ends in error after 2 samples: ReadError: unexpected end of data"),
        ("unreadable", None),
        ("unreadable", "cannot read: OSError: not a regular file but a named pipe"),
        ("unreadable", "cannot read tar: OSError: not a regular file but a character device"),
        ("too_large", "file is 9 bytes, over the 8-byte cap; not read"),
        (None, None),
    ]
    t = pa.table({"reason": [r for r, _ in rows], "detail": [d for _, d in rows]})
    assert read_failed_mask(t).to_pylist() == [True] * 4 + [False] * 4
    assert read_again_text(1) == "1 input that could not be read before was read again"
    assert read_again_text(3) == "3 inputs that could not be read before were read again"


def test_an_input_that_could_not_be_read_is_read_again_by_a_rerun(local_ray, tmp_path, capsys):
    """An input whose read failed is read again by every rerun: it keeps one row, the newest
    (`unreadable` again, or its real verdict once it reads). Links stand for any failed read
    here (root reads a file whatever its mode): a dangling one, then a loop, then one to a
    photograph. A named pipe is no file to read again: its verdict stands."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_photo(7900))
    late = folder / "late.jpg"
    late.symlink_to(tmp_path / "not-yet.jpg")
    os.mkfifo(folder / "pipe.jpg")
    args = ["curate", str(folder), "--output", str(out), *SMALL]
    assert main(args) == 0
    first = _rows_by_name(out)
    assert first["late.jpg"]["reason"] == "unreadable"
    assert "FileNotFoundError" in first["late.jpg"]["detail"]
    assert first["pipe.jpg"]["reason"] == "unreadable"

    late.unlink()
    late.symlink_to(late.name)  # a loop: its read fails again, otherwise
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "1 input that could not be read before was read again" in said
    assert "analysed 1 input in this run" in said  # not the pipe
    again = _rows_by_name(out)
    assert set(again) == {"a.jpg", "late.jpg", "pipe.jpg"}
    assert again["late.jpg"]["reason"] == "unreadable"
    assert "Too many levels of symbolic links" in again["late.jpg"]["detail"]  # the newest
    verdict = ("status", "reason", "detail")
    assert [again["pipe.jpg"][c] for c in verdict] == [first["pipe.jpg"][c] for c in verdict]

    (tmp_path / "not-yet.jpg").write_bytes(_photo(7901))
    late.unlink()
    late.symlink_to(tmp_path / "not-yet.jpg")
    assert main(args) == 0
    final = _rows_by_name(out)
    assert set(final) == {"a.jpg", "late.jpg", "pipe.jpg"}
    assert final["late.jpg"]["status"] == "kept" and final["a.jpg"]["status"] == "kept"
    _kept_once(out)
    capsys.readouterr()
    assert main(args) == 0  # read, it is done: not read once more
    said = capsys.readouterr().out
    assert "analysed 0 inputs in this run" in said and "read again" not in said
    verdict = ("status", "reason", "detail", "key", "shard")
    assert {n: [r[c] for c in verdict] for n, r in _rows_by_name(out).items()} == {
        n: [r[c] for c in verdict] for n, r in final.items()
    }


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_file_that_could_not_be_read_gets_its_verdict_once_readable(
    local_ray, tmp_path, capsys
):
    """A file without read permission is `unreadable`, on every rerun while it stays so (one
    row); once readable, the rerun reads it and judges it: here a copy of another input, a
    `duplicate`, with one sample in the shards. A folder that could not be listed is one
    `unreadable` row while it stays so; listed, its files are inputs and its row is gone."""
    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "shut").mkdir(parents=True)
    photo = _photo(7910)
    (folder / "a.jpg").write_bytes(photo)
    (folder / "b.jpg").write_bytes(_photo(7911))
    (folder / "shut" / "c.jpg").write_bytes(_photo(7912))
    locked = folder / "locked.jpg"
    locked.write_bytes(photo)
    locked.chmod(0)
    (folder / "shut").chmod(0)
    args = ["curate", str(folder), "--output", str(out), *SMALL]
    try:
        assert main(args) == 0
        rows = _rows_by_name(out)
        assert set(rows) == {"a.jpg", "b.jpg", "locked.jpg", "shut"}
        for name in ("locked.jpg", "shut"):
            assert rows[name]["reason"] == "unreadable", name
            assert "PermissionError" in rows[name]["detail"], name
        capsys.readouterr()
        assert main(args) == 0
        assert "2 inputs that could not be read before were read again" in capsys.readouterr().out
        rows = _rows_by_name(out)
        assert set(rows) == {"a.jpg", "b.jpg", "locked.jpg", "shut"}
        assert rows["locked.jpg"]["reason"] == rows["shut"]["reason"] == "unreadable"
    finally:
        locked.chmod(0o644)
        (folder / "shut").chmod(0o755)
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "analysed 2 inputs in this run" in said  # locked.jpg and shut/c.jpg
    assert "1 input that could not be read before was read again" in said
    rows = _rows_by_name(out)
    assert set(rows) == {"a.jpg", "b.jpg", "locked.jpg", "c.jpg"}
    assert [rows[n]["status"] for n in ("a.jpg", "b.jpg", "c.jpg")] == ["kept"] * 3
    assert rows["locked.jpg"]["reason"] == "duplicate"
    assert rows["locked.jpg"]["duplicate_of"] == rows["a.jpg"]["key"]
    _kept_once(out)
    assert main(["verify", str(out)]) == 0


def test_a_tar_that_ended_in_error_is_read_again_from_its_failed_member(
    local_ray, tmp_path, capsys
):
    """A tar cut short in a member: its samples before the cut are analysed, the cut member
    and the rest are `unreadable`. Once the tar is whole, the rerun reads the members it
    could not (the ones analysed are not analysed twice), and no `unreadable` row stays."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(4):
            data = _photo(7920 + i)
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        cut = tf.getmember("k2.jpg")
    tar = tmp_path / "data.tar"
    tar.write_bytes(whole[: cut.offset_data + cut.size // 2])
    out = tmp_path / "out"
    args = ["curate", str(tar), "--output", str(out), *SMALL]
    assert main(args) == 0
    rows = _rows_by_name(out, "#")
    assert {n: r["status"] if r["status"] == "kept" else r["reason"] for n, r in rows.items()} == {
        "k0.jpg": "kept", "k1.jpg": "kept", "k2.jpg": "unreadable", "<rest>": "unreadable"
    }  # fmt: skip
    tar.write_bytes(whole)
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    rows = _rows_by_name(out, "#")
    assert set(rows) == {f"k{i}.jpg" for i in range(4)}
    assert {r["status"] for r in rows.values()} == {"kept"}
    _kept_once(out)
    assert "analysed 2 inputs in this run" in said  # k2 and k3: not k0 and k1 again
    assert "1 input that could not be read before was read again" in said


def test_an_s3_object_that_could_not_be_read_is_read_by_the_rerun(local_ray, s3_server, tmp_path):
    """A listed S3 object that could not be read (here: not there yet) is read again by the
    rerun, with the job's OUT on S3 too (its analysis parts dated by the store)."""
    import boto3

    client = boto3.client("s3")
    for bucket in ("retry-in", "retry-out"):
        client.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
        )
    client.put_object(Bucket="retry-in", Key="a.jpg", Body=_photo(7930))
    uris = tmp_path / "inputs.lst"
    uris.write_text("s3://retry-in/a.jpg\ns3://retry-in/late.jpg\n")
    out = "s3://retry-out/run"
    args = ["curate", str(uris), "--output", out, *SMALL]

    def rows() -> dict[str, dict]:
        got = read_manifest(out)
        assert len(got) == len({r["source"] for r in got})
        return {r["source"].rsplit("/", 1)[-1]: r for r in got}

    assert main(args) == 0
    assert rows()["late.jpg"]["reason"] == "unreadable"
    assert main(args) == 0  # still missing: one row
    assert set(rows()) == {"a.jpg", "late.jpg"} and rows()["late.jpg"]["reason"] == "unreadable"
    client.put_object(Bucket="retry-in", Key="late.jpg", Body=_photo(7931))
    assert main(args) == 0
    final = rows()
    assert set(final) == {"a.jpg", "late.jpg"}
    assert {r["status"] for r in final.values()} == {"kept"}
    fsspec.filesystem("s3").invalidate_cache()  # shards rewritten since this process listed them
    assert verify(out) == []
