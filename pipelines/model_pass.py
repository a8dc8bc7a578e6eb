"""The model pass of the curation job: scores, model rules, semantic duplicates, captions.

It runs between exact/near de-duplication and the shard pass, on the candidates only (rows
that no cheap rule rejected; `score.score_all` also scores every decodable image for audits,
without changing earlier verdicts). Models never decode the 4K file: they read the small RGB
thumbnails pass 1 made from its one decode (`_work/thumbnails-v2/part-*.parquet`, written by
`ThumbnailSink`).

Steps, each a barrier (materialised) so that one actor pool holds the cluster at a time:

1. join the candidates with their thumbnails;
2. actor pools (`map_batches` with a class: one model load per actor, `num_gpus` fractions
   and batch sizes by configuration, CPU when `num_gpus` is 0): `ClipEmbedder` (embedding,
   aesthetic, safety head, zero-shot person), `PyiqaScorer` (quality), `NudeNetDetector`;
3. absolute thresholds, then semantic duplicates over the embeddings (faiss, job-wide: a
   duplicate takes no place in a share), then share thresholds from a global quantile
   sketch over the candidates left (`curation/score/quantiles.py`: off by at most
   1/`score.quantile_points` of them in rank, exact when every block is smaller); a
   semantic duplicate whose kept copy a share cut, and that passes the cuts, takes its place;
4. captions and translations of the rows still kept (last);
5. embeddings to `OUT/embeddings/part-*.parquet` (atomic files, moved into place), and the
   results joined back onto every row, so scores reach the manifest also for rows that a
   model rule rejected.

Steps 2 and 4 keep each batch's results in side files (`ResultSink`: `_work/scores/`, one
folder per scorer and `fingerprint` of its model and settings, and `_work/captions/`, one per
fingerprint of the captioner and translator); a rerun takes a step's results for rows whose
bytes (and input captions) are unchanged when the step's fingerprint is (`split_cached`), and
runs each model only on the rows it has no results for.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema
from curation.analyze.pixel_analyzer import DECODED_MARK
from curation.analyze.thumbnail_maker import ThumbnailMaker
from curation.base import Stage, column, pending_mask, set_columns, to_table
from curation.caption.captioner import VlmCaptioner, input_caption_source
from curation.caption.translator import CaptionTranslator
from curation.dedup.near_dup import HASH_COLUMNS, captioned, colour, rank_key
from curation.dedup.semantic_dedup import SemanticDedup
from curation.io.atomic import atomic_write, join, part_name
from curation.score.chain import SKIP_PREFIX, ModelChain, WarmActor, skip_column
from curation.score.clip_embedder import ClipEmbedder
from curation.score.nudenet_detector import NudeNetDetector, nudenet_available
from curation.score.pyiqa_scorer import (
    WEIGHTLESS_METRICS,
    PyiqaScorer,
    check_no_reference,
    lower_better,
    takes_weight_file,
)
from curation.score.quantiles import share_cut, sketch
from curation.shard.shard_writer import sample_key
from curation.threshold_filter import Rule, ThresholdFilter
from pipelines import grouping
from pipelines.config import ConfigError, JobConfig
from pipelines.stats import count_text

MODEL_COLUMNS = (
    schema.AESTHETIC,
    schema.QUALITY,
    schema.NSFW,
    schema.PERSON_SCORE,
    schema.CHARACTER,
)
"""Score columns the model pass adds to every row it scores."""

RESULT_COLUMNS = (
    *MODEL_COLUMNS,
    schema.STATUS,
    schema.REASON,
    schema.DETAIL,
    schema.DUPLICATE_OF,
    schema.CAPTION_EN,
    schema.CAPTION_ZH,
    schema.CAPTION_SOURCE,
    schema.STAGE_SECONDS,
)
"""What the model pass joins back onto the job's rows (prefixed while joined)."""

SLIM_COLUMNS = (
    schema.SOURCE,
    schema.SHA256,
    schema.WIDTH,
    schema.HEIGHT,
    schema.SHARPNESS,
    schema.NATIVE_SCORE,
    schema.STATUS,
    schema.REASON,
    schema.DETAIL,
    schema.DUPLICATE_OF,
    schema.CAPTION_EN,
    schema.CAPTION_ZH,
    schema.TAR_OFFSET,
    schema.SIZE_BYTES,
    schema.ORIENTATION,
    schema.MODE,
)
"""The columns of a row the model pass needs (no bytes; thumbnails join them, or are made
again from the source for a row that has none)."""

PREFIX = "model__"
SCORED = "model__scored"
THUMBNAILS = "thumbnails-v2"
"""Pass 1's thumbnails by (source, sha256). Before 2026-12-07 `thumbnails/` held them by source
alone, so an input whose bytes changed between runs could be scored from its old picture; a
rerun of such an output makes its candidates' thumbnails again (the old folder is removed)."""
"""Folder under `_work` of the thumbnail side files."""
SCORES = "scores"
"""Folder under `_work` of the score side files: one sub-folder per scorer, named by the
scorer and the fingerprint of its model and settings (`score_kept`)."""
CAPTIONS = "captions"
"""Folder under `_work` of the caption side files, one sub-folder per captioner fingerprint."""
MATCH = "match__"
"""Prefix, in a side file, of what a row must still be to take its results (`Kept`)."""
KEPT = "kept__"
"""Prefix, in a side file, of the results it kept."""
SCORE_CACHE_VERSION = 2
"""Part of every fingerprint (`fingerprint`): raise it when a model step's code changes its
results."""
_MODEL_PACKAGES = ("torch", "open_clip_torch", "pyiqa", "nudenet", "onnxruntime", "transformers")


# --- which models, and whether their files are here -----------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One configured model: what it is for, where its files are, whether they are there."""

    setting: str
    path: str
    purpose: str
    present: bool
    how: str
    """How to provide the file when it is missing."""
    optional: bool = False
    """The job runs without it (nudenet 'auto' when not installed): no error, a note."""


def _exists(path: str, folder: bool = False) -> bool:
    p = Path(path)  # `~` was expanded when the configuration loaded
    return (p / "config.json").is_file() if folder else p.is_file()


