"""The real CLI on local Ray over generated images and real photographs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.stats import inputs_text

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _rows(out: Path) -> dict[str, dict]:
    return {r["source"]: r for r in pq.read_table(out / "manifest").to_pylist()}


def _rel(samples: Path, source: str) -> str:
    return source.replace(str(samples.resolve()) + "/", "")


def test_every_input_gets_exactly_its_expected_outcome(samples, curated):
    folder, expected = samples
    rows = _rows(curated)
    by_rel = {_rel(folder, s): r for s, r in rows.items()}
    assert set(by_rel) == set(expected)  # one row per input, none lost, none invented
    for rel, e in expected.items():
        r = by_rel[rel]
        got = r["status"] if r["status"] == "kept" else r["reason"]
        if e["outcome"] == "rejected":
            assert r["status"] == "rejected", rel
        elif e["outcome"] != "*":
            assert got == e["outcome"], (rel, r["detail"])
        if r["status"] == "rejected":
            assert r["reason"] and r["detail"] and r["shard"] is None
        if e["size"]:
            assert [r["width"], r["height"]] == e["size"], rel  # after EXIF orientation
        if e["caption"]:
            assert r["caption_en"] == e["caption"]
        if e.get("meta"):
            assert json.loads(r["source_meta"]) == e["meta"], rel
        if e.get("color_profile"):
            assert r["color_profile"] == e["color_profile"], rel
        if e["duplicate_of"]:
            assert r["duplicate_of"] == by_rel[e["duplicate_of"]]["key"], rel


def test_kept_samples_are_bucketed_without_upscaling_and_bytes_unchanged(curated):
    kept = [r for r in _rows(curated).values() if r["status"] == "kept"]
    assert len(kept) >= 10
    for r in kept:
        w, h = (int(x) for x in r["bucket"].split("x"))
        assert w % 64 == 0 and h % 64 == 0
        assert r["crop_right"] - r["crop_left"] >= w and r["crop_bottom"] - r["crop_top"] >= h
        assert r["shard"] == f"shards/{r['bucket']}/{r['bucket']}-000000.tar"
        with tarfile.open(curated / r["shard"]) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        data = members[f"{r['key']}.{r['extension']}"]
        if "#" in r["source"]:
            assert hashlib.sha256(data).hexdigest() == r["sha256"]
        else:
            assert data == Path(r["source"]).read_bytes()
        row = json.loads(members[f"{r['key']}.json"])
        assert row["source"] == r["source"] and row["source_meta"] == r["source_meta"]
        if r["caption_en"]:
            assert members[f"{r['key']}.txt"].decode() == r["caption_en"]


def test_outputs_and_verify_stats_report(curated):
    for name in ("buckets.json", "config.yaml", "stats.json", "_SUCCESS"):
        assert (curated / name).exists(), name
    parts = sorted(p.name for p in (curated / "manifest").iterdir())
    assert parts and all(p.startswith("part-") and p.endswith(".parquet") for p in parts)
    stats = json.loads((curated / "stats.json").read_text())
    rows = _rows(curated)
    assert stats["total"] == len(rows)
    assert stats["kept"] == sum(r["status"] == "kept" for r in rows.values())
    assert sum(b["count"] for b in stats["buckets"].values()) == stats["kept"]
    assert stats["reasons"]["duplicate"] == sum(r["reason"] == "duplicate" for r in rows.values())
    assert {"read", "probe", "analyze", "write"} <= set(stats["stage_seconds"])
    cli = Path(sys.executable).with_name("native4k")
    done = subprocess.run([str(cli), "verify", str(curated)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [str(cli), "stats", str(curated), "--json"], capture_output=True, text=True
    )
    assert json.loads(done.stdout)["total"] == stats["total"]
    assert main(["report", str(curated)]) == 0
    assert "<table>" in (curated / "report.html").read_text()


def test_verify_catches_a_tampered_shard(curated, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(curated, copy)
    shard = sorted((copy / "shards").rglob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name.endswith((".jpg", ".png", ".webp")):
                data = data[:-10] + b"0123456789"
            m.size = len(data)
            tf.addfile(m, __import__("io").BytesIO(data))
    assert main(["verify", str(copy)]) == 1
    (copy / "_SUCCESS").unlink()
    assert main(["verify", str(copy)]) == 1


def test_rerun_and_fresh_run_give_identical_keys_and_shards(samples, curated, tmp_path, capsys):
    folder, _ = samples
    before = {s: (r["key"], r["shard"], r["reason"]) for s, r in _rows(curated).items()}
    assert main(["report", str(curated), "--samples", "0"]) == 0
    capsys.readouterr()
    assert main(["curate", str(folder), "--output", str(curated)]) == 0  # rerun in place
    # the earlier run's report is gone, not left to describe this one
    assert not (curated / "report.html").exists()
    assert "removed the earlier run's report.html" in capsys.readouterr().out
    assert {s: (r["key"], r["shard"], r["reason"]) for s, r in _rows(curated).items()} == before
    fresh = tmp_path / "fresh"
    assert main(["curate", str(folder), "--output", str(fresh)]) == 0
    assert {s: (r["key"], r["shard"], r["reason"]) for s, r in _rows(fresh).items()} == before
    for shard in {v[1] for v in before.values() if v[1]}:
        assert (fresh / shard).read_bytes() == (curated / shard).read_bytes()


def test_bad_config_stops_before_work(samples, tmp_path, capsys):
    folder, _ = samples
    bad = tmp_path / "bad.yaml"
    bad.write_text("analyze:\n  min_sharpnes: 3\n")
    assert main(["curate", str(folder), "--output", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "analyze.min_sharpnes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


SCORES = ("sharpness", "flat_fraction", "entropy", "native_score", "phash")


def test_retuning_a_pixel_threshold_analyses_again_only_what_stopped_early(
    samples, curated, tmp_path, capsys
):
    """The analyses of an image stop at the first rule it fails; a rerun whose thresholds let
    it pass that rule analyses it again (and nothing else), and the result equals a fresh
    job's with those thresholds."""
    folder, _ = samples
    first = _rows(curated)
    for r in first.values():
        if r["reason"] in ("flat", "low_entropy"):
            assert r["sharpness"] is not None and r["native_score"] is None, r["source"]
    relax = ["--set", "analyze.min_entropy=1.0"]
    stopped = [
        s for s, r in first.items() if r["reason"] == "low_entropy" and r["entropy"] >= 1.0
    ]
    assert stopped, "the samples hold a low-entropy image"
    copy, fresh = tmp_path / "copy", tmp_path / "fresh"
    shutil.copytree(curated, copy)
    capsys.readouterr()
    assert main(["curate", str(folder), "--output", str(copy), *relax]) == 0
    assert f"analysed {inputs_text(len(stopped))} in this run" in capsys.readouterr().out
    rows = {_rel(folder, s): r for s, r in _rows(copy).items()}
    assert rows["reject/low_entropy.png"]["status"] == "kept"
    assert rows["reject/flat_gradient.png"]["reason"] == "flat"
    assert main(["curate", str(folder), "--output", str(copy), *relax]) == 0  # once is enough
    assert "analysed 0 inputs in this run" in capsys.readouterr().out
    assert main(["curate", str(folder), "--output", str(fresh), *relax]) == 0
    retuned, direct = _rows(copy), _rows(fresh)
    assert len(retuned) == len(first)  # the superseded rows are gone: one row per input
    fields = ("status", "reason", "key", "shard", *SCORES)
    for source, r in direct.items():
        assert {f: retuned[source][f] for f in fields} == {f: r[f] for f in fields}, source
    assert main(["verify", str(copy)]) == 0


def test_a_rerun_with_score_all_completes_every_stored_analysis(samples, curated, tmp_path, capsys):
    """`analyze.score_all` over an output whose analyses stopped early: the rerun analyses
    again exactly the decoded images that lack a score, fills every score, and keeps every
    verdict (it crashed before: the stale rows' mask was built from an expression)."""
    folder, _ = samples
    first = _rows(curated)
    partial = {s for s, r in first.items()
               if r["sharpness"] is not None and any(r[f] is None for f in SCORES)}
    assert partial, "some analysis stopped at a rule the image failed"
    copy = tmp_path / "copy"
    shutil.copytree(curated, copy)
    capsys.readouterr()
    assert main(["curate", str(folder), "--output", str(copy),
                 "--set", "analyze.score_all=true"]) == 0
    assert f"analysed {inputs_text(len(partial))} in this run" in capsys.readouterr().out
    rows = _rows(copy)
    assert rows.keys() == first.keys()
    for source, r in rows.items():
        assert (r["status"], r["reason"], r["key"]) == (
            first[source]["status"], first[source]["reason"], first[source]["key"]), source
        if source in partial:
            assert all(r[f] is not None for f in SCORES), source
    assert main(["verify", str(copy)]) == 0
