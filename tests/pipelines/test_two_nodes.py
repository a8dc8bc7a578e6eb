"""A real two-node Ray cluster on this machine: `ray start --head` and a second `ray start
--address`, each with its own resources and temp dir. `native4k curate --ray-address` runs
on it as a subprocess; its output equals a local run's, pass-1 tasks are seen running on both
nodes (worker processes under each node's raylet), and the second node is SIGKILLed mid-job
without changing the output. Only the processes this test started are stopped (by their temp
dirs), never other Ray instances on the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from pipelines.cli import main
from pipelines.samples import encode, render
from pipelines.verify import verify

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
SMALL = ["--set", "probe.min_pixels=65536", "--set",
         "bucket.tier_scales=[1.0,0.5,0.25,0.125,0.0625,0.05]"]
NUM_FILES = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(marks: tuple[str, ...]) -> list[psutil.Process]:
    """Processes whose command line names one of this test's Ray temp dirs."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or ())
            if any(m in cmd for m in marks):
                found.append(p)
    return found


def _stop(marks: tuple[str, ...]) -> None:
    procs = _ours(marks)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=3)  # the test is over: no need to wait long
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


class Cluster:
    """Two Ray nodes started with `ray start`; `stop()` ends only their processes."""

    def __init__(self) -> None:
        self.head_tmp = tempfile.mkdtemp(prefix="n4kh-", dir="/tmp")  # short socket paths
        self.node_tmp = tempfile.mkdtemp(prefix="n4kw-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, *args: str, temp: str) -> None:
        common = [
            "--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            "--object-store-memory=200000000", f"--temp-dir={temp}",
            f"--dashboard-agent-listen-port={_free_port()}",
        ]
        done = subprocess.run(
            [str(BIN / "ray"), "start", *args, *common],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "RAY_TMPDIR": temp},
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def start(self) -> None:
        self._start("--head", f"--port={self.port}", '--resources={"head_node": 1}',
                    "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
                    temp=self.head_tmp)
        self._start(f"--address={self.address}", '--resources={"second_node": 1}',
                    temp=self.node_tmp)

    def raylets(self) -> dict[str, psutil.Process]:
        """{'head' | 'second': raylet process}, told apart by their declared resources."""
        out = {}
        for p in _ours((self.head_tmp, self.node_tmp)):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if "raylet" in p.name() or "/raylet" in cmd.split(" ")[0]:
                    out["second" if "second_node" in cmd else "head"] = p
        return out

    def stop(self) -> None:
        _stop((self.head_tmp, self.node_tmp))
        shutil.rmtree(self.head_tmp, ignore_errors=True)
        shutil.rmtree(self.node_tmp, ignore_errors=True)


@pytest.fixture
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two-node-inputs")
    for seed in range(NUM_FILES):
        w, h = (512, 320) if seed % 3 else (320, 512)
        (folder / f"p{seed:02d}.jpg").write_bytes(encode(render(w, h, 100 + seed), "JPEG",
                                                         quality=93))
    (folder / "copy.jpg").write_bytes((folder / "p01.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    return folder


def test_two_node_cluster_matches_a_local_run(cluster, inputs, local_ray, tmp_path, job_outcome):
    raylets = cluster.raylets()
    assert set(raylets) == {"head", "second"}
    worked: dict[str, set[str]] = {"head": set(), "second": set()}
    killed = threading.Event()
    done = threading.Event()

    def watch() -> None:
        """Record the tasks each node's workers run; kill the second node once it has
        worked and pass 1 has written a part."""
        while not done.is_set():
            for node, raylet in raylets.items():
                with contextlib.suppress(psutil.Error):
                    for p in raylet.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            title = " ".join(p.cmdline())
                            if title.startswith("ray::") and "MapBatches" in title:
                                worked[node].add(title.split(" ")[0])
            parts = list((tmp_path / "out" / "_work" / "analysis").glob("part-*.parquet"))
            if worked["second"] and parts and not killed.is_set():
                victims = [raylets["second"], *raylets["second"].children(recursive=True)]
                for p in victims:
                    with contextlib.suppress(psutil.Error):
                        p.send_signal(signal.SIGKILL)
                killed.set()
            done.wait(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [str(BIN / "native4k"), "curate", str(inputs), "--output", str(tmp_path / "out"),
             "--ray-address", cluster.address, *SMALL],
            capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        done.set()
        thread.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert worked["head"] and worked["second"], worked  # work ran on both nodes
    assert killed.is_set()  # and the second node died mid-job
    assert f"analysed {NUM_FILES + 2} inputs in this run" in proc.stdout

    local = tmp_path / "local"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["curate", str(inputs), "--output", str(local), *SMALL]) == 0
    assert job_outcome(tmp_path / "out") == job_outcome(local)  # manifest, keys, shard bytes
    assert verify(str(tmp_path / "out")) == []
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["total"] == NUM_FILES + 2