def configured_models(cfg: JobConfig) -> list[ModelEntry]:
    """Every model the configuration would run, with its files' presence."""
    m, s = cfg.models, cfg.score
    out: list[ModelEntry] = []
    if s.enabled and m.clip_weights:
        if m.clip_model.endswith(".json"):
            out.append(
                ModelEntry(
                    setting="models.clip_model",
                    path=m.clip_model,
                    purpose="open_clip architecture config (JSON)",
                    present=_exists(m.clip_model),
                    how="write the open_clip model config JSON there, or name a built-in model",
                )
            )
        elif (builtin := _open_clip_architectures()) is not None:
            out.append(
                ModelEntry(
                    setting="models.clip_model",
                    path=m.clip_model,
                    purpose="open_clip built-in architecture",
                    present=m.clip_model in builtin,
                    how="name one of open_clip's architectures (e.g. ViT-L-14; its "
                    "model_configs folder lists them) or an architecture config JSON",
                )
            )
        out.append(
            ModelEntry(
                setting="models.clip_weights",
                path=m.clip_weights,
                purpose=f"open_clip {Path(m.clip_model).stem} image embedding",
                present=_exists(m.clip_weights),
                how=(
                    "download the open_clip checkpoint for that architecture (e.g. "
                    "open_clip_pytorch_model.bin of laion/CLIP-ViT-L-14-laion2B-s32B-b82K) on a "
                    "machine with internet access and copy it there"
                ),
            )
        )
    for setting, path, purpose, how in (
        (
            "models.aesthetic_weights",
            m.aesthetic_weights,
            "LAION aesthetic MLP (aesthetic)",
            "download sac+logos+ava1-l14-linearMSE.pth from "
            "github.com/christophschuhmann/improved-aesthetic-predictor and copy it there",
        ),
        (
            "models.safety_weights",
            m.safety_weights,
            "safety head over the embedding (nsfw)",
            "save a torch state dict of the head (Linear layers, sigmoid output) there",
        ),
    ):
        if s.enabled and path:
            out.append(
                ModelEntry(
                    setting=setting, path=path, purpose=purpose, present=_exists(path), how=how
                )
            )
    if s.enabled and s.quality_metric:
        needs = takes_weight_file(s.quality_metric)
        out.append(
            ModelEntry(
                setting="models.pyiqa_weights" if needs else "score.quality_metric",
                path=(m.pyiqa_weights or "(not set)")
                if needs
                else f"(pyiqa {s.quality_metric}: no weights)"
                if s.quality_metric in WEIGHTLESS_METRICS
                else f"(pyiqa {s.quality_metric}: from the Hugging Face cache, HF_HOME)",
                purpose=f"pyiqa {s.quality_metric} (quality at {s.quality_size} px)",
                present=(not needs) or (bool(m.pyiqa_weights) and _exists(m.pyiqa_weights)),
                how=(
                    f"download the weights of pyiqa's {s.quality_metric!r} (the URL is in "
                    "pyiqa.default_model_configs / pyiqa's model card) and set "
                    "models.pyiqa_weights to the file"
                ),
            )
        )
    plan = plan_models(cfg)
    installed = nudenet_available()
    # Listed when the job runs it, or would if installed: not when the person and safety
    # models are none or CLIP's (a missing file of a model never run stopped the job).
    if (plan.nudenet_person or plan.nudenet_safety) or (
        s.enabled and m.nudenet == "auto" and not installed
        and "auto" in (s.person_model, s.safety_model)
    ):  # fmt: skip
        wheel = "(nudenet's bundled 320n.onnx)"
        out.append(
            ModelEntry(
                setting="models.nudenet_weights" if m.nudenet_weights else "models.nudenet",
                path=m.nudenet_weights or wheel,
                purpose="nudenet faces/body parts (character, nsfw)",
                present=installed and (not m.nudenet_weights or _exists(m.nudenet_weights)),
                optional=m.nudenet == "auto" and not installed,
                how=(
                    "install the opt-in extra: pip install -e '.[nsfw]' (nudenet's licence file "
                    "is AGPL-3.0, see README)"
                    if not installed
                    else "copy the nudenet ONNX file there"
                ),
            )
        )
    for setting, path, purpose in (
        ("models.caption_model", m.caption_model, "image-text-to-text captioner (caption_en)"),
        ("models.translation_model", m.translation_model, "translator (caption_zh)"),
    ):
        if path:
            folder = Path(path)
            out.append(
                ModelEntry(
                    setting=setting,  # a folder without config.json: name the file it lacks
                    path=str(folder / "config.json") if folder.is_dir() else path,
                    purpose=purpose,
                    present=_exists(path, folder=True),
                    how="save the model, its processor/tokenizer and config.json there "
                    "(save_pretrained) on a machine with internet access, then copy the folder",
                )
            )
    return out


