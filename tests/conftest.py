"""Shared fixtures: the generated sample set (built once per session) and helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo's sample set, with its expected outcomes (real photos when installed)."""
    from pipelines.samples import build_samples

    folder = tmp_path_factory.mktemp("samples")
    build_samples(folder, real_photos=6)
    return folder, json.loads((folder / "expected.json").read_text())


def real_photo_paths(limit: int = 8) -> list[Path]:
    """Real photographs from Debian's wallpaper packages (empty when not installed)."""
    from pipelines.samples import _real_photos

    return _real_photos(limit)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on 127.0.0.1; AWS_* variables point every client at it.

    Started before Ray so that local Ray workers inherit the endpoint. moto keeps one backend
    per process, shared by every server a test starts: each test uses bucket names of its own.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """One local Ray instance (2 CPUs) for every test that runs the job in-process."""
    import ray

    from pipelines.curate import local_ray_system_config

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=local_ray_system_config(2),
        runtime_env={"env_vars": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def curated(samples, local_ray, tmp_path_factory) -> Path:
    """The sample set curated once by the real CLI on local Ray (shared by the e2e tests)."""
    from pipelines.cli import main

    folder, _ = samples
    out = tmp_path_factory.mktemp("curated")
    assert main(["curate", str(folder), "--output", str(out)]) == 0
    return out


class StepLimit(AssertionError):
    """A call ran more Python lines than its bound (`python_lines`)."""


@pytest.fixture
def python_lines():
    """`run(limit, fn, *args)`: `fn(*args)`, counting the Python lines it executes in every
    frame below it and failing once it passes `limit`. A bound on work that does not depend
    on the machine's speed or load, where a timing bound would (timed tests are not used)."""
    import sys

    def run(limit: int, fn, *args):
        count = 0

        def tracer(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
                if count > limit:
                    raise StepLimit(f"{fn.__name__} ran more than {limit} Python lines")
            return tracer

        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            return fn(*args)
        finally:
            sys.settrace(previous)

    return run
