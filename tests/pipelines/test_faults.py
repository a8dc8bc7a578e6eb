"""Faults mid-job: the driver SIGKILLed at every pass, Ray workers SIGKILLed while they run
tasks, the S3 server stopped for seconds; each job completes, loses and duplicates nothing,
and equals an uninterrupted run. No partial or temporary file is ever visible in the output
outside `_work/`, and no credential reaches a log, a process list, or an output file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from pipelines.cli import main
from pipelines.samples import encode, render
from pipelines.verify import verify

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CLI = str(Path(sys.executable).with_name("native4k"))
SMALL = ["--set", "probe.min_pixels=65536", "--set",
         "bucket.tier_scales=[1.0,0.5,0.25,0.125,0.0625,0.05]"]
PASSES = ("listing", "start-up", "analysis", "dedup", "shards", "manifest")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A small job with every kind of row: kept in two buckets, exact and near duplicates,
    broken and non-image files, a caption, and a tar."""
    folder = tmp_path_factory.mktemp("fault-inputs")
    for seed in range(6):
        w, h = (512, 320) if seed % 2 else (320, 512)
        (folder / f"photo{seed}.jpg").write_bytes(encode(render(w, h, seed), "JPEG", quality=93))
    (folder / "photo0.txt").write_text("a caption")
    (folder / "copy_of_photo1.jpg").write_bytes((folder / "photo1.jpg").read_bytes())
    (folder / "photo2_q80.jpg").write_bytes(encode(render(320, 512, 2), "JPEG", quality=80))
    (folder / "big.png").write_bytes(encode(render(1536, 1024, 40), "PNG"))
    (folder / "broken.jpg").write_bytes((folder / "photo3.jpg").read_bytes()[:3000])
    (folder / "notes.png").write_bytes(b"not an image\n" * 50)
    with tarfile.open(folder / "pack.tar", "w") as tf:
        for seed in (20, 21):
            data = encode(render(512, 320, seed), "JPEG", quality=93)
            info = tarfile.TarInfo(f"sample{seed}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return folder


def _quiet_main(*argv: str) -> tuple[int, str]:
    so = io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(io.StringIO()):
        rc = main(list(argv))
    return rc, so.getvalue()


@pytest.fixture(scope="module")
def reference(inputs, local_ray, tmp_path_factory) -> Path:
    """The same job, uninterrupted."""
    out = tmp_path_factory.mktemp("fault-reference") / "out"
    rc, _ = _quiet_main("curate", str(inputs), "--output", str(out), *SMALL)
    assert rc == 0
    return out


class OutputWatcher:
    """Polls an output folder while jobs run and records every temporary or hidden file
    that was visible outside `_work/` (a reader must only ever see whole files)."""

    def __init__(self, out: Path) -> None:
        self.out, self.seen_bad, self.polls = out, set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for root, dirs, files in os.walk(self.out):
                if Path(root) == self.out and "_work" in dirs:
                    dirs.remove("_work")
                for f in files:
                    if ".tmp" in f or f.startswith("."):
                        self.seen_bad.add(os.path.join(root, f))
            self.polls += 1
            self._stop.wait(0.005)

    def __enter__(self) -> OutputWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> tuple[int, str, str]:
    """`native4k ARGS` in its own process group; every process left in it is killed after.

    It starts with Ctrl-C's default action, as from a terminal, even where this test runs with
    SIGINT ignored (a background job of a non-interactive shell): exec keeps an ignored signal
    ignored, so a small launcher resets it first.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _DEFAULT_SIGINT, CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
        proc.wait()
    return proc.returncode, stdout, stderr


def kill_session(sid: int) -> None:
    """Kill every process of the session `sid` (a driver started with `start_new_session`):
    the Ray processes a killed driver left behind. Ray's workers move to process groups of
    their own, so killing the driver's group alone leaves them running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == sid:
                p.kill()


def test_driver_killed_at_every_pass_then_rerun(inputs, reference, tmp_path, job_outcome):
    out = tmp_path / "out"
    with OutputWatcher(out) as watcher:
        for step in PASSES:
            rc, stdout, stderr = run_cli(
                "curate", str(inputs), "--output", str(out), *SMALL,
                env={"NATIVE4K_FAULT": f"{step}:kill"},
            )
            assert rc == -signal.SIGKILL, (step, stderr[-2000:])
            assert not (out / "_SUCCESS").exists()
            if step == "dedup":
                assert "analysed 13 inputs in this run" in stdout
            if step in ("shards", "manifest"):  # finished analysis is never redone
                assert "analysed 0 inputs in this run" in stdout, stdout
        assert list((out / "shards").rglob("*.tar"))  # the killed manifest pass left shards
        rc, stdout = _quiet_main("curate", str(inputs), "--output", str(out), *SMALL)
    assert rc == 0
    assert "analysed 0 inputs in this run" in stdout
    assert job_outcome(out) == job_outcome(reference)  # rows, keys, reasons, shard bytes
    assert verify(str(out)) == []
    assert watcher.polls > 10 and not watcher.seen_bad, sorted(watcher.seen_bad)
    assert not [p for p in out.rglob("*") if "_work" not in p.parts and ".tmp" in p.name]


@pytest.mark.parametrize("step", ["analysis", "shards"])
def test_ctrl_c_is_one_line_and_a_rerun_resumes(inputs, reference, tmp_path, job_outcome, step):
    """Ctrl-C in any pass: exit 130 and one line saying how to resume, no traceback."""
    out = tmp_path / "out"
    rc, _, stderr = run_cli(
        "curate", str(inputs), "--output", str(out), *SMALL,
        env={"NATIVE4K_FAULT": f"{step}:interrupt"},
    )  # fmt: skip
    assert rc == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.rstrip().splitlines()[-1] == (
        "native4k: interrupted; rerun the same command to resume"
    )
    rc, stdout = _quiet_main("curate", str(inputs), "--output", str(out), *SMALL)
    assert rc == 0
    if step == "shards":  # the finished analysis is kept
        assert "analysed 0 inputs in this run" in stdout
    assert job_outcome(out) == job_outcome(reference)


@pytest.mark.parametrize("step", ["start", "analysis"])
def test_sigterm_is_one_line_and_a_rerun_resumes(inputs, reference, tmp_path, job_outcome, step):
    """SIGTERM (a scheduler's stop) during Ray's start-up exited 15 after about 30 s without a
    word; later, Ray's core aborted with a stack dump (SIGABRT). Now it stops as Ctrl-C does:
    exit 143, one line saying how to resume."""
    out = tmp_path / "out"
    if step == "start":  # inside `ray.init`, where Ray's own handler answers
        proc = subprocess.Popen(
            [CLI, "curate", str(inputs), "--output", str(out), *SMALL],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not _ray_started_by(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=300)
        finally:
            kill_session(proc.pid)
            proc.wait()
        rc = proc.returncode
    else:
        rc, _, stderr = run_cli("curate", str(inputs), "--output", str(out), *SMALL,
                                env={"NATIVE4K_FAULT": f"{step}:term"})  # fmt: skip
    assert rc == 143, (rc, stderr[-2000:])
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-2000:]
    assert stderr.rstrip().splitlines()[-1] == (
        "native4k: stopped (SIGTERM); rerun the same command to resume"
    )
    rc, _ = _quiet_main("curate", str(inputs), "--output", str(out), *SMALL)
    assert rc == 0
    assert job_outcome(out) == job_outcome(reference)


def _ray_started_by(pid: int) -> bool:
    """Whether the driver `pid` has begun starting Ray (a child process of Ray's is up)."""
    with contextlib.suppress(psutil.Error):
        return any("ray" in " ".join(c.cmdline()) for c in psutil.Process(pid).children())
    return False


def _task_workers(root: psutil.Process) -> list[psutil.Process]:
    """This process's Ray workers that are running one of the job's pass-1 tasks."""
    found = []
    for p in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(p.cmdline())
            if title.startswith("ray::") and "MapBatches(FileReader)" in title:
                found.append(p)
    return found


def failed_workers(ray) -> int:
    """Ray workers of this session that died of a system error so far, as the GCS logs
    them."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(
        p.read_text(errors="replace").count("exit_type = SYSTEM_ERROR")
        for p in logs.glob("gcs_server*.out")
    )


def _curate_killing(
    inputs: Path, out: Path, victims: Callable[[psutil.Process], list[psutil.Process]], most: int
) -> tuple[int, str, list[int]]:
    """Run the job while a thread SIGKILLs up to `most` processes that `victims` picks among
    this process's descendants; returns the exit code, the output and the killed pids."""
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        me = psutil.Process()
        while not stop.is_set() and len(killed) < most:
            for p in victims(me):
                if p.pid not in killed:
                    with contextlib.suppress(psutil.Error):
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
                    break
            stop.wait(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        rc, stdout = _quiet_main("curate", str(inputs), "--output", str(out), *SMALL)
    finally:
        stop.set()
        thread.join()
    return rc, stdout, killed


def test_ray_workers_killed_mid_job(inputs, reference, local_ray, tmp_path, job_outcome):
    """SIGKILL Ray workers while they run pass-1 tasks: Ray retries the tasks (Ray Data's
    map tasks retry system failures without limit) and each rewrites its own part file."""
    out = tmp_path / "out"
    crashes = failed_workers(local_ray)
    rc, stdout, killed = _curate_killing(inputs, out, _task_workers, most=2)
    assert rc == 0
    assert killed, "no pass-1 task was caught running"
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in killed)
    assert "analysed 13 inputs in this run" in stdout  # each input once: none lost or doubled
    deadline = time.time() + 30
    while failed_workers(local_ray) < crashes + 1 and time.time() < deadline:
        time.sleep(0.5)  # the GCS logs a worker's death asynchronously
    assert failed_workers(local_ray) >= crashes + 1
    assert job_outcome(out) == job_outcome(reference)
    assert verify(str(out)) == []


def _early_actor(root: psutil.Process) -> list[psutil.Process]:
    """This process's Ray worker holding a small job's early actor (`WarmWorker`)."""
    found = []
    for p in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(p.cmdline()).startswith("ray::WarmActor"):
                found.append(p)
    return found


def test_small_jobs_early_actor_killed(inputs, reference, local_ray, tmp_path, job_outcome):
    """SIGKILL a small job's early actor (`WarmWorker`: scorers and shard writer) while it
    loads: the pass that needs it fails as lost to the cluster, the job resumes from the
    stored analysis on Ray Data's own pools, and the output equals an uninterrupted run's."""
    out = tmp_path / "out"
    rc, stdout, killed = _curate_killing(inputs, out, _early_actor, most=1)
    assert killed, "the early actor was never seen"
    assert rc == 0
    assert "lost a Ray node, worker or object" in stdout and "attempt 2 of" in stdout
    assert job_outcome(out) == job_outcome(reference)
    assert verify(str(out)) == []


FAKE_KEY_ID = "AKIANATIVE4KFAKEKEY7"
FAKE_SECRET = "n4kFAKE/secret+Never-Print-Me-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portable(rows: dict) -> dict:
    """Manifest rows keyed by file name (local and S3 sources differ only in their prefix)."""
    return {src.rsplit("/", 1)[-1]: v for src, v in rows.items()}


def test_s3_outage_mid_job_and_no_credential_leaks(
    inputs, reference, tmp_path, job_outcome
):
    """S3 stops answering for 8 s while the job runs: requests back off and retry, the job
    completes, nothing half-written appears; a recognisable fake secret appears nowhere: not
    in the job's output or logs, Ray's logs, process command lines, the manifest, config.yaml,
    stats.json or report.html."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ray_tmp = tempfile.mkdtemp(prefix="n4k-", dir="/tmp")  # short: Ray's socket paths
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-west-2",
        aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET,
    )
    try:
        for bucket in ("outage-raw", "outage-curated"):
            client.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
            )
        for f in inputs.iterdir():
            client.upload_file(str(f), "outage-raw", f"in/{f.name}")
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-west-2",
            "RAY_TMPDIR": ray_tmp,
            "PYTHONUNBUFFERED": "1",
        }
        proc = subprocess.Popen(
            [CLI, "curate", "s3://outage-raw/in", "--output", "s3://outage-curated/run", *SMALL],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **env}, start_new_session=True,
        )
        cmdlines: set[str] = set()
        outage = threading.Event()

        def watch() -> None:
            """Record command lines; stop S3 for 8 s once pass 1 has written a part."""
            nonlocal server
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    for p in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            cmdlines.add(" ".join(p.cmdline()))
                if not outage.is_set():
                    with contextlib.suppress(Exception):
                        listed = client.list_objects_v2(
                            Bucket="outage-curated", Prefix="run/_work/analysis/"
                        )
                        if listed.get("KeyCount"):
                            server.stop()
                            outage.set()
                            time.sleep(8)
                            server = ThreadedMotoServer(
                                ip_address="127.0.0.1", port=port, verbose=False
                            )
                            server.start()
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            kill_session(proc.pid)
            watcher.join()
        assert outage.is_set(), "the job ended before the outage could start"
        assert proc.returncode == 0, stderr[-3000:]
        rc, rout, rerr = run_cli("report", "s3://outage-curated/run", env=env)
        assert rc == 0, rerr[-2000:]

        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket="outage-curated", Prefix="run/"
            )
            for o in page.get("Contents", [])
        ]
        visible = [k for k in keys if not k.startswith("run/_work/")]
        assert not [k for k in visible if ".tmp" in k or "/." in k], visible
        assert not client.list_multipart_uploads(Bucket="outage-curated").get("Uploads")
        local = tmp_path / "run"  # the whole output, fetched to compare and to search
        for k in keys:
            dest = local / k.removeprefix("run/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("outage-curated", k, str(dest))
        assert {"_SUCCESS", "stats.json", "config.yaml", "report.html"} <= {
            k.removeprefix("run/") for k in visible
        }
        rows, shards = job_outcome(local)
        ref_rows, ref_shards = job_outcome(reference)
        assert _portable(rows) == _portable(ref_rows)
        assert set(shards) == set(ref_shards)  # the same shards with the same members
        haystacks = {"stdout": stdout, "stderr": stderr, "report stdout": rout + rerr}
        haystacks["command lines"] = "\n".join(cmdlines)
        for root in (local, Path(ray_tmp)):
            for f in root.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    with contextlib.suppress(OSError):
                        haystacks[str(f)] = f.read_bytes().decode("latin-1")
        assert any("/logs/" in k for k in haystacks)  # Ray's logs were searched
        for secret in (FAKE_SECRET, FAKE_KEY_ID):
            leaks = [name for name, text in haystacks.items() if secret in text]
            assert not leaks, (secret, leaks)
    finally:
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_failed_pass_is_one_plain_line_even_from_ray(tmp_path):
    """Ray colours task names in its errors (`\\x1b[36mray::MapBatches\\x1b[39m`); the job's
    one-line message carries no escape codes."""
    from pipelines.curate import JobFailed

    cause = RuntimeError("\x1b[36mray::MapBatches(_not_stale)()\x1b[39m (pid=1) failed\nmore")
    msg = str(JobFailed("listing", 20, str(tmp_path / "log.txt"), cause))
    assert "\x1b" not in msg
    assert "(RuntimeError: ray::MapBatches(_not_stale)() (pid=1) failed)" in msg


def test_a_failed_ray_task_names_its_error_in_the_one_line(tmp_path):
    """A full disk while shards are written: the one line said only `RayTaskError(
    UserCodeException): ray::MapBatches(each_group)()`; the error raised in the task (here
    ENOSPC, as Ray 2.60 words it) is what the user needs to read."""
    from pipelines.curate import JobFailed

    text = (
        "\x1b[36mray::MapBatches(each_group)()\x1b[39m (pid=1518, ip=192.0.2.2)\n"
        '  File "/x/curation/io/atomic.py", line 68, in atomic_write\n'
        "    fh.write(data)\n"
        "OSError: [Errno 28] No space left on device\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "\x1b[36mray::MapBatches(each_group)()\x1b[39m (pid=1518, ip=192.0.2.2)\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    cause = type("RayTaskError(UserCodeException)", (RuntimeError,), {})(text)
    msg = str(JobFailed("shards", 15, str(tmp_path / "log.txt"), cause))
    assert "(OSError: [Errno 28] No space left on device, in ray::MapBatches(each_group)())" in msg
    assert "\n" not in msg and "\x1b" not in msg


def test_a_ray_address_that_nothing_answers_is_one_line_at_once(tmp_path, monkeypatch):
    """`--ray-address` with a mistyped port: Ray retried it for more than 10 minutes (killed
    then), a warning every few seconds; `auto` with no Ray running failed the start-up pass
    with "rerun the same command to resume". Now one line, exit 2, before Ray is asked."""
    from pipelines.curate import check_ray_address

    with socket.socket() as listening:  # an address that answers passes the check
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_ray_address(f"127.0.0.1:{listening.getsockname()[1]}")
        closed = listening.getsockname()[1]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"any input")
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was asked: the address is checked before")

    monkeypatch.setattr(ray, "init", no_ray)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["curate", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                   "--ray-address", f"127.0.0.1:{closed}"])  # fmt: skip
    assert rc == 2
    assert err.getvalue().splitlines() == [
        f"native4k: no Ray cluster answers at --ray-address 127.0.0.1:{closed} (Connection "
        "refused); give the head node's address (ray start --head prints it), or leave "
        "--ray-address out for a local Ray instance"
    ]


def test_a_rerun_leaves_no_empty_bucket_folder(tmp_path):
    """A rerun whose kept images left a bucket removed that bucket's shards, but not its
    folder: `shards/<bucket>/` stayed, empty, for a bucket the job no longer has."""
    from pipelines.curate import _remove_stale_shards

    for name in ("shards/4096x2304/4096x2304-000000.tar", "shards/2304x4096/2304x4096-000000.tar",
                 "shards/2304x4096/2304x4096-000001.tar"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"tar")
    _remove_stale_shards(str(tmp_path), {"shards/4096x2304/4096x2304-000000.tar"})
    left = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "shards").rglob("*"))
    assert left == ["shards/4096x2304", "shards/4096x2304/4096x2304-000000.tar"]


def test_a_manifest_staged_by_a_killed_run_is_removed(tmp_path):
    """A driver killed while moving the manifest (or the embeddings) into place left its
    staged copy (`_work/manifest-<pid>-<time>/`, `_work/embeddings-<pid>-<time>/`: gigabytes
    of embeddings at scale) for good; the next run removes it."""
    from pipelines.curate import _remove_leftover_temporaries

    for name in ("manifest-4242-1765000000", "embeddings-4242-1765000000"):
        staged = tmp_path / "_work" / name
        staged.mkdir(parents=True)
        (staged / "part-00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "_work" / "tmp").mkdir()
    (tmp_path / "_work" / "tmp" / ".x.tar.tmp-0123").write_bytes(b"partial")
    _remove_leftover_temporaries(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "_work").iterdir()) == ["tmp"]
    assert not list((tmp_path / "_work" / "tmp").iterdir())


def test_a_model_that_does_not_load_says_which_setting_to_correct(tmp_path):
    """A model file that does not load failed the job with 'rerun the same command to
    resume', which fails the same way; the line names the setting and the file instead."""
    from pipelines.curate import JobFailed

    text = (
        "\x1b[36mray::MapBatches(on_actor)()\x1b[39m (pid=1, ip=192.0.2.2)\n"
        "_pickle.UnpicklingError: Weights only load failed. Re-running `torch.load` ...\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "curation.base.ModelFileError: models.clip_weights: /m/clip.pt does not load as "
        "open_clip ViT-L-14 weights (not a torch checkpoint: unpickling failed)\n"
    )
    cause = type("RayTaskError(ModelFileError)", (RuntimeError,), {})(text)
    msg = str(JobFailed("models", 7, str(tmp_path / "log.txt"), cause))
    assert "could not load a model: models.clip_weights: /m/clip.pt does not load" in msg
    assert "rerun the same command" not in msg and "correct that setting" in msg
