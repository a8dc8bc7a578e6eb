"""The job's listing runs in Ray tasks and lists exactly what the driver-side listing lists."""

from __future__ import annotations

import os
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.io.listing import list_inputs, plan_inputs
from pipelines.config import load_config
from pipelines.curate import KIND, SIDECAR, list_job

NAMES = st.lists(
    st.tuples(
        st.sampled_from(["", "sub/", "sub/deeper/", ".hidden/", "sub/.git/objects/",
                         "@eaDir/a.jpg/", "sub/#recycle/"]),
        st.sampled_from(["a", "b", "c d", "ünï", "x#y"]),
        st.sampled_from([".jpg", ".png", ".txt", ".json", ".tar", ".webp"]),
    ),
    min_size=1,
    max_size=10,
    unique=True,
)


def _inputs(tmp_path, names) -> list[str]:
    folder = tmp_path / "in"
    for prefix, stem, ext in names:
        path = folder / f"{prefix}{stem}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if ext == ".tar":
            with tarfile.open(path, "w"):
                pass
        else:
            path.write_bytes(b"not really an image")
    lst = tmp_path / "more.lst"
    lst.write_text("# comments and blanks are skipped\n\n/data/p-{0..2}.jpg\ns3://b/k.tar\n")
    return [str(folder), str(lst)]


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=NAMES, chunk=st.sampled_from([1, 2, 1000]))  # rows per yielded chunk
def test_ray_listing_equals_the_driver_listing(local_ray, tmp_path_factory, names, chunk):
    inputs = _inputs(tmp_path_factory.mktemp("listing"), names)
    want = sorted((i.uri, i.sidecar, i.kind) for i in list_inputs(inputs))
    listing = list_job(local_ray.data, plan_inputs(inputs), load_config(), chunk=chunk)
    rows = listing.rows.take_all() if listing.rows is not None else []
    got = sorted((r["source"], r[SIDECAR], r[KIND]) for r in rows)
    assert got == want
    assert listing.count == len(want)
    assert listing.tars == sum(1 for w in want if w[2] == "tar")


def test_an_output_inside_an_input_folder_is_not_listed(local_ray, tmp_path):
    """`curate F --output F/out`: a rerun must not take its own shards, manifest and work
    files for inputs (they became `decode_error`/`duplicate` rows before)."""
    from pipelines.cli import main
    from pipelines.samples import encode, render

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.jpg", "sub/b.jpg")):
        (folder / name).write_bytes(encode(render(1280, 720, 7500 + i), "JPEG", quality=95))
    out = folder / "out"
    args = ["curate", str(folder), "--output", str(out), "--set", "probe.min_pixels=921600",
            "--set", "bucket.tier_scales=[0.25,0.1875]"]
    assert main(args) == 0
    assert main(args) == 0  # OUT now holds shards, a manifest and _work files
    import pyarrow.parquet as pq

    sources = sorted(r["source"] for r in pq.read_table(out / "manifest").to_pylist())
    assert sources == [str(folder / "a.jpg"), str(folder / "sub" / "b.jpg")]
    specs = plan_inputs([str(folder)])
    listed = list_job(local_ray.data, specs, load_config(), output=str(out)).rows.take_all()
    assert sorted(r["source"] for r in listed) == sources
    # OUT may not be the input folder itself.
    assert main(["curate", str(folder), "--output", str(folder)]) == 2
    # The same folder listed for another job (OUT elsewhere) does see those files.
    assert len(list_job(local_ray.data, specs, load_config()).rows.take_all()) > len(sources)


def _photos(tmp_path):
    from pipelines.samples import encode, render

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.jpg", "sub/b.jpg", "sub/c.jpg")):
        (folder / name).write_bytes(encode(render(384, 256, 7600 + i), "JPEG", quality=92))
    return folder


_SMALL = ["--set", "score.enabled=false", "--set", "probe.min_pixels=65536",
          "--set", "bucket.tier_scales=[1.0,0.5,0.25,0.125,0.0625,0.05]"]  # fmt: skip