@functools.cache
def _open_clip_architectures() -> frozenset[str] | None:
    """The names of open_clip's built-in architectures (its `model_configs/*.json`), found
    without importing it (which imports torch); None when open_clip is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    configs = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return frozenset(p.stem for p in configs.glob("*.json"))


def _absence(path: str) -> str:
    """Why a model file is missing, in words: a folder named where a file belongs says so."""
    return "is a folder, not a file" if path and Path(path).is_dir() else "not found"


def check_metric(cfg: JobConfig) -> None:
    """Raise `ConfigError` when `score.quality_metric` is not a pyiqa metric."""
    if cfg.score.enabled and cfg.score.quality_metric:
        try:
            check_no_reference(cfg.score.quality_metric)
        except ValueError as e:
            raise ConfigError(f"config key 'score.quality_metric': {e}") from e


def check_models(cfg: JobConfig) -> None:
    """Stop before any work when a configured model's files are missing.

    `models.nudenet` 'auto' without nudenet installed is not an error (the job says so in
    its summary); 'always' is.

    Raises:
        ConfigError: one message naming every missing file and how to provide it.
    """
    check_metric(cfg)
    missing = [e for e in configured_models(cfg) if not (e.present or e.optional)]
    if missing:
        lines = [
            f"{e.setting}: {e.path or '(not set)'} {_absence(e.path)} ({e.purpose}); {e.how}, "
            f"or unset {e.setting}"
            for e in missing
        ]
        raise ConfigError(
            "model files are missing, nothing was processed:\n  " + "\n  ".join(lines)
        )


@dataclass(frozen=True, kw_only=True)
class ModelPlan:
    """Which model stages run, decided from the configuration (and nudenet's presence)."""

    clip: bool = False
    clip_person: bool = False
    clip_safety: bool = False
    quality: bool = False
    nudenet_person: bool = False
    nudenet_safety: bool = False
    caption: bool = False
    translate: bool = False
    notes: tuple[str, ...] = ()

    @property
    def scores(self) -> bool:
        """Whether any scorer runs."""
        return self.clip or self.quality or self.nudenet_person or self.nudenet_safety


def plan_models(cfg: JobConfig) -> ModelPlan:
    """The stages to run and the plain sentences the job summary gives about them."""
    m, s = cfg.models, cfg.score
    notes: list[str] = []
    if not s.enabled:
        return ModelPlan(
            caption=bool(m.caption_model),
            translate=bool(m.translation_model),
            notes=("model scores are off (score.enabled false)",),
        )
    clip = bool(m.clip_weights)
    nude = m.nudenet == "always" or (m.nudenet == "auto" and nudenet_available())
    person = s.person_model
    if person == "auto":
        person = "clip" if clip and s.person_prompts else ("nudenet" if nude else "none")
    safety = s.safety_model
    if safety == "auto":
        safety = "clip" if m.safety_weights else ("nudenet" if nude else "none")
    if m.nudenet == "auto" and not nude and "none" in (person, safety):
        notes.append(
            "nudenet is not installed, so `character` and/or `nsfw` stay null: install the "
            "opt-in extra (pip install -e '.[nsfw]'; its licence file is AGPL-3.0, see README) "
            "or configure models.clip_weights with score.person_model / models.safety_weights"
        )
    elif safety == "none":
        notes.append(
            "no safety model (score.safety_model, models.nudenet, models.safety_weights): "
            "`nsfw` stays null and no image is rejected as unsafe"
        )
    if not clip:
        notes.append(
            "no embedding model (models.clip_weights unset): `aesthetic` stays null and no "
            "semantic de-duplication runs"
        )
    return ModelPlan(
        clip=clip,
        clip_person=person == "clip",
        clip_safety=safety == "clip",
        quality=bool(s.quality_metric),
        nudenet_person=person == "nudenet",
        nudenet_safety=safety == "nudenet",
        caption=bool(m.caption_model),
        translate=bool(m.translation_model),
        notes=tuple(notes),
    )


def model_rules(cfg: JobConfig) -> list[Rule]:
    """Absolute thresholds over the model scores, in the order their reasons take precedence."""
    s = cfg.score
    plan = plan_models(cfg)
    rules = []
    if plan.clip_safety or plan.nudenet_safety:  # no safety model: no `nsfw`, no such rule
        rules.append(
            Rule(column=schema.NSFW, reason="unsafe", max=s.max_nsfw, setting="score.max_nsfw")
        )
    if s.min_quality is not None or s.max_quality is not None:
        rules.append(
            Rule(
                column=schema.QUALITY,
                reason="low_quality",
                min=s.min_quality,
                max=s.max_quality,
                setting="score.min_quality / score.max_quality",
            )
        )
    if s.min_aesthetic is not None:
        rules.append(
            Rule(
                column=schema.AESTHETIC,
                reason="low_aesthetic",
                min=s.min_aesthetic,
                setting="score.min_aesthetic",
            )
        )
    return rules


def rule_summary(cfg: JobConfig, cuts: dict[str, float] | None = None) -> dict[str, dict]:
    """Per reason the model pass decides: the rule in words and the setting that moves it."""
    out: dict[str, dict[str, Any]] = {}
    for r in model_rules(cfg):
        out[r.reason] = {"rule": r.bound_text(), "setting": r.setting}
    for reason, col, share, setting in _share_specs(cfg):
        cut = (cuts or {}).get(col)
        text = f"outside the best {share:.0%} of the job by {col}"
        if cut is not None:
            text += f" (cut {cut:.4g})"
        prev = out.get(reason)
        out[reason] = {
            "rule": f"{prev['rule']} or {text}" if prev else text,
            "setting": f"{prev['setting']} / {setting}" if prev else setting,
        }
    return out


def _share_specs(cfg: JobConfig) -> list[tuple[str, str, float, str]]:
    s = cfg.score
    specs = []
    if s.quality_metric and s.quality_top_share < 1.0:
        specs.append(
            ("low_quality", schema.QUALITY, s.quality_top_share, "score.quality_top_share")
        )
    if s.aesthetic_top_share < 1.0:
        specs.append(
            ("low_aesthetic", schema.AESTHETIC, s.aesthetic_top_share, "score.aesthetic_top_share")
        )
    return specs


# --- pass 1: thumbnails to a side file -------------------------------------------------------


def thumbnail_size(cfg: JobConfig) -> int:
    """The thumbnail side pass 1 should make: `analyze.thumbnail_size` when a model runs."""
    plan = plan_models(cfg)
    return cfg.analyze.thumbnail_size if (plan.scores or plan.caption) else 0


def thumbnail_folder(analysis: str) -> str:
    """`_work/thumbnails`, next to pass 1's `_work/analysis`."""
    return join(analysis.rstrip("/").rsplit("/", 1)[0], THUMBNAILS)


@dataclass(kw_only=True)
class ThumbnailSink(Stage):
    """Move each batch's thumbnails to one atomic side file; the rows travel on without them.

    Written as `part-<digest>.parquet` (source, sha256, thumbnail) with the digest of the batch's
    sources, as pass 1's analysis files, so a retried batch rewrites the same file. Rows
    without a thumbnail (rejected before the decode, undecodable) are not written.
    """

    name: ClassVar[str] = "thumbnails"
    batch_size: ClassVar[int | None] = None
    reads: ClassVar[tuple[str, ...]] = (schema.SOURCE, schema.SHA256, schema.THUMBNAIL)
    folder: str = ""

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """The input's columns without the thumbnail."""
        names = [n for n in input_schema.names if n != schema.THUMBNAIL]
        return pa.schema([input_schema.field(n) for n in names])

    def process(self, t: pa.Table) -> pa.Table:
        if schema.THUMBNAIL not in t.column_names:
            return t
        thumbs = t.select([schema.SOURCE, schema.SHA256, schema.THUMBNAIL]).filter(
            pc.is_valid(t[schema.THUMBNAIL])
        )
        if thumbs.num_rows:
            with atomic_write(join(self.folder, part_name(column(t, schema.SOURCE)))) as fh:
                pq.write_table(thumbs, fh)
        return t.drop_columns([schema.THUMBNAIL])


# --- scores kept for reruns -----------------------------------------------------------------


def _file_state(path: str) -> list[Any]:
    """(relative name, size, mtime) of a model file, or of every file under a model folder."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [["", st.st_size, st.st_mtime_ns]]
    state = []
    for folder, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            st = os.stat(os.path.join(folder, name))
            rel = os.path.relpath(os.path.join(folder, name), path)
            state.append([rel, st.st_size, st.st_mtime_ns])
    return state


def fingerprint(cfg: JobConfig, steps: list[tuple[type[Stage], dict[str, Any]]]) -> str:
    """A digest of everything the results of model `steps` depend on.

    Each step's class and arguments (model paths, prompts, sizes), the size and modification
    time of every model file or folder they name, the thumbnail side the models see, the
    versions of the model packages and `SCORE_CACHE_VERSION`: results kept under one
    fingerprint are what a fresh job would compute (up to the device's rounding).
    """
    from importlib import metadata

    files: dict[str, list[Any]] = {}
    for _, kwargs in steps:
        for value in kwargs.values():
            if isinstance(value, str) and value and os.path.exists(value):
                files[value] = _file_state(value)
    versions = {}
    for package in _MODEL_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    payload = {
        "steps": [[f"{cls.__module__}.{cls.__qualname__}", kwargs] for cls, kwargs in steps],
        "files": files,
        "thumbnail_size": cfg.analyze.thumbnail_size,
        "packages": versions,
        "version": SCORE_CACHE_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SCORE_COLUMNS = (schema.EMBEDDING, *MODEL_COLUMNS)
"""What the score side files keep of a scored row (null where the job's scorers add nothing)."""
CAPTION_COLUMNS = (schema.CAPTION_EN, schema.CAPTION_ZH, schema.CAPTION_SOURCE)


@dataclass(frozen=True)
class Kept:
    """Results of a model step kept for reruns, in `folder` (one per `fingerprint` of the
    step's models and settings): `columns` per source, valid for a row whose `match` columns
    (its sha256; for captions also the captions it came with) are what they were."""

    folder: str
    columns: tuple[str, ...]
    match: tuple[str, ...] = (schema.SHA256,)


def stamp(kept: Kept) -> Callable[[pa.Table], pa.Table]:
    """Copies of a batch's `match` columns as they are before the step (for `ResultSink`)."""

    def run(t: pa.Table) -> pa.Table:
        for c in kept.match:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows, schema.arrow_type(c)))
            t = t.append_column(MATCH + c, t[c])
        return t

    return run


@dataclass(kw_only=True)
class ResultSink(Stage):
    """Keep each batch's results of a model step in one atomic side file; the rows travel on
    without the `stamp` columns.

    `part-<digest>.parquet` (source, the stamped `match` columns, the result `columns`) in
    the step's `Kept.folder`, named like `ThumbnailSink`'s files, so a retried batch rewrites
    its file. A rerun whose step has the same fingerprint takes these instead of running the
    models again (`split_cached`): a changed threshold, share or dedup setting costs no
    model, and a model pass that was interrupted keeps the batches it finished.
    """

    name: ClassVar[str] = "kept_results"
    batch_size: ClassVar[int | None] = None
    reads: ClassVar[tuple[str, ...]] = (schema.SOURCE,)
    kept: Kept
    skip: str = ""
    """A boolean column (`skip_column`): its rows took their results from this side file's
    folder already, and are not written again."""

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """The input's schema without the `stamp` columns."""
        return pa.schema([f for f in input_schema if not f.name.startswith(MATCH)])

    def process(self, t: pa.Table) -> pa.Table:
        self.write(t)
        return t.drop_columns([c for c in t.column_names if c.startswith(MATCH)])

    def write(self, t: pa.Table) -> None:
        """The side file of the batch's rows (those not marked `skip`)."""
        if self.skip in t.column_names:
            t = t.filter(pc.invert(t[self.skip].fill_null(False)))
        if not t.num_rows:
            return
        k = self.kept
        results = schema.conform(t, k.columns)
        side = pa.table(
            [t[schema.SOURCE], *(t[MATCH + c] for c in k.match), *results.columns],
            names=[schema.SOURCE, *(MATCH + c for c in k.match), *(KEPT + c for c in k.columns)],
        )
        with atomic_write(join(k.folder, part_name(column(t, schema.SOURCE)))) as fh:
            pq.write_table(side, fh)

    def __call__(self, batch: Any) -> pa.Table:
        """`process` without the timing column (a sink adds nothing to the rows)."""
        t = to_table(batch)
        return self.process(t) if t.num_rows else self.output_schema(t.schema).empty_table()


def split_cached(t: pa.Table, kept: Kept, flag: str) -> pa.Table:
    """One row per source of a rows ⟕ side-file join, marked in the boolean column `flag`.

    A source takes kept results only when its `match` columns are what they were when they
    were kept (the first such row); it then carries them in place of its own. A source
    without them keeps its first row as it was, to run the step on. All rows of a source are
    in the block (the join is partitioned by source).
    """
    sources = column(t, schema.SOURCE)
    found = column(t, MATCH + kept.match[0])
    same = [True] * t.num_rows
    for c in kept.match:
        same = [s and a == b for s, a, b in zip(same, column(t, MATCH + c), column(t, c),
                                                 strict=True)]
    hit = [f is not None and s for f, s in zip(found, same, strict=True)]
    first: dict[str, int] = {}
    for i, src in enumerate(sources):
        j = first.get(src)
        if j is None or (hit[i] and not hit[j]):
            first[src] = i
    take = sorted(first.values())
    out = t.take(pa.array(take, pa.int64()))
    cached = pa.array([hit[i] for i in take], pa.bool_())
    mine = schema.conform(out, kept.columns)  # the row's own values (null when it has none)
    # (a join may give the side file's columns large types: each is cast to its schema type)
    out = set_columns(out, {
        c: pc.if_else(cached, out[KEPT + c].cast(schema.arrow_type(c)), mine[c])
        for c in kept.columns
    })
    out = out.drop_columns([c for c in out.column_names if c.startswith((MATCH, KEPT))])
    return out.append_column(flag, cached)


def _kept_around(
    step: Callable[[pa.Table], pa.Table], kepts: list[Kept]
) -> Callable[[pa.Table], pa.Table]:
    """`step` (a `ModelChain`), its batches stamped before and each scorer's results kept
    after (`_score_sinks`)."""
    if not kepts:
        return step
    before, sinks = stamp(kepts[0]), _score_sinks(kepts)

    def run(t: pa.Table) -> pa.Table:
        return sinks(step(before(t)))

    return run


def _score_sinks(kepts: list[Kept]) -> Callable[[pa.Table], pa.Table]:
    """Each scorer's side file of the rows it ran on (`ResultSink`, one per scorer of the
    chain); the rows travel on without the stamp and skip columns."""
    sinks = [ResultSink(kept=k, skip=skip_column(i)) for i, k in enumerate(kepts)]

    def run(batch: Any) -> pa.Table:
        t = to_table(batch)
        for sink in sinks:
            sink.write(t)
        return t.drop_columns([c for c in t.column_names if c.startswith((MATCH, SKIP_PREFIX))])

    return run


def _cache_rows(
    cached: bool, names: tuple[str, ...], flags: tuple[str, ...]
) -> Callable[[pa.Table], pa.Table]:
    """The rows that hold kept results of every step (`cached`), or the others."""

    def select(t: pa.Table) -> pa.Table:
        every = t[flags[0]]
        for f in flags[1:]:
            every = pc.and_(every, t[f])
        t = t.filter(every if cached else pc.invert(every))
        return t.select([c for c in names if c in t.column_names])

    return select


# --- the pass -------------------------------------------------------------------------------


@dataclass
class ModelPassResult:
    """The rows with model columns and decisions, and what the job summary should say."""

    rows: Any
    notes: list[str] = field(default_factory=list)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    cuts: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def _nonempty(ds: Any) -> tuple[Any | None, int]:
    from pipelines.curate import nonempty

    return nonempty(ds)


WARM_MAX_INPUTS = 64
"""Jobs over at most this many local files start a `WarmWorker` with the job."""


@dataclass
class WarmWorker:
    """One actor started with a small job, right after Ray, holding no CPU while it waits.

    A job of a few files otherwise spends most of its time on imports, one pass after the
    other: torch, torchvision and pyiqa for the model pass (about 4 s), webdataset and torch
    again for the shard writer (1.2 s). This actor does them while the listing and the
    analysis run; the model pass scores on it and the shard writer writes on it. One that holds
    a GPU is stopped after scoring, so that a GPU captioner can start; `stop` is idempotent.
    """

    actor: Any
    stages: list[tuple[type[Stage], dict[str, Any]]]
    holds_gpu: bool
    loading: Any = None
    """The reference of the actor's model loading (`WarmActor.warm`), until it is read."""

    @classmethod
    def start(cls, cfg: JobConfig) -> WarmWorker:
        """Start the job's actor (it loads the scorers of `cfg`, if any, and the imports)."""
        import ray

        stages = model_chain(cfg, plan_models(cfg))
        gpus = cfg.score.num_gpus if stages else 0.0
        opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
        if gpus:
            opts["num_gpus"] = gpus
        actor = (
            ray.remote(WarmActor)
            .options(**opts)
            .remote(stages=stages, device="cuda" if gpus else "cpu")
        )
        loading = actor.warm.remote()
        return cls(actor=actor, stages=stages, holds_gpu=bool(gpus), loading=loading)

    def loaded(self) -> None:
        """Wait until the actor's models are loaded; a model that does not load raises here,
        as one error (a load error left unread was printed by Ray as an 'Unhandled error'
        with its whole traceback, besides the job's one line)."""
        import ray

        loading, self.loading = self.loading, None
        if loading is not None:
            ray.get(loading)

    def scores(self) -> bool:
        """Whether this actor, still running, holds the job's scorers (`model_chain`)."""
        return self.actor is not None and bool(self.stages)

    def runs(
        self, fn: Callable[[pa.Table], pa.Table] | None = None
    ) -> Callable[[pa.Table], pa.Table]:
        """A function of a batch that runs `fn` on this actor (without `fn`: the actor's
        scorers, see `scores`); `fn` itself, run where it is called, once the actor stopped."""
        actor = self.actor
        if actor is None:
            if fn is None:
                raise RuntimeError("the job's early actor was stopped before scoring")
            return fn

        def on_actor(t: pa.Table) -> pa.Table:
            import ray

            return ray.get(actor.apply.remote(fn, t))

        return on_actor

    def stop(self) -> None:
        """End the actor (its memory and any GPU go back to the cluster); idempotent."""
        import ray

        actor, self.actor = self.actor, None
        loading, self.loading = self.loading, None
        if loading is not None:  # read, so that a load error is not printed as unhandled
            with contextlib.suppress(Exception):
                if ray.wait([loading], timeout=0)[0]:
                    ray.get(loading)
        if actor is not None:
            # The cluster may be gone already (a failed job): that must not hide its error.
            with contextlib.suppress(Exception):
                ray.kill(actor)


def _pool(
    ds: Any,
    cls: type[Stage],
    kwargs: dict[str, Any],
    *,
    gpus: float,
    n: int,
    bs: int,
    then: Callable[[Any], pa.Table] | None = None,
) -> Any:
    """One actor pool of `cls` over `ds`, materialised (one model load per actor); `then`
    runs on each batch the pool returns, as it returns it (a sink)."""
    from ray.data import ActorPoolStrategy

    opts: dict[str, Any] = {"num_cpus": 1, "compute": ActorPoolStrategy(size=n), "batch_size": bs}
    if gpus:
        opts["num_gpus"] = gpus
    out = ds.map_batches(
        cls,
        fn_constructor_kwargs={**kwargs, "device": "cuda" if gpus else "cpu"},
        batch_format="pyarrow",
        zero_copy_batch=True,
        **opts,
    )
    if then is not None:
        out = out.map_batches(then, batch_format="pyarrow", batch_size=None)
    return out.materialize()


def _reuse(
    rd: Any, ds: Any, kepts: list[Kept], num: int, partitions: Callable[[int], int]
) -> tuple[Any | None, Any | None, int, int, list[int]]:
    """Split the rows of `ds` into those to run the model chain on and those that take
    every scorer's results from what `kepts` hold (`split_cached`, one join per scorer with
    side files). A row to run carries the results it has of some scorers, marked in their
    `skip_column`s, so the chain runs only the others on it.

    Returns:
        (to run, with kept results of every scorer, how many of each, how many rows took
        each scorer's results); a part without rows is None.
    """
    from pipelines.curate import _read_parquet

    names = tuple(ds.columns())
    marked, flags, columns = ds, [], list(names)
    for i, kept in enumerate(kepts):
        fs, path = fsspec.core.url_to_fs(kept.folder)
        if not (fs.exists(path) and fs.glob(path.rstrip("/") + "/part-*.parquet")):
            continue
        joined = grouping.join(
            marked, _read_parquet(rd, kept.folder), "left_outer", partitions(num),
            on=(schema.SOURCE,),
        )  # fmt: skip
        marked = joined.map_batches(
            split_cached, fn_kwargs={"kept": kept, "flag": skip_column(i)},
            batch_format="pyarrow", batch_size=None,
        ).materialize()  # fmt: skip
        flags.append(skip_column(i))
        columns += [*kept.columns, skip_column(i)]
    if not flags:
        return ds, None, num, 0, [0] * len(kepts)
    taken = [int(marked.sum(skip_column(i)) or 0) if skip_column(i) in flags else 0
             for i in range(len(kepts))]  # fmt: skip
    if len(flags) < len(kepts):  # a scorer with nothing kept runs on every row
        return marked, None, num, 0, taken
    with_all = tuple(dict.fromkeys((*names, *(c for k in kepts for c in k.columns))))
    hits, num_hits = _nonempty(marked.map_batches(
        _cache_rows(True, with_all, tuple(flags)), batch_format="pyarrow", batch_size=None
    ))  # fmt: skip
    if len(kepts) == 1:  # a row to run holds no kept result
        columns = list(names)
    misses, num_misses = _nonempty(marked.map_batches(
        _cache_rows(False, tuple(dict.fromkeys(columns)), tuple(flags)),
        batch_format="pyarrow", batch_size=None,
    ))  # fmt: skip
    return misses, hits, num_misses, num_hits, taken


def score_kept(cfg: JobConfig, work: str, step: tuple[type[Stage], dict[str, Any]]) -> Kept:
    """Where one scorer of the chain keeps its results: `_work/scores/<name>-<fingerprint>`,
    the fingerprint of its own model and settings, so that changing one scorer's settings
    runs that scorer again and takes the others' results."""
    cls, kwargs = step
    folder = join(work, SCORES, f"{cls.name}-{fingerprint(cfg, [step])}")
    return Kept(folder, cls(**kwargs).sets())


def _remove_other_caches(*caches: str) -> None:
    """Remove the side files beside `caches` (one folder each, all in one parent) that are
    none of them: other fingerprints of the same steps, or steps the job no longer runs."""
    fs, first = fsspec.core.url_to_fs(caches[0])
    keep = {fsspec.core.url_to_fs(c)[1].rstrip("/") for c in caches}
    parent = first.rstrip("/").rsplit("/", 1)[0]
    if fs.exists(parent):
        for other in fs.ls(parent, detail=False):
            if other.rstrip("/") not in keep:
                fs.rm(other, recursive=True)


def _conformed(names: tuple[str, ...]) -> Callable[[pa.Table], pa.Table]:
    def run(t: pa.Table) -> pa.Table:
        return schema.conform(t, names)

    return run


def _to_score(score_all: bool) -> Any:
    def select(t: pa.Table) -> pa.Table:
        pending = pc.is_null(t[schema.STATUS])
        if score_all:
            decoded = pc.is_valid(t[DECODED_MARK])
            pending = pc.or_(pending, decoded)
        cols = [c for c in SLIM_COLUMNS if c in t.column_names]
        return schema.conform(t.filter(pending).select(cols), SLIM_COLUMNS)

    return select


def join_thumbnails(rd: Any, slim: Any, work: str, num_partitions: int) -> Any:
    """`slim` rows with the thumbnail pass 1 made of their bytes (`thumbnail` null where none).

    Matched by source and sha256: a source whose bytes changed between runs has a thumbnail
    of each, and only the one of its present bytes is its picture. A rerun after a crash
    between the two sinks of pass 1 can leave two files of one picture; the join is
    partitioned by its keys, so the copies meet in one block and one is kept.
    """
    fs, tpath = fsspec.core.url_to_fs(join(work, THUMBNAILS))
    with contextlib.suppress(OSError):  # the folder of thumbnails by source alone
        old = fsspec.core.url_to_fs(join(work, "thumbnails"))[1]
        if fs.isdir(old):
            fs.rm(old, recursive=True)
    matched = slim
    if fs.exists(tpath) and fs.glob(tpath.rstrip("/") + "/part-*.parquet"):
        from pipelines.curate import _read_parquet

        thumbs = _read_parquet(rd, join(work, THUMBNAILS))
        matched = grouping.join(
            slim, thumbs, "left_outer", num_partitions, on=(schema.SOURCE, schema.SHA256)
        )
    return matched.map_batches(_first_per_source, batch_format="pyarrow", batch_size=None)


def _first_per_source(t: pa.Table) -> pa.Table:
    sources = column(t, schema.SOURCE)
    first = {src: i for i, src in reversed(list(enumerate(sources)))}
    if len(first) == t.num_rows:
        return t
    return t.take(pa.array(sorted(first.values()), pa.int64()))


def _with_thumbnail(t: pa.Table) -> pa.Table:
    if schema.THUMBNAIL not in t.column_names:  # no thumbnails made (thumbnail_size 0)
        return t.slice(0, 0)
    return t.filter(pc.is_valid(t[schema.THUMBNAIL]))


def _no_thumbnail(t: pa.Table) -> pa.Table:
    """The rows without thumbnail bytes (a null column): what translation alone needs."""
    if schema.THUMBNAIL in t.column_names:
        t = t.drop_columns([schema.THUMBNAIL])
    return t.append_column(schema.THUMBNAIL, pa.nulls(t.num_rows, pa.binary()))


def _candidates_only(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t[schema.STATUS]))


