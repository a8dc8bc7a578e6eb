"""Several model stages in one actor (`ModelChain`), and the actor a small job starts early.

Kept apart from `pipelines.model_pass` so that a model actor imports only the stages and
pyarrow before torch, not the job's Ray Data plumbing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.base import Batch, Stage, set_columns, to_table


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
        for i, stage in enumerate(self._chain):
            flag = skip_column(i)
            if flag in table.column_names:
                table = _run_where(stage, table, pc.invert(table[flag].fill_null(False)))
            else:
                table = stage(table)
        return table

    def warm(self) -> int:
        """Load every model now (imports, weights) instead of at the first batch."""
        for stage in self._chain:
            stage.ready()
        return len(self._chain)


SKIP_PREFIX = "chain__skip"


def skip_column(step: int) -> str:
    """A boolean column that, where true, tells `ModelChain` not to run stage `step` on the
    row: it already holds that stage's results (kept by an earlier run)."""
    return f"{SKIP_PREFIX}{step}"


def _run_where(stage: Stage, table: pa.Table, run: pa.ChunkedArray) -> pa.Table:
    """`stage` on the rows where `run` is true; the other rows keep their values of the
    columns it sets (`Stage.sets`)."""
    rows = pc.indices_nonzero(run)
    if len(rows) == table.num_rows:
        return stage(table)
    out = table
    for f in stage.output_schema(table.schema):  # the columns it adds, null until it runs
        if f.name not in out.column_names:
            out = out.append_column(f, pa.nulls(table.num_rows, f.type))
    if len(rows) == 0:
        return out
    done = stage(table.take(rows))
    # Row i takes its own value (position i) or, when run, the stage's (position n + k).
    pick = np.arange(table.num_rows, dtype=np.int64)
    pick[rows.to_numpy()] = table.num_rows + np.arange(len(rows), dtype=np.int64)
    new = {}
    for name in (*stage.sets(), schema.STAGE_SECONDS):
        if name in done.column_names:
            typ = schema.arrow_type(name)  # both sides as the schema types it (one may be null)
            both = pa.chunked_array([*out[name].cast(typ).chunks, *done[name].cast(typ).chunks],
                                    type=typ)  # fmt: skip
            new[name] = both.take(pa.array(pick))
    return set_columns(out, new)


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
