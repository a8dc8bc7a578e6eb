"""Group-by and join that fit the job's size.

Ray Data's hash shuffles (``groupby(...).map_groups``, ``join``) start a pool of shuffle tasks
and aggregator actors; on a cold local instance the first one costs 1-3 s, which dominated
small jobs. When a pass plans one partition (``Partitioning``: at most
``ray.rows_per_partition`` rows, 50,000 by default), a shuffle buys nothing: the whole pass runs
in one task either way. These helpers then run the same function over the same rows in one
Ray task instead; with more partitions they are Ray Data's own operators, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

GroupFn = Callable[[pa.Table], pa.Table]
_LEFT_ROW = "__native4k_left_row"
_RIGHT_ROW = "__native4k_right_row"
_ARROW_JOIN = {
    "inner": "inner",
    "left_outer": "left outer",
    "left_semi": "left semi",
    "left_anti": "left anti",
}


def group_map(ds: Any, key: str, fn: GroupFn, num_partitions: int) -> Any:
    """``ds.groupby(key).map_groups(fn)`` over pyarrow tables, in one task when one partition.

    `fn` is a function (Ray Data names its operator after ``fn.__name__``).
    """
    if num_partitions > 1:
        return ds.groupby(key, num_partitions=num_partitions).map_groups(
            fn, batch_format="pyarrow"
        )
    return ds.repartition(1).map_batches(
        partial(each_group, key=key, fn=fn), batch_format="pyarrow", batch_size=None
    )


def each_group(t: pa.Table, *, key: str, fn: GroupFn) -> pa.Table:
    """`fn` applied to every group of rows sharing `key` (nulls form one group), concatenated.

    Groups come in key order, as ``map_groups`` hands them over.
    """
    if t.num_rows == 0:
        return t
    t = t.take(pc.sort_indices(t, sort_keys=[(key, "ascending", "at_end")]))
    col = t.column(key).combine_chunks()
    n = t.num_rows
    if n > 1:
        a, b = col.slice(0, n - 1), col.slice(1)
        differs = pc.fill_null(pc.not_equal(a, b), True)
        both_null = pc.and_(pc.is_null(a), pc.is_null(b))
        cuts = np.flatnonzero(pc.and_(differs, pc.invert(both_null)).to_numpy(zero_copy_only=False))
        starts = [0, *(int(i) + 1 for i in cuts)]
    else:
        starts = [0]
    ends = [*starts[1:], n]
    outs = [fn(t.slice(s, e - s)) for s, e in zip(starts, ends, strict=True)]
    return pa.concat_tables(outs, promote_options="permissive")


def join(
    left: Any,
    right: Any,
    how: str,
    num_partitions: int,
    *,
    on: Sequence[str],
    right_on: Sequence[str] | None = None,
) -> Any:
    """``left.join(right, how, ...)``, in one task when one partition.

    `how` is "inner", "left_outer", "left_semi" or "left_anti". The result has the left
    columns, then (inner and outer joins) the right ones without their keys, as Ray Data's
    join; rows whose key is null match nothing.
    """
    if how not in _ARROW_JOIN:
        raise ValueError(f"join type {how!r}: one of {', '.join(_ARROW_JOIN)}")
    right_on = tuple(right_on or on)
    lrefs = _block_refs(left) if num_partitions == 1 else []
    rrefs = _block_refs(right) if lrefs else []
    if not (lrefs and rrefs):  # more partitions, or a side without rows: Ray Data's own join
        return left.join(right, how, max(1, num_partitions), on=tuple(on), right_on=right_on)
    import ray

    task = ray.remote(num_cpus=1)(join_tables)
    ref = task.remote(how, tuple(on), right_on, len(lrefs), *lrefs, *rrefs)
    return ray.data.from_arrow_refs([ref])


def join_tables(
    how: str, on: tuple[str, ...], right_on: tuple[str, ...], num_left: int, *tables: pa.Table
) -> pa.Table:
    """Join the concatenation of the first `num_left` tables with that of the rest.

    Arrow's hash join carries only some column types, so it matches row numbers on the keys
    and every column (lists and structs included) is then taken by row number.
    """
    left = pa.concat_tables(tables[:num_left], promote_options="permissive")
    right = pa.concat_tables(tables[num_left:], promote_options="permissive")
    lkeys = left.select(list(on)).append_column(
        _LEFT_ROW, pa.array(np.arange(left.num_rows, dtype=np.int64))
    )
    rkeys = right.select(list(right_on)).append_column(
        _RIGHT_ROW, pa.array(np.arange(right.num_rows, dtype=np.int64))
    )
    matched = lkeys.join(
        rkeys,
        keys=list(on),
        right_keys=list(right_on),
        join_type=_ARROW_JOIN[how],
        coalesce_keys=True,
    )
    out = left.take(matched.column(_LEFT_ROW))
    if how in ("left_semi", "left_anti"):
        return out
    rest = right.drop_columns(list(right_on)).take(matched.column(_RIGHT_ROW))
    for name, column in zip(rest.column_names, rest.columns, strict=True):
        if name in out.column_names:
            raise ValueError(f"join: column {name!r} is on both sides")
        out = out.append_column(name, column)
    return out


def repeated_keys(ds: Any, key: str, num_partitions: int) -> Any:
    """The values of `key` held by more than one row of `ds`: one row each, column `key`.

    Ray Data's hash aggregation with more partitions; one Ray task over the materialised
    blocks otherwise (a Ray Data pass costs ~0.1 s more). Null keys are not reported.
    """
    if num_partitions > 1:
        keys = ds.select_columns([key])
        counts = keys.groupby(key, num_partitions=num_partitions).count()
        return counts.map_batches(partial(_more_than_once, key=key), batch_format="pyarrow")
    import ray

    refs = _block_refs(ds)
    if not refs:
        return ds.limit(0).select_columns([key])
    task = ray.remote(num_cpus=1)(repeated_in_tables)
    return ray.data.from_arrow_refs([task.remote(key, *refs)])


def repeated_in_tables(key: str, *tables: pa.Table) -> pa.Table:
    """`repeated_keys` over the concatenation of `tables`, in this process."""
    t = pa.concat_tables([t.select([key]) for t in tables], promote_options="permissive")
    counts = t.group_by(key).aggregate([(key, "count")])
    return _more_than_once(counts, key=key)


def _more_than_once(t: pa.Table, *, key: str) -> pa.Table:
    """Rows of a count table (`key` and one count column) whose count exceeds one: `key`."""
    count = next(c for c in t.column_names if c != key)
    return t.filter(pc.and_(pc.greater(t[count], 1), pc.is_valid(t[key]))).select([key])


def column_sum(ds: Any, name: str) -> int:
    """The sum of an integer column, read block by block (no aggregation shuffle)."""
    total = 0
    for batch in ds.select_columns([name]).iter_batches(batch_format="pyarrow", batch_size=None):
        total += int(pc.sum(batch.column(name)).as_py() or 0)
    return total


def _block_refs(ds: Any) -> list[Any]:
    """The blocks of `ds` that hold rows (an empty block may lack the columns)."""
    bundles = ds.materialize().iter_internal_ref_bundles()
    return [e.ref for b in bundles for e in b.blocks if e.metadata.num_rows]
