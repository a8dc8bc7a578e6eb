"""The `native4k` command line: curate and audit (stats, verify, report), models and config,
generate, and training (train-dit, train-vae, encode-text)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from curation.io.atomic import storage_errors
from pipelines.arguments import at_least


def _curate(args: argparse.Namespace) -> int:
    global _STOPPED_OWN_RAY
    from pipelines.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"native4k: configuration error: {e}", file=sys.stderr)
        return 2
    started_ray = not _ray_running()
    try:
        return _run_and_report(args, cfg)
    finally:
        sys.stdout.flush()
        if started_ray:  # not a Ray instance this process was given (the tests' shared one)
            _stop_ray()
            _STOPPED_OWN_RAY = True


def _run_and_report(args: argparse.Namespace, cfg: Any) -> int:
    """`native4k curate` after its configuration loaded: the job, then its summary."""
    from pipelines.config import ConfigError
    from pipelines.curate import JobFailed, bucket_table, outcome_lines, run_curate
    from pipelines.model_pass import check_models
    from pipelines.report import summary_text

    try:
        bucket_table(cfg)
        check_models(cfg)  # missing weight files stop the job before any work
        result = run_curate(args.inputs, args.output, cfg, ray_address=args.ray_address)
    except ConfigError as e:
        print(f"native4k: configuration error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"native4k: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"native4k: {e}", file=sys.stderr)
        return 2
    except storage_errors() as e:  # outside a pass: OUT's or an INPUT's storage said no
        print(f"native4k: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"native4k: {note}")
    print()
    print(summary_text(result.stats))
    print()
    for line in outcome_lines(result.stats):
        print(f"native4k: {line}")
    kept = result.stats.get("kept", 0)
    print(f"shards:   {f'{result.output}/shards/' if kept else 'none (nothing kept)'}")
    print(f"manifest: {result.output}/manifest/")
    print(f"stats:    {result.output}/stats.json   (native4k stats {result.output})")
    return 0


def _ray_running() -> bool:
    """Whether this process is already connected to Ray (the tests' shared instance)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _stop_ray() -> None:
    """Stop the job's local Ray instance: about 1.5 s sooner than Ray's own exit hook.

    The hook first sleeps 0.5 s to let worker logs drain (this job forwards none). Ray then
    stops the GCS before its autoscaler monitor, whose SIGTERM handler waits on the stopped
    GCS until Ray kills it a second later; a local instance has nothing to autoscale, so the
    monitor is killed first. Where Ray's internals differ, its plain shutdown runs.
    """
    if not _ray_running():
        return
    ray = sys.modules["ray"]
    with contextlib.suppress(Exception):
        for info in ray._private.worker._global_node.all_processes.get("monitor", []):
            info.process.kill()
            info.process.wait(timeout=1)
    ray.shutdown()


def _audit_error(output: str, e: Exception) -> int:
    """One line for an audit that cannot run: OUT unusable (exit 2)."""
    storage = not isinstance(e, ValueError) or isinstance(e, UnicodeDecodeError)
    print(f"native4k: {f'cannot use {output}: ' if storage else ''}{e}", file=sys.stderr)
    return 2


def _stats(args: argparse.Namespace) -> int:
    from pipelines.stats import output_stats, stats_json, stats_text

    try:
        stats = output_stats(args.output, by=args.by)
    except (ValueError, *storage_errors()) as e:
        return _audit_error(args.output, e)
    print(stats_json(stats) if args.json else stats_text(stats))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipelines.stats import count_text, printable
    from pipelines.verify import run_verify

    try:
        res = run_verify(args.output, deep=args.deep, workers=args.workers, progress=True)
    except (ValueError, *storage_errors()) as e:
        return _audit_error(args.output, e)
    for p in res.findings:
        print(f"MISMATCH {printable(p)}")  # a finding quotes names, which may hold escapes
    checked = ", ".join(count_text(n, noun) for n, noun in (
        (res.rows, "manifest row"), (res.shards, "shard"), (res.samples, "sample")))
    if res.findings:
        print(
            f"native4k verify: {len(res.findings)} problem(s) in {args.output} ({checked})",
            file=sys.stderr,
        )
        return 1
    deep = ", every image decoded" if args.deep and res.samples else ""
    print(f"native4k verify: {args.output} agrees with its manifest ({checked}{deep})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipelines.report import write_report

    try:
        print(write_report(args.output, samples=args.samples))
    except (ValueError, *storage_errors()) as e:
        return _audit_error(args.output, e)
    return 0


def _config(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, dump_yaml, load_config

    try:
        print(dump_yaml(load_config(args.config, args.set)))
    except ConfigError as e:
        print(f"native4k: configuration error: {e}", file=sys.stderr)
        return 2
    return 0


def _models(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, load_config
    from pipelines.model_pass import check_metric, configured_models, plan_models

    try:
        cfg = load_config(args.config, args.set)
        check_metric(cfg)
    except ConfigError as e:
        print(f"native4k: configuration error: {e}", file=sys.stderr)
        return 2
    entries = configured_models(cfg)
    for e in entries:
        state = "present" if e.present else ("absent" if e.optional else "MISSING")
        print(f"{state:8} {e.setting:26} {e.path}\n{'':8} {e.purpose}")
        if not e.present:
            print(f"{'':8} {'optional' if e.optional else 'needed'}; to provide it: {e.how}")
    if not entries:
        print("no model is configured (see `native4k config`, sections models/score/caption)")
    for note in plan_models(cfg).notes:
        print(f"note: {note}")
    return 0 if all(e.present or e.optional for e in entries) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="native4k", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML file overriding the defaults (see `native4k config`)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one setting, e.g. --set dedup.max_hamming=4",
        )

    p = sub.add_parser("curate", help="curate INPUTs into native-4K WebDataset shards")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folder, URI list file, s3:// prefix, or WebDataset tar (brace patterns ok)",
    )
    p.add_argument("--output", "-o", required=True, help="output folder or s3:// prefix")
    p.add_argument("--ray-address", help="address of a running Ray cluster (default: local Ray)")
    config_args(p)
    p.set_defaults(func=_curate)

    p = sub.add_parser("stats", help="print the per-bucket and per-reason tables of OUT")
    p.add_argument("output", metavar="OUT", help="a finished job's folder or s3:// prefix")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.add_argument(
        "--by",
        metavar="COLUMN",
        help="cut every row, rejected ones included, by this manifest column (default: the "
        "kept rows by bucket, then the rejected ones by reason)",
    )
    p.set_defaults(func=_stats)

    p = sub.add_parser(
        "verify", help="re-read every shard of OUT and check it against the manifest"
    )
    p.add_argument("output", metavar="OUT")
    p.add_argument("--deep", action="store_true", help="also decode every image in full")
    p.add_argument(
        "--workers", type=at_least(1), help="processes reading shards (default: one per CPU)"
    )
    p.set_defaults(func=_verify)

    p = sub.add_parser("report", help="write OUT/report.html for auditors")
    p.add_argument("output", metavar="OUT")
    p.add_argument(
        "--samples", type=at_least(0), default=8,
        help="thumbnails per bucket and per rejection reason",
    )
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "models", help="list the configured models and whether their files are present"
    )
    config_args(p)
    p.set_defaults(func=_models)

    p = sub.add_parser("config", help="print the resolved configuration, documented")
    config_args(p)
    p.set_defaults(func=_config)

    p = sub.add_parser("generate", help="generate an image with an UltraFlux model folder")
    from pipelines import generate

    generate.add_arguments(p)
    p.set_defaults(func=generate.run)

    from pipelines import train

    p = sub.add_parser("train-dit", help="train the UltraFlux DiT on curated shards")
    train.add_train_arguments(p)
    p.set_defaults(func=train.train_dit_cmd)
    p = sub.add_parser("train-vae", help="post-train the F16 VAE decoder on curated shards")
    train.add_train_arguments(p)
    p.set_defaults(func=train.train_vae_cmd)
    p = sub.add_parser("encode-text", help="cache frozen text-encoder outputs of DATA's captions")
    train.add_encode_text_arguments(p)
    p.set_defaults(func=train.encode_text_cmd)
    return parser


_STOPPED_OWN_RAY = False
"""Set when `curate` stopped the Ray instance it started: nothing is left to tear down."""


def main(argv: Sequence[str] | None = None) -> int:
    """The command line, callable in-process (tests); returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def _stopped(code: int) -> None:
    """End a stopped command: one line (how to resume a `curate`), exit 130 or 143."""
    resume = "; rerun the same command to resume" if sys.argv[1:2] == ["curate"] else ""
    word = "interrupted" if code == 130 else "stopped (SIGTERM)"
    print(f"\nnative4k: {word}{resume}", file=sys.stderr)
    sys.exit(code)


def console() -> None:
    """Entry point of the `native4k` console script.

    After a `curate` that started and stopped its own Ray instance, every output file is
    closed and renamed and Ray is down; the interpreter's teardown of Ray's and Arrow's native
    modules would still take about 0.7 s, so the process ends at once (output flushed first).
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `native4k stats OUT | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not the traceback of wherever it landed
        curate = sys.modules.get("pipelines.curate")  # its SIGTERM handler raises `Terminated`
        term = curate is not None and isinstance(e, curate.Terminated)
        _stopped(128 + signal.SIGTERM if term else 130)
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        _stopped(128 + signal.SIGTERM)  # SIGTERM inside `ray.init`: Ray's handler exits 15
    if _STOPPED_OWN_RAY:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
