"""`python -m activator`: the public data-path port and the loopback-only admin port.

`--kube`: Knative's activator (activator/kube/): revisions, their class and their ready pods from
the cluster (`--kubeconfig`, else $KUBECONFIG, else the pod's service account), the public app on
8012 (HTTP/1) and 8013 (h2c) on all addresses, demand of our class's revisions to our autoscaler
(`--autoscaler-url`) and of Knative's classes to Knative's (`--knative-autoscaler-url`). A cluster
that cannot be configured, or not listed within `--kube-sync-timeout`, stops it at start with exit 2."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import sys
from typing import Any

import uvicorn
import uvloop

from activator.app import Activator, H2cApp, build_admin_app, build_public_app
from activator.config import ActivatorConfig, KubeSettings
from activator.kube import contract
from activator.migration import MigrationConfig
from sllm_knative import log
from sllm_knative.api.auth import TOKEN_ENV, token_from_env
from sllm_knative.kube.client import KubeConfigError, error_message
from sllm_knative.serving import Server, stop_on_signals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m activator", description=__doc__)
    p.add_argument("--host", default=None, help="public listen address (default 127.0.0.1; with --kube 0.0.0.0)")
    p.add_argument("--port", type=int, default=None,
                   help=f"public port (clients, ingress; default 8080; with --kube {contract.HTTP1_PORT}, HTTP/1)")
    p.add_argument("--h2c-port", type=int, default=None,
                   help=f"public h2c port (HTTP/2 without TLS; with --kube default {contract.H2C_PORT}; 0: none)")
    p.add_argument("--admin-port", type=int, default=8081, help="admin port")
    p.add_argument("--admin-host", default="127.0.0.1",
                   help="admin listen address (loopback unless the autoscaler runs elsewhere, as on Kubernetes)")
    p.add_argument("--autoscaler-url", default=None, help="where demand and stats are reported")
    p.add_argument("--cold-start-timeout", type=float, default=ActivatorConfig.cold_start_timeout_s,
                   help="seconds a request of a service that sets no timeoutSeconds may be held (default 300, "
                        "Knative's revision-timeout-seconds)")
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
    p.add_argument("--export-interval", type=float, default=MigrationConfig.export_interval_s,
                   help="seconds between exports of each relayed stream's state: a stream whose instance dies "
                        "resumes from the last one on another instance (0: exports only during migrations)")
    k = p.add_argument_group("Kubernetes mode (Knative's activator)")
    k.add_argument("--kube", action="store_true", help="serve as Knative's activator, from the cluster's state")
    k.add_argument("--kubeconfig", default=None, help="kubeconfig (default $KUBECONFIG, else in-cluster)")
    k.add_argument("--cluster-domain", default=contract.CLUSTER_DOMAIN)
    k.add_argument("--knative-autoscaler-url", default=contract.KNATIVE_AUTOSCALER_URL,
                   help="Knative's autoscaler stat websocket, for revisions of Knative's classes ('' : none)")
    k.add_argument("--pod-name", default=os.environ.get("POD_NAME") or socket.gethostname(),
                   help="this activator's pod, named in its stats to Knative (default $POD_NAME)")
    k.add_argument("--kube-resync", type=float, default=30.0, help="informer resync period, seconds")
    k.add_argument("--kube-sync-timeout", type=float, default=60.0,
                   help="seconds the first lists may take before the activator gives up (exit 2)")
    args = p.parse_args(argv)
    if args.host is None:
        args.host = "0.0.0.0" if args.kube else "127.0.0.1"
    if args.port is None:
        args.port = contract.HTTP1_PORT if args.kube else 8080
    if args.h2c_port is None:
        args.h2c_port = contract.H2C_PORT if args.kube else 0
    if not is_loopback(args.admin_host) and token_from_env() is None:
        p.error(f"--admin-host {args.admin_host}: an admin API off loopback needs {TOKEN_ENV} (its callers send it); "
                "on Kubernetes it comes from the sllm-knative-internal Secret")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(args: argparse.Namespace) -> int:
    kube = None
    if args.kube:
        kube = KubeSettings(kubeconfig=args.kubeconfig, cluster_domain=args.cluster_domain,
                            knative_autoscaler_url=args.knative_autoscaler_url or None, pod_name=args.pod_name,
                            resync_s=args.kube_resync, sync_timeout_s=args.kube_sync_timeout)
    log_ = log.get_logger("activator")
    try:
        act = _activator(args, kube)
    except KubeConfigError as exc:
        log_.error("no cluster to serve", error=str(exc))
        return 2
    except Exception as exc:  # a kubeconfig the client cannot use
        log_.error("cannot configure the Kubernetes client", kubeconfig=args.kubeconfig,
                   error=f"{type(exc).__name__}: {exc}"[:500])
        return 2
    if kube is not None:
        try:
            await act.start_kube()
        except Exception as exc:  # the API server refused or never answered the first lists
            log_.error("cannot list the cluster's revisions, PodAutoscalers and EndpointSlices",
                       error=f"{type(exc).__name__}: {error_message(exc)}"[:500])
            return 2
    public_app = build_public_app(act)
    # httptools parses HTTP and uvloop runs the loop (main); no websocket upgrades and no
    # X-Forwarded-* rewriting of the client address, which the activator never reads.
    public = Server(uvicorn.Config(public_app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False, lifespan="on", http="httptools", ws="none",
                                           proxy_headers=False))
    admin = Server(uvicorn.Config(build_admin_app(act, token_from_env()), host=args.admin_host, port=args.admin_port,
                                          log_level="warning", access_log=False, lifespan="off", http="httptools",
                                          ws="none"))
    stop_on_signals([public, admin])  # both stop on SIGTERM; serve() returns and the lifespan's shutdown has run
    servers = [public.serve(), admin.serve()]
    stopped = asyncio.Event()
    if args.h2c_port:
        # HTTP/2 without TLS (prior knowledge or an h2c upgrade; HTTP/1.1 too), as Knative's h2c
        # server; it stops when the HTTP/1 server does (on SIGTERM or SIGINT, stop_on_signals).
        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config as HypercornConfig

        h2c = HypercornConfig()
        h2c.bind = [f"{args.host}:{args.h2c_port}" if ":" not in args.host else f"[{args.host}]:{args.h2c_port}"]
        h2c.accesslog = None
        h2c.errorlog = logging.getLogger("hypercorn.error")  # through the root handler (log.setup)
        h2c.errorlog.setLevel(logging.WARNING)
        app: Any = H2cApp(public_app)  # a plain ASGI app; hypercorn's types name its own scope dicts
        servers.append(hypercorn_serve(app, h2c, shutdown_trigger=stopped.wait, mode="asgi"))

    async def first() -> None:
        try:
            await servers[0]
        finally:
            stopped.set()

    log_.info("listening", host=args.host, port=args.port, h2c_port=args.h2c_port or None,
              admin_port=args.admin_port, mode="kube" if kube else "local")
    await asyncio.gather(first(), *servers[1:])
    return 0


def _activator(args: argparse.Namespace, kube: KubeSettings | None) -> Activator:
    return Activator(ActivatorConfig(autoscaler_url=args.autoscaler_url, cold_start_timeout_s=args.cold_start_timeout,
                                    max_body_bytes=args.max_body_bytes, max_held_per_service=args.max_held,
                                    report_interval_s=args.report_interval,
                                    migration=MigrationConfig(gap_threshold=args.migration_gap,
                                                              max_rounds=args.migration_rounds,
                                                              settle_gap=args.migration_settle_gap,
                                                              max_follow=args.migration_follow,
                                                              export_interval_s=args.export_interval,
                                                              internal_token=token_from_env()),
                                     kube=kube))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log.setup()
    try:
        return uvloop.run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
