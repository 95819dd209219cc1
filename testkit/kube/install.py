"""The install a user applies (`kubectl apply -k manifests/`), run as pods on the test control plane.

What a test cluster differs in, and the one place each difference is made (`for_test_cluster`,
applied to the output of `kubectl kustomize manifests/`; everything else is the manifests' own):

- **Nodes**: every pod template gets a nodeSelector for the test's node agent (other tests' nodes
  may share the control plane).
- **The pod network**: the node agent's pods on one node share the node's network namespace, so
  the activator binds its pod IP (`--host=$(POD_IP)`), as the autoscaler's manifest already does;
  on a real node each pod has its own.
- **No Service networking, no DNS** (there is no kube-proxy or CoreDNS here): the names
  `sllm-autoscaler.sllm-knative.svc.cluster.local` (the activator's `--autoscaler-url`) and a
  revision's public Service (the autoscaler's activator probe, which Knative's SKS points at
  `activator-service` in Proxy mode) do not resolve. Each is replaced by a `ServiceProxy`: a
  userspace proxy on the pod network's host address that sends every connection to a ready
  endpoint of the named Service, read from its EndpointSlices (what kube-proxy's userspace mode
  did). The placement webhook's `service` clientConfig needs nothing: the test API server routes
  webhooks to the Service's endpoints (`--enable-aggregator-routing`, testkit/kube/cluster.py).
- **The webhook's scope**: the MutatingWebhookConfiguration keeps its `service` and its
  `failurePolicy: Fail`, narrowed to the test's namespace (labelled `sllm-test`), so other tests'
  pods on this control plane are never sent to it.
- **The loader's store and tiers**: `--store` names the test's model store instead of `hf://`
  (no network here), with small tiers (`--ssd-bytes`, `--dram-bytes`) and a 1 MiB bandwidth
  profile, so three loaders start in seconds on a small machine.
- **Timing**: the autoscaler's scale-to-zero grace period is 1 s (Knative's default is 30 s).

Knative's own side is what `knative_activator_docs` and `knative_config_deployment` return: its
release-1.23 activator Deployment (its container a stand-in: Knative's image cannot run here),
`activator-service`, HPA and PDB, and its `config-deployment`, as Knative's install makes them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import copy
import itertools
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from sllm_knative.log import get_logger
from testkit.kube.cluster import BIN_DIR, KubeCluster
from testkit.kube.nodeagent import NodeAgent
from testkit.kube.stack import SOCKET_DIR, NodeLoader, Stack, read_token
from testkit.kube.util import until

_log = get_logger("testkit.kube.install")
REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
CONFIG_DEPLOYMENT_PATCH = MANIFESTS / "knative" / "config-deployment-patch.yaml"
KNATIVE = REPO / "sllm_knative" / "schemas" / "knative"  # vendored, unmodified
KNATIVE_ACTIVATOR = KNATIVE / "deployments" / "activator.yaml"
KNATIVE_CONFIG_DEPLOYMENT = KNATIVE / "configmaps" / "deployment.yaml"
INSTALL_NAMESPACE = "sllm-knative"
KNATIVE_NAMESPACE = "knative-serving"
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}

# knative/serving config/core/deployments/activator-hpa.yaml at knative-v1.23.0.
KNATIVE_HPA = {
    "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
    "metadata": {"name": "activator", "namespace": KNATIVE_NAMESPACE},
    "spec": {"minReplicas": 1, "maxReplicas": 20,
             "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "activator"},
             "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                 "type": "Utilization", "averageUtilization": 100}}}]}}
KNATIVE_PDB = {
    "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
    "metadata": {"name": "activator-pdb", "namespace": KNATIVE_NAMESPACE},
    "spec": {"minAvailable": "80%", "selector": {"matchLabels": {"app": "activator"}}}}

# Knative's activator, played by a process that answers every request (kubelet probes included).
KNATIVE_STANDIN = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "17")
        self.end_headers()
        self.wfile.write(b"knative-activator")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], 8012), H).serve_forever()
"""


