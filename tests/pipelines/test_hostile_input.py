"""Hostile input through the real job: a fuzz corpus, hostile names and links.

The corpus (`fuzz_corpus.py`, 200+ files) mutates valid JPEG, PNG, WebP and TIFF files. The
job runs with `probe.min_pixels` lowered to the corpus's small base size, so every mutant whose
header still looks usable reaches the full decode and the pixel analysis.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from curation.io.listing import local_path
from pipelines.cli import main
from pipelines.samples import encode, render
from pipelines.verify import verify


def _load_corpus_module():
    spec = importlib.util.spec_from_file_location(
        "native4k_fuzz_corpus", Path(__file__).with_name("fuzz_corpus.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus_module()
MIN_PIXELS_FOR_BASE, TIER_SCALES = corpus.MIN_PIXELS_FOR_BASE, corpus.TIER_SCALES

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = ("--set", f"probe.min_pixels={MIN_PIXELS_FOR_BASE}", "--set",
         f"bucket.tier_scales={TIER_SCALES}")
REASONS = {
    "decode_error", "unsupported_format", "too_large", "too_small", "aspect_ratio", "unreadable",
    "upscaled", "blurry", "flat", "low_entropy", "duplicate",
}
WORKER_RSS_CAP = 2 << 30
"""Peak resident memory allowed to any Ray worker of the fuzz job (a 4K RGB decode is 25 MB;
before the probe stopped decoding PNGs to look for EXIF, one 1 x 2^30 PNG took 8 GB)."""


class WorkerMemory:
    """Polls the resident memory of this process's Ray workers (`ray::` processes)."""

    def __init__(self) -> None:
        self.peak = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if p.name().startswith("ray::") or "default_worker.py" in " ".join(
                        p.cmdline()
                    ):
                        self.pids.add(p.pid)
                        self.peak = max(self.peak, p.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _curate(inputs: list[Path], out: Path, *extra: str) -> tuple[int, str, str]:
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = main(["curate", *map(str, inputs), "--output", str(out), *extra])
    return rc, so.getvalue(), se.getvalue()


def failed_workers(ray) -> int:
    """Ray workers of this session that died of a system error (a crash, an OOM kill) so far,
    as the GCS logs them."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(
        p.read_text(errors="replace").count("exit_type = SYSTEM_ERROR")
        for p in logs.glob("gcs_server*.out")
    )


def test_fuzz_corpus_gets_a_row_per_file(local_ray, tmp_path):
    folder = tmp_path / "fuzz"
    names = corpus.build_corpus(folder)
    assert len(names) >= 200
    out = tmp_path / "out"
    crashed_before = failed_workers(local_ray)
    with WorkerMemory() as mem:
        rc, _, stderr = _curate([folder], out, *SMALL)
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert failed_workers(local_ray) == crashed_before  # no worker died
    assert mem.pids and 0 < mem.peak < WORKER_RSS_CAP, mem.peak
    rows = pq.read_table(out / "manifest").to_pylist()
    by_name = {Path(r["source"]).name: r for r in rows}
    assert len(rows) == len(by_name) == len(names)  # one row per file, none invented
    assert set(by_name) == set(names)
    for name, r in by_name.items():
        if r["status"] == "kept":
            assert r["reason"] is None and r["shard"], name
        else:
            assert r["status"] == "rejected" and r["reason"] in REASONS, (name, r["reason"])
            assert r["detail"], name
    outcome = {n: by_name[n]["reason"] for n in names}
    for ext in ("jpg", "png", "webp", "tif"):
        assert outcome[f"zero_{ext}.{ext}"] == "decode_error"
        assert outcome[f"text_as_{ext}.{ext}"] == "unsupported_format"
    for n in ("dims_png_100000x100000.png", "dims_jpg_65535x65535.jpg",
              "dims_png_2147483647x2147483647.png"):
        assert outcome[n] == "too_large", n  # judged from the header, never decoded
    assert outcome["dims_png_1x1073741824.png"] in ("aspect_ratio", "too_large")
    # a mislabelled but valid file is judged by its content, not its name (every mutant
    # shows one picture, so the intact ones are duplicates of one another)
    for name, fmt in (("mislabel_png_as_webp.webp", "png"), ("mislabel_jpg_as_png.png", "jpeg")):
        assert by_name[name]["format"] == fmt
        assert by_name[name]["status"] == "kept" or by_name[name]["reason"] == "duplicate"
    assert sum(r["status"] == "kept" for r in rows) > 0  # the intact mutants survive
    assert verify(str(out)) == []


def _jpeg(seed: int) -> bytes:
    """A small photo-like JPEG, a different picture per seed (no two are duplicates)."""
    w, h = (384, 256) if seed % 2 else (256, 384)
    return encode(render(w, h, seed), "JPEG", quality=92)


def _snapshot(root: Path, skip: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if skip not in p.parents and p != skip
    }


def test_hostile_names_and_links(local_ray, tmp_path):
    """`../`, absolute paths, newlines, `#` and invalid UTF-8 in file and member names stay
    inside OUT and give content keys; links follow the README's rule: a linked file is read
    through its link, a linked folder is not descended (so a loop cannot hang the listing),
    a dangling link, a named pipe and a link to a device are `unreadable` rows."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad_utf8 = os.fsdecode(b"caf\xe9-\xff\xfe.jpg")  # Latin-1 bytes: not UTF-8
    local = {"new\nline.jpg": 1, "a#b.jpg": 2, "up..down...jpg": 3, bad_utf8: 4}
    for name, seed in local.items():
        (inputs / name).write_bytes(_jpeg(seed))
    members = {
        "../../escaped.jpg": 5,
        "/etc/absolute.jpg": 6,
        "dir/../../../up.jpg": 7,
        "new\nline-member.jpg": 8,
        os.fsdecode(b"m\xff\xfe.jpg"): 9,
        "x#y.jpg": 10,
    }
    with tarfile.open(inputs / "hostile.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for name, seed in members.items():
            data = _jpeg(seed)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "target.jpg").write_bytes(_jpeg(21))
    (elsewhere / "inside_linked_dir.jpg").write_bytes(_jpeg(22))
    (inputs / "sub").mkdir()
    (inputs / "file_link.jpg").symlink_to(elsewhere / "target.jpg")
    (inputs / "dir_link").symlink_to(elsewhere, target_is_directory=True)
    (inputs / "sub" / "loop").symlink_to(inputs, target_is_directory=True)  # a cycle
    (inputs / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (inputs / "zero.jpg").symlink_to("/dev/zero")  # a read of it never ends
    os.mkfifo(inputs / "pipe.jpg")  # a read of it waits for ever for a writer
    links = ("file_link.jpg", "dangling.jpg", "zero.jpg", "pipe.jpg")

    out = tmp_path / "out"
    before = _snapshot(tmp_path, out)
    rc, _, stderr = _curate([inputs], out, *SMALL)
    assert rc == 0, stderr
    assert _snapshot(tmp_path, out) == before  # nothing written outside OUT
    assert not list(tmp_path.rglob("escaped.jpg")) and not Path("/etc/absolute.jpg").exists()
    rows = {r["source"]: r for r in pq.read_table(out / "manifest").to_pylist()}
    assert len(rows) == len(local) + len(members) + len(links)  # nothing via dir_link, loop
    for name in ("dangling.jpg", "zero.jpg", "pipe.jpg"):
        assert rows.pop(f"{inputs}/{name}")["reason"] == "unreadable", name
    assert all(r["status"] == "kept" for r in rows.values()), [
        (k, r["detail"]) for k, r in rows.items()
    ]
    assert f"{inputs}/file_link.jpg" in rows  # read through the link, named by it
    encoded = "file://" + str(inputs) + "/caf%E9-%FF%FE.jpg"
    assert encoded in rows  # lossless: percent-encoded raw bytes
    assert os.fsencode(local_path(encoded)) == os.fsencode(str(inputs / bad_utf8))
    assert f"{inputs}/new\nline.jpg" in rows and f"{inputs}/a#b.jpg" in rows
    tar_uri = f"{inputs}/hostile.tar"
    for name in ("../../escaped.jpg", "/etc/absolute.jpg", "x#y.jpg", "new\nline-member.jpg"):
        assert f"{tar_uri}#{name}" in rows
    assert f"{tar_uri}#m%FF%FE.jpg" in rows
    for r in rows.values():  # keys are content digests: only [0-9a-f], whatever the name
        assert len(r["key"]) == 32 and set(r["key"]) <= set("0123456789abcdef")
    shards = {p.relative_to(out) for p in (out / "shards").rglob("*") if p.is_file()}
    assert shards == {Path(r["shard"]) for r in rows.values()}
    assert verify(str(out)) == []


def test_a_broken_png_exif_lookup_is_not_a_decode(monkeypatch):
    """The probe reads a huge PNG's size without decoding it (formerly 66 s and 8 GB: Pillow's
    PNG `getexif` loads the pixels to find an EXIF chunk after them)."""
    from PIL import ImageFile

    from curation.probe.header_probe import probe

    decoded: list[str] = []
    load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(self.format)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    png = corpus._png_with_ihdr(corpus.base_files()["png"], 1, 1 << 30)
    facts = probe(png)
    assert decoded == []
    assert (facts["width"], facts["height"]) == (1, 1 << 30)
    assert np.isfinite(facts["orientation"])
