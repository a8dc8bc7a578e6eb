"""`native4k train-dit`, `train-vae` and `encode-text`: the training module's command line.

Multi-GPU: ``torchrun --nproc-per-node 8 -m pipelines.cli train-dit --config FILE`` (every
rank reads the same config; set ``parallel.strategy: fsdp`` or ``ddp``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from pipelines.arguments import at_least


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """--config FILE and --set KEY=VALUE overrides."""
    p.add_argument("--config", required=True, help="YAML training configuration")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set loop.max_steps=100",
    )


def _train(args: argparse.Namespace, which: str) -> int:
    try:
        return _run_training(args, which)
    except KeyboardInterrupt:  # before a run began (loading the config imports diffusers)
        print(f"native4k train-{which}: interrupted before training started", file=sys.stderr)
        return 130


def _run_training(args: argparse.Namespace, which: str) -> int:
    from training.config import (
        DitTrainConfig,
        TrainConfigError,
        VaeTrainConfig,
        load_train_config,
    )

    cls = DitTrainConfig if which == "dit" else VaeTrainConfig
    try:
        cfg = load_train_config(cls, args.config, args.set)
    except TrainConfigError as e:
        print(f"native4k: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        if which == "dit":
            from training.dit_trainer import train_dit

            result = train_dit(cfg)
        else:
            from training.vae_trainer import train_vae

            result = train_vae(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"native4k: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # S3's own errors (no credentials, no endpoint): one line
        from pipelines.cli import storage_errors

        if isinstance(e, OSError) or not isinstance(e, storage_errors()):
            raise
        print(f"native4k: cannot read {cfg.data.root}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from training.checkpoint import latest_checkpoint

        last = latest_checkpoint(cfg.loop.output_dir)
        where = f"from {last}" if last is not None else "from the start (no checkpoint yet)"
        print(f"native4k train-{which}: interrupted; {_rerun(cfg)} to resume {where}",
              file=sys.stderr)
        return 130
    import torch.distributed as dist

    if result.stopped_by:
        import signal

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"native4k train-{which}: stopped by {result.stopped_by} after step "
                  f"{result.step}; {_rerun(cfg)} to resume from {result.checkpoint}",
                  file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        name = result.stopped_by if result.stopped_by in signal.Signals.__members__ else "SIGTERM"
        return 128 + signal.Signals[name].value  # as if the signal had ended the process
    if not dist.is_initialized() or dist.get_rank() == 0:
        last = f"{result.losses[-1]:.5g}" if result.losses else "n/a"
        print(f"native4k train-{which}: {result.step} steps, last loss {last}")
        if result.metrics:
            print("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
        if result.export:
            print(f"model:      {result.export}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def train_dit_cmd(args: argparse.Namespace) -> int:
    """`native4k train-dit --config FILE`."""
    return _train(args, "dit")


def train_vae_cmd(args: argparse.Namespace) -> int:
    """`native4k train-vae --config FILE`."""
    return _train(args, "vae")


def add_encode_text_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `native4k encode-text`."""
    p.add_argument("data", metavar="DATA", help="a curation output (folder or s3:// prefix)")
    p.add_argument(
        "--encoders",
        required=True,
        help="folder with text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ (FLUX.1-dev)",
    )
    p.add_argument("--output", "-o", required=True, help="cache folder to write")
    p.add_argument("--max-sequence-length", type=at_least(1), default=512, help="T5 tokens (512)")
    p.add_argument("--language", default="en", choices=["en", "zh"], help="caption column")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="captions per batch (8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def encode_text_cmd(args: argparse.Namespace) -> int:
    """Encode every kept sample's caption once, for `text.source: cache`."""
    import torch

    from training.text_cache import TextEncoders, write_text_cache

    if args.device == "cuda" and not torch.cuda.is_available():
        print("native4k: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # so the staging folder goes
    try:
        encoders = TextEncoders(
            args.encoders, device=device, dtype=torch.bfloat16 if use_cuda else torch.float32
        )
        meta = write_text_cache(
            args.data,
            encoders,
            args.output,
            max_sequence_length=args.max_sequence_length,
            language=args.language,
            batch_size=args.batch_size,
            encoders_folder=str(args.encoders),
            progress=sys.stderr.isatty(),
        )
    except (OSError, ValueError) as e:  # DATA, the output folder or an encoder file
        print(f"native4k: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # transformers on an encoder folder it cannot use
        print(f"native4k: cannot use the encoders in {args.encoders}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: nothing half-written is left
        term = bool(e.args) and e.args[0] == signal.SIGTERM
        print(f"native4k encode-text: {'stopped (SIGTERM)' if term else 'interrupted'}; "
              f"{args.output} is as it was; rerun the same command", file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM if term else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    column = f"caption_{args.language}"
    print(f"native4k encode-text: {meta['num_samples']} samples, {meta['captioned']} with a "
          f"{column} -> {args.output}")  # fmt: skip
    if not meta["captioned"]:
        print(f"native4k: no sample has a {column}: each gets the empty caption's embedding",
              file=sys.stderr)  # fmt: skip
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signum)


def _rerun(cfg: Any) -> str:
    """How to resume a stopped run: the same command, unless `loop.resume` names a checkpoint
    (or `never`), which would then refuse the run's own newer checkpoints."""
    if cfg.loop.resume == "auto":
        return "rerun the same command"
    return "rerun the same command with --set loop.resume=auto"
