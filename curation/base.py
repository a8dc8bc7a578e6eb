"""The stage base class: declared resources, lazy per-worker setup, per-row timing.

A stage is a keyword-only dataclass whose fields are its settings. It is called on a batch
(a `pyarrow.Table`, or a dict of columns that is turned into one) and returns a batch, so Ray
Data blocks pass straight through and a unit test calls it on a hand-built dict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from curation import schema

Batch = pa.Table | Mapping[str, Sequence[Any]]


class ModelFileError(ValueError):
    """A configured model file or folder is there but does not load as that model.

    The message starts with the setting and the path, so the job's one-line failure names
    both (a rerun with the same file fails the same way: the setting must change).
    """

    @classmethod
    def of(cls, setting: str, path: str, what: str, cause: BaseException) -> ModelFileError:
        """The error for `setting` = `path`, which should hold `what`, given why it failed."""
        if type(cause).__name__ == "UnpicklingError":
            why = "not a torch checkpoint: unpickling failed"  # torch's text suggests unsafe loads
        else:
            lines = str(cause).strip().splitlines() or [""]
            why = f"{type(cause).__name__}: {lines[0][:160]}"
        return cls(f"{setting}: {path} does not load as {what} ({why})")


def to_table(batch: Batch) -> pa.Table:
    """Turn a dict of columns into a table, typing known columns from `schema.py`."""
    if isinstance(batch, pa.Table):
        return batch
    arrays, names = [], []
    for name, values in batch.items():
        typ = schema.FIELDS.get(name)
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        arrays.append(pa.array(values, type=typ))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def set_columns(table: pa.Table, columns: Mapping[str, Sequence[Any] | pa.Array]) -> pa.Table:
    """Add or replace columns, each typed from `schema.py`."""
    for name, values in columns.items():
        typ = schema.arrow_type(name)
        arr = (
            values
            if isinstance(values, pa.Array | pa.ChunkedArray)
            else pa.array(list(values), type=typ)
        )
        if arr.type != typ:
            arr = arr.cast(typ)
        idx = table.schema.get_field_index(name)
        if idx >= 0:
            table = table.set_column(idx, name, arr)
        else:
            table = table.append_column(pa.field(name, typ), arr)
    return table


def column(table: pa.Table, name: str, default: Any = None) -> list[Any]:
    """A column as a Python list (all `default` when the column is absent)."""
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def pending_mask(table: pa.Table) -> list[bool]:
    """True for rows that no stage has rejected yet."""
    return [s is None for s in column(table, schema.STATUS)]


def reject(table: pa.Table, rows: Mapping[int, tuple[str, str | None]]) -> pa.Table:
    """Mark rows rejected: `rows` maps row index to (reason, detail)."""
    if not rows:
        return table
    assert all(r in schema.REASONS for r, _ in rows.values()), rows
    status = column(table, schema.STATUS)
    reason = column(table, schema.REASON)
    detail = column(table, schema.DETAIL)
    for i, (r, d) in rows.items():
        status[i], reason[i], detail[i] = schema.STATUS_REJECTED, r, d
    return set_columns(table, {schema.STATUS: status, schema.REASON: reason, schema.DETAIL: detail})


@dataclass(kw_only=True)
class Stage:
    """Base of every curation stage.

    Subclasses set the class attributes below and implement `process`. Heavy state (models,
    CUDA contexts) is created in `setup`, which runs once per worker before the first batch.
    """

    name: ClassVar[str] = "stage"
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    memory: ClassVar[int] = 0
    """Bytes of memory one worker of this stage may use at peak (0: not declared)."""
    batch_size: ClassVar[int | None] = 16
    """Rows per call; None for cheap stages that take whatever block arrives (Ray fuses a
    chain of stages under the largest batch size, so a large one would starve the next
    stage of parallel tasks)."""
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()

    def sets(self) -> tuple[str, ...]:
        """The columns this stage, as configured, gives values (a subset of `writes`; the
        others pass through as they came)."""
        return self.writes

    def setup(self) -> None:
        """Load heavy state once per worker (models, tokenizers)."""

    def ready(self) -> None:
        """Run `setup` once per worker: at the first batch, or earlier when asked."""
        if not getattr(self, "_ready", False):
            self.setup()
            self._ready = True

    def process(self, table: pa.Table) -> pa.Table:
        """Transform one batch."""
        raise NotImplementedError

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """The schema of this stage's output for a batch of `input_schema`.

        By default the input's columns plus the declared `writes` and `stage_seconds`, typed
        from `schema.py`; stages that reshape their rows (select, explode) override it.
        """
        fields = list(input_schema)
        names = set(input_schema.names)
        for name in (*self.writes, schema.STAGE_SECONDS):
            if name not in names:
                fields.append(pa.field(name, schema.arrow_type(name)))
                names.add(name)
        return pa.schema(fields)

    def __call__(self, batch: Batch) -> pa.Table:
        table = to_table(batch)
        if table.num_rows == 0:
            # A batch with no rows still gets the declared columns (and needs no model).
            return self.output_schema(table.schema).empty_table()
        self.ready()
        start = time.perf_counter()
        out = self.process(table)
        return record_time(out, self.name, time.perf_counter() - start)

    def ray_options(self) -> dict[str, Any]:
        """Resources for `Dataset.map_batches`, as declared by the stage."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "batch_size": self.batch_size}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.memory:
            opts["memory"] = self.memory
        return opts


def record_time(table: pa.Table, stage: str, seconds: float) -> pa.Table:
    """Spread the batch's time evenly over its rows in the `stage_seconds` JSON column."""
    n = table.num_rows
    if n == 0:
        return table
    per_row = seconds / n
    old = column(table, schema.STAGE_SECONDS)
    new = []
    for text in old:
        d = json.loads(text) if text else {}
        d[stage] = round(d.get(stage, 0.0) + per_row, 6)
        new.append(json.dumps(d, sort_keys=True))
    return set_columns(table, {schema.STAGE_SECONDS: new})


def count_by(table: pa.Table, name: str) -> dict[Any, int]:
    """Counts of each value of a column (for summaries)."""
    if name not in table.column_names or table.num_rows == 0:
        return {}
    vc = pc.value_counts(table.column(name))
    return {v["values"].as_py(): v["counts"].as_py() for v in vc}
