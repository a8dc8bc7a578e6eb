"""The bucketed streaming loader over shards written by the real `native4k curate`."""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from training.data import (
    WORKER_IGNORED_SIGNALS,
    BucketedLoader,
    DataConfig,
    _once_per_batch,
    fit_aspect,
)

pytestmark = [pytest.mark.ray]

CAPTION = "A small procedural scene, landscape."
SMALL = ["1024x1024", "640x960"]  # one sample each


def _rows(root: Path) -> dict[str, dict]:
    return {
        r["key"]: r for r in pq.read_table(root / "manifest").to_pylist() if r["status"] == "kept"
    }


def _epoch(loader: BucketedLoader) -> list[dict]:
    return list(loader)


def _fresh_keys(batches: list[dict]) -> list[str]:
    return [
        k for b in batches for k, p in zip(b["keys"], b["padded"].tolist(), strict=True) if not p
    ]


def _reference(root: Path, row: dict) -> np.ndarray:
    """The oriented RGB image cropped to its box, decoded independently of the loader."""
    with tarfile.open(root / row["shard"]) as tf:
        data = tf.extractfile(f"{row['key']}.{row['extension']}").read()
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    return np.asarray(im.convert("RGB"))


def test_bucket_batches_are_single_bucket_sized_and_in_range(curated_shards):
    rows = _rows(curated_shards)
    cfg = DataConfig(
        root=str(curated_shards), batch_size=2, resolution_divisor=4, small_buckets="pad"
    )
    loader = BucketedLoader(cfg)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 3 + 2 + 1 + 1
    for b in batches:
        tw, th = cfg.target_size(b["bucket"])
        assert b["pixels"].shape == (2, 3, th, tw) and b["pixels"].dtype.is_floating_point
        assert -1.0 <= float(b["pixels"].min()) < -0.5 and 0.5 < float(b["pixels"].max()) <= 1.0
        assert all(rows[k]["bucket"] == b["bucket"] for k in b["keys"])
        assert b["aesthetic"].shape == (2,) and bool(b["aesthetic"].isnan().all())
        for k, c in zip(b["keys"], b["captions"], strict=True):
            assert c == (rows[k]["caption_en"] or "")
    fresh = _fresh_keys(batches)
    assert sorted(fresh) == sorted(rows)  # every sample once, the rest flagged as padding
    assert CAPTION in {c for b in batches for c in b["captions"]}
    assert sum(int(b["padded"].sum()) for b in batches) == 3  # 576x1024 and the two singles
    assert cfg.target_size("1024x576") == (256, 128)  # 1024/4, 576/4=144 -> 128


