"""The curation job's configuration: one typed tree, loaded from YAML and validated up front.

Every threshold lives here with its documented default. `native4k config` prints the whole
tree as commented YAML; `--config FILE` overrides any part of it. An unknown key, a wrong type
or contradictory settings stop the job before it starts, naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curation.analyze.native import DEFAULT_NATIVE_THRESHOLD
from curation.analyze.sharpness import DEFAULT_SHARPNESS_THRESHOLD
from training.settings import apply_overrides


def _f(default: Any, help: str) -> Any:
    """A field with a default and its help text (the documentation of the key)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration that cannot run: names the offending key."""


@dataclass(kw_only=True)
class InputConfig:
    """Which files count as inputs."""

    sidecar_extensions: list[str] = _f(
        ["txt", "json"],
        "Extensions of sidecar files (<stem>.txt caption, or <stem>.json with a 'caption' field); "
        "they travel with their image (a .txt with no image of its stem is an input, rejected "
        "as unsupported_format; a lone .json is a crawl's metadata, skipped).",
    )
    list_extensions: list[str] = _f(
        ["lst", "list", "uris"],
        "A file INPUT with one of these extensions is read as a list of URIs, one per line.",
    )


@dataclass(kw_only=True)
class ProbeConfig:
    """Cheap header checks, before any full decode."""

    min_pixels: int = _f(
        3840 * 2160, "Reject (too_small) below this many pixels (paper: 3840x2160)."
    )
    max_pixels: int = _f(
        120_000_000,
        "Reject (too_large) above this many pixels, without decoding: the decompression-bomb cap.",
    )
    min_aspect: float = _f(1 / 3, "Reject (aspect_ratio) when width/height is below this.")
    max_aspect: float = _f(3.0, "Reject (aspect_ratio) when width/height is above this.")
    max_file_bytes: int = _f(
        512 * 1024 * 1024, "Reject (too_large) input files larger than this many bytes, unread."
    )


@dataclass(kw_only=True)
class AnalyzeConfig:
    """Pixel analyses from one full decode, and their thresholds."""

    min_native_score: float = _f(
        DEFAULT_NATIVE_THRESHOLD,
        "Reject (upscaled) when native_score is below this (evidence of resampling from a "
        "smaller image).",
    )
    min_sharpness: float = _f(
        DEFAULT_SHARPNESS_THRESHOLD, "Reject (blurry) when the focus measure is below this."
    )
    flat_patch: int = _f(
        240, "Side of the non-overlapping grayscale patches for flatness (paper: 240)."
    )
    flat_variance: float = _f(
        800.0, "A patch is flat when the variance of its Sobel gradient magnitude is below this."
    )
    max_flat_fraction: float = _f(
        0.5, "Reject (flat) when more than this fraction of patches is flat."
    )
    min_entropy: float = _f(
        7.0, "Reject (low_entropy) when the 8-bit grayscale entropy (bits) is below this."
    )
    thumbnail_size: int = _f(
        512, "Longest side of the small JPEG handed to model scorers (0 disables thumbnails)."
    )
    score_all: bool = _f(
        False,
        "Compute every pixel score of every decodable image (audits; a rerun may then re-tune "
        "any threshold without decoding again). Otherwise an image's analyses stop at the first "
        "rule it fails (sharpness, flatness, entropy, native, in that order): its verdict is "
        "the same and the later scores stay null; a rerun whose thresholds let it pass "
        "analyses it again.",
    )


@dataclass(kw_only=True)
class DedupConfig:
    """Exact and near-duplicate removal across the whole job."""

    enabled: bool = _f(
        True,
        "Drop exact (sha256) and near (perceptual hash) duplicates. Off: near duplicates are "
        "kept, but byte-identical copies stay one sample (a key names its content).",
    )
    max_hamming: int = _f(
        6,
        "Two images are near duplicates when their 64-bit pHashes differ in at most this many "
        "bits (re-encodes, resizes, small crops).",
    )


@dataclass(kw_only=True)
class BucketConfig:
    """The aspect-ratio bucket table."""

    buckets: list[str] = _f(
        [],
        "Explicit bucket table as 'WxH' strings (sides multiples of 64). Empty: the default "
        "table, the paper's 4096^2-area tier plus the lower-area tiers below.",
    )
    tier_scales: list[float] = _f(
        [1.0, 0.875, 0.75, 0.6875],
        "Side scales of the default table's tiers relative to the 4096^2-area tier; the lowest "
        "tier must hold every image of min_pixels without upscaling.",
    )


@dataclass(kw_only=True)
class ShardConfig:
    """WebDataset shard sizes."""

    max_samples: int = _f(1000, "At most this many samples per shard.")
    max_bytes: int = _f(
        2 * 1024**3, "Start a new shard before a shard would exceed this many bytes."
    )


NUDENET_MODES = ("auto", "always", "never")
PERSON_MODELS = ("auto", "clip", "nudenet", "none")
SAFETY_MODELS = ("auto", "clip", "nudenet", "none")


@dataclass(kw_only=True)
class ModelsConfig:
    """Where model weights are: local files only (no model hub is contacted)."""

    clip_model: str = _f(
        "ViT-L-14",
        "open_clip architecture of the one image embedding per image (aesthetic, safety and "
        "person heads, semantic de-duplication).",
    )
    clip_weights: str = _f(
        "",
        "Local file of the open_clip weights for clip_model (e.g. open_clip_pytorch_model.bin of "
        "laion/CLIP-ViT-L-14-laion2B-s32B-b82K, or OpenAI's ViT-L-14.pt). Empty: no embedding "
        "model, so no aesthetic score, no CLIP heads and no semantic de-duplication.",
    )
    aesthetic_weights: str = _f(
        "",
        "Local file of the LAION aesthetic predictor (improved-aesthetic-predictor "
        "sac+logos+ava1-l14-linearMSE.pth: MLP 768-1024-128-64-16-1 over the L2-normalised "
        "ViT-L/14 embedding). Needs clip_weights. Empty: `aesthetic` stays null.",
    )
    safety_weights: str = _f(
        "",
        "Local file of a safety head over the L2-normalised embedding: a torch state dict of an "
        "nn.Sequential of Linear layers (ReLU between, sigmoid on the single output). Needs "
        "clip_weights.",
    )
    nudenet: str = _f(
        "auto",
        "The nudenet face/body-part detector (its ONNX weights ship in the `nsfw` extra's wheel; "
        "licence file AGPL-3.0, see README): auto = run it when installed, always = required, "
        "never.",
    )
    nudenet_weights: str = _f(
        "", "Another nudenet ONNX file (e.g. 640m.onnx); empty: the 320n model in the wheel."
    )
    nudenet_resolution: int = _f(
        320,
        "Side (px) nudenet's detector runs at: 320 for the wheel's 320n model, 640 for its 640m "
        "model (which then needs analyze.thumbnail_size >= 640: it sees the thumbnail).",
    )
    pyiqa_weights: str = _f(
        "",
        "Local weight file for score.quality_metric (every pyiqa metric but piqe and entropy "
        "needs one; pyiqa's download URL for it is in pyiqa's DEFAULT_CONFIGS).",
    )
    caption_model: str = _f(
        "",
        "Local folder of a transformers image-text-to-text model (config.json, weights, "
        "processor and tokenizer files, a chat template). Empty: no captioning.",
    )
    translation_model: str = _f(
        "",
        "Local folder of a transformers sequence-to-sequence model that translates English "
        "captions to Chinese (caption_zh). Empty: no translation.",
    )

    _PATHS: typing.ClassVar[tuple[str, ...]] = (
        "clip_model", "clip_weights", "aesthetic_weights", "safety_weights", "nudenet_weights",
        "pyiqa_weights", "caption_model", "translation_model",
    )  # fmt: skip

    def __post_init__(self) -> None:
        """`~/w.pt` means the home folder's file and `w.pt` the one in the folder `curate`
        started in, for the checks and the loaders alike (a Ray worker on another node, or in
        another folder, gets the same absolute path; config.yaml records it)."""
        for name in self._PATHS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                continue
            if name == "clip_model" and not value.endswith(".json"):
                continue  # an open_clip architecture's name
            setattr(self, name, os.path.abspath(os.path.expanduser(value)))


@dataclass(kw_only=True)
class ScoreConfig:
    """Model scores, after the cheap rules and exact/near de-duplication, and their thresholds."""

    enabled: bool = _f(True, "Run the model stages at all.")
    score_all: bool = _f(
        False,
        "Score every decodable image (audits), not only the candidates that passed the cheap "
        "rules and de-duplication; rejections are unchanged.",
    )
    num_gpus: float = _f(
        0.0,
        "GPUs per model actor (fractions share one GPU; every scorer of an actor shares it); "
        "0 runs the models on CPUs.",
    )
    concurrency: int = _f(
        1, "Model actors; each loads every configured scorer once and runs them in turn."
    )
    batch_size: int = _f(32, "Images per model call.")
    quality_metric: str = _f(
        "piqe",
        "pyiqa metric for `quality` (piqe needs no weights; musiq, metaiqa, ... need "
        "models.pyiqa_weights; topiq_nr, hyperiqa, nima, laion_aes and qalign also fetch a "
        "backbone from a model hub, which must be in the local caches). Empty: no quality "
        "score.",
    )
    quality_size: int = _f(
        512,
        "Longest side (pixels) of the image the quality metric sees: the thumbnail, resized. "
        "Scores of no-reference metrics depend on it; at most analyze.thumbnail_size.",
    )
    min_quality: float | None = _f(
        None, "Reject (low_quality) when `quality` is below this (paper: Q-Align > 4.0)."
    )
    max_quality: float | None = _f(
        None, "Reject (low_quality) when `quality` is above this (lower-better metrics: piqe)."
    )
    quality_top_share: float = _f(
        1.0,
        "Keep only this share of the job's candidates, best by `quality` in the metric's "
        "direction (1.0: no share rule).",
    )
    min_aesthetic: float | None = _f(None, "Reject (low_aesthetic) below this aesthetic score.")
    aesthetic_top_share: float = _f(
        1.0, "Keep only this share of the candidates, best by `aesthetic` (paper: 0.3)."
    )
    max_nsfw: float = _f(0.5, "Reject (unsafe) when `nsfw` is above this.")
    person_model: str = _f(
        "auto",
        "Source of `character`: clip (zero-shot prompts), nudenet (any face or body part "
        "detected), auto (clip when clip_weights is set, else nudenet when it runs), none.",
    )
    safety_model: str = _f(
        "auto",
        "Source of `nsfw`: clip (models.safety_weights), nudenet (highest score of an exposed "
        "intimate part), auto (clip when safety_weights is set, else nudenet when it runs), none.",
    )
    character_threshold: float = _f(0.5, "`character` is true when person_score is at least this.")
    person_prompts: list[str] = _f(
        ["a photo of a person", "a photo of people", "a portrait of a man or a woman"],
        "Zero-shot prompts that mean a person is visible (person_model clip).",
    )
    other_prompts: list[str] = _f(
        [
            "a photo of a landscape",
            "a photo of an animal",
            "a photo of a building",
            "a photo of an object",
            "an abstract image",
        ],
        "Zero-shot prompts that mean no person (person_score: softmax mass of person_prompts).",
    )
    semantic_dedup: bool = _f(
        True,
        "Drop semantic near duplicates (cosine similarity of embeddings), job-wide; runs only "
        "with an embedding model.",
    )
    semantic_threshold: float = _f(
        0.95, "Two images are semantic duplicates at or above this cosine similarity."
    )
    semantic_exact_max: int = _f(
        100_000,
        "Exact nearest-neighbour search up to this many embeddings; above it a faiss IVF index "
        "(approximate: a pair can be missed when its vectors fall in cells not probed).",
    )
    quantile_points: int = _f(
        1024,
        "Quantile sketch points per block for share rules: the share's cut is off by at most "
        "1/quantile_points of the candidates in rank (exact when blocks are smaller).",
    )


@dataclass(kw_only=True)
class CaptionConfig:
    """Captions of kept images (last, after every rule), and their translation."""

    prompt: str = _f(
        "Describe this image in one or two detailed sentences.",
        "Instruction given to the captioning model with each image.",
    )
    max_new_tokens: int = _f(77, "Longest caption, in generated tokens.")
    batch_size: int = _f(8, "Images per generate() call.")
    num_gpus: float = _f(0.0, "GPUs per captioning actor (fractions allowed; 0: CPU).")
    concurrency: int = _f(1, "Captioning actors (each loads the model once).")
    keep_sidecar: bool = _f(
        True, "Images that came with a caption (sidecar or tar member) keep it, uncaptioned."
    )
    sidecar_hint: bool = _f(
        False,
        "Caption those images too, giving the existing caption to the model as a hint (the "
        "model's caption replaces it; caption_source names the model and the hint).",
    )
    hint_template: str = _f(
        '{prompt} The image came with this caption, which may help: "{hint}"',
        "How the hint joins the prompt ({prompt}, {hint}).",
    )
    translation_prefix: str = _f(
        "", "Text put before each caption for the translation model (e.g. a T5 task prefix)."
    )
    translation_max_new_tokens: int = _f(128, "Longest translation, in generated tokens.")


MIN_OBJECT_STORE_BYTES = 75 * 1024 * 1024
"""The smallest object store `ray.init` accepts."""


@dataclass(kw_only=True)
class RayConfig:
    """How the job uses Ray."""

    num_cpus: int = _f(0, "CPUs for a local Ray instance (0: all of this machine's).")
    object_store_memory: int = _f(
        0, "Bytes of object store for a local Ray instance (0: Ray's default)."
    )
    rows_per_partition: int = _f(
        50_000,
        "Metadata rows (about 0.5 kB each) per shuffle partition in the dedup, shard and stats "
        "passes, at most two partitions per CPU: a small job plans one.",
    )


@dataclass(kw_only=True)
class JobConfig:
    """The whole curation job."""

    input: InputConfig = field(default_factory=InputConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    bucket: BucketConfig = field(default_factory=BucketConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def _model_checks(self) -> list[tuple[bool, str, str]]:
        from curation.score.nudenet_detector import nudenet_available

        m, s, c = self.models, self.score, self.caption
        thumbs = self.analyze.thumbnail_size
        named_nudenet = "nudenet" in (s.person_model, s.safety_model)
        nudenet_runs = s.enabled and (
            m.nudenet == "always"
            or named_nudenet
            or (m.nudenet == "auto" and "auto" in (s.person_model, s.safety_model)
                and nudenet_available())
        )
        # The captioner runs with the scores off too; every stage but translation sees only
        # the thumbnails.
        uses_thumbs = bool(m.caption_model) or nudenet_runs or (
            s.enabled and bool(m.clip_weights or s.quality_metric)
        )
        return [
            (  # (models.nudenet 'never' beside it: the check on models.nudenet below)
                not (s.enabled and named_nudenet) or m.nudenet == "never" or nudenet_available(),
                "score.person_model" if s.person_model == "nudenet" else "score.safety_model",
                "is nudenet, which is not installed: install the nsfw extra "
                "(pip install -e '.[nsfw]') or choose another model",
            ),
            (thumbs >= 0, "analyze.thumbnail_size", "must be >= 0"),
            (
                thumbs >= 64 or not uses_thumbs,
                "analyze.thumbnail_size",
                "must be at least 64 when model stages run (they see only the thumbnails)",
            ),
            (m.nudenet in NUDENET_MODES, "models.nudenet", f"must be one of {NUDENET_MODES}"),
            (
                _formats(c.hint_template, "prompt", "hint"),
                "caption.hint_template",
                "may name only {prompt} and {hint} (a literal brace is written {{ or }})",
            ),
            (
                s.person_model in PERSON_MODELS,
                "score.person_model",
                f"must be one of {PERSON_MODELS}",
            ),
            (
                s.safety_model in SAFETY_MODELS,
                "score.safety_model",
                f"must be one of {SAFETY_MODELS}",
            ),
            (s.num_gpus >= 0, "score.num_gpus", "must be >= 0"),
            (c.num_gpus >= 0, "caption.num_gpus", "must be >= 0"),
            (s.concurrency >= 1, "score.concurrency", "must be at least 1"),
            (c.concurrency >= 1, "caption.concurrency", "must be at least 1"),
            (s.batch_size >= 1, "score.batch_size", "must be at least 1"),
            (c.batch_size >= 1, "caption.batch_size", "must be at least 1"),
            (c.max_new_tokens >= 1, "caption.max_new_tokens", "must be at least 1"),
            (
                s.quality_size >= 8 and (s.quality_size <= thumbs or not uses_thumbs),
                "score.quality_size",
                "must be in [8, analyze.thumbnail_size] (the metric sees the thumbnail)",
            ),
            (
                m.nudenet_resolution % 32 == 0 and m.nudenet_resolution >= 32
                and (m.nudenet_resolution <= thumbs or not uses_thumbs),
                "models.nudenet_resolution",
                "must be a multiple of 32 in [32, analyze.thumbnail_size] (the detector sees the "
                "thumbnail)",
            ),
            (0 < s.quality_top_share <= 1, "score.quality_top_share", "must be in (0, 1]"),
            (0 < s.aesthetic_top_share <= 1, "score.aesthetic_top_share", "must be in (0, 1]"),
            (0 <= s.max_nsfw <= 1, "score.max_nsfw", "must be in [0, 1]"),
            (0 <= s.character_threshold <= 1, "score.character_threshold", "must be in [0, 1]"),
            (-1 <= s.semantic_threshold <= 1, "score.semantic_threshold", "must be in [-1, 1]"),
            (s.quantile_points >= 2, "score.quantile_points", "must be at least 2"),
            (s.semantic_exact_max >= 0, "score.semantic_exact_max", "must be >= 0"),
            (
                s.min_quality is None or s.max_quality is None or s.min_quality < s.max_quality,
                "score.min_quality",
                "must be below score.max_quality (with both, an image must lie between them)",
            ),
            (
                c.translation_max_new_tokens >= 1,
                "caption.translation_max_new_tokens",
                "must be at least 1",
            ),
            (
                bool(m.clip_weights) or not (m.aesthetic_weights or m.safety_weights),
                "models.clip_weights",
                "must be set when models.aesthetic_weights or models.safety_weights is",
            ),
            (
                bool(m.aesthetic_weights)
                or (s.min_aesthetic is None and s.aesthetic_top_share == 1.0),
                "models.aesthetic_weights",
                "must be set for score.min_aesthetic / score.aesthetic_top_share",
            ),
            (
                bool(s.quality_metric)
                or (s.min_quality is None and s.max_quality is None and s.quality_top_share == 1),
                "score.quality_metric",
                "must be set for score.min_quality / max_quality / quality_top_share",
            ),
            (
                s.person_model != "clip" or (bool(m.clip_weights) and bool(s.person_prompts)),
                "score.person_model",
                "'clip' needs models.clip_weights and score.person_prompts",
            ),
            (
                bool(s.other_prompts) or not s.person_prompts
                or not (s.person_model == "clip" or (s.person_model == "auto" and m.clip_weights)),
                "score.other_prompts",
                "must not be empty beside score.person_prompts (person_score is the prompts' "
                "share against these: with none it is 1 for every image)",
            ),
            (
                s.safety_model != "clip" or bool(m.safety_weights),
                "score.safety_model",
                "'clip' needs models.safety_weights",
            ),
            (
                "nudenet" not in (s.person_model, s.safety_model) or m.nudenet != "never",
                "models.nudenet",
                "must not be 'never' when score.person_model or score.safety_model is 'nudenet'",
            ),
        ]

    def validate(self) -> None:
        """Contradictory settings raise `ConfigError` naming the key."""
        p, a = self.probe, self.analyze
        checks = [
            (p.min_pixels > 0, "probe.min_pixels", "must be positive"),
            (p.max_pixels > p.min_pixels, "probe.max_pixels", "must exceed probe.min_pixels"),
            (
                0 < p.min_aspect < p.max_aspect,
                "probe.min_aspect",
                "must be in (0, probe.max_aspect)",
            ),
            (p.max_file_bytes > 0, "probe.max_file_bytes", "must be positive"),
            (a.flat_patch >= 8, "analyze.flat_patch", "must be at least 8"),
            (a.flat_variance >= 0, "analyze.flat_variance", "must be >= 0"),
            (
                a.min_native_score <= 1,
                "analyze.min_native_score",
                "must be at most 1 (native_score lies in [0, 1]; 0 or less keeps every image)",
            ),
            (0 <= a.max_flat_fraction <= 1, "analyze.max_flat_fraction", "must be in [0, 1]"),
            (0 <= a.min_entropy <= 8, "analyze.min_entropy", "must be in [0, 8] bits"),
            (0 <= self.dedup.max_hamming < 32, "dedup.max_hamming", "must be in [0, 31]"),
            (self.shard.max_samples > 0, "shard.max_samples", "must be positive"),
            (self.shard.max_bytes > 0, "shard.max_bytes", "must be positive"),
            (self.ray.num_cpus >= 0, "ray.num_cpus", "must be >= 0"),
            (
                self.ray.object_store_memory == 0
                or self.ray.object_store_memory >= MIN_OBJECT_STORE_BYTES,
                "ray.object_store_memory",
                f"must be 0 (Ray's default) or at least {MIN_OBJECT_STORE_BYTES} bytes (75 MiB, "
                "Ray's minimum)",
            ),
            (self.ray.rows_per_partition > 0, "ray.rows_per_partition", "must be positive"),
            (bool(self.bucket.tier_scales), "bucket.tier_scales", "must not be empty"),
            (all(s > 0 for s in self.bucket.tier_scales), "bucket.tier_scales", "must be positive"),
            *self._model_checks(),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {msg}")
        for b in self.bucket.buckets:
            parts = b.lower().split("x")
            if len(parts) != 2 or not all(
                x.isdigit() and int(x) > 0 and int(x) % 64 == 0 for x in parts
            ):
                raise ConfigError(
                    f"config key 'bucket.buckets' has {b!r}: "
                    "expected 'WxH' with sides multiples of 64"
                )


def _formats(template: str, *names: str) -> bool:
    """Whether `str.format` fills `template` from these keyword names alone."""
    try:
        template.format(**dict.fromkeys(names, ""))
    except (KeyError, IndexError, ValueError):
        return False
    return True


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation, which YAML 1.1 reads as text unless it has a dot."""