def model_chain(cfg: JobConfig, plan: ModelPlan) -> list[tuple[type[Stage], dict[str, Any]]]:
    """The scorers of the job, in order, as (stage class, constructor arguments)."""
    s, m = cfg.score, cfg.models
    chain: list[tuple[type[Stage], dict[str, Any]]] = []
    if plan.clip:
        chain.append(
            (
                ClipEmbedder,
                {
                    "model": m.clip_model,
                    "weights": m.clip_weights,
                    "aesthetic_weights": m.aesthetic_weights,
                    "safety_weights": m.safety_weights if plan.clip_safety else "",
                    "person_prompts": list(s.person_prompts) if plan.clip_person else [],
                    "other_prompts": list(s.other_prompts) if plan.clip_person else [],
                    "character_threshold": s.character_threshold,
                },
            )
        )
    if plan.quality:
        chain.append(
            (
                PyiqaScorer,
                {
                    "metric": s.quality_metric,
                    "input_size": s.quality_size,
                    "weights": m.pyiqa_weights,
                },
            )
        )
    if plan.nudenet_person or plan.nudenet_safety:
        chain.append(
            (
                NudeNetDetector,
                {
                    "weights": m.nudenet_weights,
                    "resolution": m.nudenet_resolution,
                    "person": plan.nudenet_person,
                    "safety": plan.nudenet_safety,
                    "character_threshold": s.character_threshold,
                },
            )
        )
    return chain


