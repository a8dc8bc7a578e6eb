"""Several model stages in one actor (`ModelChain`), and the actor a small job starts early.

Kept apart from `pipelines.model_pass` so that a model actor imports only the stages and
pyarrow before torch, not the job's Ray Data plumbing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from curation.base import Batch, Stage, to_table


@dataclass(kw_only=True)
class ModelChain(Stage):
    """Several model stages in one actor, applied in order to each batch.

    One actor start and one round of imports (torch, onnxruntime) serve every scorer, and the
    rows cross the object store once instead of once per model. Each stage keeps its own
    lazy setup, columns and timing; the chain only passes the batch along.
    """

    name: ClassVar[str] = "models"
    stages: list[tuple[type[Stage], dict[str, Any]]]
    device: str = "cpu"

    def __post_init__(self) -> None:
        self._chain = [cls(**kwargs, device=self.device) for cls, kwargs in self.stages]

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        for stage in self._chain:
            input_schema = stage.output_schema(input_schema)
        return input_schema

    def __call__(self, batch: Batch) -> pa.Table:
        table = to_table(batch)
        for stage in self._chain:
            table = stage(table)
        return table

    def warm(self) -> int:
        """Load every model now (imports, weights) instead of at the first batch."""
        for stage in self._chain:
            stage.ready()
        return len(self._chain)


class WarmActor:
    """A small job's early actor (`pipelines.model_pass.WarmWorker`): its model chain, loaded
    before the first batch, and the shard writer's imports."""

    def __init__(self, stages: list[tuple[type[Stage], dict[str, Any]]], device: str) -> None:
        self._chain = ModelChain(stages=stages, device=device)

    def warm(self) -> int:
        """Load the models, then import what the shard writer needs (webdataset imports torch)."""
        n = self._chain.warm()
        importlib.import_module("webdataset")
        return n

    def apply(self, fn: Callable[[pa.Table], pa.Table] | None, batch: pa.Table) -> pa.Table:
        """`fn(batch)` here, or the model chain's scores of `batch` when `fn` is None."""
        return fn(batch) if fn is not None else self._chain(batch)
