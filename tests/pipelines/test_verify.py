"""`native4k verify`: shards, manifest, `_SUCCESS` and `stats.json` against each other."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from pipelines.verify import run_verify, verify

BUCKETS = ["3840x2176", "4096x2048"]


@pytest.fixture
def job(audit_output, audit_jpeg) -> tuple[Path, dict]:
    """Six kept samples (two buckets, two per shard, one captioned) and two rejected rows."""
    kept = [
        {
            "data": audit_jpeg(48 + i, 32, i),
            "ext": "jpg",
            "bucket": BUCKETS[i % 2],
            "width": 48 + i,
            "height": 32,
            "orientation": 1,
            "sharpness": 10.5 + i,
            "caption_en": "a red kite" if i == 0 else None,
        }
        for i in range(6)
    ]
    rejected = [
        {"source": "/in/x.jpg", "reason": "upscaled", "native_score": 3.0},
        {"source": "/in/y.png", "reason": "too_small"},
    ]
    return audit_output(kept, rejected)


def _shards(out: Path) -> list[Path]:
    return sorted((out / "shards").rglob("*.tar"))


def _rewrite(shard: Path, edit: Callable[[list[tuple[tarfile.TarInfo, bytes]]], list]) -> None:
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else b"") for m in tf]
    members = edit(members)
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.isreg():
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))
            else:
                tf.addfile(m)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _edit_manifest(out: Path, edit: Callable[[pa.Table], pa.Table]) -> None:
    for part in sorted((out / "manifest").glob("*.parquet")):
        pq.write_table(edit(pq.read_table(part)), part)


def _set(t: pa.Table, col: str, mask: pa.Array, value) -> pa.Table:
    i = t.schema.get_field_index(col)
    new = pc.if_else(mask, pa.scalar(value, t.schema.field(col).type), t.column(col))
    return t.set_column(i, col, new)


def _one(findings: list[str], *words: str) -> str:
    hits = [f for f in findings if all(w in f for w in words)]
    assert hits, f"no finding with {words} in {findings}"
    return hits[0]


def test_a_clean_job_agrees_shallow_and_deep(job, capsys):
    out, _written = job
    res = run_verify(str(out), deep=True, workers=1)
    assert res.findings == []
    assert res.samples == 6 and res.shards == 4 and res.rows == 8
    assert main(["verify", str(out), "--deep"]) == 0
    assert "agrees" in capsys.readouterr().out


def test_shards_checked_in_parallel_give_the_same_findings(job):
    out, _ = job
    shard = _shards(out)[0]
    _rewrite(
        shard, lambda ms: [(m, d[:-3] + b"abc" if m.name.endswith(".jpg") else d) for m, d in ms]
    )
    one = run_verify(str(out), workers=1)
    two = run_verify(str(out), workers=2, progress=True)
    assert one.findings and sorted(one.findings) == sorted(two.findings)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_any_changed_image_byte_is_caught(job, tmp_path_factory, data):
    src, _ = job
    out = tmp_path_factory.mktemp("flip") / "out"
    shutil.copytree(src, out)
    shard = data.draw(st.sampled_from(_shards(out)))
    with tarfile.open(shard) as tf:
        images = [m.name for m in tf if m.name.endswith(".jpg")]
    name = data.draw(st.sampled_from(images))

    def flip(ms):
        res = []
        for m, d in ms:
            if m.name == name:
                i = data.draw(st.integers(0, len(d) - 1))
                d = d[:i] + bytes([d[i] ^ 0x01]) + d[i + 1 :]
            res.append((m, d))
        return res

    _rewrite(shard, flip)
    findings = verify(str(out))
    key = name.split(".")[0]
    _one(findings, shard.relative_to(out).as_posix(), key, "sha256")


def test_deleted_members_and_samples_are_caught(job):
    out, _ = job
    a, b = _shards(out)[:2]
    with tarfile.open(a) as tf:
        key_a = tf.getnames()[0].split(".")[0]
    _rewrite(a, lambda ms: [(m, d) for m, d in ms if m.name != f"{key_a}.json"])
    with tarfile.open(b) as tf:
        key_b = tf.getnames()[0].split(".")[0]
    _rewrite(b, lambda ms: [(m, d) for m, d in ms if not m.name.startswith(key_b)])
    findings = verify(str(out))
    _one(findings, key_a, "no .json member")
    _one(findings, "lacks sample", key_b)
    _one(findings, "stats.json", "samples", "the shards hold")
    assert main(["verify", str(out)]) == 1


def test_unknown_and_unsafe_members_are_caught(job):
    out, _ = job
    shard = _shards(out)[0]
    with tarfile.open(shard) as tf:
        key = tf.getnames()[0].split(".")[0]
    link = tarfile.TarInfo(f"{key}.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"

    def add(ms):
        return [
            *ms,
            _member(f"{key}.pth", b"\x80\x04pickle"),
            _member(f"{key}.pickle", b"\x80\x04"),
            _member("other.pyd", b"MZ"),
            _member(f"{key}.xyz", b"?"),
            _member(f"../{key}.jpg", b"x"),
            _member(f"sub/{key}.json", b"{}"),
            (link, b""),
        ]

    _rewrite(shard, add)
    findings = verify(str(out))
    for ext in ("pth", "pickle"):
        _one(findings, f"{key}.{ext}", "unsafe")
    _one(findings, "other.pyd", "unsafe")
    _one(findings, key, "unexpected unknown member .xyz")
    _one(findings, f"../{key}.jpg", "unsafe path")
    _one(findings, f"sub/{key}.json", "unsafe path")
    _one(findings, f"{key}.png", "link")


def test_manifest_edits_are_caught(job):
    out, written = job
    kept = [r for r in written["rows"] if r["status"] == "kept"]
    k0, k1 = kept[0], kept[1]
    shards = [r["shard"] for r in kept]
    k2 = next(r for r in kept[2:] if shards.count(r["shard"]) == 2)  # its shard keeps a sample
    other = next(s for s in sorted(shards) if s != k2["shard"])

    def edit(t: pa.Table) -> pa.Table:
        t = _set(t, "width", pc.equal(t["key"], k0["key"]), 9999)
        t = _set(t, "sha256", pc.equal(t["key"], k1["key"]), "0" * 64)
        t = _set(t, "shard", pc.equal(t["key"], k2["key"]), other)
        return t

    _edit_manifest(out, edit)
    findings = verify(str(out))
    _one(findings, k0["key"], ".json width=", "9999")
    _one(findings, k1["key"], "sha256")
    _one(findings, f"sample {k2['key']} is in {k2['shard']}, the manifest places it in {other}")
    _one(findings, other, "lacks sample", k2["key"])
    _one(findings, k2["shard"], "holds sample", k2["key"], "does not place here")


def test_manifest_row_level_problems(job):
    out, _written = job
    part = sorted((out / "manifest").glob("*.parquet"))[-1]
    t = pq.read_table(part)
    dup = t.slice(t.num_rows - 1, 1)
    dup = _set(dup, "shard", pc.is_null(dup["shard"]), "shards/9x9/9x9-000000.tar")
    dup = _set(dup, "reason", pc.is_valid(dup["reason"]), None)
    pq.write_table(pa.concat_tables([t, dup]), part)
    findings = verify(str(out))
    src = dup["source"][0].as_py()
    _one(findings, "manifest", src, "2 rows")
    _one(findings, "rejected row", src, "names shard")
    _one(findings, "rejected row", src, "no reason")
    _one(findings, "_SUCCESS says 8 rows", "9")
    _one(findings, "stats.json says total=8", "9")


def test_a_duplicate_must_name_a_row_of_the_manifest(job):
    """`duplicate_of` was never checked: a duplicate pointing at a key no row has (a manifest
    merged from two jobs, an edit) passed verify."""
    out, _written = job
    kept_key = next(r["key"] for r in pq.read_table(out / "manifest").to_pylist() if r["key"])

    def as_duplicate_of(key: str) -> Callable[[pa.Table], pa.Table]:
        def edit(t: pa.Table) -> pa.Table:
            mask = pc.equal(t["source"], "/in/x.jpg")
            t = _set(t, "reason", mask, "duplicate")
            return _set(t, "duplicate_of", mask, key)

        return edit

    _edit_manifest(out, as_duplicate_of(kept_key))
    assert not [f for f in verify(str(out)) if "duplicate_of" in f]
    _edit_manifest(out, as_duplicate_of("0" * 32))
    _one(verify(str(out)), "duplicate row /in/x.jpg", "0" * 32, "no row of the manifest")


def test_json_member_edits_and_captions_are_caught(job):
    out, written = job
    captioned = next(r for r in written["rows"] if r["caption_en"])
    shard = out / captioned["shard"]
    key = captioned["key"]

    def edit(ms):
        res = []
        for m, d in ms:
            if m.name == f"{key}.json":
                meta = json.loads(d)
                meta["sharpness"] = 0.5
                d = json.dumps(meta).encode()
            if m.name == f"{key}.txt":
                d = b"a blue kite"
            res.append((m, d))
        return res

    _rewrite(shard, edit)
    findings = verify(str(out))
    _one(findings, key, ".json sharpness=0.5")
    _one(findings, key, ".txt differs", "caption_en")


def test_summary_files_disagreeing_with_the_shards(job):
    out, _ = job
    stats = json.loads((out / "stats.json").read_text())
    stats["buckets"][BUCKETS[0]]["bytes"] += 1
    stats["reasons"]["upscaled"] = 5
    (out / "stats.json").write_text(json.dumps(stats))
    findings = verify(str(out))
    _one(findings, "stats.json", BUCKETS[0], "image bytes")
    _one(findings, "stats.json says 5 rejected as upscaled", "has 1")
    (out / "_SUCCESS").unlink()
    _one(verify(str(out)), "_SUCCESS is missing", "did not complete")


def test_summary_files_of_another_shape_are_findings_not_crashes(job):
    """stats.json's `reasons` or `buckets` as a list crashed verify (AttributeError), its
    `rules` as a list crashed report; `_SUCCESS` saying rows "6" (text) read '6 rows, the
    manifest has 6'."""
    from pipelines.report import write_report

    out, _ = job
    good = json.loads((out / "stats.json").read_text())
    for key in ("reasons", "buckets"):
        (out / "stats.json").write_text(json.dumps({**good, key: list(good[key])}))
        _one(verify(str(out)), f"stats.json's {key} are list, not an object")
    (out / "stats.json").write_text(json.dumps({**good, "rules": []}))
    with pytest.raises(ValueError, match=r"stats\.json's rules is not the mapping a job writes"):
        write_report(str(out))
    (out / "stats.json").write_text(json.dumps(good))
    success = json.loads((out / "_SUCCESS").read_text())
    (out / "_SUCCESS").write_text(json.dumps({**success, "rows": str(success["rows"])}))
    _one(verify(str(out)), f"_SUCCESS says '{success['rows']}' rows")


