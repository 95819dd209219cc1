"""`python -m loader_sidecar`: one node's checkpoint tiers over gRPC (see docs/sidecar.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from loader_sidecar.config import add_arguments, from_args
from loader_sidecar.server import serve
from sllm_knative import log
from sllm_knative.loader.errors import BadRequest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loader_sidecar",
                                     description="sllm-knative loader sidecar: checkpoint tiers remote -> SSD -> DRAM")
    add_arguments(parser)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: $SLLM_LOG_LEVEL or INFO)")
    args = parser.parse_args(argv)
    log.setup(args.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per range request is noise
    try:
        config = from_args(args)
    except BadRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from sllm_knative.kube.client import KubeConfigError

    try:
        asyncio.run(serve(config))
    except KubeConfigError as exc:  # --kube-node without a usable cluster configuration
        print(f"error: publishing the NodeCache of {config.kube_node}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
