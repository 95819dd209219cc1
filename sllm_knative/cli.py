"""The `sllm-knative` command line.

Each subcommand lives in its own module under `sllm_knative/commands/` and exposes
`register(subparsers)`; the parser sets `func(args) -> int`. Heavy imports (torch,
transformers) happen inside the commands, so `sllm-knative --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback

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


def describe(exc: BaseException) -> str:
    """An error as the one line the CLI prints: what went wrong and where, never a traceback.
    A message of several lines (a component's log tail) is cut to its first line."""
    import httpx

    if isinstance(exc, httpx.TransportError):  # a component that does not answer
        try:
            where = f" {exc.request.method} {exc.request.url}"
        except RuntimeError:  # no request attached
            where = ""
        text = f"cannot reach{where}: {str(exc) or type(exc).__name__} (is the local cluster running?)"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, (ValueError, OSError, RuntimeError)):
            text = f"{type(exc).__name__}: {text}"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        if logging.getLogger().isEnabledFor(logging.DEBUG):  # --log-level DEBUG: the whole story
            traceback.print_exc()
        return 2 if isinstance(exc, (ValueError, OSError)) else 1


if __name__ == "__main__":
    sys.exit(main())
