"""The job-wide dedup step on Ray: chains of near duplicates resolve to the one kept copy."""

import pyarrow as pa
import pytest

from curation import schema
from pipelines.config import load_config
from pipelines.curate import Partitioning, dedup_decisions

pytestmark = [pytest.mark.ray]


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def test_chain_resolves_to_the_root_and_far_rows_stay(local_ray):
    # a ~ b ~ c within 4 bits each, a and c 8 bits apart; d is unrelated
    a, b, c, d = 0, 0b1111, 0b11111111, 0xFFFF_FFFF_0000_0000
    rows = pa.table(
        {
            schema.SOURCE: ["a", "b", "c", "d"],
            schema.SHA256: ["sa", "sb", "sc", "sd"],
            schema.PHASH: pa.array([_signed(x) for x in (a, b, c, d)], pa.int64()),
            schema.WIDTH: [6000, 5000, 4000, 6000],
            schema.HEIGHT: [4000, 3000, 2500, 4000],
            schema.SHARPNESS: [1.0, 1.0, 1.0, 1.0],
            schema.NATIVE_SCORE: [1.0, 1.0, 1.0, 1.0],
            schema.STATUS: pa.nulls(4, pa.string()),
        }
    )
    cfg = load_config(None, ["dedup.max_hamming=4"])
    ds = local_ray.data.from_arrow(rows)
    decisions = dedup_decisions(ds, cfg, Partitioning(2, 1))  # up to 4 partitions, most empty
    out = {r["source"]: (r["root"], r["root_sha256"]) for r in decisions.take_all()}
    assert out == {"b": ("a", "sa"), "c": ("a", "sa")}
