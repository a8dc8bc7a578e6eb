"""A semantic duplicate takes the place of the copy it pointed at when a top-share rule cuts
that copy (`pipelines.model_pass.semantic_promotions`)."""

from __future__ import annotations

import hashlib

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from curation import schema
from curation.shard.shard_writer import sample_key
from curation.threshold_filter import Rule
from pipelines.model_pass import _mark_promoted, semantic_promotions

CUT = Rule(column=schema.AESTHETIC, reason="low_aesthetic", min=5.0,
           setting="score.aesthetic_top_share")  # fmt: skip


def _row(source: str, width: int, aesthetic: float, *, reason: str | None = None,
         root: str | None = None) -> dict:  # fmt: skip
    sha = hashlib.sha256(source.encode()).hexdigest()
    return {
        schema.SOURCE: source, schema.SHA256: sha, schema.WIDTH: width, schema.HEIGHT: 2160,
        schema.SIZE_BYTES: 1000, schema.SHARPNESS: 1.0, schema.NATIVE_SCORE: 1.0,
        schema.MODE: "RGB", schema.CAPTION_EN: None, schema.CAPTION_ZH: None,
        schema.STATUS: None if reason is None else schema.STATUS_REJECTED,
        schema.REASON: reason,
        schema.DETAIL: None if reason != "duplicate" else f"semantic near duplicate of {root}",
        schema.DUPLICATE_OF: None if root is None else sample_key(
            hashlib.sha256(root.encode()).hexdigest()),
        schema.AESTHETIC: aesthetic,
    }  # fmt: skip


def test_the_best_duplicate_that_passes_the_cut_is_kept_instead() -> None:
    """A semantic duplicate pointed at a copy the aesthetic share then cut: the group lost
    every copy, though one duplicate scored above the cut."""
    rows = [
        _row("root", 4000, 4.0, reason="low_aesthetic"),
        _row("small_good", 3840, 6.0, reason="duplicate", root="root"),
        _row("large_good", 3900, 5.5, reason="duplicate", root="root"),
        _row("large_bad", 3990, 4.5, reason="duplicate", root="root"),
        _row("other_root", 4000, 7.0),  # not cut: its duplicate stays one
        _row("other_dup", 3840, 9.0, reason="duplicate", root="other_root"),
        _row("lost_root", 4000, 1.0, reason="low_aesthetic"),  # no duplicate passes
        _row("lost_dup", 3840, 2.0, reason="duplicate", root="lost_root"),
    ]
    t = pa.Table.from_pylist(rows)
    dups = {r[schema.SOURCE]: ("root", "", 0.97) for r in rows[1:4]}
    dups |= {"other_dup": ("other_root", "", 0.96), "lost_dup": ("lost_root", "", 0.95)}
    promoted = semantic_promotions(t, dups, [CUT])
    assert promoted == {"large_good": ("root", rows[2][schema.SHA256])}
    out = {r[schema.SOURCE]: r for r in _mark_promoted(promoted, dups)(t).to_pylist()}
    assert out["large_good"][schema.STATUS] is None and out["large_good"][schema.REASON] is None
    assert out["large_good"][schema.DUPLICATE_OF] is None
    for name in ("small_good", "large_bad"):
        assert out[name][schema.REASON] == "duplicate"
        assert out[name][schema.DUPLICATE_OF] == sample_key(rows[2][schema.SHA256])
        assert out[name][schema.DETAIL].endswith("kept in its place: large_good")
    assert out["other_dup"] == rows[5] and out["lost_dup"] == rows[7]
    assert out["root"] == rows[0]


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(
        st.tuples(
            st.floats(0, 10), st.lists(st.tuples(st.integers(3840, 4000), st.floats(0, 10)),
                                       min_size=1, max_size=4),
        ),
        min_size=1, max_size=4,
    )
)  # fmt: skip
def test_each_cut_copy_is_replaced_by_its_best_passing_duplicate(groups: list) -> None:
    rows, dups = [], {}
    for g, (root_aesthetic, members) in enumerate(groups):
        root = f"r{g}"
        reason = CUT.reason if CUT.violation(root_aesthetic) else None
        rows.append(_row(root, 4100, root_aesthetic, reason=reason))
        for m, (width, aesthetic) in enumerate(members):
            rows.append(_row(f"d{g}_{m}", width, aesthetic, reason="duplicate", root=root))
            dups[f"d{g}_{m}"] = (root, "", 0.99)
    promoted = semantic_promotions(pa.Table.from_pylist(rows), dups, [CUT])
    by_source = {r[schema.SOURCE]: r for r in rows}
    for g, (root_aesthetic, members) in enumerate(groups):
        passing = [(w, f"d{g}_{m}") for m, (w, a) in enumerate(members) if a >= CUT.min]
        mine = [s for s, (root, _) in promoted.items() if root == f"r{g}"]
        if CUT.violation(root_aesthetic) is None or not passing:
            assert mine == []
        else:  # the widest passing duplicate (more pixels rank first), ties by source
            best = min(passing, key=lambda p: (-p[0], p[1]))[1]
            assert mine == [best]
            assert promoted[best][1] == by_source[best][schema.SHA256]