def kubectl(kubeconfig: Path | str, *args: str, stdin: str | None = None, timeout: float = 180) -> str:
    """Run the control plane's kubectl; its stdout, or AssertionError with its stderr."""
    run = subprocess.run([str(BIN_DIR / "kubectl"), "--kubeconfig", str(kubeconfig), *args], input=stdin,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"kubectl {' '.join(args)}: {run.stderr}"
    return run.stdout


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize path`: the documents `kubectl apply -k path` would apply."""
    out = subprocess.run([str(BIN_DIR / "kubectl"), "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def knative_activator_docs(selector: dict[str, str]) -> list[dict[str, Any]]:
    """Knative's activator Deployment (its container a stand-in, its pods on the test agent's
    nodes), Service `activator-service`, ServiceAccount, HPA and PDB."""
    docs = {d["kind"]: d for d in yaml.safe_load_all(KNATIVE_ACTIVATOR.read_text()) if d}
    dep = docs["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    [container] = spec["containers"]
    container.update(image="python:3.11", command=["python", "-c", KNATIVE_STANDIN, "$(POD_IP)"])
    spec["nodeSelector"] = selector
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": {"name": spec["serviceAccountName"], "namespace": KNATIVE_NAMESPACE}}
    return [sa, dep, docs["Service"], copy.deepcopy(KNATIVE_HPA), copy.deepcopy(KNATIVE_PDB)]


def knative_config_deployment() -> dict[str, Any]:
    """Knative's `config-deployment` ConfigMap, as its release creates it."""
    return dict(yaml.safe_load(KNATIVE_CONFIG_DEPLOYMENT.read_text()))


def activator_for_test_cluster(docs: list[dict[str, Any]], selector: dict[str, str],
                               autoscaler_url: str | None = None) -> list[dict[str, Any]]:
    """manifests/activator's documents with the test cluster's changes (module docstring): its pods
    bind their pod IP and keep to `selector`'s nodes; `autoscaler_url`, if given, replaces the
    autoscaler Service's DNS name."""
    for d in docs:
        if d["kind"] != "Deployment" or d["metadata"]["name"] != "sllm-activator":
            continue
        spec = d["spec"]["template"]["spec"]
        [c] = spec["containers"]
        args = [*c["args"], "--host=$(POD_IP)"]
        if autoscaler_url is not None:
            args = [f"--autoscaler-url={autoscaler_url}" if a.startswith("--autoscaler-url=") else a for a in args]
        c["args"] = args
        if not any(e["name"] == "POD_IP" for e in c.get("env", [])):
            c["env"] = [*c.get("env", []), POD_IP_ENV]
        spec["nodeSelector"] = dict(selector)
    return docs


def for_test_cluster(docs: list[dict[str, Any]], *, selector: dict[str, str], pods_namespace: str,
                     store_url: str, autoscaler_url: str, probe_url: str) -> list[dict[str, Any]]:
    """The install's documents (`kustomize(MANIFESTS)`) with the test cluster's changes (module
    docstring), and nothing else."""
    docs = activator_for_test_cluster(copy.deepcopy(docs), selector, autoscaler_url)
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "DaemonSet"):
            d["spec"]["template"]["spec"]["nodeSelector"] = dict(selector)
        if kind == "Deployment" and name == "sllm-autoscaler":
            [c] = d["spec"]["template"]["spec"]["containers"]
            c["args"] = [*c["args"], f"--probe-url={probe_url}", "--scale-to-zero-grace=1"]
        elif kind == "DaemonSet" and name == "sllm-loader":
            [c] = d["spec"]["template"]["spec"]["containers"]
            assert "--store=hf://" in c["args"], c["args"]
            c["args"] = [f"--store={store_url}" if a == "--store=hf://" else a for a in c["args"]]
            c["args"] += ["--ssd-bytes=64MiB", "--dram-bytes=64MiB", "--profile-bytes=1MiB"]
        elif kind == "MutatingWebhookConfiguration":
            for wh in d["webhooks"]:
                wh["namespaceSelector"]["matchExpressions"].append(
                    {"key": "sllm-test", "operator": "In", "values": [pods_namespace]})
    return docs


class TcpProxy(abc.ABC):
    """A userspace TCP proxy on `host` (the pod network's host address, reachable from every pod):
    each connection goes to one of `endpoints()`, round robin. `url` is `http://host:port`."""

    def __init__(self, host: str, name: str) -> None:
        self.host, self.name = host, name
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{name}", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._rr = itertools.count()
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop listening, close every open connection (both ends), then the loop."""
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._open):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=3)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @abc.abstractmethod
    def endpoints(self) -> list[tuple[str, int]]:
        """Where a new connection may go (the proxy picks them round robin); [] refuses it."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            eps = await asyncio.to_thread(self.endpoints)
            if not eps:
                _log.info("no ready endpoint", proxy=self.name)
                writer.close()
                return
            addr, port = eps[next(self._rr) % len(eps)]
            up_reader, up_writer = await asyncio.open_connection(addr, port)
        except Exception as exc:  # refused, like a Service with no endpoint
            _log.info("proxy connect failed", proxy=self.name, error=str(exc)[:200])
            writer.close()
            return

        self._open |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}


