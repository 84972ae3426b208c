"""The `dml` command: `dml <stage> --config FILE [key=value ...]`, and `dml config` to print
the resolved config. ``key=value`` overrides may stand anywhere on the command line. Packages
add commands of their own through entry points (`dml.cli_plugins`): `pipeline` adds
`dml pipeline`, so the library never imports the orchestration built on it.

Every command logs where its outputs went and exits non-zero with a one-line reason on bad
input (any `DMLError`) and on a failing file operation (any `OSError`: disk full, a name
too long, a file where a folder belongs), naming the path; other exceptions keep their
traceback, since those are bugs. ``-v`` prints the traceback of one-line errors too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from dml.cli_plugins import add_plugin_commands
from dml.config import load_config
from dml.data.workers import die_with_parent
from dml.errors import ConfigError, DMLError, os_error_line, printable


def setup_logging(verbose: bool = False) -> None:
    """One compact line per event on stderr (progress bars share the stream).

    In a multi-process run (torchrun's ``RANK`` / ``WORLD_SIZE``) only rank 0 logs INFO; the
    other ranks log warnings and errors, each line marked with its rank (every rank used to
    repeat each stage line). ``verbose`` logs DEBUG on every rank.
    """
    rank, world = _env_position()
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    marker = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {marker}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Libraries that log every request or their own import at INFO drown the stage lines.
    for noisy in ("httpx", "faiss.loader", "openTSNE"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _env_position() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when started alone. Values that
    are not integers count as alone here: the launch itself reports them."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _end_with_launcher() -> None:
    """Under torchrun, end this worker when its launcher dies. A launcher killed with SIGKILL
    (a job scheduler, an OOM kill) runs no clean-up, and its workers kept training as orphans
    holding the run folder; the kernel now kills them (Linux), or a watch of the parent pid
    notices within a second (see `dml.data.workers.die_with_parent`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        die_with_parent(os.getppid())


def _add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.batch_size=32")


def _check_prepare_options(args: argparse.Namespace) -> None:
    """--merge and --verify act on a shard folder alone; given with each other or with the
    options of a run, the others were silently ignored. Raises `ConfigError` (one line)."""
    action = "--verify" if args.verify else "--merge" if args.merge else None
    run_options = [
        name
        for name, given in (
            ("--merge", args.verify and args.merge),
            ("--config", args.config),
            ("key=value overrides", args.overrides),
            ("--resume", args.resume),
            ("--partition", args.partition is not None),
        )
        if given
    ]
    if action and run_options:
        raise ConfigError(f"dml prepare {action} DIR takes no {' or '.join(run_options)}; run them separately")


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dml.prepare import parse_partition, run_merge, run_prepare, run_verify

    _check_prepare_options(args)
    if args.verify:
        problems = run_verify(args.verify)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"verify: {args.verify}: {'ok' if not problems else f'{len(problems)} bad shard(s)'}")
        return 1 if problems else 0
    if args.merge:
        result = run_merge(args.merge)
    else:
        # prepare never builds a model: skip importing timm just to check backbone names
        config = load_config(args.config, args.overrides, check_backbones=False)
        result = run_prepare(config, resume=args.resume, partition=parse_partition(args.partition))
    print(
        f"prepare: {result.inputs} inputs, {result.written} written, {result.rejected} rejected; "
        f"manifest: {result.manifest_path}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dml.train.run import run_train

    result = run_train(load_config(args.config, args.overrides), resume=args.resume, allow_new_data=args.allow_new_data)
    if result is not None and _is_rank_zero():
        print(
            f"train: {result.steps} steps; model: {result.model_path}; run: {result.run_dir}; "
            + _headline(result.metrics)
        )
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from dml.tune.run import run_tune

    result = run_tune(args.config, args.space, args.overrides, resume=args.resume)
    for line in result.lines:
        print(f"tune: {line}")
    print(f"tune: best config: {result.best_config}; report: {result.report_path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dml.eval.run import run_evaluate

    result = run_evaluate(load_config(args.config, args.overrides), embeddings_dir=args.embeddings)
    if _is_rank_zero():
        print(f"evaluate: report: {result.report_path}; " + _headline(result.metrics))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from dml.distill.run import run_distill

    result = run_distill(load_config(args.config, args.overrides), resume=args.resume)
    if _is_rank_zero():
        print(f"distill: {result.steps} steps; student: {result.model_path}; " + _headline(result.metrics))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dml.export.run import run_export

    result = run_export(load_config(args.config, args.overrides))
    formats = ", ".join(f"{name}: {path}" for name, path in result.files.items())
    print(f"export: {formats}; model card: {result.card_path}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _cmd_track(args: argparse.Namespace) -> int:
    from dml.tracking.sync import sync_folder

    print(f"track sync: {args.run_dir} -> mlflow run {sync_folder(args.run_dir, args.uri)}")
    return 0


def _headline(metrics: dict) -> str:
    keys = ("map_at_r", "precision_at_1")
    return ", ".join(
        f"{k}={v:.4f}" for k, v in metrics.items() if any(k.endswith(key) for key in keys) and isinstance(v, float)
    )


def _is_rank_zero() -> bool:
    from dml.distributed import launched_rank  # imports torch: only after a stage ran

    return launched_rank() == 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dml`` argument parser: one subcommand per stage, plus ``config`` and ``pipeline``."""
    parser = argparse.ArgumentParser(prog="dml", description="Distributed deep metric learning pipeline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="raw images -> WebDataset shards + manifest.json")
    _add_config_args(prepare)
    prepare.add_argument("--resume", action="store_true", help="keep finished shards, redo the rest")
    prepare.add_argument("--partition", metavar="i/N", help="write only partition i of N (then --merge)")
    prepare.add_argument("--merge", metavar="DIR", help="combine the partial manifests in DIR")
    prepare.add_argument("--verify", metavar="DIR", help="re-hash every shard in DIR against its manifest")
    prepare.set_defaults(handler=_cmd_prepare)

    train = sub.add_parser("train", help="train the embedding model (torchrun for several processes)")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument(
        "--allow-new-data",
        action="store_true",
        help="with --resume: continue on other shards (a fine-tune; see README)",
    )
    train.set_defaults(handler=_cmd_train)

    tune = sub.add_parser("tune", help="fair hyperparameter search: class-disjoint folds, Optuna, seeds on test")
    _add_config_args(tune, required=True)
    tune.add_argument("--space", required=True, help="search-space YAML: dotted config keys with ranges/choices")
    tune.add_argument("--resume", action="store_true", help="continue the study; killed trials are retried")
    tune.set_defaults(handler=_cmd_tune)

    evaluate = sub.add_parser("evaluate", help="faiss retrieval / verification metrics and a report")
    _add_config_args(evaluate)
    evaluate.add_argument("--embeddings", metavar="DIR", help="recompute metrics from saved embeddings (no model)")
    evaluate.set_defaults(handler=_cmd_evaluate)

    distill = sub.add_parser("distill", help="distil a trained teacher into a compact student")
    _add_config_args(distill)
    distill.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    distill.set_defaults(handler=_cmd_distill)

    export = sub.add_parser("export", help="ONNX / TorchScript export with parity check and model card")
    _add_config_args(export)
    export.set_defaults(handler=_cmd_export)

    config = sub.add_parser("config", help="print the resolved config (extends and overrides applied) as YAML")
    _add_config_args(config)
    config.set_defaults(handler=_cmd_config)

    track = sub.add_parser("track", help="experiment tracking: upload a stage folder to MLflow later")
    track_sub = track.add_subparsers(dest="action", required=True)
    sync = track_sub.add_parser("sync", help="upload RUN_DIR's metrics.jsonl, config and files to MLflow")
    sync.add_argument("run_dir", metavar="RUN_DIR")
    sync.add_argument("--uri", help="tracking URI (default: the one recorded in RUN_DIR/tracking.json)")
    sync.set_defaults(handler=_cmd_track)

    add_plugin_commands(sub, _add_config_args)  # `dml pipeline`, registered by the pipeline package
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with ``key=value`` overrides accepted anywhere, not only before the first
    option: argparse leaves those after an option unrecognised, so they are collected here
    (in command-line order) and anything else unrecognised is still an error."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dml` console script; returns the process exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    setup_logging(args.verbose)
    _end_with_launcher()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (DMLError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        line = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        # One write of line and newline: print() writes them separately, and two torchrun ranks
        # failing together interleaved into "AB\n\n" (seen in a fresh clone's test run).
        sys.stderr.write(f"dml {args.command}: error: {printable(line)}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt as exc:
        said = f": {exc}" if str(exc) else ""  # e.g. prepare's "run ... with --resume to continue"
        print(f"dml {args.command}: interrupted{said}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
