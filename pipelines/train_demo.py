"""`make train-demo`: a tiny DiT trains a few CPU steps on the shards `make demo` wrote.

Uses ``demo_out/curated`` (run ``make demo`` first). The models are tiny and random (an F16 VAE,
CLIP/T5 text encoders and a one-block-each DiT, saved in the real folder layouts under
``demo_out/train/parts``): the point is the path — shards → loader → frozen VAE and text cache
→ flow matching with the SNR-aware Huber wavelet loss → checkpoint → exported transformer — not
the loss value. Images train at 1/16 of their bucket size so each step takes well under a second.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from pipelines.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Write tiny parts, encode the captions, train 8 steps, print the losses."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="demo_out/curated", help="a curation output")
    parser.add_argument("--work", default="demo_out/train", help="where the demo writes")
    args = parser.parse_args(argv)
    curated = Path(args.data).resolve()
    if not (curated / "_SUCCESS").is_file():
        print(f"train-demo: {curated} is not a finished curation output: run `make demo` first")
        return 2
    from training.tiny import TINY_DIT, save_tiny_text_encoders, save_tiny_vae

    work = Path(args.work).resolve()
    parts = work / "parts"
    if not (parts / "vae" / "config.json").is_file():
        save_tiny_vae(parts / "vae")
        save_tiny_text_encoders(parts / "text_encoders")
    cache = work / "text_cache"
    rc = cli_main(
        ["encode-text", str(curated), "--encoders", str(parts / "text_encoders"),
         "--output", str(cache), "--max-sequence-length", "16", "--device", "cpu"]
    )  # fmt: skip
    if rc:
        return rc
    config = {
        "data": {"root": str(curated), "batch_size": 1, "resolution_divisor": 16},
        "model": {"architecture": TINY_DIT, "vae": str(parts / "vae")},
        "text": {"source": "cache", "cache": str(cache), "max_sequence_length": 16},
        "stages": [
            {"name": "all", "steps": 6},
            {"name": "sharpest-half, noisy t", "steps": 2, "select_column": "sharpness",
             "select_top": 0.5, "t_min": 0.54},
        ],
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "loop": {"output_dir": str(work / "run"), "mixed_precision": "no", "device": "cpu",
                 "progress": False, "log_every": 1, "resume": "never", "ema_decay": 0.9},
    }  # fmt: skip
    # the demo trains afresh each time: its earlier run is its own output, not a user's
    shutil.rmtree(work / "run", ignore_errors=True)
    path = work / "dit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"train-demo: config {path}")
    rc = cli_main(["train-dit", "--config", str(path)])
    if rc == 0:
        print(f"train-demo: TensorBoard logs in {work / 'run' / 'tensorboard'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
