"""The autoscaler.

`python -m autoscaler --cluster STATE/cluster.json --port N`: the control loop of a local cluster.
cluster.json (written by `sllm-knative up`) names the activator's admin URL and the nodes:
their loader sidecar, their zygote socket and their instance slots.

`python -m autoscaler --kube [--kubeconfig PATH] --port N`: the PodAutoscaler-class controller
on Kubernetes (autoscaler/kube/main.py; docs/kubernetes.md).
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
from autoscaler.journal import Journal, replay
from autoscaler.server import build_app
from sllm_knative import log
from sllm_knative.serving import Server, serve_until_signalled


async def serve(cluster: dict, port: int, state: Path | None = None) -> None:
    """The local cluster's control loop. With `state` (the cluster's state folder), what is
    applied is journaled there and the running instances' records kept, and a restarted
    autoscaler replays the one and adopts the others before it decides anything."""
    nodes = [LocalNode(n["name"], n["loader"], n["zygote"], int(n["slots"]), Path(n["logs"]))
             for n in cluster["nodes"]]
    admin = cluster["activator_admin"]
    records = state / "instances" if state is not None else None
    if records is not None:
        records.mkdir(parents=True, exist_ok=True)
    backend = LocalBackend(nodes, cluster.get("device", "cpu"), drain_url=admin, records=records)
    scaler = Autoscaler(backend, ActivatorClient(admin) if admin else None)
    scaler.scaler.placer = cluster.get("placement", "load-time")  # `up --placement`
    journal = Journal(state / "applied.json") if state is not None else None
    logger = log.get_logger("autoscaler")
    if journal is not None and journal.entries:
        # No decision until the instances still running are counted: one taken before would
        # start them again.
        scaler.may_decide = lambda: False
        replayed = await replay(journal, scaler)
        adopted = await backend.adopt_running()
        for rt in scaler.services.values():
            await scaler.scaler.push(rt)  # the activator's rotation as it stands; READY events follow
        scaler.may_decide = lambda: True
        logger.info("restarted: journal replayed, running instances adopted", entries=replayed,
                    adopted=",".join(adopted) or "-")
    server = Server(uvicorn.Config(build_app(scaler, journal=journal), host="127.0.0.1", port=port,
                                   log_level="warning", access_log=False, lifespan="off"))
    loop = asyncio.ensure_future(scaler.run())
    logger.info("listening", port=port, nodes=len(nodes))
    try:
        await serve_until_signalled([(server, None)])
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await scaler.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoscaler", description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cluster", help="cluster.json written by `sllm-knative up` (local mode)")
    mode.add_argument("--kube", action="store_true", help="run as the PodAutoscaler-class controller on Kubernetes")
    p.add_argument("--port", type=int, required=True)
    k = p.add_argument_group("Kubernetes (with --kube)")
    k.add_argument("--kubeconfig", default=None, help="else $KUBECONFIG, else the pod's service account")
    k.add_argument("--host", default="0.0.0.0", help="address of the HTTP API (default 0.0.0.0)")
    k.add_argument("--lease-namespace", default="sllm-knative", help="namespace of the leader Lease")
    k.add_argument("--activator-admin", action="append", default=[],
                   help="an activator's admin URL (repeatable; default: every ready pod of Knative's "
                        "activator-service, at --activator-admin-port)")
    k.add_argument("--activator-namespace", default="knative-serving", help="where activator-service is")
    k.add_argument("--activator-admin-port", type=int, default=8090, help="the activator pods' admin port")
    k.add_argument("--identity", default=None, help="leader-election identity (default: pod name and pid)")
    k.add_argument("--resync", type=float, default=30.0, help="informer resync period, seconds")
    k.add_argument("--lease-duration", type=float, default=15.0, help="leader lease duration, seconds")
    k.add_argument("--scale-to-zero-grace", type=float, default=None,
                   help="seconds in Proxy mode before replicas go to 0 (default: config-autoscaler's)")
    k.add_argument("--probe-url", default=None,
                   help="where the activator probe goes, with {service} {namespace} {revision} "
                        "(default: the revision's public Service)")
    k.add_argument("--webhook-port", type=int, default=8443, help="the placement webhook's HTTPS port (0: none)")
    k.add_argument("--webhook-host", default=None, help="the webhook's address (default: --host)")
    k.add_argument("--webhook-san", action="append", default=[],
                   help="another host name or IP for the webhook's certificate (repeatable)")
    args = p.parse_args(argv)
    log.setup()
    if args.kube:
        from autoscaler.kube.main import serve_kube
        from autoscaler.kube.pa_controller import PROBE_URL
        from sllm_knative.kube.client import KubeConfigError

        lease = args.lease_duration
        try:
            asyncio.run(serve_kube(port=args.port, host=args.host, kubeconfig=args.kubeconfig,
                                   lease_namespace=args.lease_namespace, activator_admin=tuple(args.activator_admin),
                                   activator_namespace=args.activator_namespace,
                                   activator_admin_port=args.activator_admin_port,
                                   identity=args.identity, resync_s=args.resync, lease_duration_s=lease,
                                   renew_deadline_s=lease * 2 / 3, retry_period_s=lease / 7.5,
                                   grace_s=args.scale_to_zero_grace, probe_url=args.probe_url or PROBE_URL,
                                   webhook_port=args.webhook_port, webhook_host=args.webhook_host,
                                   webhook_hosts=tuple(args.webhook_san)))
        except KubeConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    cluster = json.loads(Path(args.cluster).read_text())
    state = cluster.get("state_dir")
    asyncio.run(serve(cluster, args.port, Path(state) if state else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
