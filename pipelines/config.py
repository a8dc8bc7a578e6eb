"""The curation job's configuration: one typed tree, loaded from YAML and validated up front.

Every threshold lives here with its documented default. `native4k config` prints the whole
tree as commented YAML; `--config FILE` overrides any part of it. An unknown key, a wrong type
or contradictory settings stop the job before it starts, naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curation.analyze.native import DEFAULT_NATIVE_THRESHOLD
from curation.analyze.sharpness import DEFAULT_SHARPNESS_THRESHOLD


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
        "they travel with their image and are not inputs themselves.",
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


@dataclass(kw_only=True)
class DedupConfig:
    """Exact and near-duplicate removal across the whole job."""

    enabled: bool = _f(True, "Drop exact (sha256) and near (perceptual hash) duplicates.")
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


@dataclass(kw_only=True)
class RayConfig:
    """How the job uses Ray."""

    num_cpus: int = _f(0, "CPUs for a local Ray instance (0: all of this machine's).")
    object_store_memory: int = _f(
        0, "Bytes of object store for a local Ray instance (0: Ray's default)."
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
    ray: RayConfig = field(default_factory=RayConfig)

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
            (a.flat_patch >= 8, "analyze.flat_patch", "must be at least 8"),
            (0 <= a.max_flat_fraction <= 1, "analyze.max_flat_fraction", "must be in [0, 1]"),
            (0 <= a.min_entropy <= 8, "analyze.min_entropy", "must be in [0, 8] bits"),
            (0 <= self.dedup.max_hamming < 32, "dedup.max_hamming", "must be in [0, 31]"),
            (self.shard.max_samples > 0, "shard.max_samples", "must be positive"),
            (self.shard.max_bytes > 0, "shard.max_bytes", "must be positive"),
            (self.ray.num_cpus >= 0, "ray.num_cpus", "must be >= 0"),
            (bool(self.bucket.tier_scales), "bucket.tier_scales", "must not be empty"),
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
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
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
        overrides: `section.key=value` strings (values parsed as YAML), applied last.

    Raises:
        ConfigError: an unknown key, a wrong type or contradictory settings.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{dotted}' does not name a setting")
        node[parts[-1]] = yaml.safe_load(raw)
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
