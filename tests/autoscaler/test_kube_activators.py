"""The autoscaler's withholds on Kubernetes (autoscaler/kube/activators.py) against a real
activator process: a scale-down's victim is withheld while its pod still stands, and a replica
that restarts, or did not know the revision yet, gets the withhold again (a fresh activator
routes to every ready pod of the revision's EndpointSlices, the victim included).

What the activator routes to is read back the way an EndpointSlice update meets it: the
rotation is PUT (both pods listed, as the slices still list the victim) and the answer says how
many instances it rotates over.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

from autoscaler.backends.base import InstanceRecord, InstanceState
from autoscaler.kube.activators import KubeActivators
from sllm_knative.api import activator as admin_api
from sllm_knative.api import auth
from sllm_knative.config.service import parse_service
from sllm_knative.ports import free_port
from testkit.proc import Proc

TOKEN = "withhold-test-token"
SVC = parse_service({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                     "metadata": {"name": "chat-00001", "namespace": "ns"},
                     "spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}})
PODS = ("chat-00001-deployment-a", "chat-00001-deployment-b")


def _record(pod: str) -> InstanceRecord:
    return InstanceRecord(pod, SVC.key, "n0", 9000, 9001, state=InstanceState.READY)


def _activator(logs: Path, name: str, port: int, admin_port: int) -> Proc:
    p = Proc(name)
    p.start([sys.executable, "-m", "activator", "--port", str(port), "--admin-port", str(admin_port)],
            logs / f"{name}.log", env={"SLLM_INTERNAL_TOKEN": TOKEN})
    p.wait_http(f"http://127.0.0.1:{admin_port}{admin_api.METRICS}", 30)
    return p


def _rotation(admin: str) -> int:
    """PUT both pods as the revision's EndpointSlices list them; how many the activator routes to."""
    body = {"container_concurrency": 0,
            "instances": [{"id": pod, "url": f"http://127.0.0.1:{9000 + i}", "node": "n0"}
                          for i, pod in enumerate(PODS)]}
    r = httpx.put(f"{admin}{admin_api.SERVICES}/{SVC.namespace}/{SVC.name}", json=body, timeout=5,
                  headers=auth.auth_headers(TOKEN))
    r.raise_for_status()
    return int(r.json()["instances"])


def test_a_withhold_reaches_a_replica_that_restarted_or_did_not_know_the_revision(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    procs = [_activator(tmp_path, "activator-1", port, admin_port)]
    acts = KubeActivators(None, static=[admin], token=TOKEN)
    a, b = (_record(p) for p in PODS)

    async def scenario() -> None:
        try:
            assert _rotation(admin) == 2
            await acts.push_endpoints(SVC, [a, b])
            await acts.push_endpoints(SVC, [a])  # b is the scale-down's victim: DRAINING, its pod still stands
            assert _rotation(admin) == 1

            # The activator restarts at the same address; its slices list both pods again.
            procs[0].stop()
            procs.append(_activator(tmp_path, "activator-2", port, admin_port))
            assert _rotation(admin) == 2  # what this guards against: a fresh replica routes to the victim
            await acts.resend()
            assert _rotation(admin) == 2  # taken by the old process: nothing says it must go again...
            acts.replica_started()  # ...until the new process's stats report, with its new boot id
            await acts.resend()
            assert _rotation(admin) == 1

            # Restarted again, and told before its informers know the revision: refused (404),
            # so kept to send at the next resend (the leader's tick).
            procs[1].stop()
            procs.append(_activator(tmp_path, "activator-3", port, admin_port))
            acts.replica_started()
            await acts.resend()
            assert _rotation(admin) == 2
            await acts.resend()
            assert _rotation(admin) == 1

            await acts.push_endpoints(SVC, [a, b])  # the scale-down called off: back on every replica
            assert _rotation(admin) == 2
            await acts.resend()
            assert _rotation(admin) == 2  # nothing left to withhold
        finally:
            await acts.close()

    try:
        asyncio.run(scenario())
    finally:
        for p in procs:
            p.stop()
