"""`native4k stats`: per-bucket / per-reason / per-column tables from the manifest."""

from __future__ import annotations

import json
import math
import statistics
import unicodedata

import fsspec
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation import schema
from pipelines import stats as stats_module
from pipelines.cli import main
from pipelines.stats import job_stats, output_stats

BUCKETS = ["3840x2176", "4096x2048", "2880x2880"]
REASONS = ["upscaled", "blurry", "too_small"]

row_strategy = st.fixed_dictionaries(
    {
        "kept": st.booleans(),
        "bucket": st.sampled_from(BUCKETS),
        "reason": st.sampled_from(REASONS),
        "shard": st.integers(0, 2),
        "size": st.one_of(st.none(), st.integers(0, 10**9)),
        "sharpness": st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
        "entropy": st.one_of(st.none(), st.floats(0, 8)),
        "fmt": st.sampled_from(["jpeg", "png", None]),
    }
)


def _table(rows: list[dict]) -> pa.Table:
    cols = {
        schema.SOURCE: [f"/in/{i}" for i in range(len(rows))],
        schema.STATUS: ["kept" if r["kept"] else "rejected" for r in rows],
        schema.REASON: [None if r["kept"] else r["reason"] for r in rows],
        schema.BUCKET: [r["bucket"] if r["kept"] else None for r in rows],
        schema.SHARD: [
            f"shards/{r['bucket']}/{r['bucket']}-{r['shard']:06d}.tar" if r["kept"] else None
            for r in rows
        ],
        schema.SIZE_BYTES: [r["size"] for r in rows],
        schema.SHARPNESS: [r["sharpness"] for r in rows],
        schema.ENTROPY: [r["entropy"] for r in rows],
        schema.FORMAT: [r["fmt"] for r in rows],
    }
    return schema.conform(pa.table({k: pa.array(v, schema.FIELDS[k]) for k, v in cols.items()}))


def _expect(rows: list[dict], score: str) -> tuple[float, float] | None:
    vals = [r[score] for r in rows if r[score] is not None]
    return (statistics.fmean(vals), statistics.median(vals)) if vals else None


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row_strategy, max_size=40))
def test_bucket_and_reason_tables_match_a_plain_python_count(rows):
    s = job_stats(_table(rows))
    with pytest.MonkeyPatch.context() as mp:  # medians by one lexsort (jobs with many groups)
        mp.setattr(stats_module, "PER_GROUP_MEDIANS", 0)
        assert job_stats(_table(rows)) == s
    kept = [r for r in rows if r["kept"]]
    assert (s["total"], s["kept"], s["rejected"]) == (len(rows), len(kept), len(rows) - len(kept))
    assert s["bytes"] == sum(r["size"] or 0 for r in rows)
    assert s["kept_bytes"] == sum(r["size"] or 0 for r in kept)
    groups = {g["bucket"]: g for g in s["groups"]}
    assert set(groups) == {r["bucket"] for r in kept}
    assert [g["samples"] for g in s["groups"]] == sorted(
        (g["samples"] for g in s["groups"]), reverse=True
    )
    for b, g in groups.items():
        members = [r for r in kept if r["bucket"] == b]
        assert g["samples"] == g["kept"] == len(members)
        assert g["shards"] == len({r["shard"] for r in members})
        assert g["bytes"] == sum(r["size"] or 0 for r in members)
        assert math.isclose(g["share"], len(members) / len(kept), abs_tol=1e-6)
        for score in ("sharpness", "entropy"):
            want = _expect(members, score)
            if want is None:
                assert score not in g["scores"]
            else:
                assert _close(g["scores"][score]["mean"], want[0])
                assert _close(g["scores"][score]["median"], want[1])
    reasons = {g["reason"]: g for g in s["reasons"]}
    assert set(reasons) == {r["reason"] for r in rows if not r["kept"]}
    for reason, g in reasons.items():
        members = [r for r in rows if not r["kept"] and r["reason"] == reason]
        assert g["samples"] == g["rejected"] == len(members)
        assert math.isclose(g["share"], len(members) / len(rows), abs_tol=1e-6)
        want = _expect(members, "sharpness")
        assert (want is None) == ("sharpness" not in g["scores"])


