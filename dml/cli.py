"""The `dml` command: `dml <stage> --config FILE [key=value ...]`.

Every command logs where its outputs went and exits non-zero with a one-line reason on bad
input (any `DMLError`); unexpected exceptions keep their traceback, since those are bugs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from dml.config import load_config
from dml.errors import DMLError

log = logging.getLogger("dml")


def setup_logging(verbose: bool = False) -> None:
    """One compact line per event on stderr (progress bars share the stream)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.batch_size=32")


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dml.prepare import parse_partition, run_merge, run_prepare, run_verify

    if args.verify:
        problems = run_verify(args.verify)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"verify: {args.verify}: {'ok' if not problems else f'{len(problems)} bad shard(s)'}")
        return 1 if problems else 0
    if args.merge:
        result = run_merge(args.merge)
    else:
        config = load_config(args.config, args.overrides)
        result = run_prepare(config, resume=args.resume, partition=parse_partition(args.partition))
    print(f"prepare: {result.inputs} inputs, {result.written} written, {result.rejected} rejected; "
          f"manifest: {result.manifest_path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dml.train.run import run_train

    result = run_train(load_config(args.config, args.overrides), resume=args.resume)
    if result is not None and _is_rank_zero():
        summary = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if "map_at_r" in k or "precision_at_1" in k)
        print(f"train: {result.steps} steps; model: {result.model_path}; run: {result.run_dir}"
              + (f"; {summary}" if summary else ""))
    return 0


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
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
    train.set_defaults(handler=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dml` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except DMLError as exc:
        print(f"dml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
