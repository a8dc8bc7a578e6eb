"""`native4k report`: one self-contained page, checked in headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import html.parser
import io
import json
import os
import select
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from curation import schema
from curation.analyze.native import CODECS, TESTS
from pipelines.cli import main
from pipelines.report import (
    NATIVE_FIRED,
    native_rows,
    open_reduced,
    reduced_image,
    write_report,
)
from pipelines.samples import _real_photos

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)"
)


# --- a small DevTools-protocol client over --remote-debugging-pipe (no websocket needed) ---


class Browser:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out)."""

    def __init__(self, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--no-default-browser-check", "--disable-default-apps",
            "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        # The shell puts our pipe ends on fds 3 and 4, where Chromium expects them.
        hi = max(cmd_r, out_w) + 1  # moved above both first, so that 3 and 4 never collide
        shell = (
            f"exec {hi}<&{cmd_r} {hi + 1}>&{out_w} {cmd_r}<&- {out_w}>&-; "
            f'exec 3<&{hi} 4>&{hi + 1} {hi}<&- {hi + 1}>&-; exec "$@"'
        )
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, "bash", *args],
            pass_fds=(cmd_r, out_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._out_r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 60,
    ) -> dict[str, Any]:
        """Send one command and wait for its reply (events meanwhile are kept)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            reply = self._read(end - time.monotonic())
            if reply is None:
                raise TimeoutError(f"no reply to {method}")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for an event (already received ones count)."""
        end = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("method") == method:
                    return e
            msg = self._read(end - time.monotonic())
            if msg is None:
                raise TimeoutError(f"no {method} event")
            self.events.append(msg)

    def drain(self, seconds: float) -> None:
        """Collect events for a while."""
        end = time.monotonic() + seconds
        while (msg := self._read(max(0.0, end - time.monotonic()))) is not None:
            self.events.append(msg)

    def close(self) -> None:
        """Close the browser (and kill it if it does not go)."""
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)


def open_page(url: str, profile: Path, screenshot: Path, width: int = 1400) -> dict[str, Any]:
    """Load `url`, run checks in the page, save a full-page PNG; return what was observed."""
    b = Browser(profile)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=sid)
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
               session=sid)  # fmt: skip
        b.events.clear()
        b.send("Page.navigate", {"url": url}, session=sid)
        b.wait_event("Page.loadEventFired")
        b.drain(1.0)
        metrics = b.send("Page.getLayoutMetrics", session=sid)
        h = int(min(metrics["cssContentSize"]["height"], 16000))
        shot = b.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True,
             "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1}},
            session=sid,
        )  # fmt: skip
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return {"events": list(b.events), "session": sid, "browser": b}
    except BaseException:
        b.close()
        raise


def _evaluate(b: Browser, session: str, expr: str) -> Any:
    res = b.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
    assert "exceptionDetails" not in res, res
    return res["result"].get("value")


# --- outputs -----------------------------------------------------------------------------------


def _photos(n: int) -> list[bytes]:
    """Real photographs when Debian's wallpapers are installed, else generated JPEGs."""
    paths = _real_photos(n)
    if len(paths) >= n:
        return [p.read_bytes() for p in paths]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = (rng.random((360, 640, 3)) * 255 * (i + 1) / n).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def _png(width: int, height: int) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx % 256, yy % 256, (xx // 3 + yy // 5) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def mixed_job(audit_output, tmp_path):
    """Kept photos in two buckets (one PNG); rejected: a local file, a tar member, a missing
    file, a bomb that must never be decoded; scores on both sides of a configured threshold."""
    photos = _photos(6)
    src = tmp_path / "src"
    src.mkdir()
    (src / "soft.jpg").write_bytes(photos[4])
    with tarfile.open(src / "pack.tar", "w") as tf:
        info = tarfile.TarInfo("inner/flat.jpg")
        info.size = len(photos[5])
        tf.addfile(info, io.BytesIO(photos[5]))
    kept = [
        {"data": photos[i], "ext": "jpg", "bucket": ["3840x2176", "4096x2048"][i % 2],
         "sharpness": 14.0 + i, "entropy": 7.2 + i / 10, "width": 2560, "height": 1600,
         "source": f"/gone/photo-{i}.jpg"}  # read from the shard: the source is not needed
        for i in range(4)
    ] + [{"data": _png(640, 400), "ext": "png", "bucket": "4096x2048", "sharpness": 20.0,
          "width": 640, "height": 400}]  # fmt: skip
    rejected = [
        {"source": str(src / "soft.jpg"), "reason": "blurry", "sharpness": 3.5,
         "sha256": "a" * 64, "width": 2560, "height": 1600},
        {"source": f"{src / 'pack.tar'}#inner/flat.jpg", "reason": "flat", "sharpness": 11.0,
         "flat_fraction": 0.9, "sha256": "b" * 64, "width": 2560, "height": 1600},
        {"source": str(src / "missing.jpg"), "reason": "blurry", "sharpness": 2.0,
         "sha256": "c" * 64, "width": 3000, "height": 2000},
        {"source": str(src / "bomb.png"), "reason": "too_large", "width": 40000,
         "height": 40000, "sha256": "d" * 64},
    ]  # fmt: skip
    (src / "bomb.png").write_bytes(b"never read")
    return audit_output(
        kept, rejected, config_overrides=["analyze.min_sharpness=12.5", "probe.min_pixels=1000"]
    )


class _Attrs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "srcset")]