def run_model_pass(
    rd: Any,
    rows: Any,
    cfg: JobConfig,
    *,
    output: str,
    work: str,
    partitions: Callable[[int], int],
    cpus: int,
    warm: WarmWorker | None = None,
) -> ModelPassResult:
    """Score, decide and caption the job's candidates; see the module docstring.

    Args:
        rd: `ray.data`.
        rows: every row of the job after de-duplication (status null: still a candidate).
        cfg: the job's configuration (models checked by `check_models` before the job).
        output: OUT, where `embeddings/` goes.
        work: OUT/_work, holding `thumbnails-v2/`.
        partitions: shuffle partitions for a number of rows (the job's `Partitioning`).
        cpus: the cluster's CPUs (at most 16 model batches per CPU are planned).
        warm: the job's actor if it was started with the job (`WarmWorker.start`): it
            scores instead of a new actor pool (and is stopped here if it holds a GPU).

    Returns:
        The rows with the model columns (null where not scored) and the new verdicts.
    """
    plan = plan_models(cfg)
    result = ModelPassResult(rows=rows, notes=list(plan.notes))
    _remove(join(output, "embeddings"))
    if not (plan.scores or plan.caption or plan.translate):
        result.rows = rows.map_batches(_caption_sources, batch_format="pyarrow", batch_size=None)
        return result
    s, m = cfg.score, cfg.models
    slim, num_slim = _nonempty(
        rows.map_batches(_to_score(s.score_all), batch_format="pyarrow", batch_size=None)
    )
    if slim is None:
        result.rows = rows.map_batches(_caption_sources, batch_format="pyarrow", batch_size=None)
        return result
    matched = join_thumbnails(rd, slim, work, partitions(num_slim))
    if not (plan.scores or plan.caption):  # translation alone reads captions, no image
        scored, num_scored = matched.map_batches(
            _no_thumbnail, batch_format="pyarrow", batch_size=None
        ), num_slim
    else:
        # Candidates without a thumbnail: pass 1 makes JPEG thumbnails only for rows that
        # passed its thresholds, so a rerun that re-tuned one reads the newly passing files.
        if cfg.analyze.thumbnail_size:
            matched = matched.map_batches(
                ThumbnailMaker(size=cfg.analyze.thumbnail_size, rows="all"),
                batch_format="pyarrow",
            )
        scored, num_scored = _nonempty(
            matched.map_batches(_with_thumbnail, batch_format="pyarrow", batch_size=None)
        )
    if num_scored < num_slim:
        result.notes.append(
            f"{num_slim - num_scored} of {num_slim} candidates have no thumbnail (file gone or "
            "undecodable since the analysis, or analyze.thumbnail_size 0): not scored"
        )
    if scored is None:
        result.rows = rows.map_batches(_caption_sources, batch_format="pyarrow", batch_size=None)
        return result
    chain = model_chain(cfg, plan)
    kepts: list[Kept] = []
    hits = None
    if chain:
        # Results an earlier run of a scorer with the same model and settings kept
        # (`ResultSink`, one folder per scorer) are taken, not redone.
        kepts = [score_kept(cfg, work, step) for step in chain]
        scored, hits, num_scored, num_hits, taken = _reuse(
            rd, scored, kepts, num_scored, partitions
        )
        if num_hits:
            result.notes.append(
                f"scores of {num_hits} of {num_hits + num_scored} candidates taken from an "
                "earlier run with the same models and settings (_work/scores)"
            )
        partly = [f"{cls.name} {n - num_hits}" for (cls, _), n in zip(chain, taken, strict=True)
                  if n > num_hits]  # fmt: skip
        if partly:
            result.notes.append(
                f"of the other {num_scored} candidates, the results of some scorers were taken "
                f"from an earlier run with the same model and settings ({', '.join(partly)}); "
                "the scorers whose model or settings changed ran on them"
            )
    if scored is not None:
        # Blocks of one model batch each (up to 16 per CPU): an actor pool hands out whole
        # blocks, so one big block would keep every actor but one idle.
        per_block = min(s.batch_size, cfg.caption.batch_size)
        scored = scored.repartition(
            min(-(-num_scored // per_block), 16 * max(cpus, 1))
        ).materialize()
        pool = {"gpus": s.num_gpus, "n": s.concurrency, "bs": s.batch_size}
        if warm is not None and warm.scores():
            # A small job's actor, started with the job: its models are loaded by now. The
            # side file is written by the same task (one Ray operator: a small job's time).
            warm.loaded()
            scored = scored.map_batches(
                _kept_around(warm.runs(), kepts), batch_format="pyarrow",
                batch_size=s.batch_size, num_cpus=0,
            ).materialize()
        elif chain:  # one pool for every scorer: one actor start, one pass over the rows
            scored = scored.map_batches(stamp(kepts[0]), batch_format="pyarrow",
                                        batch_size=None)  # fmt: skip
            scored = _pool(scored, ModelChain, {"stages": chain}, then=_score_sinks(kepts),
                           **pool)
    if warm is not None and warm.holds_gpu:
        warm.stop()  # a GPU captioner pool may need its GPU
    if kepts:
        _remove_other_caches(*(k.folder for k in kepts))
    if hits is not None:
        both = tuple(dict.fromkeys(
            (*SLIM_COLUMNS, schema.THUMBNAIL, *SCORE_COLUMNS, schema.STAGE_SECONDS)
        ))
        hits = hits.map_batches(_conformed(both), batch_format="pyarrow", batch_size=None)
        if scored is None:
            scored = hits
        else:
            scored = scored.map_batches(_conformed(both), batch_format="pyarrow", batch_size=None)
            scored = scored.union(hits)
    scored = scored.map_batches(
        ThresholdFilter(rules=model_rules(cfg)), batch_format="pyarrow", batch_size=None
    )
    scored = scored.materialize()
    if plan.clip and s.semantic_dedup:
        dups, kind = _semantic_duplicates(scored, s)
        result.counts["semantic_duplicates"] = len(dups)
        if dups:
            scored = scored.map_batches(
                _mark_semantic(dups), batch_format="pyarrow", batch_size=None
            ).materialize()
        result.notes.append(
            f"semantic de-duplication ({kind} index, cosine >= {s.semantic_threshold}): "
            f"{len(dups)} duplicates"
        )
    specs = _share_specs(cfg)
    share_rules: list[Rule] = []
    for reason, col, share, setting in specs:
        lower = s.quality_metric and col == schema.QUALITY and lower_better(s.quality_metric)
        k = s.quantile_points
        sketches = [
            (np.array(json.loads(r["points"])), np.array(json.loads(r["weights"])))
            for r in scored.map_batches(
                _sketcher(col, k), batch_format="pyarrow", batch_size=None
            ).take_all()
        ]
        cut = share_cut(sketches, share, bool(lower))
        if cut is None:
            continue
        result.cuts[col] = cut
        exact = all(float(w.max(initial=1)) == 1.0 for _, w in sketches)
        result.notes.append(
            f"{setting}={share}: {col} cut {cut:.4g} over "
            f"{int(sum(w.sum() for _, w in sketches))} candidates in "
            f"{count_text(len(sketches), 'block')} "
            f"({'exact' if exact else f'approximate: within 1/{k} of them in rank'})"
        )
        rule = Rule(
            column=col,
            reason=reason,
            min=None if lower else cut,
            max=cut if lower else None,
            setting=setting,
        )
        share_rules.append(rule)
        scored = scored.map_batches(
            ThresholdFilter(rules=[rule]), batch_format="pyarrow", batch_size=None
        )
        scored = scored.materialize()
    if plan.clip and s.semantic_dedup and dups and share_rules:
        promoted = semantic_promotions(_semantic_rows(scored, dups, share_rules), dups,
                                       share_rules)  # fmt: skip
        if promoted:
            scored = scored.map_batches(
                _mark_promoted(promoted, dups), batch_format="pyarrow", batch_size=None
            ).materialize()
            result.notes.append(
                f"{count_text(len(promoted), 'semantic duplicate')} kept in place of the copy "
                "a top-share rule cut"
            )
    if plan.caption or plan.translate:
        scored = _caption(rd, scored, cfg, plan, work, partitions, result.notes)
    if plan.clip:
        _write_embeddings(rd, scored, output, work, Path(m.clip_model).stem)
    result.rows = _merge(rows, scored, partitions)
    result.rules = rule_summary(cfg, result.cuts)
    return result


def _sketcher(col: str, k: int) -> Any:
    def run(t: pa.Table) -> pa.Table:
        values = [v for v, p in zip(column(t, col), pending_mask(t), strict=True) if p]
        points, weights = sketch(values, k)
        return pa.table(
            {"points": [json.dumps(points.tolist())], "weights": [json.dumps(weights.tolist())]}
        )

    return run


def _semantic_duplicates(scored: Any, s: Any) -> tuple[dict[str, tuple[str, str, float]], str]:
    """source → (root source, root sha256, similarity) of every semantic duplicate."""
    cols = [*_RANK_COLUMNS, schema.EMBEDDING]
    parts = []
    for batch in scored.select_columns([*cols, schema.STATUS]).iter_batches(
        batch_format="pyarrow", batch_size=65_536
    ):
        keep = pc.and_(pc.is_null(batch[schema.STATUS]), pc.is_valid(batch[schema.EMBEDDING]))
        parts.append(batch.filter(keep).select(cols))
    table = pa.concat_tables(parts) if parts else None
    dedup = SemanticDedup(threshold=s.semantic_threshold, exact_max=s.semantic_exact_max)
    if table is None or table.num_rows < 2:
        return {}, dedup.index_kind(0)
    emb = np.stack(table[schema.EMBEDDING].to_numpy(zero_copy_only=False)).astype(np.float32)
    widths, heights = column(table, schema.WIDTH), column(table, schema.HEIGHT)
    pixels = [(w or 0) * (h or 0) for w, h in zip(widths, heights, strict=True)]
    sources, shas = column(table, schema.SOURCE), column(table, schema.SHA256)
    matches = dedup.find(
        emb,
        pixels,
        column(table, schema.SIZE_BYTES),
        column(table, schema.SHARPNESS),
        column(table, schema.NATIVE_SCORE),
        sources,
        [colour(m) for m in column(table, schema.MODE)],
        captioned(table),
    )
    out = {sources[mt.index]: (sources[mt.root], shas[mt.root], mt.similarity) for mt in matches}
    return out, dedup.index_kind(table.num_rows)


_RANK_COLUMNS = (
    *(c for c in HASH_COLUMNS if c != schema.PHASH),
    schema.CAPTION_EN,
    schema.CAPTION_ZH,
)
"""What `near_dup.rank_key` ranks a copy by (its captions give `captioned`)."""


def _semantic_rows(
    scored: Any, dups: dict[str, tuple[str, str, float]], rules: list[Rule]
) -> pa.Table:
    """The rows of the semantic duplicates and of the copies they point at, with the columns
    `semantic_promotions` reads."""
    wanted = pa.array(sorted({*dups, *(root for root, _, _ in dups.values())}), pa.string())
    cols = list(dict.fromkeys(
        (*_RANK_COLUMNS, *schema.DECISION_COLUMNS, *(r.column for r in rules))
    ))  # fmt: skip
    parts = [
        b.filter(pc.is_in(b[schema.SOURCE], value_set=wanted))
        for b in scored.select_columns(cols).iter_batches(
            batch_format="pyarrow", batch_size=65_536
        )
    ]
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in cols})


