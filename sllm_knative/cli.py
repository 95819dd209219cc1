"""The `sllm-knative` command line.

Each subcommand lives in its own module under `sllm_knative/commands/` and exposes
`register(subparsers)`; the parser sets `func(args) -> int`. Heavy imports (torch,
transformers) happen inside the commands, so `sllm-knative --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from sllm_knative import log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sllm-knative", description="Serverless LLM inference on Knative")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: $SLLM_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from sllm_knative import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"sllm_knative.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