@settings(max_examples=30, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=30))
def test_by_any_column_cuts_every_row(rows):
    s = job_stats(_table(rows), by="format")
    groups = {g["format"]: g for g in s["groups"]}
    assert set(groups) == {r["fmt"] for r in rows}  # null is a group of its own
    for fmt, g in groups.items():
        members = [r for r in rows if r["fmt"] == fmt]
        assert g["samples"] == len(members)
        assert g["kept"] == sum(r["kept"] for r in members)
        assert math.isclose(g["share"], len(members) / len(rows), abs_tol=1e-6)
        want = _expect(members, "entropy")
        if want:
            assert _close(g["scores"]["entropy"]["median"], want[1])


def _outputs(audit_output, audit_jpeg, n_kept: int):
    kept = [
        {
            "data": audit_jpeg(64, 36, i),
            "ext": "jpg",
            "bucket": BUCKETS[i % 2],
            "sharpness": 10.0 + i,
            "entropy": 7.0 + i / 10,
            "width": 3840,
            "height": 2160,
        }
        for i in range(n_kept)
    ]
    rejected = [
        {"source": "/in/a.jpg", "reason": "upscaled", "sharpness": 3.0, "size_bytes": 100},
        {"source": "/in/b.jpg", "reason": "upscaled", "sharpness": 5.0, "size_bytes": 300},
        {"source": "/in/c.png", "reason": "too_small", "size_bytes": 50},
    ]
    return audit_output(kept, rejected, name=f"out{n_kept}")