@pytest.mark.parametrize(
    "args,note",
    [
        (["{f}", "{f}/sub"], "{f}/sub is inside {f}, listed once"),
        (["{f}/sub/b.jpg", "{f}"], "{f}/sub/b.jpg is inside {f}, listed once"),
        (["{f}", "{f}/"], "{f}/ is the same as {f}, listed once"),
        (["{f}/sub", "{f}/a.jpg", "{f}/../photos/"],
         "{f}/sub is inside {f}/../photos/; {f}/a.jpg is inside {f}/../photos/: each listed once"),
        (["{f}/a.jpg", "{f}/../again.lst"], None),
    ],
)  # fmt: skip
def test_overlapping_inputs_are_analysed_once_and_one_row_each(
    local_ray, tmp_path, capsys, args, note
):
    """`curate DIR DIR/sub OUT` (a file named beside its folder, a folder given twice, a list
    naming a file twice) listed the inner files twice: each was analysed twice, and only a
    note after the analysis said so. Each INPUT is now listed once, before any work, and one
    note names the INPUTs another one covers."""
    import pyarrow.parquet as pq

    from pipelines.cli import main

    folder = _photos(tmp_path)
    lines = ("photos/sub/b.jpg", "./photos/sub/b.jpg", "photos/sub/c.jpg", f"{folder}/sub/b.jpg")
    (tmp_path / "again.lst").write_text("\n".join(lines))
    out = tmp_path / "out"
    inputs = [a.format(f=folder) for a in args]
    assert main(["curate", *inputs, "--output", str(out), *_SMALL]) == 0
    said = capsys.readouterr().out
    sources = sorted(r["source"] for r in pq.read_table(out / "manifest").to_pylist())
    want = [str(folder / n) for n in ("a.jpg", "sub/b.jpg", "sub/c.jpg")]
    assert sources == want
    notes = [x for x in said.splitlines() if "listed once" in x]
    assert notes == ([f"native4k: {note.format(f=folder)}"] if note else []), said
    assert f"native4k: analysed {len(want)} inputs in this run" in said
    assert "repeated a source" not in said


def test_a_list_naming_a_file_of_a_folder_input_gives_one_row_and_says_why(
    local_ray, tmp_path, capsys
):
    """A list naming a file that a folder INPUT lists too: still one row per file, and the
    line about repeated rows names that cause (it blamed an interrupted run or a second job
    on the output, which the user never had)."""
    import pyarrow.parquet as pq

    from pipelines.cli import main

    folder = _photos(tmp_path)
    lst = tmp_path / "again.lst"
    lst.write_text(f"{folder}/a.jpg\n{folder}/./a.jpg\n")
    out = tmp_path / "out"
    assert main(["curate", str(folder), str(folder / "sub"), str(lst), "--output", str(out),
                 *_SMALL]) == 0  # fmt: skip
    said = capsys.readouterr().out
    sources = sorted(r["source"] for r in pq.read_table(out / "manifest").to_pylist())
    assert sources == [str(folder / n) for n in ("a.jpg", "sub/b.jpg", "sub/c.jpg")]
    assert f"native4k: {folder}/sub is inside {folder}, listed once" in said
    line = next(x for x in said.splitlines() if "repeated a source" in x)
    assert "1 input was listed more than once: a URI list names files another INPUT" in line
    assert "interrupted" not in line


def test_an_output_that_cannot_be_a_folder_is_one_line_before_any_work(tmp_path, capsys):
    """OUT a file (or a path under one): a usage error (exit 2) in one line, before Ray
    starts, not a traceback after the listing."""
    from pipelines.cli import main
    from pipelines.samples import encode, render

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(render(512, 320, 1), "JPEG", quality=90))
    afile = tmp_path / "out.txt"
    afile.write_text("not a folder")
    for out in (afile, afile / "out"):
        assert main(["curate", str(folder), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"native4k: the output {out} ") and "not a folder" in err, err
    assert afile.read_text() == "not a folder"


def test_an_output_that_cannot_be_created_or_reached_is_one_line_before_any_work(
    s3_server, tmp_path, capsys, monkeypatch
):
    """A link to an unmounted storage, a system folder, or a bucket that is not there: a
    traceback from `os.makedirs`, or botocore's after Ray's start-up and the listing."""
    import pipelines.curate
    from pipelines.cli import main
    from pipelines.samples import encode, render

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the output is checked before any work")

    monkeypatch.setattr(pipelines.curate, "init_ray", no_ray)

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(render(512, 320, 1), "JPEG", quality=90))
    (tmp_path / "nas").symlink_to("/mnt/native4k-not-mounted")
    cases = {
        str(tmp_path / "nas"): "link to /mnt/native4k-not-mounted, which does not exist",
        str(tmp_path / "nas" / "out"): "link to /mnt/native4k-not-mounted, which does not",
        "/proc/native4k-out": "cannot be created",
        "s3://native4k-no-such-bucket/out": "no bucket 'native4k-no-such-bucket' there",
    }
    for out, words in cases.items():
        assert main(["curate", str(folder), "--output", out]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"native4k: the output {out} ") and words in err, err
    assert not os.path.lexists("/mnt/native4k-not-mounted")