# --- tests -----------------------------------------------------------------------------------


@needs_chromium
def test_report_in_headless_chromium(mixed_job, tmp_path):
    out, _ = mixed_job
    assert main(["report", str(out), "--samples", "3"]) == 0
    page = out / "report.html"
    shot = tmp_path / "report.png"
    b = Browser(tmp_path / "profile")
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=sid)
        b.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
            session=sid,
        )
        b.events.clear()
        b.send("Page.navigate", {"url": page.as_uri()}, session=sid)
        b.wait_event("Page.loadEventFired")
        b.drain(0.5)
        loaded = _evaluate(
            b, sid,
            "[...document.images].map(i => [i.closest('.card') ? 'card' : 'plot',"
            " i.complete && i.naturalWidth > 0])",
        )  # fmt: skip
        placeholders = _evaluate(
            b, sid, "[...document.querySelectorAll('.ph')].map(e => e.innerText)"
        )
        rows0 = _evaluate(b, sid, "document.querySelectorAll('#lineage tbody tr').length")
        _evaluate(
            b, sid,
            "const f = document.getElementById('lineage-filter'); f.value = 'missing.jpg';"
            "f.dispatchEvent(new Event('input'));",
        )  # fmt: skip
        filtered = _evaluate(
            b, sid, "[...document.querySelectorAll('#lineage tbody tr')].map(r => r.innerText)"
        )
        metrics = b.send("Page.getLayoutMetrics", session=sid)
        height = int(min(metrics["cssContentSize"]["height"], 12000))
        png = b.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True,
             "clip": {"x": 0, "y": 0, "width": 1400, "height": height, "scale": 1}},
            session=sid,
        )  # fmt: skip
        shot.write_bytes(base64.b64decode(png["data"]))
        b.drain(0.2)
    finally:
        b.close()
    if os.environ.get("NATIVE4K_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["NATIVE4K_SCREENSHOT_DIR"]) / "report.png")

    methods = [e.get("method") for e in b.events]
    assert "Runtime.exceptionThrown" not in methods, b.events
    console = [e["params"] for e in b.events if e.get("method") == "Runtime.consoleAPICalled"]
    assert not [c for c in console if c["type"] in ("error", "warning", "assert")], console
    logs = [e["params"]["entry"] for e in b.events if e.get("method") == "Log.entryAdded"]
    assert not [e for e in logs if e["level"] in ("error", "warning")], logs
    requested = [
        e["params"]["request"]["url"]
        for e in b.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    external = [u for u in requested if u != page.as_uri() and not u.startswith("data:")]
    assert requested and not external, external
    # every plot and thumbnail decoded in the browser; the two rejected inputs without a
    # thumbnail show why (a missing file, a bomb never decoded)
    assert loaded and all(ok for _, ok in loaded), loaded
    kinds = [k for k, _ in loaded]
    assert kinds.count("card") == 5 + 2 and kinds.count("plot") >= 5
    assert len(placeholders) == 2
    assert any("FileNotFoundError" in p for p in placeholders)
    assert any("decompression-bomb" in p for p in placeholders)
    assert rows0 == 9
    assert len(filtered) == 1 and "missing.jpg" in filtered[0] and "blurry" in filtered[0]
    # the screenshot shows a page, not a blank
    im = Image.open(shot).convert("RGB")
    px = np.asarray(im)
    assert im.size[0] == 1400 and im.size[1] > 2000
    assert px.std() > 20 and len(np.unique(px.reshape(-1, 3)[::7], axis=0)) > 2000


def test_page_is_self_contained_and_deterministic(mixed_job):
    out, _ = mixed_job
    first = Path(write_report(str(out), workers=1)).read_bytes()
    text = first.decode()
    p = _Attrs()
    p.feed(text)
    assert p.urls and all(u.startswith(("data:", "#")) for u in p.urls), p.urls
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert "default-src 'none'" in text  # the browser itself refuses any request
    assert Path(write_report(str(out), workers=2)).read_bytes() == first


def test_thresholds_come_from_config_yaml(mixed_job):
    out, _ = mixed_job
    text = Path(write_report(str(out), workers=1)).read_text()
    assert "analyze.min_sharpness = 12.5" in text
    assert "analyze.max_flat_fraction = 0.5" in text
    # the funnel: inputs, then each reason in the job's order, then kept
    steps = text[text.index('id="funnel"') : text.index('id="buckets"')]
    order = [
        steps.index(f"<td>{n}</td>") for n in ("inputs", "too_large", "blurry", "flat", "kept")
    ]
    assert order == sorted(order)


def _cards(text: str) -> list[str]:
    """The source of every contact-sheet card, in page order."""
    return [
        c.split('<div class="src" title="')[1].split('"')[0]
        for c in text.split('<figure class="card">')[1:]
    ]


def test_samples_are_chosen_by_content_not_row_order(mixed_job):
    out, _ = mixed_job
    cards = _cards
    before = cards(Path(write_report(str(out), samples=1, workers=1)).read_text())
    assert len(before) == 2 + 3  # one per bucket, one per reason
    for part in (out / "manifest").glob("*.parquet"):
        t = pq.read_table(part)
        pq.write_table(t.take(list(range(t.num_rows))[::-1]), part)
    after = cards(Path(write_report(str(out), samples=1, workers=1)).read_text())
    assert after == before


@pytest.mark.parametrize("n_kept", [0, 1])
def test_zero_and_one_kept(audit_output, audit_jpeg, n_kept):
    kept = [{"data": audit_jpeg(64, 40, 1), "ext": "jpg", "bucket": "3840x2176",
             "sharpness": 9.0, "width": 64, "height": 40}][:n_kept]  # fmt: skip
    out, _ = audit_output(kept, [{"source": "/gone.jpg", "reason": "too_small"}])
    text = Path(write_report(str(out))).read_text()
    assert ("No image was kept" in text) == (n_kept == 0)
    assert text.count('<figure class="card">') == n_kept + 1
    assert 'id="lineage-data"' in text


def test_reduced_decoding_and_orientation():
    rgb = np.zeros((2160, 3840, 3), np.uint8)
    rgb[:, :1920] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    assert open_reduced(jpeg, 240).size == (480, 270)  # decoded at 1/8 scale, never at 4K
    assert reduced_image(jpeg).size == (240, 135)
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(rgb[:1080, :1920]).save(buf, fmt)
        assert reduced_image(buf.getvalue()).size == (240, 135)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.fromarray(rgb[:1080, :1920]).save(rotated, "JPEG", exif=exif)
    assert reduced_image(rotated.getvalue()).size == (135, 240)
    with pytest.raises(ValueError, match="over the decode cap"):
        reduced_image(jpeg, max_pixels=1000)


def test_thumbnails_follow_the_orientation_the_manifest_records():
    """A PNG whose `eXIf` chunk comes after its pixels is recorded upright (orientation 1: the
    probe reads no chunk after the pixel data) and so is trained on; the report turned its
    thumbnail by the chunk, a portrait picture labelled landscape."""
    from PIL import PngImagePlugin

    rgb = np.zeros((1080, 1920, 3), np.uint8)
    rgb[:, :960] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    chunk = PngImagePlugin.putchunk  # a chunk with its CRC, placed before IEND
    late = io.BytesIO()
    chunk(late, b"eXIf", raw)
    png = buf.getvalue()
    png = png[:-12] + late.getvalue() + png[-12:]
    assert Image.open(io.BytesIO(png)).getexif().get(0x0112) == 6  # Pillow finds it late
    assert reduced_image(png).size == (135, 240)  # the file's own EXIF, as before
    upright = reduced_image(png, orientation=1)
    assert upright.size == (240, 135)
    assert np.asarray(upright)[60, 20, 0] > 150  # the red half stays on the left
    assert reduced_image(png, orientation=6).size == (135, 240)


def test_an_mpo_thumbnail_decodes_at_reduced_scale():
    """Pillow names a camera JPEG with an MPF preview `MPO`: it decoded at full size."""
    rgb = np.zeros((2160, 3840, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "MPO", save_all=True,
                              append_images=[Image.fromarray(rgb[:270, :480])])  # fmt: skip
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    assert open_reduced(buf.getvalue(), 240).size == (480, 270)


def test_s3_output_and_sources(audit_output, audit_jpeg, s3_server):
    import boto3

    boto3.client("s3").create_bucket(
        Bucket="audit-report", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    fs = fsspec.filesystem("s3")
    fs.pipe("audit-report/raw/soft.jpg", audit_jpeg(80, 50, 9))
    out, _ = audit_output(
        [{"data": audit_jpeg(64, 40, 1), "ext": "jpg", "bucket": "3840x2176", "width": 64,
          "height": 40}],
        [{"source": "s3://audit-report/raw/soft.jpg", "reason": "blurry", "sha256": "e" * 64},
         {"source": "s3://audit-report/raw/gone.jpg", "reason": "blurry", "sha256": "f" * 64}],
    )  # fmt: skip
    fs.put(str(out) + "/", "audit-report/job", recursive=True)
    uri = write_report("s3://audit-report/job", workers=2)
    assert uri == "s3://audit-report/job/report.html"
    text = fs.cat_file("audit-report/job/report.html").decode()
    assert text.count("data:image/jpeg;base64,") == 2  # the kept sample and the s3 source
    assert text.count('class="ph"') == 1 and "gone.jpg" in text


@pytest.mark.ray
@pytest.mark.slow
def test_real_jobs_with_zero_and_one_kept(local_ray, tmp_path, capsys):
    """The real `native4k curate` on inputs that keep nothing and one image, then every
    audit tool on its output."""
    from pipelines.samples import encode, render

    buf = io.BytesIO()
    Image.open(io.BytesIO(_photos(1)[0])).convert("RGB").resize((1280, 720)).save(buf, "JPEG")
    small = buf.getvalue()
    for n_kept in (0, 1):
        raw = tmp_path / f"raw{n_kept}"
        raw.mkdir()
        (raw / "small.jpg").write_bytes(small)  # too small: rejected from the header
        (raw / "broken.jpg").write_bytes(small[: len(small) // 3])
        if n_kept:
            (raw / "native.jpg").write_bytes(encode(render(3840, 2160, 3), "JPEG", quality=92))
        out = tmp_path / f"out{n_kept}"
        loose = [  # pixel thresholds out of the way: this test is about the audit tools
            "--set", "analyze.min_native_score=-1000", "--set", "analyze.min_sharpness=0",
            "--set", "analyze.max_flat_fraction=1", "--set", "analyze.min_entropy=0",
        ]  # fmt: skip
        assert main(["curate", str(raw), "--output", str(out), *loose]) == 0
        capsys.readouterr()
        assert main(["stats", str(out), "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert (s["total"], s["kept"]) == (2 + n_kept, n_kept)
        assert main(["verify", str(out), "--deep"]) == 0
        assert main(["report", str(out)]) == 0
        text = (out / "report.html").read_text()
        assert text.count('<figure class="card">') == 2 + n_kept
        assert ("No image was kept" in text) == (n_kept == 0)
        if n_kept:
            shard = next((out / "shards").rglob("*.tar"))
            shard.write_bytes(shard.read_bytes()[:-2048])
            assert main(["verify", str(out)]) == 1


_NATIVE_ROW = st.tuples(
    st.sampled_from([None, *CODECS]),
    st.sampled_from([None, *TESTS]),
    st.sampled_from([None, "upscaled", "blurry", "flat", "duplicate"]),
)


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(_NATIVE_ROW, max_size=40))
def test_native_evidence_counts_every_judged_row_once(rows):
    """Each judged row counts once per model, and once under the test that rejected it."""
    t = pa.table({
        schema.NATIVE_CODEC: pa.array([r[0] for r in rows], pa.string()),
        schema.NATIVE_TEST: pa.array([r[1] for r in rows], pa.string()),
        schema.REASON: pa.array([r[2] for r in rows], pa.string()),
    })  # fmt: skip
    table = native_rows(t)
    assert [r[0] for r in table] == [c for c in CODECS if any(x[0] == c for x in rows)]
    for codec, judged, upscaled, *by_test, cfa in table:
        mine = [r for r in rows if r[0] == codec]
        assert judged == len(mine)
        assert upscaled == sum(r[2] == "upscaled" for r in mine)
        fired = dict(zip(NATIVE_FIRED, by_test, strict=True))
        for name in NATIVE_FIRED:
            assert (fired[name] or 0) == sum(r[2] == "upscaled" and r[1] == name for r in mine)
        assert (cfa or 0) == sum(r[2] != "upscaled" and r[1] == "cfa" for r in mine)


def test_report_shows_which_test_judged_images_upscaled(audit_output, audit_jpeg):
    img = audit_jpeg(64, 40, 1)
    kept = [{"data": img, "ext": "jpg", "bucket": "3840x2176", "width": 64, "height": 40,
             "native_score": 0.8, "native_test": "cfa", "native_codec": "jpeg"}]
    rejected = [
        {"source": "/a.webp", "reason": "upscaled", "native_score": 0.2, "native_test": "harmonic",
         "native_codec": "vp8", "sha256": "a" * 64},
        {"source": "/b.webp", "reason": "upscaled", "native_score": 0.3, "native_test": "grid",
         "native_codec": "vp8", "sha256": "b" * 64},
        {"source": "/c.jpg", "reason": "upscaled", "native_score": 0.4, "native_test": "fold",
         "native_codec": "jpeg", "sha256": "c" * 64},
        {"source": "/d.jpg", "reason": "blurry", "native_score": 0.9, "native_test": "spectral",
         "native_codec": "jpeg_low", "sha256": "d" * 64},
        {"source": "/e.jpg", "reason": "too_small"},  # never analysed
    ]  # fmt: skip
    out, _ = audit_output(kept, rejected)
    text = Path(write_report(str(out), workers=1)).read_text()
    section = text[text.index('id="native"') : text.index('id="sizes"')]
    rows = [r.split("</tr>")[0] for r in section.split("<tr>")[2:]]
    cells = [[c.split("</td>")[0] for c in r.split("<td>")[1:]] for r in rows]
    by_model = {c[0]: c[1:] for c in cells}
    assert list(by_model) == ["jpeg", "jpeg_low", "vp8"]  # the detector's order of models
    heads = ["judged", "upscaled", *NATIVE_FIRED, "cfa"]
    assert dict(zip(heads, by_model["vp8"], strict=True)) == {
        "judged": "2", "upscaled": "2", "spectral": "", "fold": "", "harmonic": "1", "grid": "1",
        "quarter": "", "cfa": ""}  # fmt: skip
    assert dict(zip(heads, by_model["jpeg"], strict=True))["fold"] == "1"
    assert dict(zip(heads, by_model["jpeg"], strict=True))["cfa"] == "1"
    assert by_model["jpeg_low"][:2] == ["1", "0"]


def test_report_without_native_evidence_says_so(audit_output):
    out, _ = audit_output([], [{"source": "/gone.jpg", "reason": "too_small"}])
    text = Path(write_report(str(out), workers=1)).read_text()
    assert "No manifest row carries native evidence" in text


def test_a_file_over_the_byte_cap_is_not_called_a_bomb(audit_output):
    """A file rejected unread by `probe.max_file_bytes` (no size) had the placeholder "not
    decoded: over the decompression-bomb cap" on the report's contact sheet."""
    out, _ = audit_output([], [
        {"source": "/in/huge.tif", "reason": "too_large", "detail": "file is 9 bytes, over..."},
        {"source": "/in/bomb.png", "reason": "too_large", "width": 40000, "height": 40000},
    ])  # fmt: skip
    text = Path(write_report(str(out), workers=1)).read_text()
    assert text.count("not read: over the file-size cap (probe.max_file_bytes)") == 1
    assert text.count("not decoded: over the decompression-bomb cap") == 1


def test_thumbnails_find_files_whose_names_hold_a_hash(tmp_path):
    """Only a row read from a tar (it has `tar_offset`) is a tar member; a file named
    `bad#one.jpg` is opened whole (the report showed a placeholder for it before)."""
    from pipelines.report import ThumbJob, thumb_job

    def row(source: str, offset: int | None = None, status: str = "rejected") -> dict:
        return {schema.STATUS: status, schema.SOURCE: source, schema.TAR_OFFSET: offset,
                schema.SIZE_BYTES: 99, schema.SHARD: None}

    assert thumb_job("/out", row("/in/bad#one.jpg")) == ThumbJob("/in/bad#one.jpg")
    assert thumb_job("/out", row("/in/x.tar#c#d.jpg", 1536)) == ThumbJob(
        "/in/x.tar", "c#d.jpg", 1536, 99)
    assert thumb_job("/out", row("s3://b/p.tar#k.webp", 512)) == ThumbJob(
        "s3://b/p.tar", "k.webp", 512, 99)
    assert thumb_job("/out", row("/in/p.tar#k.jpg")) == ThumbJob("/in/p.tar", "k.jpg")
    named = tmp_path / "a.tar#b.jpg"  # a plain file, whatever its name says
    named.write_bytes(b"x")
    assert thumb_job("/out", row(str(named))) == ThumbJob(str(named))
    kept = {**row("/in/a#b.jpg"), schema.STATUS: schema.STATUS_KEPT,
            schema.SHARD: "shards/1x1/1x1-000000.tar", schema.KEY: "k", "extension": "jpg"}
    assert thumb_job("/out", kept) == ThumbJob("/out/shards/1x1/1x1-000000.tar", "k.jpg")


@pytest.mark.parametrize(
    "name,text,words",
    [("config.yaml", "analyze: [", "config.yaml cannot be read"),
     ("config.yaml", "- a list\n", "config.yaml is not a mapping"),
     ("stats.json", "{bad", "stats.json cannot be read")],
)  # fmt: skip
def test_a_damaged_summary_file_is_named(audit_output, audit_jpeg, capsys, name, text, words):
    out, _ = audit_output([], [{"source": "/gone.jpg", "reason": "too_small"}])
    (out / name).write_text(text)
    assert main(["report", str(out)]) == 2
    assert words in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(out), "--samples", "-1"])
    assert exit_.value.code == 2


def test_contact_sheets_never_read_a_pipe_and_open_sources_as_the_manifest_names_them(
    tmp_path, audit_jpeg
):
    """A rejected input that is a named pipe gets a placeholder (opening it waited for ever
    for a writer, so `report` never finished); a source recorded as a `file://` URI (a name
    that is not UTF-8) is opened as the file it names."""
    import threading

    from curation.io.listing import local_source
    from pipelines.report import ThumbJob, make_thumbnails

    os.mkfifo(tmp_path / "pipe.jpg")
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    odd.write_bytes(audit_jpeg(64, 48, 1))
    jobs = [ThumbJob(str(tmp_path / "pipe.jpg")), ThumbJob(local_source(str(odd)))]
    assert jobs[1].uri.startswith("file://")
    out: list = []
    worker = threading.Thread(
        target=lambda: out.append([make_thumbnails([j]) for j in jobs]), daemon=True
    )
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the report blocked on a named pipe"
    (pipe,), (named,) = out[0]
    assert pipe[0] is None and "named pipe" in pipe[1]
    assert named[0] is not None and named[0].startswith("data:image/jpeg"), named


def test_an_edited_config_section_or_a_non_utf8_summary_is_no_traceback(
    audit_output, capsys
):
    """`probe: null` in config.yaml crashed the report (AttributeError); a config.yaml or
    stats.json that is not UTF-8 gave an error that did not name the file; a YAML error
    printed five lines with a caret."""
    out, _ = audit_output([], [{"source": "/gone.jpg", "reason": "too_small"}])
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config + "\nprobe: null\n")
    assert main(["report", str(out)]) == 0
    (out / "config.yaml").write_bytes(b"\xff\xfe garbage")
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml cannot be read (not UTF-8 text" in err, err
    (out / "config.yaml").write_text("analyze:\n  min_entropy: [1,\n")
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.yaml cannot be read (" in err and "\n" not in err, err
