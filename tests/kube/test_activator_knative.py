"""The activator as Knative's activator (`python -m activator --kube`) on the real control plane:
real pods run by the node agent, the revisions' private Services and the EndpointSlices the real
EndpointSlice controller publishes for them, the activator process started with a kubeconfig.

Knative's controller cannot run here (docs/kubernetes.md): the Revision, its Deployment and its
PodAutoscaler are made as Knative's revision reconciler would (`knative.revision_objects`),
the SKS as the PA's class controller would (`make_sks`, Knative's MakeSKS), and its private
Service as Knative's SKS reconciler would (`knative.PrivateServices`). Our autoscaler
stands in as an HTTP server recording `/v1/demand` and `/v1/stats`; Knative's as a websocket
server decoding stat messages.

Checked: the probe contract; routing by the revision headers with the rewriting the pod sees, on
the HTTP/1 port and the h2c port; 404 for an unknown revision; a revision of our class at zero
held, its demand reported at once, and released when its pod becomes ready; a KPA-class revision
at zero held, its demand poked to Knative's autoscaler (and not ours), then served.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from activator.kube import stat_pb2
from autoscaler.kube.podautoscaler import make_sks
from sllm_knative.api import autoscaler as autoscaler_api
from sllm_knative.config.autoscaler import KPA_CLASS, SLLM_CLASS
from sllm_knative.kube.client import PODAUTOSCALERS, REVISIONS, SERVERLESSSERVICES, Kube
from sllm_knative.ports import free_port
from testkit.kube.cluster import KubeCluster
from testkit.kube.knative import PrivateServices, revision_objects
from testkit.kube.nodeagent import NodeAgent
from testkit.proc import Proc
from tests.kube.conftest import agent_selector, until
from tests.kube.test_nodeagent import ENV

POD_NAME = "activator-test-0"

# The revision's pod: answers every request with what it received (method, path, headers, body)
# and its own name, on $(POD_IP):8012, the port Knative's private Service targets (queue-proxy's).
ECHO = r"""
import http.server, json, os, sys
ip, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode() if n else ""
        out = json.dumps({"pod": os.environ["POD_NAME"], "method": self.command, "path": self.path, "body": body,
                          "headers": [[k.lower(), v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = answer
    def log_message(self, *a):
        pass
print(f"echo {os.environ['POD_NAME']} on {ip}:{port}", flush=True)
http.server.ThreadingHTTPServer((ip, port), H).serve_forever()
"""


# --- stand-ins for the two autoscalers -----------------------------------------------------------


@dataclass
class Recorder:
    """Our autoscaler's HTTP API, recording what the activator posts."""

    url: str = ""
    demand: list[dict[str, Any]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def demand_for(self, namespace: str, name: str) -> list[autoscaler_api.Demand]:
        with self.lock:
            bodies = list(self.demand)
        out = [autoscaler_api.Demand.model_validate(b) for b in bodies]  # the real schema, or fail
        return [d for d in out if (d.namespace, d.name) == (namespace, name)]


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            with rec.lock:
                {autoscaler_api.DEMAND: rec.demand, autoscaler_api.STATS: rec.stats}.get(self.path, []).append(body)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield rec
    finally:
        server.shutdown()


@dataclass
class KnativeAutoscaler:
    """Knative's autoscaler stat server (statserver/server.go): a websocket taking binary frames,
    each a WireStatMessages."""

    url: str = ""
    messages: list[Any] = field(default_factory=list)
    text_frames: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def for_revision(self, namespace: str, name: str) -> list[Any]:
        with self.lock:
            return [m for m in self.messages if (m.namespace, m.name) == (namespace, name)]


@pytest.fixture(scope="module")
def knative_autoscaler() -> Iterator[KnativeAutoscaler]:
    from websockets.asyncio.server import serve

    ka = KnativeAutoscaler()
    port = free_port()
    ka.url = f"ws://127.0.0.1:{port}"
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def handler(ws: Any) -> None:
        async for frame in ws:
            if not isinstance(frame, bytes):
                ka.text_frames += 1
                continue
            with ka.lock:
                ka.messages.extend(stat_pb2.WireStatMessages.FromString(frame).messages)

    async def run() -> None:
        async with serve(handler, "127.0.0.1", port):
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield ka
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


# --- the activator ---------------------------------------------------------------------------


@dataclass
class ActivatorProc:
    proc: Proc
    http1: str
    h2c: str
    admin: str


@pytest.fixture(scope="module")
def activator(kube: KubeCluster, recorder: Recorder, knative_autoscaler: KnativeAutoscaler,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActivatorProc]:
    port, h2c, admin = free_port(), free_port(), free_port()
    proc = Proc("activator").start(
        [sys.executable, "-m", "activator", "--kube", "--kubeconfig", str(kube.kubeconfig), "--host", "127.0.0.1",
         "--port", str(port), "--h2c-port", str(h2c), "--admin-port", str(admin), "--autoscaler-url", recorder.url,
         "--knative-autoscaler-url", knative_autoscaler.url, "--pod-name", POD_NAME, "--kube-resync", "5",
         "--cold-start-timeout", "90"],
        tmp_path_factory.mktemp("activator") / "activator.log")
    a = ActivatorProc(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{h2c}", f"http://127.0.0.1:{admin}")

    def answers() -> bool:
        try:
            return httpx.get(a.http1, headers={"K-Network-Probe": "activator"}, timeout=2).text == "activator"
        except httpx.TransportError:
            return False

    proc.wait_until(answers, 60, "answering Knative's probe")
    try:
        yield a
    finally:
        proc.stop(grace=10)


# --- revisions -------------------------------------------------------------------------------


def _revision(kube: Kube, namespace: str, agent: NodeAgent, name: str, cls: str, replicas: int) -> None:
    """A Revision with its Deployment, PodAutoscaler and SKS, as Knative would have them."""
    rev = kube.create(REVISIONS, {"apiVersion": REVISIONS.api_version, "kind": "Revision",
                                  "metadata": {"name": name, "namespace": namespace,
                                               "annotations": {"autoscaling.knative.dev/class": cls}},
                                  "spec": {"containers": [{"image": "python:3.11"}]}}, namespace)
    container = {"name": "user-container", "image": "python:3.11",
                 "command": ["python", "-c", ECHO, "$(POD_IP)", "8012"], "env": ENV,
                 "ports": [{"containerPort": 8012, "name": "http1"}],
                 "readinessProbe": {"httpGet": {"port": 8012, "path": "/"}, "periodSeconds": 1}}
    deployment, pa = revision_objects(name, namespace, rev["metadata"]["uid"], [container],
                                      {"nodeSelector": agent_selector(agent), "terminationGracePeriodSeconds": 2},
                                      {"autoscaling.knative.dev/class": cls}, replicas=replicas)
    kube.apps.create_namespaced_deployment(namespace, deployment)
    pa = kube.create(PODAUTOSCALERS, pa, namespace)
    kube.create(SERVERLESSSERVICES, make_sks(pa, "Proxy"), namespace)


def _headers(namespace: str, name: str, **extra: str) -> dict[str, str]:
    return {"Knative-Serving-Revision": name, "Knative-Serving-Namespace": namespace, **extra}


def _echo(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, f"{r.status_code}: {r.text}"
    doc = r.json()
    doc["h"] = {}
    for k, v in doc["headers"]:
        doc["h"].setdefault(k, []).append(v)
    return doc


def _served(url: str, namespace: str, name: str) -> httpx.Response | None:
    """One request, or None while the activator holds it past 3 s (no ready endpoint yet)."""
    try:
        r = httpx.get(f"{url}/x", headers=_headers(namespace, name), timeout=3)
    except httpx.TimeoutException:
        return None
    return r if r.status_code == 200 else None


def _ready_pods(kube: Kube, namespace: str, name: str, n: int) -> list[Any] | None:
    pods = kube.core.list_namespaced_pod(namespace, label_selector=f"serving.knative.dev/revision={name}").items
    ok = [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
    return ok if len(ok) == n else None


@pytest.fixture
def cluster(api: Any, namespace: str) -> Iterator[tuple[Kube, str]]:
    kube = Kube(api)
    services = PrivateServices(kube, namespace).start()
    try:
        yield kube, namespace
    finally:
        services.stop()


# --- tests -----------------------------------------------------------------------------------


def test_probe_contract(activator: ActivatorProc) -> None:
    """probe_handler.go and networking's probe handler, on both ports."""
    for base, http2 in ((activator.http1, False), (activator.h2c, True)):
        with httpx.Client(http1=not http2, http2=http2, timeout=5) as c:
            r = c.get(f"{base}/healthz", headers={"K-Network-Probe": "activator"})
            assert (r.status_code, r.text) == (200, "activator")
            assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            r = c.get(f"{base}/healthz", headers={"K-Network-Probe": "queue"})
            assert r.status_code == 400 and 'unexpected probe header value: "queue"' in r.text
            r = c.get(f"{base}/", headers={"K-Network-Probe": "probe", "K-Network-Hash": "h-123"})
            assert (r.status_code, r.headers.get("k-network-hash"), r.text) == (200, "h-123", "")
            assert c.get(f"{base}/", headers={"K-Network-Probe": "probe"}).status_code == 400
            assert c.get(f"{base}/", headers={"User-Agent": "kube-probe/1.37"}).status_code == 200


def test_routes_by_revision_headers_and_rewrites_them(activator: ActivatorProc, cluster: tuple[Kube, str],
                                                      node_agent: NodeAgent) -> None:
    kube, ns = cluster
    name = "echo-00001"
    _revision(kube, ns, node_agent, name, SLLM_CLASS, replicas=1)
    until(lambda: _ready_pods(kube, ns, name, 1), 60, "the revision's pod ready")
    pod = _ready_pods(kube, ns, name, 1)[0]  # type: ignore[index]
    doc = _echo(until(lambda: _served(activator.http1, ns, name), 60, "the activator serving the revision"))
    assert doc["pod"] == pod.metadata.name

    # What the pod gets: the revision headers gone, the Host in K-Original-Host, the activator's mark.
    r = httpx.post(f"{activator.http1}/v1/things?q=1", content=b"hello",
                   headers=_headers(ns, name, Host="echo.example.com", Accept="text/plain"), timeout=10)
    doc = _echo(r)
    h = doc["h"]
    assert (doc["method"], doc["path"], doc["body"]) == ("POST", "/v1/things?q=1", "hello")
    assert "knative-serving-revision" not in h and "knative-serving-namespace" not in h
    assert h["k-original-host"] == ["echo.example.com"]
    assert h["k-proxy-request"] == ["activator"]
    assert h["host"] == [f"{pod.status.pod_ip}:8012"]  # straight to the pod, no ClusterIP hop
    assert h["accept"] == ["text/plain"]
    assert r.headers["x-sllm-instance"] == pod.metadata.name  # the instance id is the pod's name

    # The same over h2c (HTTP/2 with prior knowledge) on the second port.
    with httpx.Client(http1=False, http2=True, timeout=10) as c:
        r = c.get(f"{activator.h2c}/over-h2c", headers=_headers(ns, name, **{"K-Original-Host": "given.example"}))
    assert r.http_version == "HTTP/2"
    doc = _echo(r)
    assert doc["path"] == "/over-h2c" and doc["h"]["k-original-host"] == ["given.example"]
    assert "knative-serving-revision" not in doc["h"]

    # A cluster-local Host names the revision without the headers.
    doc = _echo(httpx.get(f"{activator.http1}/", headers={"Host": f"{name}.{ns}.svc.cluster.local"}, timeout=10))
    assert doc["h"]["k-original-host"] == [f"{name}.{ns}.svc.cluster.local"]

    # An unknown revision, and no revision at all: 404s that say what was missing.
    r = httpx.get(f"{activator.http1}/", headers=_headers(ns, "nope-00001"), timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "revision_not_found" and "'nope-00001'" in r.json()["error"]["message"]
    r = httpx.get(f"{activator.http1}/", headers={"Host": "something.example.com"}, timeout=10)
    assert r.status_code == 404 and "Knative-Serving-Revision" in r.json()["error"]["message"]

    # Endpoints come from the EndpointSlices only: the admin API refuses pushes.
    r = httpx.put(f"{activator.admin}/admin/v1/services/{ns}/{name}", json={"instances": []}, timeout=5)
    assert r.status_code == 409 and "EndpointSlices" in r.json()["error"]


def _pending(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # reported by the assertion that reads `out`
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_revision_at_zero_is_held_demand_reported_then_released(
        activator: ActivatorProc, cluster: tuple[Kube, str], node_agent: NodeAgent, recorder: Recorder,
        knative_autoscaler: KnativeAutoscaler) -> None:
    kube, ns = cluster
    name = f"cold-{uuid.uuid4().hex[:4]}-00001"
    _revision(kube, ns, node_agent, name, SLLM_CLASS, replicas=0)

    def known() -> bool:  # the activator has the revision (our class: in its stats)
        stats = httpx.get(f"{activator.admin}/admin/v1/stats", timeout=5).json()["services"]
        return any((s["namespace"], s["name"]) == (ns, name) for s in stats)

    until(known, 30, "the activator knowing the revision")
    t0 = time.monotonic()
    thread, out = _pending(lambda: httpx.post(f"{activator.http1}/v1/completions", json={"prompt": "hi"},
                                              headers=_headers(ns, name), timeout=120))
    demand = until(lambda: recorder.demand_for(ns, name), 10, "demand for the revision at zero")
    assert time.monotonic() - t0 < 5, "demand is reported at once, not at the next report"
    assert demand[0].in_flight >= 1
    time.sleep(1.0)
    assert thread.is_alive() and not out, f"the request was not held: {out}"
    assert not knative_autoscaler.for_revision(ns, name), "our class's demand went to Knative's autoscaler"

    # The autoscaler's decision, played by the test: one replica; the request goes to it once ready.
    kube.apps.patch_namespaced_deployment_scale(f"{name}-deployment", ns, {"spec": {"replicas": 1}})
    thread.join(90)
    assert out, "the held request never finished"
    assert not isinstance(out[0], Exception), out[0]
    doc = _echo(out[0])
    pod = _ready_pods(kube, ns, name, 1)
    assert pod and doc["pod"] == pod[0].metadata.name
    assert doc["path"] == "/v1/completions" and json.loads(doc["body"]) == {"prompt": "hi"}
    assert doc["h"]["k-proxy-request"] == ["activator"]


def test_kpa_revision_is_held_poked_to_knatives_autoscaler_and_served(
        activator: ActivatorProc, cluster: tuple[Kube, str], node_agent: NodeAgent, recorder: Recorder,
        knative_autoscaler: KnativeAutoscaler) -> None:
    kube, ns = cluster
    name = f"kpa-{uuid.uuid4().hex[:4]}-00001"
    _revision(kube, ns, node_agent, name, KPA_CLASS, replicas=0)
    # The activator knows the revision (its log line; a KPA revision is not in our autoscaler's stats).
    until(lambda: f"msg=revision service={ns}/{name} autoscaler_class={KPA_CLASS}" in activator.proc.log(), 30,
          "the activator knowing the revision")

    thread, out = _pending(lambda: httpx.get(f"{activator.http1}/kpa", headers=_headers(ns, name), timeout=120))
    pokes = until(lambda: knative_autoscaler.for_revision(ns, name), 10, "a stat for Knative's autoscaler")
    poke = pokes[0].stat
    assert (poke.pod_name, poke.average_concurrent_requests, poke.request_count) == (POD_NAME, 1.0, 1.0)
    time.sleep(1.5)  # a report period: the held request is counted in flight
    assert thread.is_alive() and not out
    later = [m.stat for m in knative_autoscaler.for_revision(ns, name)[1:]]
    assert later and all(s.pod_name == POD_NAME for s in later)
    assert not recorder.demand_for(ns, name), "a KPA revision's demand went to our autoscaler"
    assert knative_autoscaler.text_frames == 0

    # Knative's autoscaler would scale it; the test does: the held request is served by the pod.
    kube.apps.patch_namespaced_deployment_scale(f"{name}-deployment", ns, {"spec": {"replicas": 1}})
    thread.join(90)
    assert out and not isinstance(out[0], Exception), out
    assert _echo(out[0])["path"] == "/kpa"
    # Warm now: served at once, paths our class keeps internal included (its app owns every path).
    r = httpx.get(f"{activator.http1}/admin/anything", headers=_headers(ns, name), timeout=10)
    assert _echo(r)["path"] == "/admin/anything"

