"""The one-task group-by and join give what Ray Data's shuffles give, on any rows."""

from __future__ import annotations

import sys
from collections import Counter

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.grouping import (
    column_sum,
    each_group,
    group_map,
    join,
    join_tables,
    repeated_keys,
)

KEYS = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d/é", ""]))
ROWS = st.lists(
    st.tuples(KEYS, st.integers(-5, 5), st.lists(st.floats(-1, 1), max_size=3)),
    min_size=1,
    max_size=12,
)
SLOW = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _table(rows: list[tuple]) -> pa.Table:
    return pa.table(
        {
            "k": pa.array([r[0] for r in rows], pa.string()),
            "v": pa.array([r[1] for r in rows], pa.int64()),
            "e": pa.array([r[2] for r in rows], pa.list_(pa.float64())),
        }
    )


def _summary(g: pa.Table) -> pa.Table:
    """One row per group: its key, size and sum; fails loudly on a mixed group."""
    keys = set(g.column("k").to_pylist())
    assert len(keys) == 1, keys
    return pa.table(
        {"k": [keys.pop()], "n": [g.num_rows], "total": [sum(g.column("v").to_pylist())]}
    )


def _canon(rows: list[dict]) -> list[tuple]:
    return sorted(tuple((k, repr(v)) for k, v in sorted(r.items())) for r in rows)


@given(ROWS)
def test_each_group_sees_every_group_once(rows):
    t = _table(rows)
    got = each_group(t, key="k", fn=_summary).to_pylist()
    want: dict = {}
    for k, v, _ in rows:
        n, total = want.get(k, (0, 0))
        want[k] = (n + 1, total + v)
    assert {r["k"]: (r["n"], r["total"]) for r in got} == want


@given(ROWS, ROWS)
def test_join_tables_matches_a_reference_join(left_rows, right_rows):
    left = _table(left_rows)
    right = _table(right_rows).rename_columns(["rk", "rv", "re"])
    for how in ("inner", "left_outer", "left_semi", "left_anti"):
        got = join_tables(how, ("k",), ("rk",), 1, left, right).to_pylist()
        want = []
        for lk, lv, le in left_rows:
            hits = [r for r in right_rows if lk is not None and r[0] == lk]
            if (how == "left_semi" and hits) or (how == "left_anti" and not hits):
                want.append({"k": lk, "v": lv, "e": le})
            elif how in ("inner", "left_outer"):
                want += [{"k": lk, "v": lv, "e": le, "rv": r[1], "re": r[2]} for r in hits]
                if not hits and how == "left_outer":
                    want.append({"k": lk, "v": lv, "e": le, "rv": None, "re": None})
        assert _canon(got) == _canon(want), how


@SLOW
@given(ROWS, ROWS)
def test_one_partition_equals_ray_datas_shuffles(local_ray, left_rows, right_rows):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    rd = local_ray.data
    left = rd.from_arrow(_table(left_rows)).repartition(3)
    right = rd.from_arrow(_table(right_rows).rename_columns(["rk", "rv", "re"]))
    one = group_map(left, "k", _summary, 1).take_all()
    shuffled = left.groupby("k", num_partitions=2).map_groups(_summary, batch_format="pyarrow")
    assert _canon(one) == _canon(shuffled.take_all())
    for how in ("inner", "left_outer", "left_semi", "left_anti"):
        one = join(left, right, how, 1, on=("k",), right_on=("rk",)).take_all()
        ray_join = left.join(right, how, 2, on=("k",), right_on=("rk",)).take_all()
        assert _canon(one) == _canon(ray_join), how
    assert column_sum(left, "v") == sum(r[1] for r in left_rows)


@SLOW
@given(ROWS)
def test_repeated_keys_are_the_keys_held_twice(local_ray, rows):
    ds = local_ray.data.from_arrow(_table(rows)).repartition(3)
    want = sorted(k for k, n in Counter(r[0] for r in rows if r[0] is not None).items() if n > 1)
    for partitions in (1, 2):
        got = repeated_keys(ds, "k", partitions).take_all()
        assert sorted(r["k"] for r in got) == want, partitions
    assert repeated_keys(ds.limit(0), "k", 1).take_all() == []


def test_join_refuses_what_it_does_not_implement(local_ray):
    ds = local_ray.data.from_items([{"k": "a"}])
    with pytest.raises(ValueError, match="full_outer"):
        join(ds, ds, "full_outer", 1, on=("k",))