def semantic_promotions(
    t: pa.Table, dups: dict[str, tuple[str, str, float]], rules: list[Rule]
) -> dict[str, tuple[str, str]]:
    """Semantic duplicates that take the place of the copy they pointed at, when a top-share
    rule (`rules`) then cut that copy: duplicate's source → (the cut copy's source, the
    duplicate's sha256).

    The duplicates took no place in the shares; the cut copy frees one. Of its duplicates, the
    best ranked (`near_dup.rank_key`, as semantic de-duplication ranks) that passes every
    share cut is kept instead. `t` holds the rows of the duplicates and of their copies.
    """
    reasons = {r.reason for r in rules}
    rows = {r[schema.SOURCE]: r for r in t.to_pylist()}
    cut = {
        root for root, _, _ in dups.values()
        if root in rows and rows[root][schema.STATUS] == schema.STATUS_REJECTED
        and rows[root][schema.REASON] in reasons
    }  # fmt: skip
    candidates = [s for s, (root, _, _) in dups.items() if root in cut and s in rows]
    if not candidates:
        return {}
    pending = pa.Table.from_pylist([rows[s] for s in candidates], schema=t.schema)
    pending = set_columns(pending, {c: [None] * pending.num_rows for c in schema.DECISION_COLUMNS})
    judged = ThresholdFilter(rules=rules).process(pending)
    passing = [s for s, ok in zip(candidates, pending_mask(judged), strict=True) if ok]
    best: dict[str, tuple[tuple, str]] = {}
    for s in passing:
        r = rows[s]
        key = rank_key(
            (r[schema.WIDTH] or 0) * (r[schema.HEIGHT] or 0), r[schema.SIZE_BYTES],
            r[schema.SHARPNESS], r[schema.NATIVE_SCORE], s, colour(r[schema.MODE]),
            int(bool(r[schema.CAPTION_EN]) or bool(r[schema.CAPTION_ZH])),
        )  # fmt: skip
        root = dups[s][0]
        if root not in best or key < best[root][0]:
            best[root] = (key, s)
    return {s: (root, rows[s][schema.SHA256]) for root, (_, s) in best.items()}