class Forward(TcpProxy):
    """A TcpProxy to one fixed address (a server of the test's on loopback, for the pods)."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        super().__init__(host, f"{target[0]}:{target[1]}")
        self.target = target

    def endpoints(self) -> list[tuple[str, int]]:
        return [self.target]


class ServiceProxy(TcpProxy):
    """A userspace stand-in for one port of a Service (the test cluster has no kube-proxy): each
    connection goes to a ready endpoint of `namespace/service`, from its EndpointSlices, at the
    slice port named `port_name`."""

    def __init__(self, kube: Any, namespace: str, service: str, port_name: str, host: str) -> None:
        super().__init__(host, f"{namespace}/{service}")
        self.kube, self.namespace, self.service, self.port_name = kube, namespace, service, port_name

    def endpoints(self) -> list[tuple[str, int]]:
        """(address, port) of each ready endpoint of the Service's port."""
        slices = self.kube.discovery.list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={self.service}").items
        out = []
        for s in slices:
            port = next((p.port for p in s.ports or [] if p.name == self.port_name), None)
            if port is None:
                continue
            out += [(a, port) for e in s.endpoints or [] if e.conditions is None or e.conditions.ready is not False
                    for a in e.addresses]
        return sorted(out)


def _ready(pod: Any) -> bool:
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


