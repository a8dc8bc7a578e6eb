"""The job's listing runs in Ray tasks and lists exactly what the driver-side listing lists."""

from __future__ import annotations

import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.io.listing import list_inputs, plan_inputs
from pipelines.config import load_config
from pipelines.curate import KIND, SIDECAR, list_job

NAMES = st.lists(
    st.tuples(
        st.sampled_from(["", "sub/", "sub/deeper/"]),
        st.sampled_from(["a", "b", "c d", "ünï", "x#y"]),
        st.sampled_from([".jpg", ".png", ".txt", ".json", ".tar", ".webp"]),
    ),
    min_size=1,
    max_size=10,
    unique=True,
)


def _inputs(tmp_path, names) -> list[str]:
    folder = tmp_path / "in"
    for prefix, stem, ext in names:
        path = folder / f"{prefix}{stem}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if ext == ".tar":
            with tarfile.open(path, "w"):
                pass
        else:
            path.write_bytes(b"not really an image")
    lst = tmp_path / "more.lst"
    lst.write_text("# comments and blanks are skipped\n\n/data/p-{0..2}.jpg\ns3://b/k.tar\n")
    return [str(folder), str(lst)]


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=NAMES, chunk=st.sampled_from([1, 2, 1000]))  # rows per yielded chunk
def test_ray_listing_equals_the_driver_listing(local_ray, tmp_path_factory, names, chunk):
    inputs = _inputs(tmp_path_factory.mktemp("listing"), names)
    want = sorted((i.uri, i.sidecar, i.kind) for i in list_inputs(inputs))
    listing = list_job(local_ray.data, plan_inputs(inputs), load_config(), chunk=chunk)
    rows = listing.rows.take_all() if listing.rows is not None else []
    got = sorted((r["source"], r[SIDECAR], r[KIND]) for r in rows)
    assert got == want
    assert listing.count == len(want)
    assert listing.tars == sum(1 for w in want if w[2] == "tar")
