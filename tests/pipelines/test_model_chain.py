"""`ModelChain`: several model stages in one actor, each keeping its own columns and timing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation import schema
from curation.base import Stage, set_columns
from curation.score.chain import ModelChain, skip_column


@dataclass(kw_only=True)
class _Quality(Stage):
    name: ClassVar[str] = "quality"
    writes: ClassVar[tuple[str, ...]] = (schema.QUALITY,)
    device: str = "cpu"
    offset: float = 0.0
    loads: ClassVar[list[str]] = []

    def setup(self) -> None:
        self.loads.append(self.device)

    def process(self, table: pa.Table) -> pa.Table:
        q = pc.add(pc.cast(table[schema.WIDTH], pa.float32()), self.offset)
        return set_columns(table, {schema.QUALITY: q})


@dataclass(kw_only=True)
class _Safety(Stage):
    name: ClassVar[str] = "nudenet"
    writes: ClassVar[tuple[str, ...]] = (schema.NSFW,)
    device: str = "cpu"

    def process(self, table: pa.Table) -> pa.Table:  # reads what the first stage wrote
        return set_columns(table, {schema.NSFW: pc.divide(table[schema.QUALITY], 1e4)})


def test_stages_run_in_order_with_their_own_timing_and_one_setup_each() -> None:
    _Quality.loads.clear()
    chain = ModelChain(stages=[(_Quality, {"offset": 0.5}), (_Safety, {})], device="cuda:0")
    batch = pa.table({schema.SOURCE: ["a", "b"], schema.WIDTH: [4000, 5000]})
    out = chain(batch)
    chain(batch)
    assert out[schema.QUALITY].to_pylist() == [4000.5, 5000.5]
    assert out[schema.NSFW].to_pylist() == [0.40005, 0.50005]
    assert _Quality.loads == ["cuda:0"]  # the device reaches each stage; setup runs once
    timing = json.loads(out[schema.STAGE_SECONDS][0].as_py())
    assert set(timing) == {"quality", "nudenet"}


def test_an_empty_batch_gets_every_stage_columns() -> None:
    chain = ModelChain(stages=[(_Quality, {}), (_Safety, {})])
    out = chain(pa.table({schema.SOURCE: pa.array([], pa.string())}))
    assert out.num_rows == 0
    assert {schema.QUALITY, schema.NSFW, schema.STAGE_SECONDS} <= set(out.column_names)


def test_warm_loads_every_stage_once() -> None:
    _Quality.loads.clear()
    chain = ModelChain(stages=[(_Quality, {"offset": 1.0}), (_Safety, {})])
    assert chain.warm() == 2
    assert _Quality.loads == ["cpu"]  # loaded before any batch
    out = chain(pa.table({schema.SOURCE: ["a"], schema.WIDTH: [4000]}))
    assert out[schema.QUALITY].to_pylist() == [4001.0]
    assert _Quality.loads == ["cpu"]  # and not again at the first batch


def test_a_safety_model_of_none_keeps_the_clip_safety_head_out(tmp_path) -> None:
    """`score.safety_model=none` with `models.safety_weights` set: the head still ran, filled
    `nsfw` and rejected images as `unsafe`."""
    from pipelines.config import load_config
    from pipelines.model_pass import model_chain, plan_models

    files = {n: tmp_path / n for n in ("clip.bin", "safety.pth")}
    for f in files.values():
        f.write_bytes(b"x")
    base = [f"models.clip_weights={files['clip.bin']}",
            f"models.safety_weights={files['safety.pth']}", "models.nudenet=never"]  # fmt: skip
    for safety, head in (("auto", str(files["safety.pth"])), ("clip", str(files["safety.pth"])),
                         ("none", "")):  # fmt: skip
        cfg = load_config(overrides=[*base, f"score.safety_model={safety}"])
        plan = plan_models(cfg)
        (stage, kwargs), *_ = model_chain(cfg, plan)
        assert stage.__name__ == "ClipEmbedder"
        assert kwargs["safety_weights"] == head, safety
        assert plan.clip_safety == bool(head)


def test_without_a_safety_model_the_job_says_so_and_has_no_unsafe_rule() -> None:
    """`models.nudenet=never` without a safety head: `nsfw` was null on every row with no
    word, and stats.json still listed the rule `nsfw > 0.5` as if images had been screened."""
    from pipelines.config import load_config
    from pipelines.model_pass import model_rules, plan_models, rule_summary

    cfg = load_config(overrides=["models.nudenet=never"])
    assert any("no safety model" in n and "`nsfw` stays null" in n
               for n in plan_models(cfg).notes)  # fmt: skip
    assert "unsafe" not in rule_summary(cfg) and all(r.reason != "unsafe" for r in model_rules(cfg))
    screened = load_config(overrides=["models.nudenet=always"])
    assert rule_summary(screened)["unsafe"]["setting"] == "score.max_nsfw"


@given(
    widths=st.lists(st.integers(1, 10_000), min_size=1, max_size=12),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_a_stage_runs_only_on_the_rows_not_marked_to_skip_it(widths, data) -> None:
    """Rows that hold a stage's results from an earlier run (its `skip_column`) keep them;
    the stage computes the others', and later stages see both."""
    n = len(widths)
    skip = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    kept = [float(-i) for i in range(n)]  # results "from an earlier run"
    batch = pa.table({
        schema.SOURCE: [f"s{i}" for i in range(n)],
        schema.WIDTH: widths,
        schema.QUALITY: pa.array([k if s else None for k, s in zip(kept, skip, strict=True)],
                                 pa.float32()),
        skip_column(0): skip,
    })  # fmt: skip
    out = ModelChain(stages=[(_Quality, {"offset": 0.5}), (_Safety, {})])(batch)
    want = [k if s else w + 0.5 for k, s, w in zip(kept, skip, widths, strict=True)]
    assert out[schema.QUALITY].to_pylist() == want
    assert out[schema.NSFW].to_pylist() == [pytest.approx(q / 1e4) for q in want]
    assert out[schema.SOURCE].to_pylist() == batch[schema.SOURCE].to_pylist()
    timing = [json.loads(t) if t else {} for t in out[schema.STAGE_SECONDS].to_pylist()]
    assert ["quality" in t for t in timing] == [not s for s in skip]
    assert all("nudenet" in t for t in timing)
