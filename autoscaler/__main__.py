"""`python -m autoscaler --cluster STATE/cluster.json`: the control loop of a local cluster.

cluster.json (written by `sllm-knative up`) names the activator's admin URL and the nodes:
their loader sidecar, their zygote socket and their instance slots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

import uvicorn

from autoscaler.activator_client import ActivatorClient
from autoscaler.backends.local import LocalBackend, LocalNode
from autoscaler.controller import Autoscaler
from autoscaler.server import build_app
from sllm_knative import log


async def serve(cluster: dict, port: int) -> None:
    nodes = [LocalNode(n["name"], n["loader"], n["zygote"], int(n["slots"]), Path(n["logs"]))
             for n in cluster["nodes"]]
    admin = cluster["activator_admin"]
    backend = LocalBackend(nodes, cluster.get("device", "cpu"), drain_url=admin)
    scaler = Autoscaler(backend, ActivatorClient(admin) if admin else None)
    server = uvicorn.Server(uvicorn.Config(build_app(scaler), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    loop = asyncio.ensure_future(scaler.run())
    log.get_logger("autoscaler").info("listening", port=port, nodes=len(nodes))
    try:
        await server.serve()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await scaler.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoscaler", description=__doc__)
    p.add_argument("--cluster", required=True, help="cluster.json written by `sllm-knative up`")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    log.setup()
    cluster = json.loads(Path(args.cluster).read_text())
    asyncio.run(serve(cluster, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
