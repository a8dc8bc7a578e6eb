"""Atomic writes (local staging, aborted S3 uploads), S3 retry settings, and names that are
not UTF-8."""

from __future__ import annotations

import os

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.io import S3_MAX_ATTEMPTS
from curation.io.atomic import atomic_write, staging_folder
from curation.io.listing import (
    escape_name,
    list_inputs,
    local_path,
    local_source,
    split_tar_source,
)


def test_local_temp_files_are_staged_in_the_outputs_work_folder(tmp_path):
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    target = out / "shards" / "4096x4096" / "4096x4096-000000.tar"
    assert staging_folder(str(target)) == str(out / "_work" / "tmp")
    assert staging_folder(str(out / "_work" / "analysis" / "part-1.parquet")) == str(
        out / "_work" / "tmp"
    )
    with pytest.raises(RuntimeError), atomic_write(str(target)) as fh:
        fh.write(b"half a shard")
        assert [p.parent for p in (out / "_work" / "tmp").iterdir()] == [out / "_work" / "tmp"]
        assert not target.exists()
        raise RuntimeError("the writer died")
    assert not target.exists() and not list((out / "_work" / "tmp").iterdir())
    with atomic_write(str(target)) as fh:
        fh.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert [p.name for p in out.rglob("*") if p.is_file()] == [target.name]


def test_a_failed_s3_upload_publishes_nothing(s3_server):
    import boto3

    boto3.client("s3").create_bucket(
        Bucket="atomic", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    fs = fsspec.filesystem("s3")
    for size in (10, 12 << 20):  # one PUT, and a multipart upload with a part already sent
        with pytest.raises(RuntimeError), atomic_write(f"s3://atomic/f{size}") as fh:
            fh.write(b"x" * size)
            raise RuntimeError("the writer died")
        fs.invalidate_cache()
        assert not fs.exists(f"atomic/f{size}")
    assert not boto3.client("s3").list_multipart_uploads(Bucket="atomic").get("Uploads")
    with atomic_write("s3://atomic/text.txt", "w") as fh:
        fh.write("whole")
    assert fs.cat("atomic/text.txt") == b"whole"


def test_s3_filesystems_retry_with_backoff(s3_server):
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.ls("")  # builds the botocore client from the configuration
    retry = fs.s3.meta.config.retries
    assert retry["total_max_attempts"] == int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))
    assert retry["mode"] == os.environ.get("AWS_RETRY_MODE", "standard")


@settings(max_examples=60, deadline=None)
@given(
    name=st.binary(min_size=1, max_size=40).filter(
        lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
    )
)
def test_local_sources_round_trip_any_bytes(tmp_path_factory, name):
    path = os.path.join("/data", os.fsdecode(name))
    source = local_source(path)
    source.encode("utf-8")  # always text Arrow can hold
    assert os.fsencode(local_path(source)) == os.fsencode(path)
    if source.startswith("file://"):
        with pytest.raises(UnicodeDecodeError):
            name.decode("utf-8")


def test_member_names_and_tar_sources():
    assert escape_name("ok/ä.jpg") == "ok/ä.jpg"
    assert escape_name(os.fsdecode(b"a\xff.jpg")) == "a%FF.jpg"
    assert split_tar_source("/d/x#y.tar#a#b.jpg") == ("/d/x#y.tar", "a#b.jpg")
    assert split_tar_source("s3://b/p.TAR#../m.jpg") == ("s3://b/p.TAR", "../m.jpg")


def test_listing_does_not_descend_linked_folders(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    (tmp_path / "in" / "sub" / "loop").symlink_to(tmp_path / "in", target_is_directory=True)
    (tmp_path / "in" / "link.jpg").symlink_to(tmp_path / "in" / "a.jpg")
    items = [i.uri for i in list_inputs([str(tmp_path / "in")])]
    assert items == [str(tmp_path / "in" / "a.jpg"), str(tmp_path / "in" / "link.jpg")]


def test_a_folder_input_skips_the_jobs_output(tmp_path, s3_server):
    """OUT inside a folder INPUT (local or an S3 prefix) is never listed as input."""
    import boto3

    from curation.io.listing import InputSpec, expand_input

    local = tmp_path / "in"
    for name in ("a.jpg", "out/shards/b/x.tar", "out/manifest/p.parquet", "outer/c.jpg"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(b"x")
    spec = InputSpec(str(local), "folder")
    listed = sorted(i.uri for i in expand_input(spec, exclude=str(local / "out")))
    assert listed == [str(local / "a.jpg"), str(local / "outer" / "c.jpg")]
    assert len(list(expand_input(spec))) == 4
    # Through links: the input folder's, or the output's (compared by real path).
    (tmp_path / "in_link").symlink_to(local)
    (tmp_path / "out_link").symlink_to(local / "out")
    via = InputSpec(str(tmp_path / "in_link"), "folder")
    assert len(list(expand_input(via, exclude=str(local / "out")))) == 2
    assert len(list(expand_input(spec, exclude=str(tmp_path / "out_link")))) == 2

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="outin", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    for name in ("in/a.jpg", "in/out/shards/b/x.tar", "in/out/_SUCCESS", "in/outer/c.jpg"):
        s3.put_object(Bucket="outin", Key=name, Body=b"x")
    spec = InputSpec("s3://outin/in", "folder")
    listed = sorted(i.uri for i in expand_input(spec, exclude="s3://outin/in/out/"))
    assert listed == ["s3://outin/in/a.jpg", "s3://outin/in/outer/c.jpg"]
    # A URI list on S3: relative entries are relative to the list's prefix.
    s3.put_object(Bucket="outin", Key="in/urls.lst", Body=b"a.jpg\nouter/c.jpg\ns3://x/y.jpg\n")
    fsspec.filesystem("s3").invalidate_cache()  # the listing above is cached
    listed = [i.uri for i in expand_input(InputSpec("s3://outin/in/urls.lst", "list"))]
    assert listed == ["s3://outin/in/a.jpg", "s3://outin/in/outer/c.jpg", "s3://x/y.jpg"]
