"""What a diffusers model folder must hold on disk before a model loads from it."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS_STEM = "diffusion_pytorch_model"


def missing_shards(folder: Path) -> list[Path]:
    """The weight files a sharded checkpoint's index names but the folder lacks.

    A sharded folder holds `diffusion_pytorch_model.safetensors.index.json` (or
    `.bin.index.json`) whose `weight_map` names a file per tensor; a shard left behind by an
    interrupted copy otherwise fails deep inside diffusers' loader.

    Raises:
        ValueError: an index that is not JSON with a `weight_map` of file names.
    """
    missing: list[Path] = []
    for index in sorted(folder.glob(f"{WEIGHTS_STEM}*.index.json")):
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
            found = [(f, (folder / f).is_file()) for f in sorted(files)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is no weight index ({e!r}); copy it again") from e
        missing.extend(folder / f for f, ok in found if not ok)
    return missing


def describe_missing(folder: Path, missing: list[Path]) -> str:
    """One line naming the shards a folder lacks (the first three, then a count)."""
    names = ", ".join(p.name for p in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return (f"{folder} is a sharded checkpoint whose index names {names}{more}, not there; "
            "copy every weight file of the checkpoint's folder")  # fmt: skip
