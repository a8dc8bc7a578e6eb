import json

import pyarrow as pa
import pytest

from curation import schema
from curation.base import Stage, to_table
from curation.threshold_filter import ASPECT, PIXELS, Rule, ThresholdFilter


def test_to_table_types_known_columns():
    t = to_table({schema.SOURCE: ["a", "b"], schema.WIDTH: [1, None]})
    assert t.schema.field(schema.WIDTH).type == pa.int64()
    assert t.column(schema.WIDTH).to_pylist() == [1, None]


def test_stage_records_time_per_row_and_runs_setup_once():
    class Doubler(Stage):
        name = "doubler"
        calls = 0

        def setup(self) -> None:
            type(self).calls += 1

        def process(self, t: pa.Table) -> pa.Table:
            return t.set_column(0, schema.WIDTH, pa.array([v * 2 for v in t.column(0).to_pylist()]))

    s = Doubler()
    out = s({schema.WIDTH: [1, 2]})
    out = s(out)
    assert out.column(schema.WIDTH).to_pylist() == [4, 8]
    assert Doubler.calls == 1
    times = [json.loads(x) for x in out.column(schema.STAGE_SECONDS).to_pylist()]
    assert all(set(d) == {"doubler"} and d["doubler"] >= 0 for d in times)


def test_threshold_first_failing_rule_wins_and_rejected_rows_untouched():
    f = ThresholdFilter(
        rules=[
            Rule(column=PIXELS, reason="too_large", max=100),
            Rule(column=PIXELS, reason="too_small", min=50),
            Rule(column=ASPECT, reason="aspect_ratio", min=0.5, max=2.0),
        ]
    )
    t = f(
        {
            schema.WIDTH: [20, 5, 10, 2, 8, None],
            schema.HEIGHT: [20, 5, 6, 30, 8, None],
            schema.STATUS: [None, None, None, None, None, None],
            schema.REASON: [None] * 6,
        }
    )
    assert t.column(schema.REASON).to_pylist() == [
        "too_large",
        "too_small",
        None,
        "aspect_ratio",
        None,
        None,
    ]
    assert t.column(schema.STATUS).to_pylist()[:2] == ["rejected", "rejected"]
    assert "400 > 100" in t.column(schema.DETAIL).to_pylist()[0]

    already = f(
        {
            schema.WIDTH: [1],
            schema.HEIGHT: [1],
            schema.STATUS: ["rejected"],
            schema.REASON: ["decode_error"],
        }
    )
    assert already.column(schema.REASON).to_pylist() == ["decode_error"]


def test_rule_rejects_unknown_reason():
    with pytest.raises(AssertionError):
        Rule(column=schema.SHARPNESS, reason="ugly", min=1)