def _mark_promoted(
    promoted: dict[str, tuple[str, str]], dups: dict[str, tuple[str, str, float]]
) -> Callable[[pa.Table], pa.Table]:
    """Keep (pending again) each promoted duplicate; its group's other duplicates point at it."""
    instead = {root: (s, sha) for s, (root, sha) in promoted.items()}

    def run(t: pa.Table) -> pa.Table:
        status, reason, detail = (column(t, c) for c in schema.DECISION_COLUMNS)
        dup_of = column(t, schema.DUPLICATE_OF)
        for i, src in enumerate(column(t, schema.SOURCE)):
            if src in promoted:
                status[i] = reason[i] = detail[i] = dup_of[i] = None
            elif src in dups and dups[src][0] in instead and reason[i] == "duplicate":
                new, sha = instead[dups[src][0]]
                detail[i] = f"{detail[i]}, which a top-share rule cut; kept in its place: {new}"
                dup_of[i] = sample_key(sha)
        return _set_verdicts(t, status, reason, detail, dup_of)

    return run


def _set_verdicts(t: pa.Table, status: list, reason: list, detail: list, dup_of: list) -> pa.Table:
    """`t` with its decision columns and `duplicate_of` replaced."""
    return set_columns(t, {schema.STATUS: status, schema.REASON: reason, schema.DETAIL: detail,
                           schema.DUPLICATE_OF: dup_of})  # fmt: skip


def _mark_semantic(dups: dict[str, tuple[str, str, float]]) -> Any:
    def run(t: pa.Table) -> pa.Table:
        status, reason, detail = (column(t, c) for c in schema.DECISION_COLUMNS)
        dup_of = column(t, schema.DUPLICATE_OF)
        for i, src in enumerate(column(t, schema.SOURCE)):
            if src in dups and status[i] is None:
                root, root_sha, sim = dups[src]
                status[i], reason[i] = schema.STATUS_REJECTED, "duplicate"
                detail[i] = f"semantic near duplicate of {root} (cosine {sim:.3f})"
                dup_of[i] = sample_key(root_sha)
        return _set_verdicts(t, status, reason, detail, dup_of)

    return run


