"""`make demo`: build the sample set, run the curation job on local Ray, say where it all is."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipelines.cli import main as cli_main
from pipelines.samples import build_samples


def main() -> int:
    """Build `demo_out/samples`, curate it into `demo_out/curated`, print the locations."""
    root = Path("demo_out").resolve()
    samples, curated = root / "samples", root / "curated"
    start = time.perf_counter()
    expected = build_samples(samples, real_photos=10)
    print(
        f"demo: wrote {len(expected)} sample inputs to {samples} "
        f"({time.perf_counter() - start:.0f} s; expected outcomes in expected.json)"
    )
    rc = cli_main(["curate", str(samples), "--output", str(curated)])
    if rc != 0:
        return rc
    rc = cli_main(["verify", str(curated)])
    report = cli_main(["report", str(curated)])
    print()
    print(f"demo: shards   {curated / 'shards'}")
    print(f"demo: manifest {curated / 'manifest'}")
    print(f"demo: report   {curated / 'report.html'}  (and `native4k stats {curated}`)")
    return rc or report


if __name__ == "__main__":
    sys.exit(main())