def test_shards_on_disk_and_in_the_manifest_must_match(job):
    out, _written = job
    a, b = _shards(out)[:2]
    extra = a.with_name(a.name.replace("000000", "000099"))
    shutil.copy(a, extra)  # a stray shard: its samples are now in two shards
    b.unlink()
    findings = verify(str(out))
    _one(findings, extra.relative_to(out).as_posix(), "names no sample in it")
    _one(findings, b.relative_to(out).as_posix(), "missing on disk")
    with tarfile.open(a) as tf:
        key = tf.getnames()[0].split(".")[0]
    _one(findings, f"sample {key} is in 2 shards")


def test_truncated_shard_is_a_finding_not_a_crash(job):
    out, _ = job
    shard = _shards(out)[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:700])
    _one(verify(str(out)), shard.relative_to(out).as_posix(), "cannot be read as a tar")
    # Cut after its last member (the end blocks gone), or a header spoilt: a stream read ends
    # there without a word, so the shard passed, or only 'lacks sample ...' was said.
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        last = tf.getmembers()[-1]
        second = tf.getmembers()[1]
    header = bytearray(whole)
    header[second.offset + 5] ^= 0xFF  # a byte of its name: the checksum fails
    for spoilt in (whole[: last.offset_data + -(-last.size // 512) * 512], bytes(header)):
        shard.write_bytes(spoilt)
        findings = verify(str(out))
        assert any("no end-of-archive block there (cut short, or a corrupt header)" in f
                   for f in findings), findings  # fmt: skip


def test_deep_decodes_what_sha256_cannot_see(audit_output, audit_jpeg):
    good = audit_jpeg(64, 40, 1)
    kept = [
        {
            "data": good[: len(good) // 2],
            "ext": "jpg",
            "bucket": BUCKETS[0],
            "width": 64,
            "height": 40,
        },
        {
            "data": audit_jpeg(64, 40, 2),
            "ext": "jpg",
            "bucket": BUCKETS[0],
            "width": 40,
            "height": 64,
            "orientation": 1,
        },
        {
            "data": audit_jpeg(64, 40, 3),
            "ext": "jpg",
            "bucket": BUCKETS[0],
            "width": 40,
            "height": 64,
            "orientation": 6,
        },
    ]
    out, written = audit_output(kept, [])
    assert verify(str(out)) == []  # the bytes are what the manifest says
    keys = [r["key"] for r in written["rows"]]
    deep = verify(str(out), deep=True)
    _one(deep, keys[0], "does not decode")
    _one(deep, keys[1], "decodes to 64x40", "40x64")
    assert not [f for f in deep if keys[2] in f]  # EXIF-rotated: 64x40 stored is 40x64 shown
    assert len(deep) == 2


@pytest.mark.parametrize("n_kept", [0, 1])
def test_zero_and_one_kept(audit_output, audit_jpeg, n_kept, capsys):
    one = {"data": audit_jpeg(40, 30, 0), "ext": "jpg", "bucket": BUCKETS[0], "width": 40}
    kept = [{**one, "height": 30}][:n_kept]
    out, _ = audit_output(kept, [{"source": "/in/z.jpg", "reason": "blurry"}])
    assert verify(str(out), deep=True) == []
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    said = capsys.readouterr().out  # counts in the singular where they are one
    want = "2 manifest rows, 1 shard, 1 sample" if n_kept else "1 manifest row, 0 shards, 0 samples"
    assert want in said, said
    if n_kept:
        _shards(out)[0].unlink()
        _one(verify(str(out)), "missing on disk")


def test_s3_output_in_parallel(job, s3_server):
    import boto3

    out, _ = job
    boto3.client("s3").create_bucket(
        Bucket="audit-verify", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    fs = fsspec.filesystem("s3")
    fs.put(str(out) + "/", "audit-verify/job", recursive=True)
    # the console's "Create folder" keys: no shards, no findings
    for key in ("job/shards/", f"job/shards/{BUCKETS[0]}/"):
        boto3.client("s3").put_object(Bucket="audit-verify", Key=key, Body=b"")
    fs.invalidate_cache()
    assert run_verify("s3://audit-verify/job", workers=2, deep=True).findings == []
    shard = _shards(out)[0]
    _rewrite(shard, lambda ms: [(m, d) for m, d in ms if not m.name.endswith(".jpg")])
    fs.put_file(str(shard), f"audit-verify/job/{shard.relative_to(out).as_posix()}")
    findings = run_verify("s3://audit-verify/job", workers=2).findings
    _one(findings, shard.relative_to(out).as_posix(), "no .jpg image member")


def test_an_output_named_with_glob_characters_or_holding_mac_copies_is_audited(job, tmp_path):
    """`run [v2]` was read as a glob pattern ('has no manifest'), and the `._part-0.parquet`
    that macOS writes beside each file it copies onto exFAT or SMB was read as a manifest
    part ('Parquet magic bytes not found'): stats, report and verify all failed a good job."""
    from pipelines.stats import output_stats
    from training.data import read_manifest

    out, _ = job
    odd = tmp_path / "run [v2]"
    shutil.copytree(out, odd)
    for part in list((odd / "manifest").iterdir()):
        (part.parent / f"._{part.name}").write_bytes(b"\x00\x05\x16\x07" * 1024)
    for shard in _shards(odd):
        (shard.parent / f"._{shard.name}").write_bytes(b"\x00\x05\x16\x07" * 1024)
    assert verify(str(odd)) == verify(str(out)) == []
    assert output_stats(str(odd)) == output_stats(str(out))
    assert read_manifest(str(odd), ("key",)).equals(read_manifest(str(out), ("key",)))
    # A part cut short is named (Arrow's 'Parquet magic bytes not found' names no file).
    part = sorted((odd / "manifest").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(part))} is no readable Parquet"):
        output_stats(str(odd))


def test_a_path_that_is_no_output_is_refused_not_audited(job, tmp_path, capsys):
    """A typo, a file or an input folder is a usage error (exit 2), not a damaged output."""
    out, _ = job
    afile = tmp_path / "afile.txt"
    afile.write_text("hi")
    inputs = tmp_path / "photos"
    inputs.mkdir()
    (inputs / "a.jpg").write_bytes(b"x")
    for path, words in ((tmp_path / "nope", "does not exist"), (afile, "is a file"),
                        (inputs, "not a curation job's output")):  # fmt: skip
        assert main(["verify", str(path)]) == 2
        assert words in capsys.readouterr().err
    (out / "_SUCCESS").unlink()
    (out / "_SUCCESS").mkdir()
    _one(verify(str(out)), "_SUCCESS is a folder")
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(out), "--workers", "0"])
    assert exit_.value.code == 2 and "--workers: must be at least 1" in capsys.readouterr().err


def test_an_unfinished_runs_work_alone_is_no_finished_job(tmp_path, capsys):
    """`curate` on an empty folder stops (exit 2) after taking its lock in OUT/_work: verify
    says there is no finished job (exit 2, as stats and report do), not five mismatches."""
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    (out / "_work" / "lock").write_text("")
    assert main(["verify", str(out)]) == 2
    printed = capsys.readouterr()
    assert "holds no finished curation job" in printed.err and "MISMATCH" not in printed.out
    assert main(["stats", str(out)]) == 2 and main(["report", str(out)]) == 2


@pytest.mark.parametrize(
    "text,words",
    [("analyze: [", "config.yaml cannot be read"), ("- a list\n", "config.yaml is not a mapping"),
     (b"\xff\xfe", "config.yaml cannot be read (not UTF-8")],
)  # fmt: skip
def test_a_config_yaml_report_cannot_read_is_a_finding(job, text, words):
    out, _ = job
    assert verify(str(out)) == []
    path = out / "config.yaml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    _one(verify(str(out)), words)


def test_s3_without_credentials_is_one_line(job, s3_server, monkeypatch, capsys):
    """botocore's errors are not OSErrors: no credentials is a message, not a traceback."""
    import s3fs

    out, _ = job
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(out / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(out / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        for command in ("stats", "verify", "report"):
            assert main([command, "s3://audit-nocreds/job"]) == 2
            err = capsys.readouterr().err
            assert "cannot use s3://audit-nocreds/job" in err and "credentials" in err
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_findings_print_names_with_control_characters_escaped(job, capsys):
    out, _ = job
    name = "/in/\x1b[31mred\nline.jpg"

    def edit(t: pa.Table) -> pa.Table:
        rejected = pc.equal(t.column("source"), "/in/x.jpg")
        return _set(_set(t, "source", rejected, name), "reason", rejected, None)

    _edit_manifest(out, edit)
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\\x1b[31mred\\nline.jpg has no reason" in printed


def test_hidden_files_under_shards_are_no_shards(job):
    """Finder leaves a `.DS_Store` in every folder it shows (an output on a shared drive):
    verify called each a stray shard that could not be read as a tar, and exited 1. A
    stray shard with a plain name is still one."""
    out, _ = job
    shard = _shards(out)[0]
    for folder in (out / "shards", shard.parent):
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (shard.parent / f"._{shard.name}").write_bytes(b"AppleDouble")
    assert verify(str(out)) == []
    (shard.parent / "notes.txt").write_text("a stray file")
    _one(verify(str(out)), "notes.txt", "names no sample in it")


def test_hostile_member_names_and_json_are_findings_not_crashes(job, capsys, monkeypatch):
    """A member name that is not UTF-8 reached the terminal as raw bytes (a traceback on a
    strict UTF-8 stdout), and a .json nested 200,000 deep crashed with RecursionError."""
    out, _ = job
    shard = _shards(out)[0]
    with tarfile.open(shard) as tf:
        key = tf.getnames()[0].split(".")[0]
    bad = b"\xff\xfeabc.jpg".decode("utf-8", "surrogateescape")  # how tarfile names it
    deep = b"[" * 200_000 + b"]" * 200_000

    def add(ms):
        return [(m, deep if m.name == f"{key}.json" else d) for m, d in ms] + [_member(bad, b"x")]

    _rewrite(shard, add)
    findings = verify(str(out))
    _one(findings, key, ".json is not JSON (RecursionError")
    _one(findings, "abc", "does not place here")
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    printed.encode("utf-8")  # strict: no lone surrogate reaches the terminal
    assert "\\udcff\\udcfeabc" in printed


def test_deep_decodes_a_kept_image_over_pillows_own_bomb_limit(job, monkeypatch):
    """A kept 182 MP photograph (`probe.max_pixels` raised) failed `verify --deep` with
    DecompressionBombError: Pillow's default limit, not the job's, applied."""
    from PIL import Image

    out, _ = job
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the job's images are 1,536+ px
    assert verify(str(out), deep=True) == []


def test_the_bucket_table_and_the_configuration_belong_to_a_finished_job(job):
    """The contract lists `buckets.json` and `config.yaml` in every finished job; an output
    without them, or whose kept samples lie in a bucket its table lacks, passed verify."""
    out, _ = job
    assert verify(str(out)) == []
    table = json.loads((out / "buckets.json").read_text())
    assert {b["name"] for b in table["buckets"]} == set(BUCKETS)
    (out / "buckets.json").write_text(json.dumps({"buckets": table["buckets"][:1]}))
    _one(verify(str(out)), f"bucket {BUCKETS[1]}, which buckets.json does not hold")
    (out / "buckets.json").unlink()
    (out / "config.yaml").unlink()
    findings = verify(str(out))
    _one(findings, "buckets.json is missing")
    _one(findings, "config.yaml is missing")
    assert len(findings) == 2
