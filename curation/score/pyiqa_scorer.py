"""Any pyiqa metric by name as the `quality` scorer, on the thumbnail at a set resolution."""

from __future__ import annotations

import functools
import importlib.util
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from curation import schema
from curation.base import ModelFileError, Stage, column, set_columns

WEIGHTLESS_METRICS = frozenset({"piqe", "entropy"})
"""pyiqa metrics that need no weight file (everything else loads one)."""

HUB_ARCHS = ("QAlign", "QReAlign")
"""pyiqa architectures that take no weight file but load a model from the Hugging Face cache."""


def takes_weight_file(metric: str) -> bool:
    """Whether pyiqa's `metric` loads `models.pyiqa_weights` (read from pyiqa's table, without
    importing it): not the weightless ones, nor Q-Align's family (its cache, HF_HOME)."""
    arch = _pyiqa_configs().get(metric, {}).get("metric_opts", {}).get("type", "")
    return metric not in WEIGHTLESS_METRICS and arch not in HUB_ARCHS


@functools.cache
def _pyiqa_configs() -> dict[str, dict[str, Any]]:
    """pyiqa's table of metrics (`pyiqa/default_model_configs.py`), read without importing pyiqa.

    Importing the `pyiqa` package imports torch and every metric's architecture (about 4 s and
    700 MB); the job's driver only needs this table, a module of plain dictionaries.
    """
    package = importlib.util.find_spec("pyiqa")  # finds the package; runs none of its code
    if package is None or not package.submodule_search_locations:
        raise ValueError("pyiqa is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "default_model_configs.py"
    spec = importlib.util.spec_from_file_location("_native4k_pyiqa_configs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DEFAULT_CONFIGS


def lower_better(metric: str) -> bool:
    """Whether smaller values of a pyiqa metric mean better images (from pyiqa's table)."""
    configs = _pyiqa_configs()
    if metric not in configs:
        raise ValueError(f"unknown pyiqa metric {metric!r} (known: {', '.join(sorted(configs))})")
    return bool(configs[metric].get("lower_better", False))


MIN_SIDE = 32
"""The shortest side a metric is given (piqe's 16-px blocks fail on less): a panorama far
wider than 3:1, let through by `probe.max_aspect`, is scored a little larger than `size`."""


NOT_PER_IMAGE = frozenset({"FID", "InceptionScore", "CLIPScore"})
"""pyiqa metric types that pyiqa lists as no-reference but that score no single image by
itself (a folder's statistics; an image with a caption)."""


def check_no_reference(metric: str) -> None:
    """Raise `ValueError` unless `metric` scores one image by itself (a known metric).

    A full-reference metric (psnr, ssim, lpips, ...) compares an image with a reference the
    job does not have; asking for its 'weights' sent users after files that do not exist.
    """
    lower_better(metric)  # unknown: its own error
    cfg = _pyiqa_configs()[metric]
    kind = cfg.get("metric_opts", {}).get("type")
    if cfg.get("metric_mode") == "FR" or kind in NOT_PER_IMAGE:
        what = "full-reference" if cfg.get("metric_mode") == "FR" else "dataset-level"
        raise ValueError(
            f"pyiqa metric {metric!r} is {what}: it does not score one image by itself; "
            "name a no-reference metric (piqe, musiq, topiq_nr, qalign, ...)"
        )


def resize_longest(img: Image.Image, size: int, min_side: int = 1) -> Image.Image:
    """`img` resized (up or down, bicubic) so that its longest side is `size`, or larger where
    its shortest side would be under `min_side`."""
    w, h = img.size
    scale = max(size / max(w, h), min_side / min(w, h))
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if new == img.size else img.resize(new, Image.Resampling.BICUBIC)


@dataclass(kw_only=True)
class PyiqaScorer(Stage):
    """Score each thumbnail with a pyiqa no-reference metric at `input_size` (longest side).

    Reads: `thumbnail` (rows without one get null). Writes: `quality` (the metric's own scale
    and direction: piqe 0-100, lower is better). Images of one shape go through the metric as
    one batch. Resources: one metric per actor; `device` 'cuda' when given a GPU.
    """

    name: ClassVar[str] = "quality"
    batch_size: ClassVar[int | None] = 32
    reads: ClassVar[tuple[str, ...]] = (schema.THUMBNAIL,)
    writes: ClassVar[tuple[str, ...]] = (schema.QUALITY,)
    metric: str = "piqe"
    input_size: int = 512
    weights: str = ""
    device: str = "cpu"

    def setup(self) -> None:
        import pyiqa

        kwargs: dict[str, Any] = {}
        if self.weights and takes_weight_file(self.metric):  # piqe takes no file
            kwargs["pretrained_model_path"] = self.weights
        try:
            self._metric = pyiqa.create_metric(self.metric, device=self.device, **kwargs)
            if "pretrained_model_path" in kwargs:
                _check_weights_used(self._metric, self.weights)
        except Exception as e:
            if _from_a_hub(e):  # the file may be right: the metric wants more than it
                raise ModelFileError(
                    f"score.quality_metric: pyiqa's {self.metric} fetches files from a model "
                    f"hub (a backbone, or its whole model), which is out of reach "
                    f"({type(e).__name__}); put them in the local caches (TORCH_HOME, HF_HOME) "
                    "from a machine with internet access, or choose a metric that needs only "
                    "models.pyiqa_weights (musiq, metaiqa) or none (piqe)"
                ) from e
            if not self.weights:
                raise
            raise ModelFileError.of(
                "models.pyiqa_weights", self.weights, f"pyiqa {self.metric} weights", e
            ) from e

    def process(self, table: pa.Table) -> pa.Table:
        import torch

        thumbs = column(table, schema.THUMBNAIL)
        by_shape: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for i, t in enumerate(thumbs):
            if t is None:
                continue
            img = Image.open(io.BytesIO(t)).convert("RGB")
            img = resize_longest(img, self.input_size, MIN_SIDE)
            by_shape.setdefault(img.size, []).append((i, np.asarray(img)))
        scores: list[float | None] = [None] * table.num_rows
        for items in by_shape.values():
            x = torch.from_numpy(np.stack([a for _, a in items])).permute(0, 3, 1, 2)
            with torch.no_grad():
                values = self._metric(x.float().div(255).to(self.device))
            for (i, _), v in zip(items, values.reshape(-1).tolist(), strict=True):
                # NaN (piqe of an all-black image) is no score: it would pass every threshold,
                # and the manifest would hold a NaN where the shard's `.json` holds null
                scores[i] = float(v) if math.isfinite(v) else None
        return set_columns(table, {schema.QUALITY: scores})


def _from_a_hub(error: BaseException) -> bool:
    """Whether a metric failed to load because it tried to download something (a backbone
    from torchvision's, timm's or Hugging Face's hub): no file of the user's is at fault."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "URLError",
                                "ConnectionError", "ConnectTimeout", "MaxRetryError"):  # fmt: skip
            return True
        e = e.__cause__ or e.__context__
    return False


def _check_weights_used(metric: Any, path: str) -> None:
    """Raise unless the metric's network now holds the file's tensors.

    Several pyiqa metrics load their file with `strict=False`, so an empty or wrong file (or
    one nested where the metric does not look) left the network at its random initialisation,
    and its scores were written as real ones. The file passes when nearly all of its tensors
    are, by name (a sub-module's names included) and by value, tensors of the network. A file
    torch cannot read safely is left to pyiqa.
    """
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickled objects besides tensors: pyiqa read it as it does
        return
    tensors: dict[str, torch.Tensor] = {}

    def collect(obj: Any, prefix: str, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[prefix.removeprefix("module.")] = obj
        elif isinstance(obj, dict) and depth < 3:  # `params`, `state_dict`, ... wrappers
            for k, v in obj.items():
                collect(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)

    collect(saved, "", 0)
    by_suffix: dict[str, list[torch.Tensor]] = {}  # every dotted suffix of the net's names
    for name, t in getattr(metric, "net", metric).state_dict().items():
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(t)

    def loaded(name: str, value: torch.Tensor) -> bool:
        parts = name.split(".")
        return any(
            t.shape == value.shape and torch.equal(t.detach().cpu(), value)
            for i in range(len(parts))
            for t in by_suffix.get(".".join(parts[i:]), ())
        )

    # Only tensors that are not one value throughout tell: a fresh network's norm layers and
    # biases already equal a file's ones and zeros.
    telling = {
        n: v for n, v in tensors.items() if v.numel() > 1 and not bool((v == v.flatten()[0]).all())
    }
    matched = sum(loaded(n, v) for n, v in telling.items())
    if not telling or matched < 0.9 * len(telling):
        raise ValueError(
            f"only {matched} of its {len(telling)} weight tensors are in the network: its "
            "scores would come from random weights"
        )
