"""The one stage that decides: thresholds over score columns set `status`/`reason`/`detail`.

Scorers only add columns; this filter reads them, so a threshold can be re-tuned without
re-running a scorer, and rejected rows stay in the batch to reach the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from curation import schema
from curation.base import Stage, column, pending_mask, reject

PIXELS = "pixels"  # derived: width * height
ASPECT = "aspect"  # derived: width / height
DERIVED = {PIXELS: (schema.WIDTH, schema.HEIGHT), ASPECT: (schema.WIDTH, schema.HEIGHT)}


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Reject pending rows whose `column` lies outside [`min`, `max`] with `reason`.

    A row whose value is null is left alone (it was not scored). `min` is inclusive, `max`
    inclusive: a value equal to a bound passes.
    """

    column: str
    reason: str
    min: float | None = None
    max: float | None = None
    setting: str | None = None
    """The configuration key that sets the bound (named in job summaries)."""

    def violation(self, value: Any) -> str | None:
        """Why `value` fails this rule (e.g. `flat_fraction 0.8 > 0.5`), or None if it passes.

        A null value passes: it was not scored.
        """
        if value is None:
            return None
        if self.min is not None and value < self.min:
            return f"{self.column} {_fmt(value)} < {_fmt(self.min)}"
        if self.max is not None and value > self.max:
            return f"{self.column} {_fmt(value)} > {_fmt(self.max)}"
        return None

    def bound_text(self) -> str:
        """The rule in words, e.g. `flat_fraction > 0.5`."""
        parts = []
        if self.min is not None:
            parts.append(f"{self.column} < {_fmt(self.min)}")
        if self.max is not None:
            parts.append(f"{self.column} > {_fmt(self.max)}")
        return " or ".join(parts)

    def __post_init__(self) -> None:
        assert self.reason in schema.REASONS, self.reason
        assert self.column in schema.FIELDS or self.column in DERIVED, self.column


def _values(table: pa.Table, name: str) -> list[Any]:
    if name not in DERIVED:
        return column(table, name)
    widths, heights = column(table, schema.WIDTH), column(table, schema.HEIGHT)
    out: list[Any] = []
    for w, h in zip(widths, heights, strict=True):
        if w is None or h is None or h == 0:
            out.append(None)
        else:
            out.append(w * h if name == PIXELS else w / h)
    return out


def _fmt(v: float) -> str:
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:.4g}"


@dataclass(kw_only=True)
class ThresholdFilter(Stage):
    """Apply `rules` in order; the first rule a pending row fails gives its reason.

    Reads: the rules' columns. Writes: `status`, `reason`, `detail`. Resources: 1 CPU, cheap.
    """

    name: ClassVar[str] = "threshold"
    batch_size: ClassVar[int | None] = None
    writes: ClassVar[tuple[str, ...]] = (schema.STATUS, schema.REASON, schema.DETAIL)
    rules: list[Rule] = field(default_factory=list)

    def process(self, table: pa.Table) -> pa.Table:
        pending = pending_mask(table)
        verdicts: dict[int, tuple[str, str | None]] = {}
        for rule in self.rules:
            for i, v in enumerate(_values(table, rule.column)):
                if not pending[i] or i in verdicts:
                    continue
                why = rule.violation(v)
                if why is not None:
                    verdicts[i] = (rule.reason, why)
        return reject(table, verdicts)
