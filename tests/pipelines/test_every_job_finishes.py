"""Any set of inputs finishes: property-based tests through the real `native4k curate`.

Input sets of 0-12 files mixing kinds (keepable natives, too small, flat, upscaled, corrupt,
non-image, exact and near duplicates, caption files without an image) run through the real CLI
on the shared local Ray instance, with shuffle partitions from one per row (most partitions
empty) to one per job. Every run must exit 0 (or give the documented error when nothing is an
input), write one manifest row per input with the reason its kind implies, shard exactly the
kept rows, and pass `native4k verify`.

`HYPOTHESIS_PROFILE=thorough` runs many more examples (for local runs; CI uses the default).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.cli import main
from pipelines.samples import _flat, encode, render

pytestmark = [pytest.mark.ray, pytest.mark.slow]

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
EXAMPLES = 60 if THOROUGH else 4
# The drawn jobs run without the model pass (its stages have their own end-to-end tests in
# test_model_stages.py); the real-photograph and failure tests below run the defaults.
NO_MODELS = ("--set", "score.enabled=false")

# kind -> (file extension, expected reason or None for kept, duplicate family)
KINDS: dict[str, tuple[str, str | None, str | None]] = {
    "native_a": ("jpg", None, "a"),
    "near_a": ("jpg", None, "a"),  # native_a re-encoded at q85: a near duplicate of it
    "native_b": ("jpg", None, "b"),
    "native_c": ("jpg", None, "c"),  # portrait: another bucket
    "small": ("jpg", "too_small", None),
    "flat": ("png", "flat", None),
    "upscaled": ("jpg", "upscaled", None),
    "corrupt": ("jpg", "decode_error", None),
    "text": ("png", "unsupported_format", None),
    # A caption file with no image beside it is an input of its own: it gets a row.
    "sidecar": ("txt", "unsupported_format", None),
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one file of each kind (rendered once per module)."""
    a = render(3840, 2160, 11)
    src = Image.fromarray(render(3072, 1728, 15))
    up = np.asarray(src.resize((3840, 2160), Image.Resampling.BICUBIC))
    native_a = encode(a, "JPEG", quality=95)
    return {
        "native_a": native_a,
        "near_a": encode(a, "JPEG", quality=85),
        "native_b": encode(render(3840, 2160, 12), "JPEG", quality=95),
        "native_c": encode(render(2160, 3840, 13), "JPEG", quality=95),
        "small": encode(render(2560, 1440, 14), "JPEG", quality=95),
        "flat": encode(_flat(3840, 2160, 16), "PNG"),
        "upscaled": encode(up, "JPEG", quality=95),
        "corrupt": native_a[: len(native_a) // 2],
        "text": b"not an image at all\n" * 10,
        "sidecar": b"a caption without its image\n",
    }


def expected_outcomes(names: list[tuple[str, str]]) -> dict[str, tuple[str, str | None]]:
    """{file name: (status, reason)} for the inputs; duplicate families keep one copy.

    The copy kept is the best-ranked: a q95 original over its q85 re-encode, then the smaller
    URI among byte-identical copies (the job's documented rank).
    """
    out: dict[str, tuple[str, str | None]] = {}
    families: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for name, kind in names:
        _, reason, family = KINDS[kind]
        if family:
            families[family].append((0 if kind.startswith("native") else 1, name, kind))
        else:
            out[name] = ("rejected", reason)
    for members in families.values():
        best = min(members)
        for m in members:
            out[m[1]] = ("kept", None) if m == best else ("rejected", "duplicate")
    return out


def run_job(inputs: list[Path], out: Path, *extra: str) -> tuple[int, str, str]:
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = main(["curate", *map(str, inputs), "--output", str(out), *extra])
    return rc, so.getvalue(), se.getvalue()


def check_output(out: Path, expected: dict[str, tuple[str, str | None]], stdout: str) -> None:
    """The manifest, shards, stats and verify agree with the expected outcomes."""
    assert (out / "_SUCCESS").exists() and (out / "stats.json").exists()
    rows = pq.read_table(out / "manifest").to_pylist()
    by_name = {Path(r["source"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(expected)  # one row per input, none invented
    got = {n: (r["status"], r["reason"]) for n, r in by_name.items()}
    assert got == expected
    kept = {r["key"]: r for r in rows if r["status"] == "kept"}
    for r in rows:
        if r["reason"] == "duplicate":
            assert r["duplicate_of"] in kept, r
    members: dict[str, set[str]] = defaultdict(set)
    for shard in (out / "shards").rglob("*.tar") if (out / "shards").exists() else []:
        with tarfile.open(shard) as tf:
            for m in tf.getnames():
                key, ext = m.split(".", 1)
                members[key].add(ext)
                assert kept[key]["shard"] == str(shard.relative_to(out))
    assert set(members) == set(kept)
    for key, exts in members.items():
        assert exts == {"json", kept[key]["extension"]}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"] == len(expected) and stats["kept"] == len(kept)
    if not kept:
        assert "nothing kept" in stdout
        assert "shards:   none (nothing kept)" in stdout  # no path to a folder never written
    else:
        assert f"shards:   {out}/shards/" in stdout
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["verify", str(out)]) == 0
        assert main(["stats", str(out)]) == 0


kinds = st.lists(st.sampled_from(sorted(KINDS)), min_size=0, max_size=12)
partitioning = st.sampled_from([1, 2, 50_000])  # rows per shuffle partition


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not THOROUGH,  # CI runs the same examples every time
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=kinds, rows_per_partition=partitioning)
@example(drawn=[], rows_per_partition=50_000)  # no input at all
@example(drawn=["sidecar"], rows_per_partition=50_000)  # a lone caption file
@example(drawn=["native_a"], rows_per_partition=50_000)  # 1 input, kept
@example(drawn=["flat"], rows_per_partition=50_000)  # 1 input, 0 kept
@example(drawn=["text"], rows_per_partition=1)  # 1 non-image
@example(drawn=["corrupt"] * 3, rows_per_partition=1)  # every input rejected, same reason
@example(drawn=["native_a"] * 4, rows_per_partition=1)  # every input a copy of one image
@example(drawn=["native_a", "near_a", "native_a"], rows_per_partition=2)  # exact + near copies
@example(drawn=["native_a", "native_b"], rows_per_partition=1)  # 2 inputs, both kept
@example(drawn=["native_a", "native_b", "native_c"], rows_per_partition=1)  # every input kept
@example(drawn=["small", "native_b", "upscaled", "flat"], rows_per_partition=1)  # one survivor
def test_any_input_set_finishes(pool, local_ray, tmp_path_factory, drawn, rows_per_partition):
    folder = tmp_path_factory.mktemp("inputs")
    names = []
    for i, kind in enumerate(drawn):
        name = f"f{i:02d}_{kind}.{KINDS[kind][0]}"
        (folder / name).write_bytes(pool[kind])
        names.append((name, kind))
    out = tmp_path_factory.mktemp("out") / "curated"
    rc, stdout, stderr = run_job(
        [folder], out, "--set", f"ray.rows_per_partition={rows_per_partition}", *NO_MODELS
    )
    expected = expected_outcomes(names)
    if not expected:
        assert rc == 2 and "no input files found" in stderr
        assert not (out / "_SUCCESS").exists()
        return
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    check_output(out, expected, stdout)


def test_a_single_file_given_as_a_path(pool, local_ray, tmp_path):
    photo = tmp_path / "one.jpg"
    photo.write_bytes(pool["native_b"])
    rc, stdout, stderr = run_job([photo], tmp_path / "out", *NO_MODELS)
    assert rc == 0, stderr
    check_output(tmp_path / "out", {"one.jpg": ("kept", None)}, stdout)


def test_one_real_photograph(local_ray, tmp_path):
    """A new user's first job: one real 4K camera photograph that the flatness rule rejects."""
    photo = Path("/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg")
    if not photo.exists():
        pytest.skip("lomiri-wallpapers is not installed (.ci/run installs it)")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / photo.name).write_bytes(photo.read_bytes())
    rc, stdout, stderr = run_job([folder], tmp_path / "out")
    assert rc == 0, stderr
    check_output(tmp_path / "out", {photo.name: ("rejected", "flat")}, stdout)
    assert "'flat' rejected 1 of 1 input (" in stdout
    assert "flat_fraction > 0.5" in stdout and "--set analyze.max_flat_fraction=" in stdout


def test_one_kept_photograph_through_the_console_script(tmp_path):
    """The `native4k` script as a user runs it, with its own Ray: the photograph is kept and
    scored, the summary is complete on stdout although the process ends without the
    interpreter's teardown, and nothing of its session outlives it."""
    photo = Path("/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg")
    if not photo.exists():
        pytest.skip("lomiri-wallpapers is not installed (.ci/run installs it)")
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / photo.name).write_bytes(photo.read_bytes())
    cli = Path(sys.executable).with_name("native4k")
    args = [str(cli), "curate", str(folder), "--output", str(out)]
    proc = subprocess.Popen(
        [*args, "--set", "analyze.max_flat_fraction=1.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.rstrip().splitlines()[-1].startswith("stats:    ")
    assert "1 input: 1 kept, 0 rejected" in stdout
    (row,) = pq.read_table(out / "manifest").to_pylist()
    assert row["status"] == "kept" and 0 <= row["quality"] <= 100  # piqe, on the early actor
    assert (out / "_SUCCESS").exists() and main(["verify", str(out)]) == 0
    deadline = time.time() + 10  # Ray's processes fate-share with the driver
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _session_alive(proc.pid)


def _session_alive(sid: int) -> bool:
    """Whether a live process of the session `sid` remains (zombies aside)."""
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def test_a_failed_pass_prints_one_line_and_a_rerun_resumes(pool, local_ray, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for kind in ("native_a", "flat", "corrupt"):
        (folder / f"{kind}.{KINDS[kind][0]}").write_bytes(pool[kind])
    out = tmp_path / "out"
    monkeypatch.setenv("NATIVE4K_FAULT", "shards")
    rc, _, stderr = run_job([folder], out)
    assert rc == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "the shards pass failed on 3 inputs" in lines[0]
    log = Path(lines[0].split("full traceback in ")[1].split(";")[0])
    assert log.is_file() and "Traceback" in log.read_text()
    assert not (out / "_SUCCESS").exists()
    monkeypatch.delenv("NATIVE4K_FAULT")
    rc, stdout, stderr = run_job([folder], out)
    assert rc == 0, stderr
    assert "analysed 0 inputs in this run" in stdout  # the rerun resumed
    check_output(
        out,
        {
            "native_a.jpg": ("kept", None),
            "flat.png": ("rejected", "flat"),
            "corrupt.jpg": ("rejected", "decode_error"),
        },
        stdout,
    )


def test_an_empty_tar_alone_gets_its_row(local_ray, tmp_path):
    shard = tmp_path / "empty.tar"
    with tarfile.open(shard, "w"):
        pass
    rc, _, stderr = run_job([shard], tmp_path / "out", *NO_MODELS)
    assert rc == 0, stderr
    rows = pq.read_table(tmp_path / "out" / "manifest").to_pylist()
    assert [(r["source"], r["reason"]) for r in rows] == [(str(shard), "unsupported_format")]


def test_a_rerun_after_an_input_was_deleted_drops_its_row(pool, local_ray, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for kind in ("native_a", "corrupt"):
        (folder / f"{kind}.jpg").write_bytes(pool[kind])
    out = tmp_path / "out"
    assert run_job([folder], out, *NO_MODELS)[0] == 0
    (folder / "corrupt.jpg").unlink()
    rc, stdout, stderr = run_job([folder], out, *NO_MODELS)
    assert rc == 0, stderr
    check_output(out, {"native_a.jpg": ("kept", None)}, stdout)


@pytest.mark.parametrize("step", ["analysis", "dedup", "shards"])
def test_a_pass_that_loses_a_ray_worker_runs_again(pool, local_ray, tmp_path, monkeypatch, step):
    """A Ray system error (a lost node, worker or object) reruns passes 1-4, resuming."""
    folder = tmp_path / "in"
    folder.mkdir()
    for kind in ("native_a", "flat", "corrupt"):
        (folder / f"{kind}.{KINDS[kind][0]}").write_bytes(pool[kind])
    monkeypatch.setenv("NATIVE4K_FAULT", f"{step}:lost")
    rc, stdout, stderr = run_job([folder], tmp_path / "out", *NO_MODELS)
    assert rc == 0, stderr
    assert f"the {step} pass lost a Ray node, worker or object (WorkerCrashedError)" in stdout
    check_output(
        tmp_path / "out",
        {
            "native_a.jpg": ("kept", None),
            "flat.png": ("rejected", "flat"),
            "corrupt.jpg": ("rejected", "decode_error"),
        },
        stdout,
    )


def test_only_cluster_losses_count_as_cluster_losses():
    import ray

    from pipelines.curate import lost_to_the_cluster

    assert lost_to_the_cluster(ray.exceptions.WorkerCrashedError())
    text = "ray.exceptions.ActorDiedError: The actor died because its node has died."
    assert lost_to_the_cluster(ray.exceptions.UnserializableException(text))
    try:
        try:
            raise ray.exceptions.NodeDiedError("node 1")
        except Exception as e:
            raise RuntimeError("reading the analysis failed") from e
    except RuntimeError as chained:
        assert lost_to_the_cluster(chained)
    assert not lost_to_the_cluster(ValueError("a bad threshold"))
    assert not lost_to_the_cluster(None)


def test_a_retune_analyses_again_the_files_and_tar_members_that_stopped_early(
    pool, local_ray, tmp_path
):
    """Analyses stop at the first rule an image fails; a rerun whose thresholds let it pass
    analyses it again, files and tar members alike, and its output equals a fresh job's."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "flat.png").write_bytes(pool["flat"])
    (folder / "native_a.jpg").write_bytes(pool["native_a"])
    with tarfile.open(folder / "pack.tar", "w") as tf:
        members = (("m_flat.png", "flat"), ("m_up.jpg", "upscaled"), ("m_b.jpg", "native_b"))
        for name, kind in members:
            info = tarfile.TarInfo(name)
            info.size = len(pool[kind])
            tf.addfile(info, io.BytesIO(pool[kind]))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    rc, stdout, stderr = run_job([folder], out, *NO_MODELS)
    assert rc == 0, stderr
    first = {Path(r["source"]).name: r for r in pq.read_table(out / "manifest").to_pylist()}
    assert "pack.tar#m_flat.png" in first and first["pack.tar#m_flat.png"]["reason"] == "flat"
    stopped = {n for n, r in first.items() if r["reason"] in ("flat", "upscaled")}
    assert stopped == {"flat.png", "pack.tar#m_flat.png", "pack.tar#m_up.jpg"}
    for n in stopped:  # analysed no further than the rule they failed
        assert first[n]["sharpness"] is not None and first[n]["phash"] is None, n
    relaxed = ("--set", "analyze.max_flat_fraction=1.0", "--set", "analyze.min_native_score=0")
    rc, stdout, stderr = run_job([folder], out, *NO_MODELS, *relaxed)
    assert rc == 0, stderr
    assert "analysed 3 inputs in this run" in stdout
    rc, stdout, stderr = run_job([folder], out, *NO_MODELS, *relaxed)
    assert rc == 0 and "analysed 0 inputs in this run" in stdout, stderr
    rc, _, stderr = run_job([folder], fresh, *NO_MODELS, *relaxed)
    assert rc == 0, stderr
    fields = ("status", "reason", "key", "sharpness", "flat_fraction", "entropy", "native_score",
              "phash")  # fmt: skip
    got = {Path(r["source"]).name: r for r in pq.read_table(out / "manifest").to_pylist()}
    want = {Path(r["source"]).name: r for r in pq.read_table(fresh / "manifest").to_pylist()}
    assert set(got) == set(want) == set(first)  # one row per input: the stale ones are gone
    for n, r in want.items():
        assert {f: got[n][f] for f in fields} == {f: r[f] for f in fields}, n
    assert main(["verify", str(out)]) == 0


def test_the_summary_counts_one_input_in_the_singular() -> None:
    """A one-photo job, the first a new user runs, said "all 1 inputs were rejected"."""
    from pipelines.curate import outcome_lines

    rules = {"flat": {"rule": "flat share > 0.5", "setting": "analyze.max_flat_fraction"}}
    one = outcome_lines({"total": 1, "kept": 0, "reasons": {"flat": 1}, "rules": rules})
    assert one[0] == "nothing kept: the one input was rejected (no shards were written)"
    assert one[1].startswith("'flat' rejected 1 of 1 input (100%)")
    two = outcome_lines({"total": 2, "kept": 0, "reasons": {"flat": 2}, "rules": rules})
    assert two[0] == "nothing kept: all 2 inputs were rejected (no shards were written)"
    assert two[1].startswith("'flat' rejected 2 of 2 inputs (100%)")


def test_the_summary_names_the_bound_that_rejected(local_ray, tmp_path):
    """A job of panoramas wider than 3:1 ended "'aspect_ratio' rejected ...; change it with
    --set probe.min_aspect", and files over the byte cap were "pixels > 120,000,000; change it
    with --set probe.max_pixels": settings that move none of them."""
    folder = tmp_path / "in"
    folder.mkdir()
    ramp = np.tile(np.linspace(0, 255, 1600, dtype=np.uint8), (400, 1))
    for i in range(3):  # 4:1, a few kB each
        (folder / f"pano{i}.jpg").write_bytes(encode(np.stack([ramp + i] * 3, -1), "JPEG"))
    (folder / "tall.jpg").write_bytes(encode(np.ascontiguousarray(ramp.T), "JPEG"))
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    for i in range(2):  # over the byte cap: not read, no size
        (folder / f"big{i}.png").write_bytes(encode(noise ^ i, "PNG"))
    small = ["--set", "probe.min_pixels=65536", "--set", "probe.max_file_bytes=40000",
             "--set", "bucket.tier_scales=[1.0,0.5,0.25,0.125,0.0625,0.05]"]  # fmt: skip
    rc, stdout, stderr = run_job([folder], tmp_path / "out", *NO_MODELS, *small)
    assert rc == 0, stderr
    assert "'aspect_ratio' rejected 4 of 6 inputs (67%)" in stdout
    assert "change it with --set probe.max_aspect=VALUE" in stdout
    rules = json.loads((tmp_path / "out" / "stats.json").read_text())["rules"]
    assert rules["aspect_ratio"]["setting"] == "probe.max_aspect / probe.min_aspect"
    assert rules["too_large"]["setting"] == "probe.max_file_bytes / probe.max_pixels"
    assert rules["too_large"]["rule"] == "pixels > 120,000,000 or file bytes > 40,000"


def test_inputs_that_name_a_file_twice_give_one_row_and_say_why(local_ray, tmp_path):
    """`curate in in/a.jpg`: one row per source, but the note blamed only an interrupted run's
    late worker or two runs sharing the output, neither of which had happened. The file is
    now listed once, and a note says so before the analysis."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"s{i}.jpg").write_bytes(encode(render(512, 320, i), "JPEG"))
    rc, stdout, stderr = run_job([folder, folder / "s0.jpg"], tmp_path / "out", *NO_MODELS)
    assert rc == 0, stderr
    assert len(pq.read_table(tmp_path / "out" / "manifest")) == 2
    assert f"native4k: {folder / 's0.jpg'} is inside {folder}, listed once" in stdout
    assert "analysed 2 inputs in this run" in stdout and "repeated a source" not in stdout