class InstalledStack(Stack):
    """The Stack's observations and revisions on the install itself: Knative's side
    (`knative_activator_docs`, `knative_config_deployment`), then `kubectl apply` of
    `kubectl kustomize manifests/` with the test cluster's changes (`for_test_cluster`), the
    `config-deployment` merge patch, and Knative's activator scaled to zero, as
    docs/kubernetes.md's install says; every component runs as pods under the node agent: the
    autoscaler Deployment (two replicas, leader election, the placement webhook called through its
    Service), the activator Deployment behind `activator-service`, one loader pod per node.

    After `start()`: `as_url` reaches the autoscaler's leader through its Service (a
    `ServiceProxy`), `activators` are our activator pods' public URLs (`act_url` the first,
    `act_admin` its admin API), `token` the install's internal token, and `loaders` each node's
    loader pod through its socket in the node's hostPath folder. Only the Knative stand-ins that
    cannot run here (testkit.kube.knative: SKS status, private Services) run as threads.

    `stop()` deletes what it applied except the CRDs and the namespaces (the control plane's
    other tests use them), the webhook configuration first, and Knative's side."""

    def __init__(self, cluster: KubeCluster, agent: NodeAgent, namespace: str, store_url: str, logs: Path, *,
                 start_timeout_s: float = 180.0, cold_start_timeout_s: float = 240.0) -> None:
        super().__init__(cluster, agent, namespace, INSTALL_NAMESPACE, store_url, logs, identity="install",
                         start_timeout_s=start_timeout_s, cold_start_timeout_s=cold_start_timeout_s)
        self.docs: list[dict[str, Any]] = []  # what was applied
        self.knative: list[dict[str, Any]] = []
        self.activators: list[str] = []

    def start_loaders(self) -> Stack:
        raise TypeError("the install's loaders are its DaemonSet's pods: start() runs them")

    def _start(self) -> None:
        from testkit.kube.knative import PrivateServices, RevisionStatusWriter, SksStatusWriter

        k, net, kc = self.k, self.cluster.network, self.cluster.kubeconfig
        assert net is not None
        selector = self.selector()
        self._exit.callback(self._uninstall)
        # Knative Serving, installed before us: its namespace, activator, activator-service and
        # config-deployment. The projected service-account volumes want the namespace's CA bundle.
        _ensure_namespace(k, KNATIVE_NAMESPACE)
        until(lambda: k.core.read_namespaced_config_map("kube-root-ca.crt", KNATIVE_NAMESPACE), 30,
              f"kube-root-ca.crt in {KNATIVE_NAMESPACE}")
        until(lambda: k.core.read_namespaced_service_account("default", KNATIVE_NAMESPACE), 30,
              f"the default ServiceAccount in {KNATIVE_NAMESPACE}")
        self.knative = knative_activator_docs(selector)
        kubectl(kc, "apply", "-f", "-", stdin=yaml.safe_dump_all([*self.knative, knative_config_deployment()]))
        # What Knative's reconcilers would do and cannot here (testkit.kube.knative).
        standin = SksStatusWriter(k, self.namespace).start()
        self._exit.callback(standin.stop)
        revisions = RevisionStatusWriter(k, self.namespace).start()
        self._exit.callback(revisions.stop)
        private = PrivateServices(k, self.namespace).start()
        self._exit.callback(private.stop)
        # The two Service names the install's pods call, with no kube-proxy or DNS here.
        as_proxy = ServiceProxy(k, INSTALL_NAMESPACE, "sllm-autoscaler", "http-api", net.host_ip).start()
        self._exit.callback(as_proxy.stop)
        act_proxy = ServiceProxy(k, KNATIVE_NAMESPACE, "activator-service", "http", net.host_ip).start()
        self._exit.callback(act_proxy.stop)
        # A store on the test's loopback is out of the pods' reach: they get it through a
        # forwarder on the pod network's host address (`store_url` then names that).
        url = urllib.parse.urlsplit(self.store_url)
        if url.hostname in ("127.0.0.1", "localhost") and url.port:
            store = Forward(net.host_ip, ("127.0.0.1", url.port)).start()
            self._exit.callback(store.stop)
            self.store_url = urllib.parse.urlunsplit(url._replace(netloc=f"{net.host_ip}:{store.port}"))

        # The install: `kubectl apply -k manifests/` (as its kustomize output, with the test
        # cluster's changes), then the config-deployment patch.
        self.docs = for_test_cluster(kustomize(MANIFESTS), selector=selector, pods_namespace=self.namespace,
                                     store_url=self.store_url, autoscaler_url=as_proxy.url, probe_url=act_proxy.url)
        kubectl(kc, "apply", "-f", "-", stdin=yaml.safe_dump_all(self.docs))
        kubectl(kc, "-n", KNATIVE_NAMESPACE, "patch", "configmap", "config-deployment", "--type", "merge",
                "--patch-file", str(CONFIG_DEPLOYMENT_PATCH))

        def loaders_ready() -> dict[str, Any] | None:
            pods = k.core.list_namespaced_pod(INSTALL_NAMESPACE, label_selector="app.kubernetes.io/name=sllm-loader")
            ready = {p.spec.node_name: p for p in pods.items if p.spec.node_name in self.nodes and _ready(p)}
            return ready if len(ready) == len(self.nodes) else None

        self._wait(loaders_ready, "a Ready loader pod on each node")
        self._wait(lambda: len(self.autoscaler_pods(ready=True)) == 1, "one Ready (leading) autoscaler replica")
        self._wait(lambda: len(self.activator_pods(ready=True)) == 2, "both activator replicas Ready")
        # Knative's activator steps aside: activator-service then selects only ours.
        kubectl(kc, "-n", KNATIVE_NAMESPACE, "scale", "deployment", "activator", "--replicas=0")
        ours = sorted(p.status.pod_ip for p in self.activator_pods(ready=True))
        self._wait(lambda: sorted(a for a, _ in act_proxy.endpoints()) == ours,
                   "activator-service's endpoints to be our activator pods only")

        self.as_url, self.probe_url = as_proxy.url, act_proxy.url
        self.activators = [f"http://{ip}:8012" for ip in ours]
        self.act_url, self.act_admin = self.activators[0], f"http://{ours[0]}:8090"
        self.token = read_token(k, INSTALL_NAMESPACE)
        for node in self.nodes:
            sock = self.agent.hostpath(node, SOCKET_DIR) / "loader.sock"
            self.loaders[node] = NodeLoader(node, None, sock, f"unix://{sock}")

    def _wait(self, cond: Any, what: str) -> Any:
        try:
            return until(cond, self.start_timeout_s, what, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs_of_processes()}") from None

    def autoscaler_pods(self, ready: bool = False) -> list[Any]:
        return self._install_pods(INSTALL_NAMESPACE, "app.kubernetes.io/name=sllm-knative-autoscaler", ready)

    def activator_pods(self, ready: bool = False) -> list[Any]:
        return self._install_pods(KNATIVE_NAMESPACE, "app.kubernetes.io/name=sllm-activator", ready)

    def loader_pod(self, node: str) -> Any:
        [pod] = [p for p in self._install_pods(INSTALL_NAMESPACE, "app.kubernetes.io/name=sllm-loader", True)
                 if p.spec.node_name == node]
        return pod

    def _install_pods(self, namespace: str, label: str, ready: bool) -> list[Any]:
        pods = self.k.core.list_namespaced_pod(namespace, label_selector=label).items
        return [p for p in pods if p.spec.node_name in self.nodes and p.metadata.deletion_timestamp is None
                and (not ready or _ready(p))]

    def logs_of_processes(self, chars: int = 3000) -> str:
        """The tail of the install's pods' logs, for a failure message."""
        return "\n".join(f"--- {p.parent.name}/{p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for ns in (INSTALL_NAMESPACE, KNATIVE_NAMESPACE)
                         for p in sorted((self.agent.root / "pods").glob(f"{ns}_*/*.log")))

    def _uninstall(self) -> None:
        """Delete what was applied, the webhook configuration first (a Fail webhook nobody serves
        blocks the revisions' pods), except the CRDs and namespaces; wait for the pods to go."""
        from autoscaler.kube.certs import WEBHOOK_CONFIG

        kc = self.cluster.kubeconfig
        with contextlib.suppress(Exception):
            self.k.admission.delete_mutating_webhook_configuration(WEBHOOK_CONFIG)
        ours = [d for d in self.docs if d["kind"] not in ("CustomResourceDefinition", "Namespace")]
        for docs in (ours, self.knative):
            if docs:
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    kubectl(kc, "delete", "--ignore-not-found", "--wait=false", "-f", "-",
                            stdin=yaml.safe_dump_all(docs), timeout=60)
        with contextlib.suppress(Exception):
            self.k.core.delete_namespaced_config_map("config-deployment", KNATIVE_NAMESPACE)
        with contextlib.suppress(AssertionError):
            until(lambda: not any(p.spec.node_name in self.nodes for ns in (INSTALL_NAMESPACE, KNATIVE_NAMESPACE)
                                  for p in self.k.core.list_namespaced_pod(ns).items), 60,
                  "the install's pods to go", interval=0.5)


def _ensure_namespace(k: Any, name: str, timeout_s: float = 60.0) -> None:
    """The namespace `name` exists and is Active (created if missing; waited for while an earlier
    test's deletion of it finishes)."""
    from kubernetes.client.rest import ApiException

    def active() -> bool:
        try:
            return bool(k.core.read_namespace(name).status.phase == "Active")
        except ApiException as e:
            if e.status != 404:
                raise
        with contextlib.suppress(ApiException):
            k.core.create_namespace({"metadata": {"name": name}})
        return False

    until(active, timeout_s, f"namespace {name} to be Active")