def _check_type(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        (inner,) = typing.get_args(typ)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for t in typing.get_args(typ):
            try:
                return _check_type(value, t, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' has the wrong type: {value!r}")
    if typ is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}' must be null")
        return None
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {typ} at {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(
                f"unknown config key '{where}' (known here: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, data[f.name], key)
        else:
            kwargs[f.name] = _check_type(data[f.name], typ, key)
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load and validate a job configuration.

    Args:
        path: YAML file overriding any part of the defaults (None: defaults only).
        overrides: `section.key=value` strings (values parsed as YAML), applied last;
            `section.key=` is the empty string for text and None for an optional setting.

    Raises:
        ConfigError: an unknown key, a wrong type or contradictory settings.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:  # not YAML, or not UTF-8 text
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping (section: settings)")
        data = loaded or {}
    apply_overrides(data, overrides, JobConfig, ConfigError)
    cfg = _build(JobConfig, data, "")
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain data (for config.yaml)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: JobConfig, *, comments: bool = True) -> str:
    """The resolved configuration as YAML, each key preceded by its help text."""
    if not comments:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)
    lines: list[str] = []
    for sec in dataclasses.fields(cfg):
        sub = getattr(cfg, sec.name)
        lines.append(f"# {type(sub).__doc__.strip()}")
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(sub):
            help_text = f.metadata.get("help", "")
            lines.append(f"  # {help_text}")
            value = yaml.safe_dump({f.name: getattr(sub, f.name)}, default_flow_style=True).strip()
            lines.append(f"  {value.strip('{}')}")
        lines.append("")
    return "\n".join(lines)
