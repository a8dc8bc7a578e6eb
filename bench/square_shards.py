"""Curated shards in the 4096×4096 bucket, for training steps fed by the real loader.

Renders ``--count`` native 4096×4096 scenes (`pipelines.samples.render`: drawn at that size,
no resampling) as JPEG q95 into ``DIR/inputs`` and runs the real ``native4k curate`` on them
(local Ray, default settings) into ``DIR/curated``, the folder ``bench/train_step_gpu.py
--data`` reads (and the one a device call carries: about 6 MB per image).

Usage: ``python -m bench.square_shards DIR [--count 8]``.
"""

from __future__ import annotations

import argparse
import collections
import io
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from pipelines.samples import render

SIDE = 4096


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--count", type=int, default=8)
    args = ap.parse_args()
    inputs, out = args.dir / "inputs", args.dir / "curated"
    inputs.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        path = inputs / f"render_{i:03d}.jpg"
        if not path.exists():
            buf = io.BytesIO()
            Image.fromarray(render(SIDE, SIDE, seed=1000 + i)).save(buf, "JPEG", quality=95)
            path.write_bytes(buf.getvalue())
    native4k = str(Path(sys.executable).with_name("native4k"))
    subprocess.run([native4k, "curate", str(inputs), "--output", str(out)], check=True)
    rows = pq.read_table(out / "manifest", columns=["status", "reason", "bucket"]).to_pylist()
    outcome = collections.Counter(r["bucket"] or r["reason"] for r in rows)
    print(f"{out}: {dict(outcome)}")
    return 0 if outcome.get(f"{SIDE}x{SIDE}") else 1


if __name__ == "__main__":
    sys.exit(main())
