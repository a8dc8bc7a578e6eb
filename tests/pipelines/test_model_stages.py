"""The model pass through the real CLI on local Ray, with tiny random models built from configs.

One job runs every model stage (open_clip embedding with aesthetic, safety and zero-shot heads,
pyiqa piqe, semantic de-duplication, share thresholds over several blocks, captions and
translations); one checks that missing weights stop the job before any work; one runs the
offline defaults (piqe, nudenet when installed) on real photographs.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import schema
from pipelines.stats import inputs_text

pytestmark = pytest.mark.ray

PHOTOS = [  # real photographs of at least 3840x2160 (Debian's backgrounds), cut to 3840x2160
    "/usr/share/backgrounds/Painting-Colors_by__herobrine7gamer.jpg",
    "/usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg",
    "/usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg",
    "/usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg",
]
SMALL = "small.jpg"  # rejected `too_small` from its header: never a candidate
COPY = "umang_copy.jpg"
RELAXED = [
    "--set", "analyze.max_flat_fraction=1.0",
    "--set", "analyze.min_entropy=0",
    "--set", "analyze.min_native_score=0",
    "--set", "analyze.min_sharpness=0",
]  # fmt: skip
"""Debian's 4K photographs are mostly smooth skies: the cheap rules would reject most."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    if not all(Path(p).is_file() for p in PHOTOS):
        pytest.skip("Debian wallpaper photographs are not installed")
    folder = tmp_path_factory.mktemp("model-inputs")
    for p in PHOTOS:  # the central 3840x2160 (fewer pixels to analyse)
        with Image.open(p) as im:
            w, h = im.size
            box = ((w - 3840) // 2, (h - 2160) // 2, (w + 3840) // 2, (h + 2160) // 2)
            im.crop(box).save(folder / Path(p).name, quality=92)
    # A semantic duplicate: the same photograph re-encoded (pHash de-duplication is off in
    # the job below, so only the embedding can catch it); smaller, so the original is kept.
    with Image.open(folder / Path(PHOTOS[1]).name) as im:
        im.save(folder / COPY, quality=75)
        im.resize((960, 540)).save(folder / SMALL)
    (folder / "sunset_by_Aitzol_Berasategi.txt").write_text("a sunset over the hills")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from curation.score.random_models import (
        build_aesthetic,
        build_open_clip,
        build_safety,
        build_translator,
        build_vlm,
    )

    folder = tmp_path_factory.mktemp("models")
    clip = build_open_clip(folder, "tiny-clip-e2e")
    return {
        **clip,
        "aesthetic": build_aesthetic(folder / "aesthetic.pth", clip["dim"]),
        "safety": build_safety(folder / "safety.pth", [clip["dim"], 8, 1]),
        "vlm": build_vlm(folder / "tiny-vlm"),
        "mt": build_translator(folder / "tiny-mt"),
    }


def _similarities(models: dict, inputs: Path) -> dict[str, float]:
    """Cosine similarity of the duplicate pair and of the closest distinct pair (tiny model)."""
    from curation.analyze.pixel_analyzer import decode
    from curation.score.clip_embedder import ClipEmbedder

    names = [Path(p).name for p in PHOTOS] + [COPY]
    thumbs = [decode((inputs / n).read_bytes(), 1, 512)[1] for n in names]
    out = ClipEmbedder(model=models["config"], weights=models["weights"])({"thumbnail": thumbs})
    x = np.array(out[schema.EMBEDDING].to_pylist())
    sims = x @ x.T
    dup = float(sims[1, -1])
    np.fill_diagonal(sims, -1)
    sims[1, -1] = sims[-1, 1] = -1
    return {"dup": dup, "other": float(sims.max())}


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest").to_pylist()


def test_translation_alone_needs_no_thumbnail(local_ray, inputs, models, tmp_path):
    """Translating sidecar captions reads no image: with `analyze.thumbnail_size=0` the
    model pass failed ('Field "thumbnail" does not exist'), and with thumbnails it decoded
    every 4K source again to make them."""
    from pipelines.cli import main

    out = tmp_path / "out"
    args = ["curate", str(inputs), "--output", str(out), *RELAXED,
            "--set", "score.enabled=false", "--set", "analyze.thumbnail_size=0",
            "--set", f"models.translation_model={models['mt']}",
            "--set", "caption.translation_max_new_tokens=5"]  # fmt: skip
    assert main(args) == 0
    rows = {Path(r[schema.SOURCE]).name: r for r in _manifest(out)}
    sunset = rows["sunset_by_Aitzol_Berasategi.jpg"]
    assert sunset[schema.CAPTION_EN] == "a sunset over the hills" and sunset[schema.CAPTION_ZH]


def test_every_model_stage_through_the_cli(local_ray, inputs, models, tmp_path, capsys):
    from pipelines.cli import main

    sims = _similarities(models, inputs)
    assert sims["dup"] > sims["other"] + 1e-4, sims  # the copy is the nearest neighbour
    threshold = (sims["dup"] + sims["other"]) / 2
    out = tmp_path / "out"
    args = [
        "curate",
        str(inputs),
        "--output",
        str(out),
        *RELAXED,
        "--set", "dedup.enabled=false",
        "--set", f"models.clip_model={models['config']}",
        "--set", f"models.clip_weights={models['weights']}",
        "--set", f"models.aesthetic_weights={models['aesthetic']}",
        "--set", f"models.safety_weights={models['safety']}",
        "--set", "models.nudenet=never",
        "--set", f"models.caption_model={models['vlm']}",
        "--set", f"models.translation_model={models['mt']}",
        "--set", "score.quality_size=64",
        "--set", "score.batch_size=2",
        "--set", "score.aesthetic_top_share=0.5",
        "--set", "score.max_nsfw=1.0",
        "--set", f"score.semantic_threshold={threshold}",
        "--set", "caption.max_new_tokens=5",
        "--set", "caption.translation_max_new_tokens=5",
    ]  # fmt: skip
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "semantic de-duplication (flat index" in stdout
    share = re.search(
        r"aesthetic_top_share=0.5: aesthetic cut (\S+) over 4 candidates in (\d+) blocks", stdout
    )
    assert share and int(share.group(2)) >= 2, stdout  # a job-wide cut over several blocks
    # The cut is in stats.json, so the report draws it on the aesthetic histogram (it said
    # 'no threshold configured').
    cut = json.loads((out / "stats.json").read_text())["share_cuts"]["aesthetic"]
    assert f"{cut:.4g}" == share.group(1)
    assert main(["report", str(out)]) == 0
    assert "aesthetic: score.aesthetic_top_share cut = " in (out / "report.html").read_text()
    rows = {Path(r[schema.SOURCE]).name: r for r in _manifest(out)}
    assert len(rows) == len(PHOTOS) + 2

    # Not a candidate: a cheap rule rejected it, so no model saw it.
    small = rows[SMALL]
    assert small[schema.REASON] == "too_small"
    assert small[schema.AESTHETIC] is None and small[schema.QUALITY] is None

    # The semantic duplicate: rejected, pointing at the original's key, scores kept.
    copy = rows[COPY]
    original = rows[Path(PHOTOS[1]).name]
    assert copy[schema.REASON] == "duplicate" and "semantic" in copy[schema.DETAIL]
    assert copy[schema.DUPLICATE_OF] == original[schema.SHA256][:32]
    assert copy[schema.AESTHETIC] is not None

    # Every candidate scored; the share rule kept the better half by aesthetic, job-wide
    # (the duplicate takes no place in the share).
    candidates = [r for n, r in rows.items() if n != SMALL]
    assert all(r[schema.AESTHETIC] is not None for r in candidates)
    assert all(r[schema.QUALITY] is not None and 0 <= r[schema.NSFW] <= 1 for r in candidates)
    assert all(r[schema.CHARACTER] in (True, False) for r in candidates)
    low = [r for r in candidates if r[schema.REASON] == "low_aesthetic"]
    passed = [r for r in candidates if r[schema.REASON] is None]
    assert len(low) == (len(candidates) - 1) // 2
    assert max(r[schema.AESTHETIC] for r in low) < min(r[schema.AESTHETIC] for r in passed)
    kept = [r for r in candidates if r[schema.STATUS] == schema.STATUS_KEPT]
    assert kept and all(r[schema.CAPTION_EN] and r[schema.CAPTION_ZH] for r in kept)
    assert all(r[schema.CAPTION_EN] is None for r in low)  # captions last, kept rows only
    for r in kept:
        want = "sidecar" if r[schema.SOURCE].endswith("sunset_by_Aitzol_Berasategi.jpg") else None
        assert r[schema.CAPTION_SOURCE] == (want or "tiny-vlm")

    # Captions in the shards, the sidecar one unchanged.
    members: dict[str, bytes] = {}
    for tar in (out / "shards").rglob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    for r in kept:
        assert members[f"{r[schema.KEY]}.txt"].decode() == r[schema.CAPTION_EN]
        assert members[f"{r[schema.KEY]}.zh.txt"].decode() == r[schema.CAPTION_ZH]
        assert json.loads(members[f"{r[schema.KEY]}.json"])[schema.AESTHETIC] is not None

    # One embedding per scored image, float16, the kept ones by key.
    emb = pq.read_table(out / "embeddings")
    assert emb.num_rows == len(candidates)
    assert emb.schema.field("embedding").type.value_type == "halffloat"
    assert emb.schema.field("embedding").type.list_size == models["dim"]
    assert {k for k in emb.column("key").to_pylist() if k} == {r[schema.KEY] for r in kept}
    stats = json.loads((out / "stats.json").read_text())
    assert "low_aesthetic" in stats["rules"] and stats["manifest_version"] == 5
    assert "embedding at cosine >=" in stats["rules"]["duplicate"]["rule"]  # the semantic one


def test_missing_weights_stop_the_job_before_any_work(local_ray, inputs, tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "out"
    missing = tmp_path / "nowhere" / "aesthetic.pth"
    code = main(
        [
            "curate",
            str(inputs),
            "--output",
            str(out),
            "--set",
            f"models.clip_weights={tmp_path / 'clip.bin'}",
            "--set",
            f"models.aesthetic_weights={missing}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"models.aesthetic_weights: {missing} not found" in err
    assert "improved-aesthetic-predictor" in err and "nothing was processed" in err
    assert "models.clip_weights" in err
    assert not out.exists()


def test_a_model_the_early_actor_cannot_load_is_one_error_line(local_ray, models, tmp_path):
    """A small job's early actor failing to load its model left the error of its loading
    unread: Ray printed it as an 'Unhandled error' with the whole traceback (torch's advice
    to load with weights_only=False included), besides the job's line."""
    from pipelines.config import load_config
    from pipelines.curate import JobFailed
    from pipelines.model_pass import WarmWorker

    garbage = tmp_path / "clip.pt"
    garbage.write_bytes(b"not a checkpoint")
    cfg = load_config(
        overrides=[
            f"models.clip_model={models['config']}",
            f"models.clip_weights={garbage}",
            "models.nudenet=never",
        ]
    )
    warm = WarmWorker.start(cfg)
    try:
        with pytest.raises(Exception, match="ModelFileError") as e:
            warm.loaded()
    finally:
        warm.stop()
    msg = str(JobFailed("models", 7, str(tmp_path / "log"), e.value))
    assert f"could not load a model: models.clip_weights: {garbage} does not load" in msg
    assert "\n" not in msg and "weights_only" not in msg


def test_models_turned_off_and_on_keep_the_analysis_and_the_scores(
    local_ray, inputs, tmp_path, capsys
):
    """A quick look with `score.enabled=false` changed the thumbnail size the analysis was
    keyed on (to 0): that run and the next with the models analysed every image afresh, and
    the scores kept from the first were deleted and computed again."""
    from pipelines.cli import main

    args = ["curate", str(inputs), "--output", str(tmp_path / "out"), *RELAXED,
            "--set", "dedup.enabled=false", "--set", "models.nudenet=never"]  # fmt: skip
    off = [*args, "--set", "score.enabled=false"]
    assert main(off) == 0  # no thumbnails made
    assert main(args) == 0  # the model pass makes them from the files
    said = capsys.readouterr().out
    assert "analysing afresh" not in said and "analysed 0 inputs in this run" in said
    scored = {r[schema.SOURCE]: r[schema.QUALITY] for r in _manifest(tmp_path / "out")}
    assert sum(q is not None for q in scored.values()) >= len(PHOTOS)
    assert main(off) == 0 and main(args) == 0
    said = capsys.readouterr().out
    assert "analysing afresh" not in said and "analysed 0 inputs in this run" in said
    assert re.search(r"scores of (\d+) of \1 candidates taken from an earlier run", said), said
    assert {r[schema.SOURCE]: r[schema.QUALITY] for r in _manifest(tmp_path / "out")} == scored
    # Thumbnails of another size are another analysis: the models would see the old ones.
    assert main([*args, "--set", "analyze.thumbnail_size=640"]) == 0
    assert "analysing afresh" in capsys.readouterr().out


def test_offline_defaults_score_real_photographs(local_ray, inputs, tmp_path, capsys, monkeypatch):
    """A small job scores and writes its shards on the actor it started with the job
    (`WarmWorker`); a job too large for that scores on a Ray Data actor pool and writes in a
    task, and the scores and shards are the same."""
    import pipelines.curate
    from curation.score.nudenet_detector import nudenet_available
    from pipelines import model_pass
    from pipelines.cli import main

    on_actor: list[tuple[bool, str]] = []  # (actor running, what it ran) per routed step
    runs = model_pass.WarmWorker.runs

    def spy_runs(self, fn=None):
        on_actor.append((self.actor is not None, type(fn).__name__ if fn else "scorers"))
        return runs(self, fn)

    monkeypatch.setattr(model_pass.WarmWorker, "runs", spy_runs)
    out, pooled = tmp_path / "out", tmp_path / "pooled"
    # (pHash de-duplication off: its distributed passes are another test's subject)
    args = ["curate", str(inputs), *RELAXED, "--set", "dedup.enabled=false"]
    assert main([*args, "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert on_actor == [(True, "scorers"), (True, "ShardWriter")]  # both on the early actor
    monkeypatch.setattr(pipelines.curate, "WARM_MAX_INPUTS", 0)
    assert main([*args, "--output", str(pooled)]) == 0
    assert len(on_actor) == 2  # no early actor: an actor pool scored, a task wrote
    model_cols = (schema.QUALITY, schema.NSFW, schema.CHARACTER)
    by_name = {Path(r[schema.SOURCE]).name: [r[c] for c in model_cols] for r in _manifest(out)}
    assert by_name == {
        Path(r[schema.SOURCE]).name: [r[c] for c in model_cols] for r in _manifest(pooled)
    }
    shards = {p.relative_to(out): p.read_bytes() for p in (out / "shards").rglob("*.tar")}
    assert shards and shards == {
        p.relative_to(pooled): p.read_bytes() for p in (pooled / "shards").rglob("*.tar")
    }
    rows = _manifest(out)
    candidates = [r for r in rows if r[schema.REASON] != "too_small"]
    assert len(candidates) == len(PHOTOS) + 1
    # piqe at 512 px on every candidate (0-100, lower is better), no rejection by default.
    assert all(0 <= r[schema.QUALITY] <= 100 for r in candidates)
    assert not any(r[schema.REASON] in ("low_quality", "unsafe") for r in rows)
    assert all(r[schema.AESTHETIC] is None for r in rows)  # no embedding model: never faked
    assert "no embedding model" in stdout
    if nudenet_available():
        # Debian's landscapes: nobody in them, nothing unsafe.
        assert all(r[schema.CHARACTER] is False and r[schema.NSFW] == 0.0 for r in candidates)
    else:
        assert all(r[schema.CHARACTER] is None for r in rows)
        assert "nudenet is not installed" in stdout


def test_models_command_lists_files_and_their_presence(tmp_path, capsys):
    from pipelines.cli import main

    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"x")
    missing = tmp_path / "aes.pth"
    code = main(
        [
            "models",
            "--set",
            f"models.clip_weights={weights}",
            "--set",
            f"models.aesthetic_weights={missing}",
            "--set",
            "score.quality_metric=musiq",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "present  models.clip_weights" in out and str(weights) in out
    assert f"MISSING  models.aesthetic_weights   {missing}" in out
    assert "MISSING  models.pyiqa_weights" in out and "musiq" in out
    assert main(["models"]) == 0  # the defaults need no file
    assert "pyiqa piqe" in capsys.readouterr().out
    assert main(["models", "--set", "score.quality_metric=qalign"]) == 0  # no file to give
    assert "(pyiqa qalign: from the Hugging Face cache, HF_HOME)" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "pyiqa piqe" in capsys.readouterr().out
    # as curate would: an unknown metric is a configuration error, not a missing download
    assert main(["models", "--set", "score.quality_metric=bogus_metric"]) == 2
    assert "unknown pyiqa metric 'bogus_metric'" in capsys.readouterr().err
    # a folder without config.json is named by the file it lacks
    folder = tmp_path / "translator"
    folder.mkdir()
    assert main(["models", "--set", f"models.translation_model={folder}"]) == 1
    lacking = folder / "config.json"
    assert f"MISSING  models.translation_model   {lacking}" in capsys.readouterr().out
    # An architecture open_clip does not have was 'present'; curate failed after the analysis.
    bogus = ["models", "--set", f"models.clip_weights={weights}", "--set",
             "models.clip_model=ViT-Bogus-99", "--set", "score.quality_metric="]  # fmt: skip
    assert main(bogus) == 1
    assert "MISSING  models.clip_model" in capsys.readouterr().out
    assert main([*bogus[:-4], "--set", "models.clip_model=ViT-L-14"]) == 0
    assert "present  models.clip_model" in capsys.readouterr().out
    # nudenet is listed (and its file required) only where the job would run it
    weights_set = ["--set", "models.nudenet=always", "--set", f"models.nudenet_weights={missing}"]
    assert main(["models", *weights_set, "--set", "score.person_model=none", "--set",
                 "score.safety_model=none"]) == 0  # fmt: skip
    assert "  models.nudenet" not in capsys.readouterr().out  # no line of its own


def test_models_command_says_the_defaults_need_nothing_without_nudenet(capsys, monkeypatch):
    """Without the opt-in nudenet extra (the default install) `native4k models` exited 1 with
    'MISSING models.nudenet', while curate runs the same configuration (a note, no error)."""
    from pipelines import model_pass
    from pipelines.cli import main

    monkeypatch.setattr(model_pass, "nudenet_available", lambda: False)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "absent   models.nudenet" in out and "optional; to provide it: install" in out
    assert "MISSING" not in out
    assert main(["models", "--set", "models.nudenet=always"]) == 1
    assert "MISSING  models.nudenet" in capsys.readouterr().out


def test_a_folder_named_for_a_weight_file_is_called_a_folder(tmp_path):
    """`models.clip_weights` naming the downloaded model's folder was reported 'not found',
    though the user can see it there."""
    from pipelines.config import ConfigError, load_config
    from pipelines.model_pass import check_models

    cfg = load_config(overrides=[f"models.clip_weights={tmp_path}", "models.nudenet=never"])
    with pytest.raises(ConfigError, match=rf"models\.clip_weights: {tmp_path} is a folder, not a"):
        check_models(cfg)


def test_semantic_duplicates_name_their_own_setting_in_the_summary():
    """A job whose duplicates were mostly semantic ones ended with "'duplicate' rejected ...:
    the rule is pHash within 6 bits ...; change it with --set dedup.max_hamming", a setting
    that moves none of them."""
    from pipelines.config import load_config
    from pipelines.curate import duplicate_rule, outcome_lines, rule_summary

    cfg = load_config(overrides=["score.semantic_threshold=0.9"])
    rule = duplicate_rule(cfg, semantic=8, duplicates=9)
    lines = outcome_lines(
        {"total": 10, "kept": 1, "reasons": {"duplicate": 9}, "rules": {"duplicate": rule}}
    )
    assert "embedding at cosine >= 0.9 to a better copy" in lines[-1]
    assert lines[-1].endswith("change it with --set score.semantic_threshold=VALUE")
    mostly_phash = duplicate_rule(cfg, semantic=1, duplicates=9)
    assert mostly_phash["setting"].startswith("dedup.max_hamming")
    # With pHash matching off only exact copies go, which no setting moves: no '--set' advice
    # (it named dedup.max_hamming, which changes nothing then).
    off = load_config(overrides=["dedup.enabled=false"])
    rule = rule_summary(off)["duplicate"]
    lines = outcome_lines(
        {"total": 3, "kept": 1, "reasons": {"duplicate": 2}, "rules": {"duplicate": rule}}
    )
    assert lines == ["'duplicate' rejected 2 of 3 inputs (67%): the rule is the same bytes as a "
                     "kept copy (near-duplicate matching is off)"]  # fmt: skip
    assert duplicate_rule(off, semantic=1, duplicates=2)["setting"] == "score.semantic_threshold"


def test_home_relative_model_paths_mean_the_same_file_everywhere(tmp_path, monkeypatch):
    """`models` said a `~/` file was present while the loader looked for a literal `~`."""
    from pipelines.config import load_config
    from pipelines.model_pass import configured_models

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clip.pt").write_bytes(b"x")
    cfg = load_config(overrides=["models.clip_weights=~/clip.pt", "models.caption_model=~/cap"])
    assert cfg.models.clip_weights == str(tmp_path / "clip.pt")
    assert cfg.models.caption_model == str(tmp_path / "cap")
    entry = next(e for e in configured_models(cfg) if e.setting == "models.clip_weights")
    assert entry.present and entry.path == str(tmp_path / "clip.pt")


def test_relative_model_paths_are_made_absolute_where_the_job_starts(tmp_path, monkeypatch):
    """A relative model path was checked in the driver's folder but opened in each Ray
    worker's own (another node's, with --ray-address); config.yaml did not say where."""
    from pipelines.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        overrides=[
            "models.clip_weights=w/clip.pt",
            "models.caption_model=cap",
            "models.clip_model=arch.json",
        ]
    )
    assert cfg.models.clip_weights == str(tmp_path / "w" / "clip.pt")
    assert cfg.models.caption_model == str(tmp_path / "cap")
    assert cfg.models.clip_model == str(tmp_path / "arch.json")
    assert load_config(overrides=["models.clip_model=ViT-B-32"]).models.clip_model == "ViT-B-32"
    assert load_config().models.clip_weights == ""  # unset stays unset


def test_a_home_relative_clip_model_config_is_found(tmp_path, monkeypatch):
    """`models.clip_model=~/arch.json` was reported missing (and handed to open_clip as a
    model name) while the same `~` worked for every other model path."""
    from pipelines.config import load_config
    from pipelines.model_pass import configured_models

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "arch.json").write_text("{}")
    (tmp_path / "clip.pt").write_bytes(b"x")
    cfg = load_config(overrides=["models.clip_model=~/arch.json", "models.clip_weights=~/clip.pt"])
    assert cfg.models.clip_model == str(tmp_path / "arch.json")
    entry = next(e for e in configured_models(cfg) if e.setting == "models.clip_model")
    assert entry.present
    assert load_config(overrides=["models.clip_model=ViT-B-32"]).models.clip_model == "ViT-B-32"


def test_jpeg_thumbnails_wait_for_the_thresholds_and_a_retune_makes_them(
    local_ray, inputs, tmp_path, capsys
):
    """Pass 1 makes no JPEG thumbnail for a rejected photograph; a rerun that re-tunes the
    thresholds analyses the newly passing files again and scores them as a fresh job does."""
    from pipelines.cli import main

    out, fresh = tmp_path / "out", tmp_path / "fresh"
    no_dedup = ["--set", "dedup.enabled=false"]
    assert main(["curate", str(inputs), "--output", str(out), *no_dedup]) == 0
    first = {r[schema.SOURCE]: r for r in _manifest(out)}
    from pipelines.model_pass import THUMBNAILS

    thumbs = out / "_work" / THUMBNAILS
    made = set()
    if thumbs.exists():
        made = set(pq.read_table(thumbs).column(schema.SOURCE).to_pylist())
    pixel_rejected = {
        s for s, r in first.items() if r[schema.REASON] in ("flat", "low_entropy", "upscaled")
    }
    assert pixel_rejected, "the paper's rules should reject some of Debian's skies"
    assert not made & pixel_rejected  # no thumbnail for them
    assert made == {s for s, r in first.items() if r[schema.STATUS] == "kept"}
    capsys.readouterr()

    assert main(["curate", str(inputs), "--output", str(out), *RELAXED, *no_dedup]) == 0
    # Their analyses had stopped at the rule they failed: the rerun analyses them again.
    assert f"analysed {inputs_text(len(pixel_rejected))} in this run" in capsys.readouterr().out
    assert main(["curate", str(inputs), "--output", str(fresh), *RELAXED, *no_dedup]) == 0
    retuned = {r[schema.SOURCE]: r for r in _manifest(out)}
    direct = {r[schema.SOURCE].replace(str(fresh), str(out)): r for r in _manifest(fresh)}
    for source in pixel_rejected:
        assert retuned[source][schema.STATUS] == "kept"
        assert retuned[source][schema.QUALITY] == direct[source][schema.QUALITY] is not None
    assert main(["verify", str(out)]) == 0


def test_a_rerun_with_the_same_models_takes_their_kept_scores_and_captions(
    local_ray, inputs, models, tmp_path, capsys, monkeypatch
):
    """A rerun that changes only a threshold scores nothing again: the scores of the first run
    (kept under `_work/scores`, here by an actor pool) decide, as they would have; a changed
    model file is scored again (here on the job's early actor)."""
    import pipelines.curate
    from curation.score.random_models import build_aesthetic
    from pipelines.cli import main

    head = tmp_path / "aesthetic.pth"
    head.write_bytes(Path(models["aesthetic"]).read_bytes())
    out = tmp_path / "out"
    args = [
        "curate", str(inputs), "--output", str(out), *RELAXED,
        "--set", "dedup.enabled=false",
        "--set", f"models.clip_model={models['config']}",
        "--set", f"models.clip_weights={models['weights']}",
        "--set", f"models.aesthetic_weights={head}",
        "--set", "score.semantic_dedup=false",
        "--set", "score.quality_size=64",
        "--set", f"models.caption_model={models['vlm']}",
        "--set", f"models.translation_model={models['mt']}",
        "--set", "caption.max_new_tokens=5",
        "--set", "caption.translation_max_new_tokens=5",
    ]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(pipelines.curate, "WARM_MAX_INPUTS", 0)  # no early actor: a pool scores
        assert main(args) == 0
    first = {r[schema.SOURCE]: r for r in _manifest(out)}
    scored = {s: r for s, r in first.items() if r[schema.AESTHETIC] is not None}
    assert len(scored) == len(PHOTOS) + 1
    assert all("embed" in json.loads(r[schema.STAGE_SECONDS]) for r in scored.values())
    assert "taken from an earlier run" not in capsys.readouterr().out
    captions = (schema.CAPTION_EN, schema.CAPTION_ZH, schema.CAPTION_SOURCE)
    kept = {s: [r[c] for c in captions] for s, r in scored.items() if r[schema.STATUS] == "kept"}
    assert kept and all(c[0] and c[1] for c in kept.values())

    cut = float(np.median([r[schema.AESTHETIC] for r in scored.values()]))
    assert main([*args, "--set", f"score.min_aesthetic={cut}"]) == 0
    stdout = capsys.readouterr().out
    assert f"scores of {len(scored)} of {len(scored)} candidates taken from an earlier run" in (
        stdout
    )
    second = {r[schema.SOURCE]: r for r in _manifest(out)}
    still = [s for s in kept if second[s][schema.STATUS] == "kept"]
    assert still and f"captions of {len(still)} of {len(still)} kept images taken" in stdout
    cols = (schema.AESTHETIC, schema.QUALITY, schema.NSFW, schema.CHARACTER)
    for source, row in scored.items():
        again = second[source]
        assert [again[c] for c in cols] == [row[c] for c in cols]
        ran = json.loads(again[schema.STAGE_SECONDS])
        assert "embed" not in ran and "caption" not in ran  # no model ran
        low = row[schema.AESTHETIC] < cut
        assert (again[schema.REASON] == "low_aesthetic") == low
        if not low:
            assert [again[c] for c in captions] == kept[source]
    emb = pq.read_table(out / "embeddings")
    assert emb.num_rows == len(scored)  # the kept embeddings still reach OUT/embeddings
    assert main(["verify", str(out)]) == 0

    from curation.score.nudenet_detector import nudenet_available

    folders = sorted(p.name for p in (out / "_work" / "scores").iterdir())
    assert [f.split("-")[0] for f in folders] == sorted(
        {"embed", "quality"} | ({"nudenet"} if nudenet_available() else set()))
    build_aesthetic(head, models["dim"], seed=7)  # another aesthetic head, same path
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "candidates taken from an earlier run" not in stdout  # CLIP scored again...
    # ...but only CLIP: the quality scorer's results are taken
    partly = rf"results of some scorers were taken .*\(quality {len(scored)}\b"
    assert re.search(partly, stdout), stdout
    assert f"captions of {len(kept)} of {len(kept)} kept images taken" in stdout  # ...not these
    third = {r[schema.SOURCE]: r for r in _manifest(out)}
    assert [third[s][schema.AESTHETIC] for s in scored] != [
        r[schema.AESTHETIC] for r in scored.values()
    ]
    assert [third[s][schema.QUALITY] for s in scored] == [
        r[schema.QUALITY] for r in scored.values()]
    for source in scored:
        ran = json.loads(third[source][schema.STAGE_SECONDS])
        assert "embed" in ran and "quality" not in ran
    after = sorted(p.name for p in (out / "_work" / "scores").iterdir())
    assert len(after) == len(folders)  # the old CLIP scores are gone
    assert [f for f in after if f.startswith("embed-")] != [
        f for f in folders if f.startswith("embed-")]
    assert [f for f in after if not f.startswith("embed-")] == [
        f for f in folders if not f.startswith("embed-")]
    assert len(list((out / "_work" / "captions").iterdir())) == 1


def test_kept_results_count_only_for_the_rows_they_were_computed_from():
    """`split_cached`: one row per source; kept results only where the row's match columns
    (sha256, and here a caption it came with) are what they were; otherwise its own values."""
    from hypothesis import given
    from hypothesis import strategies as st

    from curation.score.chain import skip_column
    from pipelines.model_pass import KEPT, MATCH, Kept, split_cached

    spec = Kept("unused", (schema.AESTHETIC, schema.CAPTION_ZH, schema.EMBEDDING),
                (schema.SHA256, schema.CAPTION_EN))
    side = st.tuples(st.sampled_from([None, "h1", "h2"]), st.sampled_from([None, "a", "b"]),
                     st.floats(0, 10))  # fmt: skip
    rows = st.lists(st.tuples(st.sampled_from("abc"), side), min_size=1, max_size=8)
    own = st.fixed_dictionaries({src: st.tuples(st.sampled_from(["h1", "h2"]),
                                                st.sampled_from([None, "a", "b"]))
                                 for src in "abc"})  # fmt: skip

    @given(rows, own)
    def check(rs, mine):
        # a source has one sha256 and input caption in a job; side files may hold several
        t = pa.table({
            schema.SOURCE: [src for src, _ in rs],
            schema.SHA256: [mine[src][0] for src, _ in rs],
            schema.CAPTION_EN: pa.array([mine[src][1] for src, _ in rs], pa.string()),
            schema.CAPTION_ZH: pa.array(["own"] * len(rs), pa.string()),
            MATCH + schema.SHA256: pa.array([k[0] for _, k in rs], pa.string()),
            MATCH + schema.CAPTION_EN: pa.array([k[1] for _, k in rs], pa.string()),
            KEPT + schema.AESTHETIC: pa.array([k[2] for _, k in rs], pa.float32()),
            # as a multi-partition join of Ray Data gives them: large types
            KEPT + schema.CAPTION_ZH: pa.array([f"kept {k[2]}" for _, k in rs], pa.large_string()),
            KEPT + schema.EMBEDDING: pa.array([[k[2]] for _, k in rs], pa.large_list(pa.float32())),
        })  # fmt: skip
        out = split_cached(t, spec, skip_column(0)).to_pylist()
        assert sorted(r[schema.SOURCE] for r in out) == sorted({src for src, _ in rs})
        for r in out:
            src = r[schema.SOURCE]
            matches = [k for s, k in rs if s == src and k[0] == mine[src][0]
                       and k[1] == mine[src][1]]  # fmt: skip
            assert r[skip_column(0)] == bool(matches)
            assert r[schema.CAPTION_EN] == mine[src][1]  # a match column is never replaced
            if matches:
                assert r[schema.AESTHETIC] == pytest.approx(matches[0][2], rel=1e-6)
                assert r[schema.CAPTION_ZH] == f"kept {matches[0][2]}"
                assert r[schema.EMBEDDING] == [pytest.approx(matches[0][2], rel=1e-6)]
            else:
                assert r[schema.AESTHETIC] is None and r[schema.CAPTION_ZH] == "own"
                assert r[schema.EMBEDDING] is None
            assert not [c for c in r if c.startswith((MATCH, KEPT))]

    check()


def test_a_duplicate_takes_the_place_of_a_root_a_model_rule_rejects(local_ray, tmp_path, capsys):
    """pHash de-duplication runs before the models, so it kept the larger copy (a noisy
    re-encode) for the pair; piqe then rejected it, and the clean copy, never scored, was lost
    as a `duplicate` of a sample that is not in the shards. The near duplicates of a root a
    model rule rejects are judged again without it."""
    from pipelines.cli import main
    from pipelines.samples import encode, render

    folder = tmp_path / "in"
    folder.mkdir()
    clean = render(512, 320, 91)
    noise = np.random.default_rng(0).normal(0, 25, clean.shape)
    noisy = np.clip(clean.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    files = {
        "clean.jpg": encode(clean, "JPEG", quality=93),
        "noisy.jpg": encode(noisy, "JPEG", quality=97),  # larger: pass 2 prefers it
        "other.jpg": encode(render(448, 320, 7), "JPEG", quality=93),
    }
    files["noisy_copy.jpg"] = files["noisy.jpg"]  # an exact copy stays the root's copy
    for name, data in files.items():
        (folder / name).write_bytes(data)
    small = ["--set", "probe.min_pixels=65536",
             "--set", "bucket.tier_scales=[1.0,0.5,0.25,0.125,0.0625,0.05]"]  # fmt: skip

    def job(out: Path, *more: str) -> dict[str, dict]:
        assert main(["curate", str(folder), "--output", str(out), *small, *more]) == 0
        return {Path(r[schema.SOURCE]).name: r for r in _manifest(out)}

    plain = job(tmp_path / "plain")  # no quality rule: the noisy copy stands for the pair
    assert {n for n, r in plain.items() if r[schema.STATUS] == "kept"} == {"noisy.jpg", "other.jpg"}
    assert plain["clean.jpg"][schema.DETAIL].startswith("near duplicate of ")
    capsys.readouterr()
    rows = job(tmp_path / "ruled", "--set", "score.max_quality=30")
    out = capsys.readouterr().out
    assert rows["noisy.jpg"][schema.REASON] == "low_quality"
    assert rows["noisy.jpg"][schema.QUALITY] > 30 >= rows["clean.jpg"][schema.QUALITY]
    assert rows["clean.jpg"][schema.STATUS] == "kept"
    assert rows["other.jpg"][schema.STATUS] == "kept"
    assert rows["noisy_copy.jpg"][schema.DETAIL].startswith("exact copy of ")
    kept = {r[schema.KEY] for r in rows.values() if r[schema.STATUS] == "kept"}
    near = [r for r in rows.values() if (r[schema.DETAIL] or "").startswith("near duplicate")]
    assert all(r[schema.DUPLICATE_OF] in kept for r in near)
    assert "a model rule rejected 1 image that near duplicates stood for" in out
    assert "2 kept" in out
    # A share over the rounds: the summary printed the first round's cut (over 1 candidate,
    # keeping none: an infinite cut) while the job applied the last round's (over 2); and a
    # share that keeps nothing wrote `Infinity` into stats.json, which is no JSON.
    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in stats.json"))

    capsys.readouterr()
    rows = job(tmp_path / "share", "--set", "score.max_quality=30",
               "--set", "score.quality_top_share=0.5")  # fmt: skip
    out = capsys.readouterr().out
    cut = strict((tmp_path / "share" / "stats.json").read_text())["share_cuts"]["quality"]
    note = re.search(r"quality_top_share=0.5: quality cut (\S+) over (\d+) candidates", out)
    assert note and note.group(2) == "2" and float(note.group(1)) == pytest.approx(cut, rel=1e-3)
    capsys.readouterr()
    job(tmp_path / "none", "--set", "score.quality_top_share=0.01")  # keeps no candidate
    assert strict((tmp_path / "none" / "stats.json").read_text())["share_cuts"] == {
        "quality": None}


def test_a_changed_input_is_scored_from_the_picture_of_its_present_bytes(local_ray, tmp_path):
    """Thumbnails were matched by source alone: an input whose bytes changed between runs
    had one of each, and whichever the join met first was scored, perhaps the old picture
    (under the new bytes' sha256, in the kept scores too)."""
    import ray

    from pipelines.model_pass import THUMBNAILS, join_thumbnails

    work = tmp_path / "_work"
    (work / THUMBNAILS).mkdir(parents=True)
    (work / "thumbnails").mkdir()  # by source alone (before 2026-12-07): removed
    (work / "thumbnails" / "part-old.parquet").write_bytes(b"PAR1")
    for name, sha, thumb in (("a", "new", b"new picture"), ("b", "old", b"old picture"),
                             ("c", "x", b"another input")):  # fmt: skip
        pq.write_table(pa.table({schema.SOURCE: ["/in/p.jpg" if name != "c" else "/in/q.jpg"],
                                 schema.SHA256: [sha], schema.THUMBNAIL: [thumb]}),
                       work / THUMBNAILS / f"part-{name}.parquet")  # fmt: skip
    for sha, want in (("new", b"new picture"), ("old", b"old picture"), ("gone", None)):
        slim = ray.data.from_arrow(pa.table({schema.SOURCE: ["/in/p.jpg"], schema.SHA256: [sha]}))
        (row,) = join_thumbnails(ray.data, slim, str(work), 1).take_all()
        assert row[schema.THUMBNAIL] == want, (sha, row)
    assert not (work / "thumbnails").exists()