@pytest.mark.parametrize("divisor", [1, 4])
def test_pixels_are_the_oriented_box_resized_down(curated_shards, divisor):
    """EXIF rotation, CMYK and 16-bit gray decode to the same pixels as an independent decode."""
    rows = _rows(curated_shards)
    cfg = DataConfig(
        root=str(curated_shards),
        resolution_divisor=divisor,
        jpeg_draft=divisor > 1,
        bucket_weights={"1024x576": 0.5},  # fewer big decodes
    )
    for b in BucketedLoader(cfg):
        (key,) = b["keys"]
        row = rows[key]
        ref = _reference(curated_shards, row)
        tw, th = cfg.target_size(row["bucket"])
        left, top, right, bottom = (row[f"crop_{s}"] for s in ("left", "top", "right", "bottom"))
        if divisor > 1:  # the box trimmed to the target's shape: no stretching
            left, top, right, bottom = fit_aspect((left, top, right, bottom), (tw, th))
            assert abs((right - left) / (bottom - top) - tw / th) < 0.01 * tw / th
        box = ref[top:bottom, left:right]
        want = np.asarray(Image.fromarray(box).resize((tw, th), Image.Resampling.LANCZOS))
        got = ((b["pixels"][0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.int16)
        diff = np.abs(got - want.astype(np.int16))
        if divisor == 1 and row["orientation"] == 1:
            assert diff.max() <= 1, (row["source"], diff.max())  # float round trip only
        else:  # rotated: filtered before turning (8-bit rounding between passes); or drafted
            assert diff.mean() < 1.0, (row["source"], diff.mean())
    assert rows and any(r["orientation"] == 6 for r in rows.values())


def test_crop_mode_gives_native_windows(curated_shards):
    rows = _rows(curated_shards)
    cfg = DataConfig(root=curated_shards, mode="crop", crop_size=256, batch_size=1, seed=3)
    assert cfg.root == str(curated_shards)  # a pathlib.Path names the output as well
    loader = BucketedLoader(cfg)
    first = _epoch(loader)
    second = _epoch(loader)
    for b in first[:4]:
        assert b["pixels"].shape == (1, 3, 256, 256)
        row = rows[b["keys"][0]]
        full = _reference(curated_shards, row)
        crop = ((b["pixels"][0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        score = cv2.matchTemplate(full, crop, cv2.TM_SQDIFF)
        y, x = np.unravel_index(int(np.argmin(score)), score.shape)
        assert (full[y : y + 256, x : x + 256] == crop).all()  # a window of the native pixels
    same = [
        a["keys"] == b["keys"] and bool((a["pixels"] == b["pixels"]).all())
        for a, b in zip(first, second, strict=True)
    ]
    assert not all(same)  # epochs reshuffle and recrop


def _plans(root: Path, world: int, **kw) -> list[list[dict]]:
    return [
        _epoch(BucketedLoader(DataConfig(root=str(root), **kw), rank=r, world_size=world))
        for r in range(world)
    ]


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    world=st.integers(1, 9),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    one_bucket=st.booleans(),
)
def test_ranks_get_equal_counts_and_disjoint_samples(
    curated_shards, world, batch, seed, one_bucket
):
    """Also with more ranks than shards (7 shards; one bucket: a single shard)."""
    rows = _rows(curated_shards)
    weights = {b: 0.0 for b in {r["bucket"] for r in rows.values()} if b != "1024x1024"}
    kw = dict(
        batch_size=batch,
        seed=seed,
        resolution_divisor=16,
        small_buckets="pad",
        bucket_weights=weights if one_bucket else {},
    )
    per_rank = _plans(curated_shards, world, **kw)
    counts = {len(p) for p in per_rank}
    assert len(counts) == 1 and counts.pop() >= 1
    fresh = [k for p in per_rank for k in _fresh_keys(p)]
    want = [k for k, r in rows.items() if not one_bucket or r["bucket"] == "1024x1024"]
    assert sorted(fresh) == sorted(want)  # disjoint across ranks, nothing lost
    total = sum(
        math.ceil(sum(r["bucket"] == b for r in rows.values() if r["key"] in want) / batch)
        for b in {rows[k]["bucket"] for k in want}
    )
    assert len(per_rank[0]) == math.ceil(total / world)


def test_two_gloo_processes_get_equal_counts_and_disjoint_samples(curated_shards, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys, datetime\n"
        "import torch, torch.distributed as dist\n"
        "from training.data import BucketedLoader, DataConfig\n"
        "def main():\n"
        "    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=120))\n"
        "    r, w = dist.get_rank(), dist.get_world_size()\n"
        "    cfg = DataConfig(root=sys.argv[1], batch_size=2, resolution_divisor=16,\n"
        "                     small_buckets='pad', num_workers=1)\n"
        "    loader = BucketedLoader(cfg, rank=r, world_size=w)\n"
        "    keys, steps = [], 0\n"
        "    for b in loader:\n"
        "        t = torch.ones(1)\n"
        "        dist.all_reduce(t)  # a DDP step: hangs if a rank has fewer batches\n"
        "        assert t.item() == w\n"
        "        keys.append([k for k, p in zip(b['keys'], b['padded'].tolist()) if not p])\n"
        "        steps += 1\n"
        "    out = [None] * w\n"
        "    dist.all_gather_object(out, {'steps': steps, 'len': len(loader), 'keys': keys})\n"
        "    if r == 0:\n"
        "        open(sys.argv[2], 'w').write(json.dumps(out))\n"
        "    dist.destroy_process_group()\n"
        "if __name__ == '__main__':  # DataLoader workers spawn and import this file\n"
        "    main()\n"
    )
    result = tmp_path / "out.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(curated_shards),
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out[0]["steps"] == out[1]["steps"] == out[0]["len"] == out[1]["len"]
    a = [k for b in out[0]["keys"] for k in b]
    b = [k for batch in out[1]["keys"] for k in batch]
    assert not set(a) & set(b) and sorted(a + b) == sorted(_rows(curated_shards))


@pytest.mark.parametrize("mode", ["bucket", "crop"])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(curated_shards, mode):
    kw = dict(
        root=str(curated_shards),
        mode=mode,
        crop_size=128,
        batch_size=2,
        resolution_divisor=8,
        small_buckets="pad",
        seed=11,
    )
    ref = BucketedLoader(DataConfig(**kw))
    run = _epoch(ref) + _epoch(ref)  # two epochs, uninterrupted
    n = len(ref)
    for stop in (3, n, n + 2):
        first = BucketedLoader(DataConfig(**kw))
        got = []
        for _ in range(2):
            for b in first:
                got.append(b)
                if len(got) == stop:
                    break
            if len(got) == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = BucketedLoader(DataConfig(**kw))
        resumed.load_state_dict(state)
        rest = []
        while len(got) + len(rest) < 2 * n:
            rest += _epoch(resumed)
        for want, b in zip(run[stop:], rest, strict=True):
            assert b["keys"] == want["keys"] and b["bucket"] == want["bucket"]
            assert bool((b["pixels"] == want["pixels"]).all())
    with pytest.raises(ValueError, match="seed"):
        BucketedLoader(DataConfig(**{**kw, "seed": 12})).load_state_dict(state)
    # Another selection or shuffle with as many batches was taken as the same plan: samples
    # were repeated or skipped without a word.
    for change in ({"select_column": "native_score", "select_top": 0.5},
                   {"shuffle_window": 1}, {"bucket_weights": {run[0]["bucket"]: 2.0}}):  # fmt: skip
        other = BucketedLoader(DataConfig(**{**kw, **change}))
        with pytest.raises(ValueError, match="selected samples or batching settings"):
            other.load_state_dict(state)
    BucketedLoader(DataConfig(**{**kw, "num_workers": 1})).load_state_dict(state)  # no change


def test_workers_split_batches_without_duplicates_in_the_same_order(curated_shards):
    kw = dict(root=str(curated_shards), batch_size=1, resolution_divisor=16, seed=5)
    single = _epoch(BucketedLoader(DataConfig(**kw)))
    loader = BucketedLoader(DataConfig(**kw, num_workers=2))
    multi = []
    for b in loader:
        multi.append(b)
        if len(multi) == 4:
            break
    state = loader.state_dict()
    multi += _epoch(loader)  # continues after the break, fresh workers
    assert [b["keys"] for b in multi] == [b["keys"] for b in single]
    assert all(bool((a["pixels"] == b["pixels"]).all()) for a, b in zip(single, multi, strict=True))
    assert state["batches_consumed"] == 4


def test_a_stop_signal_to_the_process_group_leaves_the_workers_running(curated_shards):
    """Slurm's `--signal` or systemd's stop signals every process of the job: the loader's
    workers died of it ('DataLoader worker ... is killed by signal: Terminated'), so the
    trainer, which checkpoints on that signal, crashed instead. The workers ignore it."""
    import multiprocessing
    import os
    import signal

    from training.trainer import STOP_SIGNALS

    assert set(STOP_SIGNALS) <= set(WORKER_IGNORED_SIGNALS)
    kw = dict(root=str(curated_shards), batch_size=1, resolution_divisor=16, seed=5)
    single = _epoch(BucketedLoader(DataConfig(**kw)))
    loader = BucketedLoader(DataConfig(**kw, num_workers=2))
    it = iter(loader)
    got = [next(it)]
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for w in workers:
        for name in STOP_SIGNALS:
            os.kill(w.pid, getattr(signal, name))
    got += list(it)
    assert [b["keys"] for b in got] == [b["keys"] for b in single]
    assert all(w.exitcode is not None for w in workers)  # gone with the epoch, not before


def test_a_stop_signal_while_workers_start_waits_for_their_init(tmp_path):
    """CI caught the window: a worker still importing (spawn) when the group's stop signal came
    died of it, before `_worker_init` could ignore it. Workers start with the signals blocked:
    the signal waits, the init ignores (discards) it, and the worker lives on. A fresh
    interpreter, because the first spawn also launches the resource tracker, which unblocked
    SIGTERM for every worker started after it."""
    import os

    script = tmp_path / "start.py"
    script.write_text(
        "import multiprocessing, os, signal\n"
        "from training.data import WORKER_IGNORED_SIGNALS, _worker_init, _worker_signals_blocked\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    with _worker_signals_blocked():\n"
        "        kids = [ctx.Process(target=_worker_init, args=(i,)) for i in range(3)]\n"
        "        for k in kids:\n"
        "            k.start()\n"
        "    for k in kids:  # long before any child has imported anything\n"
        "        for name in WORKER_IGNORED_SIGNALS:\n"
        "            os.kill(k.pid, getattr(signal, name))\n"
        "    for k in kids:\n"
        "        k.join(120)\n"
        "    blocked = set(signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
        "    print([k.exitcode for k in kids], sorted(blocked))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 0] []"


@pytest.mark.parametrize("ascending", [False, True])
def test_selection_keeps_the_top_share_by_a_column(curated_shards, ascending):
    rows = _rows(curated_shards)
    cfg = DataConfig(
        root=str(curated_shards),
        select_column="native_score",
        select_top=0.5,
        select_ascending=ascending,
        small_buckets="drop",
        resolution_divisor=16,
    )
    loader = BucketedLoader(cfg)
    ranked = sorted(rows.values(), key=lambda r: r["native_score"], reverse=not ascending)
    want = {r["key"] for r in ranked[: math.ceil(0.5 * len(rows))]}
    assert {k for b in loader for k in b["keys"]} == want
    sel = loader.report()["selection"]
    assert sel["candidates"] == len(rows) and sel["selected"] == len(want) == 6
    cutoff = ranked[len(want) - 1]["native_score"]
    assert sel["cutoff"] == pytest.approx(cutoff)


def test_small_bucket_policies(curated_shards, caplog):
    root = str(curated_shards)
    with pytest.raises(ValueError, match="1024x1024 \\(1\\), 640x960 \\(1\\)"):
        BucketedLoader(DataConfig(root=root, batch_size=2))
    with caplog.at_level("WARNING", logger="training.data"):
        drop = BucketedLoader(
            DataConfig(root=root, batch_size=2, small_buckets="drop", resolution_divisor=16)
        )
    # one line for every bucket it leaves out (it was a line each, and again each stage)
    said = [r.getMessage() for r in caplog.records if "small bucket" in r.getMessage()]
    assert said == [f"dropping {len(SMALL)} small buckets (< 2 samples): "
                    + ", ".join(f"{b} (1)" for b in SMALL)]  # fmt: skip
    rep = drop.report()
    assert rep["small_buckets"]["buckets"] == SMALL
    assert all(rep["buckets"][b]["dropped"].startswith("small") for b in SMALL)
    assert not {b["bucket"] for b in drop} & set(SMALL)
    pad = BucketedLoader(
        DataConfig(root=root, batch_size=2, small_buckets="pad", resolution_divisor=16)
    )
    seen = {b["bucket"]: b for b in pad}
    for b in SMALL:
        assert seen[b]["keys"][0] == seen[b]["keys"][1]
        assert seen[b]["padded"].tolist() == [False, True]
        assert pad.report()["buckets"][b]["padded_per_epoch"] == 1
    # min_bucket_samples raises the bar: the three portraits are small too.
    three = BucketedLoader(
        DataConfig(root=root, min_bucket_samples=4, small_buckets="drop", resolution_divisor=16)
    )
    assert three.report()["small_buckets"]["buckets"] == ["1024x1024", "576x1024", "640x960"]
    assert {b["bucket"] for b in three} == {"1024x576"}


def test_bucket_weights_repeat_subsample_and_exclude(curated_shards):
    rows = _rows(curated_shards)
    root = str(curated_shards)
    weights = {"576x1024": 2.0, "1024x576": 0.5, "1024x1024": 0.0}
    loader = BucketedLoader(DataConfig(root=root, bucket_weights=weights, resolution_divisor=16))
    epochs = [[k for b in loader for k in b["keys"]] for _ in range(2)]
    for keys in epochs:
        by = {}
        for k in keys:
            by.setdefault(rows[k]["bucket"], []).append(k)
        assert "1024x1024" not in by
        assert len(by["576x1024"]) == 6 and len(set(by["576x1024"])) == 3
        assert len(by["1024x576"]) == 3 == len(set(by["1024x576"]))
        assert len(by["640x960"]) == 1
    rep = loader.report()["buckets"]
    assert rep["1024x1024"]["dropped"] == "weight 0"
    assert (rep["1024x576"]["draws_per_epoch"], rep["576x1024"]["draws_per_epoch"]) == (3, 6)
    with pytest.raises(ValueError, match=r"bucket_weights.*9999x64"):
        BucketedLoader(DataConfig(root=root, bucket_weights={"9999x64": 1.0}))
    # Three samples drawn twice in batches of 3: each batch holds three different samples.
    loader = BucketedLoader(DataConfig(root=root, bucket_weights=weights, batch_size=3,
                                       resolution_divisor=16, small_buckets="pad"))  # fmt: skip
    for epoch in range(20):
        twice = [b for b in loader._rank_plan(epoch) if b.bucket == "576x1024"]
        assert len(twice) == 2 and all(len(set(b.ids)) == 3 for b in twice), twice


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(mode="tiles"), "mode"),
        (dict(batch_size=0), "batch_size"),
        (dict(crop_size=100), "crop_size"),
        (dict(select_column="aesthetic"), "select_top"),
        (dict(select_top=0.1), "select_column"),
        (dict(select_column="aesthetic", select_top=1.5), "select_top"),
        (dict(bucket_weights={"big": 1.0}), "bucket_weights"),
        (dict(bucket_weights={"64x64": -1.0}), "bucket_weights.64x64"),
        (dict(small_buckets="ignore"), "small_buckets"),
        (dict(caption_language="fr"), "caption_language"),
        (dict(num_workers=1.5), "num_workers"),
        (dict(resolution_divisor=0), "resolution_divisor"),
        (dict(worker_start="thread"), "worker_start"),
        (dict(shuffle_window=0), "shuffle_window"),
        (dict(resample="nearest"), "resample"),
        (dict(select_ascending=True), "select_ascending"),  # ranked nothing, silently
    ],
)
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        DataConfig(root="/nowhere", **kw)
    with pytest.raises(ValueError, match="unknown key 'batchsize'"):
        DataConfig.from_dict({"root": "/x", "batchsize": 2})


def test_unfinished_output_and_unknown_column_are_clear_errors(curated_shards, tmp_path):
    with pytest.raises(ValueError, match="_SUCCESS"):
        BucketedLoader(DataConfig(root=str(tmp_path)))
    with pytest.raises(ValueError, match=r"'select_column'.*no 'beauty'"):
        BucketedLoader(DataConfig(root=str(curated_shards), select_column="beauty", select_top=0.5))
    # What the manifest already tells stops the loader before the first batch, not at it.
    with pytest.raises(ValueError, match=r"'aesthetic' is null in all 11 kept rows"):
        BucketedLoader(DataConfig(root=str(curated_shards), select_column="aesthetic",
                                  select_top=0.05))
    with pytest.raises(ValueError, match=r"'crop_size' \(768\): 9 of the 11 .* smallest 1280x720"):
        BucketedLoader(DataConfig(root=str(curated_shards), mode="crop", crop_size=768))
    with pytest.raises(ValueError, match=r"'resolution_divisor' \(24\) shrinks bucket"):
        BucketedLoader(DataConfig(root=str(curated_shards), resolution_divisor=24))
    # The trainer's advice for such buckets, weight 0, leaves them out of the checks too.
    rows = _rows(curated_shards).values()
    for kw, too_small in (
        (dict(resolution_divisor=24), {r["bucket"] for r in rows
                                       if min(map(int, r["bucket"].split("x"))) // 24 < 32}),
        (dict(mode="crop", crop_size=768), {r["bucket"] for r in rows
                                            if min(r["width"], r["height"]) < 768}),
    ):  # fmt: skip
        assert too_small and too_small != {r["bucket"] for r in rows}
        loader = BucketedLoader(DataConfig(root=str(curated_shards), small_buckets="pad",
                                           bucket_weights=dict.fromkeys(too_small, 0), **kw))
        report = loader.report()["buckets"]
        assert {b for b, r in report.items() if r["dropped"] == "weight 0"} == too_small
    empty = tmp_path / "empty"  # a job that kept nothing
    shutil.copytree(curated_shards, empty)
    manifest = pq.read_table(empty / "manifest")
    for part in (empty / "manifest").glob("*.parquet"):
        part.unlink()
    status = manifest.schema.get_field_index("status")
    pq.write_table(manifest.set_column(status, "status", pa.array(["rejected"] * len(manifest))),
                   empty / "manifest" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"kept no image: nothing to train on"):
        BucketedLoader(DataConfig(root=str(empty)))


class _Boom:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_member_in_a_shard_is_never_unpickled(curated_shards, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(curated_shards, root)
    marker = tmp_path / "unpickled"
    shard = sorted((root / "shards" / "576x1024").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    key = members[0][0].name.split(".")[0]
    payload = pickle.dumps(_Boom(str(marker)))
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
            if m.name == f"{key}.json":
                info = tarfile.TarInfo(f"{key}.pyd")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    loader = BucketedLoader(DataConfig(root=str(root), resolution_divisor=16))
    with pytest.raises(ValueError, match=r"\.pyd.*pickle"):
        for _ in loader:
            pass
    assert not marker.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_cut_short_is_named_in_the_error(curated_shards, tmp_path, workers):
    """A truncated shard failed with `ReadError: unexpected end of data @ <LocalFileOpener
    object at 0x...>`: nothing said which of thousands of shards to fetch again. With loader
    workers, torch made the worker's whole traceback the message (42 lines)."""
    root = tmp_path / "copy"
    shutil.copytree(curated_shards, root)
    shard = max((root / "shards").rglob("*.tar"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    loader = BucketedLoader(DataConfig(root=str(root), resolution_divisor=16, small_buckets="pad",
                                       num_workers=workers))  # fmt: skip
    name = re.escape(str(shard.relative_to(root)))
    with pytest.raises(ValueError, match=rf"{name}: cannot read the shard .*verify") as e:
        for _ in loader:
            pass
    assert "\n" not in str(e.value) and " @ <" not in str(e.value), str(e.value)


@pytest.mark.parametrize(("member", "payload", "words"), [
    ("json", b"not json", "is not JSON"),
    ("json", b"[1, 2]", "is not a JSON object"),
    ("txt", b"\xff\xfe caption", "is not UTF-8 text"),
])  # fmt: skip
def test_a_corrupt_metadata_or_caption_member_names_its_sample(
    curated_shards, tmp_path, member, payload, words
):
    """These failed as a bare `JSONDecodeError`, an AttributeError traceback or a
    UnicodeDecodeError that named no shard and no sample."""
    root = tmp_path / "copy"
    shutil.copytree(curated_shards, root)
    shard = sorted((root / "shards" / "1024x1024").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    key = members[0][0].name.split(".")[0]
    members = [(m, d) for m, d in members if m.name != f"{key}.{member}"]
    added = tarfile.TarInfo(f"{key}.{member}")
    added.size = len(payload)
    members.insert(1, (added, payload))  # with its sample's other members
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    others = {"1024x576": 0.0, "576x1024": 0.0, "640x960": 0.0}  # this shard's bucket only
    loader = BucketedLoader(DataConfig(root=str(root), resolution_divisor=16, small_buckets="pad",
                                       bucket_weights=others))  # fmt: skip
    name = re.escape(str(shard.relative_to(root)))
    with pytest.raises(ValueError, match=rf"{name}: member {key}\.{member} {words}.*verify"):
        for _ in loader:
            pass


def test_a_store_that_refuses_the_reads_is_one_clear_error(curated_shards, s3_server):
    """An S3 403 (a key without rights, or expired credentials) is a PermissionError from
    s3fs, which `native4k train-*` printed as a traceback."""
    from moto.core.authorization import enable_iam_authentication

    _upload(curated_shards, "train-denied")
    cfg = DataConfig(root="s3://train-denied/run", resolution_divisor=16, small_buckets="pad")
    with enable_iam_authentication(), pytest.raises(  # moto checks the keys: 403 to each
        ValueError, match=r"^cannot read s3://train-denied/run: PermissionError"
    ):
        BucketedLoader(cfg)
    loader = BucketedLoader(cfg)  # the rights are lost after the start
    with enable_iam_authentication(), pytest.raises(
        ValueError, match=r"train-denied/run/shards/.*\.tar: cannot read the shard: Permission"
    ):
        for _ in loader:
            pass


def _upload(curated: Path, bucket: str) -> None:
    """A new bucket holding the curation output `curated` under `run/`."""
    import boto3
    import fsspec

    boto3.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    fs = fsspec.filesystem("s3")
    for p in sorted(curated.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{bucket}/run/{p.relative_to(curated)}")


def test_reads_shards_from_s3(curated_shards, s3_server):
    _upload(curated_shards, "train")
    kw = dict(batch_size=2, resolution_divisor=16, small_buckets="pad", seed=2)
    local = _epoch(BucketedLoader(DataConfig(root=str(curated_shards), **kw), rank=1, world_size=2))
    remote = _epoch(BucketedLoader(DataConfig(root="s3://train/run", **kw), rank=1, world_size=2))
    assert [b["keys"] for b in remote] == [b["keys"] for b in local]
    assert all(bool((a["pixels"] == b["pixels"]).all()) for a, b in zip(local, remote, strict=True))


def test_a_rank_reads_only_the_shards_that_hold_its_samples(curated_shards, tmp_path):
    """Shards that hold none of rank 0's samples can vanish without rank 0 noticing."""
    rows = _rows(curated_shards)
    kw = dict(root=str(curated_shards), resolution_divisor=16, small_buckets="pad")
    for seed in range(20):
        cfg = DataConfig(**kw, seed=seed)
        mine = _epoch(BucketedLoader(cfg, rank=0, world_size=2))
        used = {rows[k]["shard"] for b in mine for k in b["keys"]}
        others = {r["shard"] for r in rows.values()} - used
        if others:
            break
    assert others, "no seed left a shard to rank 1 alone"
    copy = tmp_path / "copy"
    shutil.copytree(curated_shards, copy)
    for shard in others:
        (copy / shard).unlink()
    again = _epoch(BucketedLoader(DataConfig(**{**kw, "root": str(copy)}, seed=seed), world_size=2))
    assert [b["keys"] for b in again] == [b["keys"] for b in mine]


def _png_with_trailing_exif(rgb: np.ndarray, orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after the pixel data (allowed by the PNG spec, rare)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = (struct.pack(">I", len(raw)) + b"eXIf" + raw
             + struct.pack(">I", zlib.crc32(b"eXIf" + raw)))
    return data[:-12] + chunk + data[-12:]  # before IEND


def test_the_loader_orients_as_curation_recorded(local_ray, tmp_path):
    """Curation reads a PNG's EXIF only before its pixels; the loader follows the manifest's
    `orientation`, not the file's trailing EXIF (which made the crop box fall outside)."""
    from pipelines.cli import main
    from pipelines.samples import render

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    rgb = render(1280, 720, 7400)
    data = _png_with_trailing_exif(rgb, 6)
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == 6  # what a full read of the file says
    (inputs / "late_exif.png").write_bytes(data)
    args = ["curate", str(inputs), "--output", str(out), "--set", "probe.min_pixels=921600",
            "--set", "bucket.tier_scales=[0.25,0.1875]"]  # as the `curated_shards` fixture
    assert main(args) == 0
    (row,) = _rows(out).values()
    assert (row["status"], row["orientation"], row["width"]) == ("kept", 1, 1280), row
    cfg = DataConfig(root=str(out), resolution_divisor=4)
    (batch,) = _epoch(BucketedLoader(cfg))
    tw, th = cfg.target_size(row["bucket"])
    crop = (row["crop_left"], row["crop_top"], row["crop_right"], row["crop_bottom"])
    left, top, right, bottom = fit_aspect(crop, (tw, th))  # below the bucket size
    box = rgb[top:bottom, left:right]
    want = np.asarray(Image.fromarray(box).resize((tw, th), Image.Resampling.LANCZOS))
    got = ((batch["pixels"][0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.int16)
    assert np.abs(got - want.astype(np.int16)).max() <= 1


@pytest.mark.parametrize("name", ["run [v2]", "a*b?c", "with space"])
def test_a_root_whose_name_holds_glob_characters_is_read(tmp_path, name):
    """The manifest was found by globbing `<root>/manifest/*.parquet`, so a root named
    `run [v2]` read as a pattern: "has no manifest/*.parquet" for a finished output."""
    from training.data import read_manifest

    root = tmp_path / name
    (root / "manifest").mkdir(parents=True)
    (root / "_SUCCESS").write_text("")
    for i in range(2):
        pq.write_table(pa.table({"key": [f"k{i}"], "status": ["kept"]}),
                       root / "manifest" / f"part-{i}.parquet")
    (root / "manifest" / "notes.txt").write_text("not a part")
    table = read_manifest(str(root), ("key", "status", "bucket"))
    assert table.column("key").to_pylist() == ["k0", "k1"]


def test_no_sample_left_names_each_bucket_and_why(tmp_path):
    """Every bucket left out (small and dropped, or weight 0): the error printed the loader's
    whole report as a Python dict."""
    (tmp_path / "manifest").mkdir()
    (tmp_path / "_SUCCESS").write_text("")
    row = {"status": "kept", "key": "a", "bucket": "1024x1024", "shard": "shards/x.tar",
           "extension": "jpg", "crop_left": 0, "crop_top": 0, "crop_right": 1024,
           "crop_bottom": 1024, "width": 1024, "height": 1024}  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row, {**row, "key": "b", "bucket": "1024x576",
                                               "crop_bottom": 576, "height": 576}]),
                   tmp_path / "manifest" / "part-0.parquet")  # fmt: skip
    cfg = DataConfig(root=str(tmp_path), batch_size=2, small_buckets="drop",
                     bucket_weights={"1024x576": 0})  # fmt: skip
    with pytest.raises(ValueError) as err:
        BucketedLoader(cfg)
    assert str(err.value) == (
        f"no samples left to train on in {tmp_path}: every bucket is left out "
        "(1024x1024: small (1 < 2), 1024x576: weight 0)")


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_tiff_read_without_the_manifest_is_oriented_once(orientation: int) -> None:
    """Pillow's TIFF decoder applies the orientation tag itself: read without a manifest
    orientation, a TIFF was turned twice (and its 5-8 sizes swapped back)."""
    from training.data import decode_crop

    stored = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "TIFF", exif=exif)
    turn = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
            8: Image.Transpose.ROTATE_90}[orientation]  # fmt: skip
    shown = np.asarray(Image.fromarray(stored).transpose(turn) if turn else Image.fromarray(stored))
    rgb = decode_crop(buf.getvalue(), 24, np.random.default_rng(0), name="t.tif")
    rng = np.random.default_rng(0)  # the window decode_crop draws: x, then y
    x = int(rng.integers(0, shown.shape[1] - 24 + 1))
    y = int(rng.integers(0, shown.shape[0] - 24 + 1))
    np.testing.assert_array_equal(rgb, shown[y : y + 24, x : x + 24])


@given(
    box=st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(32, 6000),
                  st.integers(32, 6000)),
    target=st.tuples(st.integers(1, 200), st.integers(1, 200)).map(
        lambda t: (32 * t[0], 32 * t[1])),
)  # fmt: skip
def test_a_box_trimmed_to_the_target_shape_stays_inside_and_large_enough(box, target):
    """`resolution_divisor` rounds each side on its own (1024x576 / 4 -> 256x128): the whole
    box resized to that squashed the picture by up to 12.5 % (50 % for 640x960 / 16)."""
    left, top, w, h = box
    tw, th = target
    if w < tw or h < th:  # the loader refuses to upscale before trimming matters
        return
    out = fit_aspect((left, top, left + w, top + h), target)
    ol, ot, orr, ob = out
    assert left <= ol < orr <= left + w and top <= ot < ob <= top + h
    assert orr - ol >= tw and ob - ot >= th  # still a reduction
    assert orr - ol == w or ob - ot == h  # only one side is trimmed
    # the shape is the target's, to the pixel
    assert abs((orr - ol) * th - (ob - ot) * tw) <= max(tw, th)
    # centred (within a pixel)
    assert abs((ol - left) - (left + w - orr)) <= 1 and abs((ot - top) - (top + h - ob)) <= 1


@settings(max_examples=300)
@given(
    n=st.integers(1, 12), rounds=st.integers(2, 4), batch=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_repeated_rounds_never_put_a_sample_twice_in_a_batch(n, rounds, batch, seed):
    """A bucket weighted 2 with fewer samples than the shuffle window put both draws of a
    sample in one batch about half the time (43 of 150 batches at 1.5), unflagged."""
    rng = np.random.default_rng(seed)
    seq = [int(i) for _ in range(rounds) for i in rng.permutation(n)]
    out = _once_per_batch(seq, batch)
    assert sorted(out) == sorted(seq)  # the same draws
    if n >= batch:
        for lo in range(0, len(out), batch):
            part = out[lo : lo + batch]
            assert len(set(part)) == len(part), (seq, out)


def _replace_member(shard: Path, name: str, payload: bytes) -> None:
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name == name:
                data = payload
                m.size = len(payload)
            tf.addfile(m, io.BytesIO(data))


def test_a_bad_sample_stops_training_or_is_skipped_as_asked(curated_shards, tmp_path):
    """Hours into a run, one corrupt image ended training; `data.bad_samples=skip` trains on:
    the sample's place in its batch goes to a repeat of another (its key, flagged padded),
    a warning names it and the loader's report counts it."""
    root = tmp_path / "copy"
    shutil.copytree(curated_shards, root)
    rows = _rows(root)
    bucket = "576x1024"
    bad = sorted(k for k, r in rows.items() if r["bucket"] == bucket)[1]
    shard = root / rows[bad]["shard"]
    _replace_member(shard, f"{bad}.{rows[bad]['extension']}", b"not an image at all")
    only = {b: (1.0 if b == bucket else 0.0) for b in {r["bucket"] for r in rows.values()}}
    kw = dict(root=str(root), resolution_divisor=16, batch_size=3, bucket_weights=only)
    with pytest.raises(ValueError, match=rf"{bad}: cannot decode image.*bad_samples=skip"):
        _epoch(BucketedLoader(DataConfig(**kw)))
    for workers in (0, 1):
        loader = BucketedLoader(DataConfig(**kw, bad_samples="skip", num_workers=workers))
        (batch,) = _epoch(loader)
        assert bad not in batch["keys"] and len(batch["keys"]) == 3
        slot = [k for k, p in zip(batch["keys"], batch["padded"].tolist(), strict=True) if p]
        assert len(slot) == 1 and batch["keys"].count(slot[0]) == 2  # a repeat stands in
        same = [i for i, k in enumerate(batch["keys"]) if k == slot[0]]
        assert bool((batch["pixels"][same[0]] == batch["pixels"][same[1]]).all())
        report = loader.report()["skipped"]
        assert report["samples"] == 1 and bad in report["first"][0]


def test_a_shard_cut_short_is_skipped_past_without_reading_it_again(curated_shards, tmp_path):
    """With `skip`, the samples behind the cut are skipped at once (the shard is not read
    again from its start for each of them), each standing in with a sample read before."""
    root = tmp_path / "copy"
    shutil.copytree(curated_shards, root)
    rows = _rows(root)
    bucket = "576x1024"  # three samples: put them in one shard, in key order
    keys = sorted(k for k, r in rows.items() if r["bucket"] == bucket)
    shards = sorted({rows[k]["shard"] for k in keys})
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    for name in shards:
        with tarfile.open(root / name) as tf:
            members += [(m, tf.extractfile(m).read()) for m in tf]
        (root / name).unlink()
    members.sort(key=lambda m: m[0].name)
    shard = root / shards[0]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    for part in (root / "manifest").glob("*.parquet"):
        t = pq.read_table(part)
        moved = pc.is_in(t.column("key"), value_set=pa.array(keys))
        t = t.set_column(t.schema.get_field_index("shard"), "shard",
                         pc.if_else(moved, shards[0], t.column("shard")))  # fmt: skip
        pq.write_table(t, part)
    with tarfile.open(shard) as tf:
        listed = tf.getmembers()
    first_key = listed[0].name.split(".")[0]
    # webdataset hands a sample on once it reads the next one's first member: a cut inside the
    # third sample loses the second and the third
    third = next(m for m in listed if m.name.split(".")[0] == keys[2])
    shard.write_bytes(shard.read_bytes()[: third.offset_data + third.size // 2])
    only = {b: (1.0 if b == bucket else 0.0) for b in {r["bucket"] for r in rows.values()}}
    cfg = DataConfig(root=str(root), resolution_divisor=16, bucket_weights=only,
                     shuffle_window=1, bad_samples="skip")  # shard order: the intact one first
    loader = BucketedLoader(cfg)
    batches = _epoch(loader)
    assert batches[0]["keys"] == [first_key] and not bool(batches[0]["padded"].any())
    assert all(b["keys"] == [first_key] and bool(b["padded"].all()) for b in batches[1:])
    skipped = loader.report()["skipped"]
    assert skipped["samples"] == len(batches) - 1 == 2
    assert all("cannot read the shard" in why for why in skipped["first"])
    assert skipped["first"][1].endswith(f"(sample {keys[2]} is in it)")  # known broken: not read


def test_a_camera_jpeg_with_an_mpf_preview_decodes_at_reduced_scale(monkeypatch) -> None:
    """Pillow names a JPEG carrying an MPF preview (many camera files) `MPO`; the loader
    decoded it at full size, about 3 times slower, where a plain JPEG is decoded at 1/8."""
    import io

    from PIL import Image
    from PIL.JpegImagePlugin import JpegImageFile

    from training.data import decode_bucket

    rgb = np.random.default_rng(0).integers(0, 255, (2160, 3840, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "MPO", save_all=True,
                              append_images=[Image.fromarray(rgb[:270, :480])])  # fmt: skip
    drafts: list[tuple] = []
    draft = JpegImageFile.draft

    def recording(self, mode, size):
        drafts.append(size)
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", recording)
    out = decode_bucket(buf.getvalue(), (0, 0, 3840, 2160), (240, 135))
    assert out.shape == (135, 240, 3)
    assert drafts == [(480, 270)]  # 1/8: twice the 240 px target