def test_a_second_job_on_an_output_in_use_is_refused(tmp_path, capsys):
    """Two jobs on one OUT with different settings both exited 0 and left `_SUCCESS` over a
    manifest naming shards the other job had removed (verify failed). A job now holds a
    lock on a local OUT while it runs (the system drops it when the process ends, however):
    a second one stops at once, exit 2, naming the holder."""
    import fcntl

    from pipelines.cli import main
    from pipelines.samples import encode, render

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(render(512, 320, 1), "JPEG", quality=90))
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    with open(out / "_work" / "lock", "a+") as held:  # another job's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere")
        held.flush()
        assert main(["curate", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"native4k: another curate job is writing {out} (pid 4242 on elsewhere)")
    assert len(err.strip().splitlines()) == 1, err


def test_an_output_on_a_filesystem_without_locks_runs_unlocked(tmp_path, monkeypatch, caplog):
    """Some network mounts refuse `flock` (ENOLCK, EOPNOTSUPP): the job runs without the lock
    and says so, instead of failing on the lock that guards it."""
    import errno
    import fcntl

    from pipelines.curate import _lock_output

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with caplog.at_level("WARNING", logger="native4k"):
        assert _lock_output(str(tmp_path / "out")) is None
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_tar_leaves_its_ray_task_in_several_blocks(local_ray, tmp_path):
    """`TarReader.blocks` is a generator; mapped through Ray Data as the job maps it, its
    blocks (10 KB samples, 50 KB blocks: the reader's and Ray's target) leave one task as
    several blocks holding every sample once, with its caption."""
    import io

    import ray.data as rd

    from curation import schema
    from curation.io.readers import TarReader

    tar = tmp_path / "big.tar"
    with tarfile.open(tar, "w") as tf:
        for i in range(40):
            for name, data in ((f"{i:02d}.jpg", bytes([i]) * 10_000), (f"{i:02d}.txt", b"c")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    reader = TarReader(max_block_bytes=50_000)
    ctx = rd.DataContext.get_current()
    target = ctx.target_max_block_size
    ctx.target_max_block_size = 50_000
    try:
        ds = rd.from_items([{schema.SOURCE: str(tar)}]).map_batches(
            reader.blocks, batch_format="pyarrow", zero_copy_batch=True, **reader.ray_options()
        )
        done = ds.materialize()
        rows = done.take_all()
    finally:
        ctx.target_max_block_size = target
    assert done.num_blocks() >= 6
    assert sorted(r[schema.SOURCE].rsplit("#", 1)[1] for r in rows) == [
        f"{i:02d}.jpg" for i in range(40)
    ]
    assert all(r[schema.CAPTION_EN] == "c" for r in rows)


def test_model_gpus_a_local_ray_lacks_are_refused_not_waited_for(local_ray, tmp_path, capsys):
    """`score.num_gpus=1` on a machine without a GPU: the job printed its analysis, then its
    scoring actor waited for a GPU forever, saying nothing."""
    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.curate import gpu_shortfall
    from pipelines.samples import encode, render

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(render(512, 320, 1), "JPEG", quality=90))
    for key in ("score.num_gpus", "caption.num_gpus"):
        cfg = load_config(overrides=[f"{key}=1", "models.caption_model=/nowhere"])
        assert gpu_shortfall(cfg, 0.0).startswith(f"{key}=1 asks for GPUs the cluster lacks")
        assert gpu_shortfall(cfg, 1.0) == ""
    off = load_config(overrides=["score.num_gpus=2", "score.enabled=false"])
    assert gpu_shortfall(off, 0.0) == ""  # no stage that runs asks
    out = tmp_path / "out"
    assert main(["curate", str(folder), "--output", str(out), *_SMALL,
                 "--set", "score.enabled=true", "--set", "score.num_gpus=1"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "score.num_gpus=1 asks for GPUs the cluster lacks (0 in all)" in err


def test_the_same_input_typed_another_way_keeps_the_analysis(
    local_ray, tmp_path, capsys, monkeypatch
):
    """`in` then `in/` (or a relative path, or the INPUTs in another order) counted as
    changed inputs: the rerun deleted all of `_work`, cached model scores and captions too."""
    from pipelines.cli import main
    from pipelines.samples import encode, render

    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.jpg").write_bytes(
            encode(render(512, 320, ord(name)), "JPEG", quality=90)
        )
    out = tmp_path / "out"
    typed = [[str(tmp_path / "a"), str(tmp_path / "b")], ["a/", "./b"], ["b", str(tmp_path / "a/")]]
    for i, inputs in enumerate(typed):
        assert main(["curate", *inputs, "--output", str(out), *_SMALL]) == 0
        said = capsys.readouterr().out
        assert "analysing afresh" not in said
        assert f"{0 if i == 0 else 2} rows already analysed by an earlier run" in said, said
    assert main(["curate", "a", "--output", str(out), *_SMALL]) == 0  # another job
    assert "inputs or configuration changed" in capsys.readouterr().out


def test_an_s3_input_without_credentials_is_a_usage_error_not_a_failed_pass(tmp_path):
    """botocore's NoCredentialsError is no OSError: the listing pass 'failed' with a log of
    its traceback and the advice to rerun, which cannot help."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), RAY_AUTH_MODE="disabled")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "curate", "s3://native4k-nocreds/in",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert err.splitlines()[-1] == "native4k: NoCredentialsError: Unable to locate credentials"
    assert "rerun" not in err and "Traceback" not in err