def _caption(
    rd: Any,
    scored: Any,
    cfg: JobConfig,
    plan: ModelPlan,
    work: str,
    partitions: Callable[[int], int],
    notes: list[str],
) -> Any:
    """Captions (and translations) of the rows still kept; the others pass unchanged.

    Captions an earlier run of the same captioner and translator kept (`ResultSink`) are
    taken for rows with the same bytes and the same input captions; a note says how many.
    """
    c, m = cfg.caption, cfg.models
    kept, num_kept = _nonempty(
        scored.map_batches(_candidates_only, batch_format="pyarrow", batch_size=None)
    )
    others, _ = _nonempty(
        scored.map_batches(
            lambda t: t.filter(pc.is_valid(t[schema.STATUS])), batch_format="pyarrow"
        )
    )
    if kept is None:
        return scored
    steps: list[tuple[type[Stage], dict[str, Any]]] = []
    if plan.caption:
        steps.append((VlmCaptioner, {
            "model_path": m.caption_model,
            "prompt": c.prompt,
            "max_new_tokens": c.max_new_tokens,
            "keep_sidecar": c.keep_sidecar,
            "sidecar_hint": c.sidecar_hint,
            "hint_template": c.hint_template,
        }))
    if plan.translate:
        steps.append((CaptionTranslator, {
            "model_path": m.translation_model,
            "prefix": c.translation_prefix,
            "max_new_tokens": c.translation_max_new_tokens,
        }))
    spec = Kept(join(work, CAPTIONS, fingerprint(cfg, steps)), CAPTION_COLUMNS,
                (schema.SHA256, schema.CAPTION_EN, schema.CAPTION_ZH))
    names = tuple(dict.fromkeys((*kept.columns(), *CAPTION_COLUMNS, schema.STAGE_SECONDS)))
    todo, hits, _, num_hits, _ = _reuse(rd, kept, [spec], num_kept, partitions)
    if num_hits:
        notes.append(f"captions of {num_hits} of {num_kept} kept images taken from an earlier "
                     "run with the same models and settings (_work/captions)")
    if todo is not None:
        pool = {"gpus": c.num_gpus, "n": c.concurrency, "bs": c.batch_size}
        todo = todo.map_batches(stamp(spec), batch_format="pyarrow", batch_size=None)
        for i, (cls, kwargs) in enumerate(steps):
            last = i == len(steps) - 1
            todo = _pool(todo, cls, kwargs, then=ResultSink(kept=spec) if last else None, **pool)
    _remove_other_caches(spec.folder)
    parts = [p for p in (todo, hits) if p is not None]
    if len(parts) == 2:
        parts = [p.map_batches(_conformed(names), batch_format="pyarrow", batch_size=None)
                 for p in parts]
    done = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
    return done if others is None else done.union(others)


def _merge(rows: Any, scored: Any, partitions: Callable[[int], int]) -> Any:
    """Join the model pass's columns and verdicts back onto every row of the job."""
    res = scored.map_batches(_result_columns, batch_format="pyarrow", batch_size=None)
    res, num_res = _nonempty(res)
    if res is None:
        return rows.map_batches(_caption_sources, batch_format="pyarrow", batch_size=None)
    joined = grouping.join(rows, res, "left_outer", partitions(num_res), on=(schema.SOURCE,))
    return joined.map_batches(_take_results, batch_format="pyarrow", batch_size=None)


def _result_columns(t: pa.Table) -> pa.Table:
    t = schema.conform(t, (schema.SOURCE, *RESULT_COLUMNS))
    t = t.rename_columns([schema.SOURCE, *(PREFIX + c for c in RESULT_COLUMNS)])
    return t.append_column(SCORED, pa.array([True] * t.num_rows, pa.bool_()))


def _take_results(t: pa.Table) -> pa.Table:
    """Model columns and verdicts from the joined `model__*` columns where a row was scored."""
    out: dict[str, list[Any]] = {}
    present = [c for c in RESULT_COLUMNS if PREFIX + c in t.column_names]
    was_scored = column(t, SCORED)  # null for rows the model pass never saw
    for c in present:
        new = column(t, PREFIX + c)
        old = column(t, c)
        if c == schema.STAGE_SECONDS:
            merged = []
            for o, n in zip(old, new, strict=True):
                d = json.loads(o) if o else {}
                for stage, seconds in (json.loads(n) if n else {}).items():
                    d[stage] = round(d.get(stage, 0.0) + seconds, 6)  # a stage of both passes
                merged.append(json.dumps(d, sort_keys=True) if d else o)
            out[c] = merged
        else:
            out[c] = [
                n if w is not None else o for o, n, w in zip(old, new, was_scored, strict=True)
            ]
    t = set_columns(t, out)
    t = t.drop_columns([PREFIX + c for c in present if PREFIX + c in t.column_names])
    if SCORED in t.column_names:
        t = t.drop_columns([SCORED])
    return _caption_sources(t)


def _caption_sources(t: pa.Table) -> pa.Table:
    """`caption_source` for captions that came with the input (sidecar file or tar member)."""
    if schema.CAPTION_EN not in t.column_names:
        return t
    caps, srcs = column(t, schema.CAPTION_EN), column(t, schema.CAPTION_SOURCE)
    offsets = column(t, schema.TAR_OFFSET)
    new = [
        s if s or not c else input_caption_source(o)
        for c, s, o in zip(caps, srcs, offsets, strict=True)
    ]
    return set_columns(t, {schema.CAPTION_SOURCE: new})


EMBEDDING_DTYPE = pa.float16()


def _embedding_rows(model: str) -> Any:
    def run(t: pa.Table) -> pa.Table:
        t = t.filter(pc.is_valid(t[schema.EMBEDDING]))
        emb = t[schema.EMBEDDING].combine_chunks() if t.num_rows else None
        dim = len(emb[0]) if emb is not None and len(emb) else 0
        keys = [
            sample_key(h) if st is None else None
            for h, st in zip(column(t, schema.SHA256), column(t, schema.STATUS), strict=True)
        ]
        if emb is not None and dim:
            flat = pa.array(
                np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float16)
            )
            values = pa.FixedSizeListArray.from_arrays(flat, dim)
        else:
            values = pa.array([], pa.list_(EMBEDDING_DTYPE, 1))
        return pa.table(
            {
                "source": column(t, schema.SOURCE),
                "key": pa.array(keys, pa.string()),
                "model": pa.array([model] * t.num_rows, pa.string()),
                "embedding": values,
            }
        )

    return run


def _write_embeddings(rd: Any, scored: Any, output: str, work: str, model: str) -> None:
    """`OUT/embeddings/part-*.parquet`: written under `_work`, then moved into place.

    `key` is the sample key of rows still kept at this point (null for rejected rows, which
    are listed by `source`); `embedding` is a fixed-size list of float16, L2-normalised.
    """
    tmp = join(work, f"embeddings-{os.getpid()}-{int(time.time())}")
    fs, tmp_path = fsspec.core.url_to_fs(tmp)
    fs.makedirs(tmp_path, exist_ok=True)
    cols = [schema.SOURCE, schema.SHA256, schema.STATUS, schema.EMBEDDING]
    n = 0
    for batch in scored.select_columns(cols).iter_batches(
        batch_format="pyarrow", batch_size=100_000
    ):
        part = _embedding_rows(model)(batch)
        if part.num_rows == 0:
            continue
        with atomic_write(join(tmp, f"part-{n:05d}.parquet")) as fh:
            pq.write_table(part, fh)
        n += 1
    dest = join(output, "embeddings")
    _remove(dest)
    dest_path = fsspec.core.url_to_fs(dest)[1].rstrip("/")
    fs.makedirs(dest_path, exist_ok=True)
    for f in sorted(fs.find(tmp_path)):
        fs.mv(f, f"{dest_path}/{f.rsplit('/', 1)[-1]}")
    _remove(tmp)


def _remove(uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


__all__ = [
    "ModelPassResult",
    "ThumbnailSink",
    "WarmWorker",
    "check_models",
    "configured_models",
    "run_model_pass",
    "thumbnail_folder",
    "thumbnail_size",
]
