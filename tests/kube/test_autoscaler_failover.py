"""Two autoscaler replicas (`python -m autoscaler --kube`), and kill -9 of the leader in the middle
of a scale-up, on the real control plane: the standby takes the Lease, adopts the running pod,
places the pod the dead leader's intent left gated, and the revision ends with exactly the pods
the decider wants: none duplicated, none left at the gate, the PA current and Ready.

Set-up as tests/kube/test_autoscaler_kube.py (real loaders' NodeCaches, the placement webhook,
Knative's objects made as its reconcilers would). The webhook is called on the standby's port,
since the leader is the one that dies (on a cluster the webhook Service reaches either replica).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from autoscaler.kube.binding import GATE, INSTANCE_LABEL
from autoscaler.kube.certs import WEBHOOK_CONFIG
from autoscaler.kube.podautoscaler import CLASS, condition
from autoscaler.kube.webhook import PATH as WEBHOOK_PATH
from sllm_knative.api.autoscaler import STATS
from sllm_knative.kube.client import PODAUTOSCALERS, SCALINGPOLICIES, Kube
from sllm_knative.ports import free_port
from testkit.kube.cluster import KubeCluster
from testkit.kube.knative import SksStatusWriter, create_revision
from testkit.kube.nodeagent import NodeAgent
from testkit.proc import Proc
from tests.kube.conftest import agent_selector, until
from tests.kube.test_autoscaler_kube import REV, _is_ready, _pods, probe_url  # noqa: F401  (fixture)
from tests.kube.test_nodeagent import ENV, SERVER
from tests.kube.test_nodecache import loaders, store  # noqa: F401  (fixtures)
from tests.kube.test_webhook import webhook_config

REPO = Path(__file__).resolve().parents[2]


def test_the_standby_takes_over_a_scale_up_from_a_killed_leader(
        kube: KubeCluster, api: Any, namespace: str, make_agent: Any, store: Path, loaders: Any,  # noqa: F811
        probe_url: str, tmp_path: Path) -> None:  # noqa: F811
    k = Kube(api)
    agent: NodeAgent = make_agent(2)
    for spec in agent.specs:
        loaders(spec.name, kube.kubeconfig, store)
    model = f"file://{store}/tiny"
    k.create(SCALINGPOLICIES, {"apiVersion": SCALINGPOLICIES.api_version, "kind": "ScalingPolicy",
                               "metadata": {"name": "chat", "namespace": namespace},
                               "spec": {"target": {"serviceName": "chat"}, "keepAlive": "120s",
                                        "targetConcurrency": 1}}, namespace)
    # max-scale 2 bounds the decision the demand below asks for (see `busy`).
    annotations = {"autoscaling.knative.dev/class": CLASS, "sllm-knative.io/model": model,
                   "autoscaling.knative.dev/max-scale": "2"}
    container = {"name": "user-container", "image": "python:3.11",
                 "command": ["python", "-c", SERVER, "$(POD_IP)", "8080"], "env": ENV,
                 "ports": [{"containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"port": 8080, "path": "/"}, "periodSeconds": 1}}
    standin = SksStatusWriter(k, namespace).start()
    install = f"{namespace}-sys"
    k.core.create_namespace({"metadata": {"name": install}})
    assert kube.network is not None
    host_ip = kube.network.host_ip
    ports = {who: (free_port(), free_port()) for who in ("a", "b")}  # (api, webhook)
    k.admission.create_mutating_webhook_configuration(
        webhook_config(f"https://{host_ip}:{ports['b'][1]}{WEBHOOK_PATH}", namespace, install))
    procs: dict[str, Proc] = {}

    def start(who: str) -> Proc:
        api_port, webhook_port = ports[who]
        p = Proc(f"autoscaler {who}")
        p.start([sys.executable, "-m", "autoscaler", "--kube", "--kubeconfig", str(kube.kubeconfig),
                 "--port", str(api_port), "--host", "127.0.0.1", "--lease-namespace", install, "--identity", who,
                 "--resync", "5", "--lease-duration", "3", "--probe-url", probe_url,
                 "--webhook-port", str(webhook_port), "--webhook-host", host_ip, "--webhook-san", host_ip],
                tmp_path / f"autoscaler-{who}.log", env={"PYTHONPATH": str(REPO)}, unset=("KUBECONFIG",))
        procs[who] = p
        return p

    def base(who: str) -> str:
        return f"http://127.0.0.1:{ports[who][0]}"

    # 5 requests in flight on average against a target of 1 at Knative's 70 % utilization want
    # ceil(5 / 0.7) = 8 instances, bounded to max-scale 2. The margin matters: a second with no
    # report counts as zero in the stable average (as in Knative), and while the new leader's
    # event loop is busy adopting and placing, reports wait. At 1.3 (needing 2 of every 4 seconds
    # reported) CI once saw `desired` 1 on the new leader: most likely no decision but the initial
    # scale it reported before its first one, which came a tick or two after the takeover (see
    # decide_when_leading in autoscaler/kube/main.py); now it decides as soon as it has adopted.
    # At 5 a stall of the reports would need 6 seconds silent in every 7 to make it decide 1.
    busy = {"services": [{"namespace": namespace, "name": REV, "average_concurrency": 5.0, "requests": 10,
                          "in_flight": 5, "seconds": 1.0}]}
    reporting = {"to": "a"}
    stop_reports = threading.Event()

    def report() -> None:  # the activator's reports, to whichever replica the Service would pick
        while not stop_reports.wait(0.5):
            try:
                httpx.post(f"{base(reporting['to'])}{STATS}", json=busy, timeout=5)
            except httpx.HTTPError:
                pass

    try:
        start("a").wait_http(f"{base('a')}/healthz", 60)  # a leads
        start("b").wait_http(f"{base('b')}/livez", 60)
        assert httpx.get(f"{base('b')}/healthz", timeout=5).status_code == 503  # b stands by
        create_revision(k, REV, namespace, annotations, [container],
                        {"nodeSelector": agent_selector(agent), "terminationGracePeriodSeconds": 2},
                        labels={"serving.knative.dev/service": "chat"})
        first = until(lambda: next((p for p in _pods(k, namespace) if _is_ready(p)), None), 60,
                      "the initial pod placed by the leader and ready")

        # Demand for two: the leader leaves an intent and raises the replicas; kill -9 it as soon
        # as the Deployment asks for the second pod, before that pod is placed and ready.
        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        until(lambda: k.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 2, 30,
              "the leader to raise the replicas to 2")
        procs["a"].kill()
        killed_at = time.monotonic()

        # The standby leads (after the lease runs out), adopts the first pod and places the second.
        reporting["to"] = "b"
        procs["b"].wait_http(f"{base('b')}/healthz", 30)
        # It waited out the dead leader's lease: 3 s from when it last saw the Lease change, which
        # (a renews and b reads every 2 s retry period) is at least 3 - 2 = 1 s after the kill.
        assert time.monotonic() - killed_at >= 1.0

        def settled() -> list[Any] | None:
            pods = _pods(k, namespace)
            ok = len(pods) == 2 and all(_is_ready(p) and p.metadata.labels.get(INSTANCE_LABEL)
                                        and not any(g.name == GATE for g in p.spec.scheduling_gates or [])
                                        for p in pods)
            return pods if ok else None

        pods = until(settled, 90, "two ready, placed pods after the takeover")
        assert first.metadata.name in {p.metadata.name for p in pods}  # adopted, not replaced
        time.sleep(3.0)  # no pod more appears while b keeps deciding
        assert len(_pods(k, namespace)) == 2
        assert k.apps.read_namespaced_deployment(f"{REV}-deployment", namespace).spec.replicas == 2

        def pa_current() -> bool:
            obj = k.get(PODAUTOSCALERS, REV, namespace)
            st = obj.get("status") or {}
            return (st.get("observedGeneration") == obj["metadata"]["generation"] and st.get("actualScale") == 2
                    and (condition(st, "Ready") or {}).get("status") == "True")

        until(pa_current, 30, "the PA current, Ready, with actualScale 2")
        services = {s["key"]: s for s in httpx.get(f"{base('b')}/v1/services", timeout=5).json()["services"]}
        assert {i["id"] for i in services[f"{namespace}/{REV}"]["instances"]} == {p.metadata.name for p in pods}
        assert services[f"{namespace}/{REV}"]["desired"] == 2
    except AssertionError as exc:  # what each replica decided, for a failure that is intermittent
        raise AssertionError(f"{exc}\n" + "\n".join(
            f"--- autoscaler {who} ---\n{p.tail(6000)}" for who, p in procs.items())) from exc
    finally:
        stop_reports.set()
        for p in procs.values():
            p.stop()
        standin.stop()
        k.admission.delete_mutating_webhook_configuration(WEBHOOK_CONFIG)
        k.core.delete_namespace(install)
