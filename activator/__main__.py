"""`python -m activator`: the public data-path port and the loopback-only admin port."""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn
import uvloop

from activator.app import Activator, build_admin_app, build_public_app
from activator.config import ActivatorConfig
from activator.migration import MigrationConfig
from sllm_knative import log
from sllm_knative.api.auth import token_from_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m activator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="public listen address")
    p.add_argument("--port", type=int, default=8080, help="public port (clients, ingress)")
    p.add_argument("--admin-port", type=int, default=8081, help="admin port, bound to 127.0.0.1 only")
    p.add_argument("--autoscaler-url", default=None, help="where demand and stats are reported")
    p.add_argument("--cold-start-timeout", type=float, default=120.0, help="seconds a request may wait")
    p.add_argument("--max-body-bytes", type=int, default=10 << 20)
    p.add_argument("--max-held", type=int, default=1000, help="requests held per service at most")
    p.add_argument("--report-interval", type=float, default=1.0)
    p.add_argument("--migration-gap", type=int, default=MigrationConfig.gap_threshold,
                   help="detach a migrating generation once the destination lacks at most this many tokens")
    p.add_argument("--migration-rounds", type=int, default=MigrationConfig.max_rounds,
                   help="prefill rounds before detaching regardless of the gap")
    p.add_argument("--migration-settle-gap", type=int, default=MigrationConfig.settle_gap,
                   help="a gap of at most this many tokens ends the waited prefill rounds and starts the follow "
                        "phase (0: only after --migration-rounds)")
    p.add_argument("--migration-follow", type=int, default=MigrationConfig.max_follow,
                   help="source steps at most in the follow phase before detaching regardless (0: no follow phase)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    act = Activator(ActivatorConfig(autoscaler_url=args.autoscaler_url, cold_start_timeout_s=args.cold_start_timeout,
                                    max_body_bytes=args.max_body_bytes, max_held_per_service=args.max_held,
                                    report_interval_s=args.report_interval,
                                    migration=MigrationConfig(gap_threshold=args.migration_gap,
                                                              max_rounds=args.migration_rounds,
                                                              settle_gap=args.migration_settle_gap,
                                                              max_follow=args.migration_follow,
                                                              internal_token=token_from_env())))
    # httptools parses HTTP and uvloop runs the loop (main); no websocket upgrades and no
    # X-Forwarded-* rewriting of the client address, which the activator never reads.
    public = uvicorn.Server(uvicorn.Config(build_public_app(act), host=args.host, port=args.port, log_level="warning",
                                           access_log=False, lifespan="on", http="httptools", ws="none",
                                           proxy_headers=False))
    admin = uvicorn.Server(uvicorn.Config(build_admin_app(act), host="127.0.0.1", port=args.admin_port,
                                          log_level="warning", access_log=False, lifespan="off", http="httptools",
                                          ws="none"))
    log.get_logger("activator").info("listening", port=args.port, admin_port=args.admin_port)
    await asyncio.gather(public.serve(), admin.serve())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log.setup()
    try:
        uvloop.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