@pytest.mark.parametrize("n_kept", [0, 1, 5])
def test_cli_tables_json_and_by(audit_output, audit_jpeg, capsys, n_kept):
    out, _ = _outputs(audit_output, audit_jpeg, n_kept)
    assert main(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{n_kept + 3} inputs" in text and "upscaled" in text and "too_small" in text
    assert ("(no kept images)" in text) == (n_kept == 0)
    assert main(["stats", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kept"] == n_kept and s["rejected"] == 3
    assert sum(g["samples"] for g in s["groups"]) == n_kept
    up = next(g for g in s["reasons"] if g["reason"] == "upscaled")
    assert up["samples"] == 2 and up["bytes"] == 400
    assert up["scores"]["sharpness"] == {"mean": 4.0, "median": 4.0}
    if n_kept:
        top = s["groups"][0]
        assert top["bucket"] == BUCKETS[0] and top["shards"] == -(-top["samples"] // 2)
        assert top["scores"]["sharpness"]["median"] == statistics.median(
            10.0 + i for i in range(n_kept) if i % 2 == 0
        )
    assert main(["stats", str(out), "--by", "status", "--json"]) == 0
    by = {g["status"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert by["rejected"]["samples"] == 3 and by.get("kept", {"samples": 0})["samples"] == n_kept
    assert main(["stats", str(out), "--by", "no_such_column"]) == 2
    assert "no_such_column" in capsys.readouterr().err


def test_unfinished_output_is_refused(audit_output, audit_jpeg, capsys):
    out, _ = _outputs(audit_output, audit_jpeg, 1)
    (out / "_SUCCESS").unlink()
    assert main(["stats", str(out)]) == 2
    assert "no finished curation job" in capsys.readouterr().err


def test_a_typo_or_a_file_is_named_as_such(tmp_path, capsys):
    """A path that is not there is not called an unfinished job (stats and report alike)."""
    afile = tmp_path / "afile.txt"
    afile.write_text("hi")
    for command in ("stats", "report"):
        for path, words in ((tmp_path / "nope", "does not exist"), (afile, "is a file")):
            assert main([command, str(path)]) == 2
            err = capsys.readouterr().err
            assert words in err and "no finished" not in err


def test_s3_output_gives_the_same_tables(audit_output, audit_jpeg, s3_server):
    import boto3

    out, _ = _outputs(audit_output, audit_jpeg, 3)
    boto3.client("s3").create_bucket(
        Bucket="audit-stats", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    fs = fsspec.filesystem("s3")
    fs.put(str(out) + "/", "audit-stats/job", recursive=True)
    assert output_stats("s3://audit-stats/job") == output_stats(str(out))
    assert output_stats("s3://audit-stats/job", by="reason")["groups"]


@settings(max_examples=30, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=20))
def test_the_share_column_says_which_rows_it_is_of(rows):
    """Plain `stats` cuts kept rows by bucket; `--by bucket` cuts every row: the header and
    the JSON say which, and the shares add up over those rows."""
    t = _table(rows)
    for by, of in ((None, "kept"), (schema.BUCKET, "all")):
        s = job_stats(t, by=by)
        assert s["rows"] == of
        assert sum(g["samples"] for g in s["groups"]) == (
            s["kept"] if of == "kept" else s["total"]
        )
        text = stats_module.stats_text(s)
        if s["groups"]:
            assert f"share ({of})" in text and ("rejected  share" in text) == (of == "all")
        else:
            assert "(no kept images)" in text and of == "kept"


@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12))
def test_control_characters_in_names_never_reach_the_terminal(name):
    """A crawled name with escape codes or line breaks is shown escaped, one row per group."""
    t = _table([{"kept": True, "bucket": BUCKETS[0], "reason": "blurry", "shard": 0,
                 "size": 1, "sharpness": 1.0, "entropy": 1.0, "fmt": "jpeg"}])
    t = t.set_column(t.schema.get_field_index(schema.SOURCE), schema.SOURCE,
                     pa.array([f"/in/{name}"], pa.string()))  # fmt: skip
    text = stats_module.stats_text(job_stats(t, by=schema.SOURCE))
    assert not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text if c != "\n")
    table_lines = text.split("\n\n")[1].splitlines()
    assert len(table_lines) == 3  # header, rule, the one group


def test_a_manifest_that_disagrees_with_success_is_refused(audit_output, audit_jpeg, capsys):
    """A stray or missing manifest file would make every count wrong: stats and report say so
    instead of printing them."""
    import shutil

    import pyarrow.parquet as pq

    out, _ = _outputs(audit_output, audit_jpeg, 2)
    part = sorted((out / "manifest").glob("*.parquet"))[0]
    stray = out / "manifest" / "part-99999-0.parquet"
    shutil.copy(part, stray)
    total, extra = 2 + 3, pq.read_metadata(part).num_rows
    for command in ("stats", "report"):
        assert main([command, str(out)]) == 2
        err = capsys.readouterr().err
        assert f"holds {total + extra} rows but _SUCCESS records {total}" in err
        assert "native4k verify" in err
    stray.unlink()
    assert main(["stats", str(out)]) == 0
    capsys.readouterr()
    pq.write_table(pq.read_table(part).drop_columns(["status"]), part)
    assert main(["stats", str(out)]) == 2
    assert "has no 'status' column" in capsys.readouterr().err


def test_tables_align_wide_characters_by_display_width():
    """Column widths were counted in characters, so a CJK name (two columns each) pushed the
    rest of its row out of line."""
    from pipelines.stats import display_width, format_table

    text = format_table(["source", "kept"], [["/in/日本の山.jpg", "1"], ["/in/lake.jpg", "12"]])
    rows = text.splitlines()
    starts = {display_width(r[: r.rindex(" ") + 1]) for r in (rows[0], rows[2], rows[3])}
    assert len(starts) == 1, text  # the second column starts at one display column
    assert display_width("日本") == 4 and display_width("e\u0301") == 1
