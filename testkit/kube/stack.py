"""Our install as processes on the test control plane: the stack tests/kube/test_e2e.py,
tests/kube/test_preemption.py and bench/kube.py run on.

`Stack(cluster, agent, namespace, ...)`, given a running control plane (`KubeCluster`), a node
agent's nodes and the namespace the revisions go in, starts:

- one loader per node (`python -m loader_sidecar --kube-node`), its socket and DRAM tier in the
  node's hostPath folders (`SOCKET_DIR`, `DRAM_DIR`), where the placement webhook's mounts put
  them for that node's function pods, publishing the node's NodeCache;
- the stand-ins for Knative's reconcilers that cannot run here (testkit.kube.knative): SKS status
  and the private Services whose EndpointSlices the activator watches;
- the MutatingWebhookConfiguration of manifests/autoscaler/webhook.yaml, narrowed to `namespace`
  and called at the autoscaler's webhook port on the pod network's host address;
- `python -m autoscaler --kube` (leases in `install_namespace`) and `python -m activator --kube`,
  with the same entry points and flags as their images, each told of the other; the activator
  gets the install's internal token (`token`) from the Secret the autoscaler makes, as its
  Deployment does, and the function pods get it from the copy the autoscaler puts in `namespace`.

`function_revision` creates a Revision of our class serving the function image
(`sllm-knative/function` -> `python -m functions.llm`) as Knative's revision reconciler would
(no queue-proxy: the Deployment's copy of the container serves 8012, the port the private Service
targets). The rest are the observations the tests and the bench make (pods, NodeCaches, the
autoscaler's and the activator's views, the loaders' leases) and `client`, an official `openai`
client that reaches a revision through the activator with the headers Knative's ingress adds.

`stop()` (or leaving the `with` block) stops everything it started, in reverse order, and deletes
the webhook configuration (a Fail webhook nobody serves would block every other pod of the
namespace). It leaves the namespaces, the agent and the control plane to whoever made them.

`testkit.kube.install.InstalledStack` is the same stack (revisions, observations, client) on the
install itself, applied with kubectl, every component a pod (tests/kube/test_install_e2e.py).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sllm_knative.api.auth import TOKEN_ENV
from testkit.kube.cluster import KubeCluster
from testkit.kube.nodeagent import NodeAgent
from testkit.kube.util import until, webhook_config
from testkit.proc import Proc

REPO = Path(__file__).resolve().parents[2]
SOCKET_DIR = "/var/run/sllm-knative"  # autoscaler/kube/admission.py: LOADER_DIR
DRAM_DIR = "/dev/shm/sllm-knative"  # autoscaler/kube/admission.py: DRAM_DIR
POD_ENV = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
FUNCTION_IMAGE = "sllm-knative/function:latest"
SERVING_PORT, INTERNAL_PORT = 8012, 8013  # what the function pods listen on (no queue-proxy here)
RESYNC_S = 5  # the loaders', the autoscaler's and the activator's --resync


def dram_holds(status: dict[str, Any], model: str) -> bool:
    """Whether a NodeCache status (or the autoscaler's view of one, /v1/nodes) has `model` in DRAM."""
    return any(c.get("model") == model and "dram" in (c.get("tiers") or [])
               for c in status.get("checkpoints") or [])


def read_token(k: Any, namespace: str) -> str:
    """The internal token in `namespace`'s Secret (autoscaler/kube/internal_token.py)."""
    from autoscaler.kube.internal_token import KEY, SECRET

    data = k.core.read_namespaced_secret(SECRET, namespace).data or {}
    if KEY not in data:
        raise ValueError(f"Secret {namespace}/{SECRET} has no {KEY!r}")
    return base64.b64decode(data[KEY]).decode()


def is_ready(pod: Any) -> bool:
    """Whether a pod (the `kubernetes` client's object) runs and is Ready."""
    return bool(pod.status.phase == "Running" and any(c.type == "Ready" and c.status == "True"
                                                      for c in pod.status.conditions or []))


@dataclass
class NodeLoader:
    """The loader of one node: its process (None for a loader pod) and its gRPC target (a unix
    socket in the node's hostPath folder)."""

    node: str
    proc: Proc | None
    socket: Path
    target: str

    def client(self, timeout: float = 30.0) -> Any:
        from sllm_knative.loader.client import LoaderClient

        return LoaderClient(self.target, timeout=timeout)

    def leases(self) -> list[tuple[str, str]]:
        """(model, instance) of each lease the loader holds."""
        with self.client(10) as c:
            return [(lease.model, lease.instance) for lease in c.inventory().leases]


class Stack:
    """The loaders, the Knative stand-ins, the autoscaler and the activator (module docstring)."""

    def __init__(self, cluster: KubeCluster, agent: NodeAgent, namespace: str, install_namespace: str,
                 store_url: str, logs: Path, *, work: Path | None = None, identity: str = "stack",
                 nodes: list[str] | None = None,
                 start_timeout_s: float = 90.0, cold_start_timeout_s: float = 240.0) -> None:
        if cluster.network is None:
            raise ValueError("the stack needs a control plane with its pod network (KubeCluster.network)")
        from sllm_knative.kube.client import Kube

        self.cluster, self.agent, self.namespace, self.install_namespace = cluster, agent, namespace, install_namespace
        self.store_url, self.logs, self.identity = store_url, Path(logs), identity
        self.work = Path(work) if work is not None else self.logs  # the loaders' SSD tiers
        self.nodes = list(nodes) if nodes is not None else [s.name for s in agent.specs]
        unknown = set(self.nodes) - {s.name for s in agent.specs}
        if unknown:
            raise ValueError(f"nodes {sorted(unknown)} are not the agent's ({[s.name for s in agent.specs]})")
        self.start_timeout_s, self.cold_start_timeout_s = start_timeout_s, cold_start_timeout_s
        self.k = Kube(cluster.api_client())
        self.loaders: dict[str, NodeLoader] = {}
        self.procs: list[Proc] = []
        self._exit = contextlib.ExitStack()
        self.as_url = self.act_url = self.act_admin = self.probe_url = ""
        self.token = ""  # the install's internal token, once the autoscaler has made it
        self.act_port = 0

    # -- bring-up and teardown ------------------------------------------------------------------

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def start_loaders(self) -> Stack:
        """Only the loaders (`start` runs them first, and skips what runs already)."""
        for node in self.nodes:
            if node not in self.loaders:
                self.loaders[node] = self._loader(node)
        return self

    def _start(self) -> None:
        from autoscaler.kube.certs import WEBHOOK_CONFIG
        from autoscaler.kube.webhook import PATH as WEBHOOK_PATH
        from sllm_knative.ports import free_port
        from testkit.kube.knative import PrivateServices, RevisionStatusWriter, SksStatusWriter

        self.start_loaders()
        k, net = self.k, self.cluster.network
        assert net is not None
        webhook_port, as_port, act_port, act_h2c, act_admin = (free_port() for _ in range(5))
        self.as_url, self.act_url = f"http://127.0.0.1:{as_port}", f"http://127.0.0.1:{act_port}"
        self.act_port, self.act_admin = act_port, f"http://127.0.0.1:{act_admin}"
        self.probe_url = self.act_url
        standin = SksStatusWriter(k, self.namespace).start()
        self._exit.callback(standin.stop)
        revisions = RevisionStatusWriter(k, self.namespace).start()
        self._exit.callback(revisions.stop)
        private = PrivateServices(k, self.namespace).start()
        self._exit.callback(private.stop)
        k.admission.create_mutating_webhook_configuration(
            webhook_config(f"https://{net.host_ip}:{webhook_port}{WEBHOOK_PATH}", self.namespace,
                           self.install_namespace))
        self._exit.callback(self._delete_webhook, WEBHOOK_CONFIG)
        kc = str(self.cluster.kubeconfig)
        autoscaler = self._proc("the autoscaler (kube)", [
            sys.executable, "-m", "autoscaler", "--kube", "--kubeconfig", kc, "--port", str(as_port), "--host",
            "127.0.0.1", "--lease-namespace", self.install_namespace, "--identity", self.identity,
            "--resync", str(RESYNC_S), "--lease-duration", "3", "--scale-to-zero-grace", "1",
            "--probe-url", self.probe_url, "--webhook-port", str(webhook_port), "--webhook-host", net.host_ip,
            "--webhook-san", net.host_ip, "--activator-admin", self.act_admin], "autoscaler.log")
        self.autoscaler = autoscaler
        autoscaler.wait_http(f"{self.as_url}/healthz", self.start_timeout_s)
        # The install's internal token, which the autoscaler made in its namespace's Secret: the
        # activator gets it as its Deployment does (SLLM_INTERNAL_TOKEN from that Secret).
        self.token = read_token(k, self.install_namespace)
        activator = self._proc("the activator (kube)", [
            sys.executable, "-m", "activator", "--kube", "--kubeconfig", kc, "--host", "127.0.0.1",
            "--port", str(act_port), "--h2c-port", str(act_h2c), "--admin-port", str(act_admin),
            "--autoscaler-url", self.as_url, "--pod-name", f"activator-{self.identity}-0",
            "--kube-resync", str(RESYNC_S), "--cold-start-timeout", f"{self.cold_start_timeout_s:g}"], "activator.log",
            env={TOKEN_ENV: self.token})
        self.activator = activator
        activator.wait_until(self._probe_answered, self.start_timeout_s, "answering Knative's probe")

    def _probe_answered(self) -> bool:
        """Whether the activator answers Knative's network probe as Knative's activator does."""
        try:
            return httpx.get(self.act_url, headers={"K-Network-Probe": "activator"}, timeout=2).text == "activator"
        except httpx.HTTPError:
            return False  # not listening yet

    def _delete_webhook(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.k.admission.delete_mutating_webhook_configuration(name)

    def _proc(self, name: str, argv: list[str], log: str, env: dict[str, str] | None = None,
              unset: tuple[str, ...] = ("KUBECONFIG",)) -> Proc:
        p = Proc(name)
        self.procs.append(p)
        self._exit.callback(p.stop, 15.0)
        p.start(argv, self.logs / log, env={"PYTHONPATH": str(REPO), **(env or {})}, unset=unset)
        return p

    def _loader(self, node: str) -> NodeLoader:
        """`python -m loader_sidecar --kube-node`, its socket and DRAM tier in the node's hostPath folders."""
        from sllm_knative.ports import free_port

        sock_dir, dram = self.agent.hostpath(node, SOCKET_DIR), self.agent.hostpath(node, DRAM_DIR) / node
        sock_dir.mkdir(parents=True, exist_ok=True)
        dram.mkdir(parents=True, exist_ok=True)
        self._exit.callback(shutil.rmtree, dram, True)
        sock = sock_dir / "loader.sock"
        target = f"unix://{sock}"
        ssd = self.work / f"ssd-{node}"
        self._exit.callback(shutil.rmtree, ssd, True)
        p = self._proc(f"the loader of {node}", [
            sys.executable, "-m", "loader_sidecar", "--node", node, "--listen", target, "--store", self.store_url,
            "--ssd-dir", str(ssd), "--dram-dir", str(dram), "--ssd-bytes", "64MiB", "--dram-bytes", "64MiB",
            "--profile-bytes", "1MiB", "--metrics", f"127.0.0.1:{free_port()}", "--kube-node", node,
            "--kubeconfig", str(self.cluster.kubeconfig), "--kube-resync", str(RESYNC_S)],
            f"loader-{node}.log", env={"HF_ENDPOINT": "", "HF_TOKEN": ""}, unset=("KUBECONFIG", "SLLM_NODE_NAME"))
        p.wait_until(sock.exists, self.start_timeout_s, "listening")
        return NodeLoader(node, p, sock, target)

    def stop(self) -> None:
        self._exit.close()

    # -- revisions ------------------------------------------------------------------------------

    def scaling_policy(self, name: str, service: str, **spec: Any) -> dict[str, Any]:
        """Create the ScalingPolicy `name` for the Knative Service `service` (`spec` beside its target)."""
        from sllm_knative.kube.client import SCALINGPOLICIES

        return self.k.create(SCALINGPOLICIES, {
            "apiVersion": SCALINGPOLICIES.api_version, "kind": "ScalingPolicy",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"target": {"serviceName": service}, **spec}}, self.namespace)

    def patch_policy(self, name: str, spec: dict[str, Any]) -> None:
        from sllm_knative.kube.client import SCALINGPOLICIES as SP

        self.k.custom.patch_namespaced_custom_object(SP.group, SP.version, self.namespace, SP.plural, name,
                                                     {"spec": spec})

    def function_revision(self, name: str, service: str, model: str, *, served_name: str = "tiny",
                          args: list[str] | None = None, env: dict[str, str] | None = None,
                          annotations: dict[str, str] | None = None, replicas: int = 1,
                          node_selector: dict[str, str] | None = None) -> dict[str, Any]:
        """Create the Revision `name` of Service `service`, our class, serving checkpoint `model` as
        `served_name` (the function's extra `args` and `env`), with its Deployment and PA as Knative
        makes them (`replicas` at first). Its pods keep to `node_selector` (default: the agent's
        nodes). Returns the Revision's annotations."""
        from autoscaler.kube.podautoscaler import CLASS
        from sllm_knative.config.service import INTERNAL_PORT_ANNOTATION
        from testkit.kube.knative import create_revision

        ann = {"autoscaling.knative.dev/class": CLASS, "sllm-knative.io/model": model,
               INTERNAL_PORT_ANNOTATION: str(INTERNAL_PORT), **(annotations or {})}
        # The Revision's container as the user writes it (Knative's default port 8080; 8012 is
        # reserved for queue-proxy). There is no queue-proxy here, so the Deployment's copy
        # listens on 8012 itself, the port the private Service targets, on its pod's address.
        container = {"name": "user-container", "image": FUNCTION_IMAGE,
                     "args": ["--device", "cpu", "--served-model-name", served_name, *(args or [])],
                     "ports": [{"containerPort": 8080}]}
        serving = {**container, "args": [*container["args"], "--host", "$(POD_IP)", "--port", str(SERVING_PORT),
                                          "--internal-host", "$(POD_IP)", "--internal-port", str(INTERNAL_PORT)],
                   "env": [*POD_ENV, *({"name": k, "value": v} for k, v in (env or {}).items())],
                   "ports": [{"containerPort": SERVING_PORT}],
                   "readinessProbe": {"httpGet": {"port": SERVING_PORT, "path": "/health/ready"}, "periodSeconds": 1}}
        pod_spec = {"nodeSelector": node_selector or self.selector(), "terminationGracePeriodSeconds": 2}
        create_revision(self.k, name, self.namespace, ann, [container], pod_spec,
                        labels={"serving.knative.dev/service": service}, replicas=replicas,
                        deployment_containers=[serving])
        return ann

    def selector(self) -> dict[str, str]:
        """A nodeSelector that keeps pods to the agent's nodes (its label, on each of its nodes)."""
        return dict(self.agent.specs[0].labels)

    def client(self, revision: str, timeout: float = 300.0, activator: str | None = None) -> Any:
        """An official `openai` client reaching `revision` through the activator (`activator`, a
        URL, default `act_url`), with the headers Knative's ingress adds."""
        import openai

        return openai.OpenAI(base_url=f"{activator or self.act_url}/v1", api_key="unused", max_retries=0, timeout=timeout,
                             default_headers={"Knative-Serving-Revision": revision,
                                              "Knative-Serving-Namespace": self.namespace})

    # -- observation ----------------------------------------------------------------------------

    def pods(self, revision: str, include_deleting: bool = False) -> list[Any]:
        items = self.k.core.list_namespaced_pod(self.namespace,
                                                label_selector=f"serving.knative.dev/revision={revision}").items
        return [p for p in items if include_deleting or p.metadata.deletion_timestamp is None]

    def ready_pods(self, revision: str) -> list[Any]:
        return [p for p in self.pods(revision) if is_ready(p)]

    def ready_pod(self, revision: str) -> Any:
        return next(iter(self.ready_pods(revision)), None)

    def revision_conditions(self, revision: str) -> dict[str, str]:
        """The Revision's conditions as `type: status/reason` (written by the stand-in for Knative's
        revision reconciler from our PA, testkit.kube.knative.RevisionStatusWriter)."""
        from sllm_knative.kube.client import REVISIONS

        status = self.k.get(REVISIONS, revision, self.namespace).get("status") or {}
        return {c["type"]: f"{c['status']}/{c.get('reason', '')}" for c in status.get("conditions") or []}

    def replicas(self, revision: str) -> int:
        return int(self.k.apps.read_namespaced_deployment(f"{revision}-deployment", self.namespace).spec.replicas)

    def in_dram(self, node: str, model: str) -> bool:
        """Whether `node`'s NodeCache (on the API server) shows `model` in DRAM."""
        from sllm_knative.kube.client import NODECACHES

        return dram_holds(self.k.get(NODECACHES, node).get("status") or {}, model)

    def autoscaler_sees_dram(self, node: str, model: str) -> bool:
        """Whether the autoscaler's informers (what its next placement decides from) have `model` in `node`'s DRAM."""
        nodes = httpx.get(f"{self.as_url}/v1/nodes", timeout=5).json()["nodes"]
        return any(n["name"] == node and dram_holds(n, model) for n in nodes)

    def prefetch(self, node: str, model: str) -> None:
        """Put `model` in `node`'s DRAM tier; return once the NodeCache and the autoscaler show it there."""
        with self.loaders[node].client(120) as c:
            c.prefetch(model, tier="dram", wait=True)
        until(lambda: self.in_dram(node, model), 30, f"{node}'s NodeCache to show {model} in DRAM")
        if self.as_url:
            until(lambda: self.autoscaler_sees_dram(node, model), 30, f"the autoscaler to see {node}'s DRAM copy")

    def services(self) -> list[dict[str, Any]]:
        """The autoscaler's /v1/services."""
        return list(httpx.get(f"{self.as_url}/v1/services", timeout=5).json()["services"])

    def service(self, revision: str) -> dict[str, Any] | None:
        key = f"{self.namespace}/{revision}"
        return next((s for s in self.services() if s["key"] == key), None)

    def in_flight(self, revision: str) -> int:
        """The autoscaler's count of requests in flight for `revision` (-1: it does not know it)."""
        svc = self.service(revision)
        return int(svc["in_flight"]) if svc is not None else -1

    def placement(self, revision: str, pod: str) -> dict[str, Any] | None:
        """The autoscaler's record of the placement that made `pod`, if it has one."""
        svc = self.service(revision) or {}
        return next((p for p in svc.get("placements") or [] if p.get("instance") == pod), None)

    def rotation(self, revision: str) -> dict[str, int]:
        """The activator's rotation for `revision`: pod -> requests outstanding."""
        from sllm_knative.api import activator as admin_api

        stats = httpx.get(f"{self.act_admin}{admin_api.STATS}", headers=self.admin_headers(), timeout=5).json()
        return {i["id"]: i["outstanding"] for s in stats["services"]
                if s["namespace"] == self.namespace and s["name"] == revision for i in s["instances"]}

    def admin_headers(self) -> dict[str, str]:
        """What the activator's admin API and the function pods' internal API want."""
        from sllm_knative.api import auth

        return auth.auth_headers(self.token or None)

    def activator_metric(self, sample: str) -> float:
        """The value of one sample line of the activator's /metrics (`name{labels}`), 0 if absent."""
        from sllm_knative.api import activator as admin_api

        for line in httpx.get(f"{self.act_admin}{admin_api.METRICS}", timeout=5).text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    def migrated(self) -> float:
        """Generations the activator has migrated."""
        return self.activator_metric('activator_migrations_total{outcome="migrated"}')

    def events(self, name: str, reason: str | None = None) -> list[Any]:
        """The namespace's Events about the object `name` (of `reason`, if given)."""
        items = self.k.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={name}").items
        return [e for e in items if reason is None or e.reason == reason]

    def pod_logs(self, chars: int = 3000) -> str:
        """The tail of every container log of the namespace's pods, for a failure message."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted((self.agent.root / "pods").glob(f"{self.namespace}_*/*.log")))

    def logs_of_processes(self, chars: int = 3000) -> str:
        """The tail of the autoscaler's and the activator's logs, for a failure message."""
        return "\n".join(f"--- {p.name}\n{p.tail(chars)}" for p in self.procs if p.name.startswith("the a"))
