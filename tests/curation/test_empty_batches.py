"""Every stage, given a batch with no rows, returns its declared output columns (no model load).

Ray Data hands stages empty blocks whenever a filter or a partition leaves none; a later
shuffle keyed on a declared column must find that column in every block.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable

import pyarrow as pa
import pytest

import curation
from curation import schema
from curation.analyze.thumbnail_maker import ThumbnailMaker
from curation.base import Stage
from curation.bucket.bucketer import Bucketer, default_table
from curation.score.chain import ModelChain
from curation.score.pyiqa_scorer import PyiqaScorer

FACTORIES: dict[str, Callable[[], Stage]] = {
    "Bucketer": lambda: Bucketer(table=default_table([1.0, 0.875, 0.75, 0.6875])),
    "ThumbnailMaker": lambda: ThumbnailMaker(size=512),
    "ModelChain": lambda: ModelChain(stages=[(PyiqaScorer, {"metric": "piqe"})]),
}
"""Stages whose settings have no defaults."""


def _stage_classes() -> list[type[Stage]]:
    for mod in pkgutil.walk_packages(curation.__path__, "curation."):
        importlib.import_module(mod.name)
    found: list[type[Stage]] = []
    todo = list(Stage.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("curation.") and not getattr(cls, "__abstractmethods__", ()):
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


def _build(cls: type[Stage]) -> Stage:
    if cls.__name__ in FACTORIES:
        return FACTORIES[cls.__name__]()
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        pytest.skip(f"{cls.__name__} needs settings {missing}: add it to FACTORIES")
    return cls()


STAGES = _stage_classes()


def test_every_stage_module_is_found():
    names = {c.__name__ for c in STAGES}
    assert {"HeaderProbe", "ThresholdFilter", "PixelAnalyzer", "BandSplitter"} <= names


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
def test_an_empty_batch_gives_the_declared_schema(cls: type[Stage]):
    stage = _build(cls)
    names = dict.fromkeys(c for c in (schema.SOURCE, *cls.reads) if c in schema.FIELDS)
    empty = pa.schema([(c, schema.FIELDS[c]) for c in names]).empty_table()
    out = stage(empty)
    assert out.num_rows == 0
    for c in cls.writes:
        assert c in out.column_names, f"{cls.__name__} lost declared column {c!r}"
        if c in schema.FIELDS:
            assert out.schema.field(c).type == schema.FIELDS[c], c
    assert out.schema == stage.output_schema(empty.schema)


def test_a_dict_batch_with_no_rows_also_gets_the_schema():
    from curation.threshold_filter import ThresholdFilter

    out = ThresholdFilter()({schema.SOURCE: []})
    assert set(ThresholdFilter.writes) <= set(out.column_names)
