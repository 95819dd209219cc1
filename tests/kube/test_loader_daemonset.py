"""The loader's DaemonSet (manifests/loader/), as the install creates it, on the test node agent.

`kubectl kustomize manifests/loader` plus the namespace are created on the real API server; the
DaemonSet controller and the scheduler put one pod on each node, and the node agent runs it the
way the image would (`sllm-knative/loader` -> `python -m loader_sidecar`, the manifest's args
with `$(VAR)` expansion, the downward API env, the hostPath volumes, the service account's token
projected into the pod). Checked on each node: the init container gave the hostPath folders to
uid 10001; the loader becomes Ready through the manifest's readiness probe; it publishes that
node's NodeCache as its ServiceAccount (the in-cluster configuration, with manifests/loader's
RBAC); and its gRPC socket and tiers are in that node's hostPath folders, where the node's
function pods will look for them.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from sllm_knative.kube.client import NODECACHES, Kube
from sllm_knative.loader.client import LoaderClient
from testkit.kube.cluster import KubeCluster
from testkit.kube.install import kustomize
from tests.kube.audit import apply_docs
from tests.kube.conftest import start_agent, until
from tests.kube.test_nodecache import nodecache

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "sllm-knative"
NAME = "sllm-loader"
LABEL = "app.kubernetes.io/name=sllm-loader"


def install_docs() -> list[dict[str, Any]]:
    namespace = yaml.safe_load((ROOT / "manifests" / "namespace.yaml").read_text())
    return [namespace, *kustomize(ROOT / "manifests" / "loader")]


def pod_logs(agent_root: Path) -> str:
    """The tail of every loader pod's container logs under the agent's root (for a failure)."""
    out = []
    for f in sorted((agent_root / "pods").glob(f"{NAMESPACE}_{NAME}-*/*.log")):
        out.append(f"--- {f.parent.name}/{f.name}\n{f.read_text(errors='replace')[-1500:]}")
    return "\n".join(out) or "(no loader pod ran)"


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_the_loader_daemonset_runs_a_ready_loader_on_every_node_that_publishes_its_nodecache(
        kube: KubeCluster, api: Any) -> None:
    admin = Kube(api)
    docs = install_docs()
    assert [d["kind"] for d in docs].count("DaemonSet") == 1
    apply_docs(api, [d for d in docs if d["kind"] != "DaemonSet"])
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    until(lambda: Kube(kube.api_client_as(NAMESPACE, sa)).list(NODECACHES) is not None, 15,
          "the loader's ClusterRoleBinding to take effect")
    # The projected service-account volume needs the namespace's CA bundle (the root CA publisher).
    until(lambda: admin.core.read_namespaced_config_map("kube-root-ca.crt", NAMESPACE), 30,
          "kube-root-ca.crt in sllm-knative")
    # A short root: a unix socket's path is limited to 107 bytes, and the socket lies in the
    # node's hostPath folder under the agent's root (make_agent's root under pytest's tmp_path is
    # too deep for it).
    root = Path(tempfile.mkdtemp(prefix="sllm-ds-", dir="/tmp"))
    agent = start_agent(kube, root, nodes=2)
    try:
        apply_docs(api, [d for d in docs if d["kind"] == "DaemonSet"])
        nodes = [s.name for s in agent.specs]

        def published(node: str) -> dict[str, Any] | None:
            obj = nodecache(api, node)
            return obj if obj and (obj.get("status") or {}).get("tiers") else None

        def ready_pods() -> dict[str, Any]:
            pods = admin.core.list_namespaced_pod(NAMESPACE, label_selector=LABEL).items
            return {p.spec.node_name: p for p in pods if p.spec.node_name in nodes and ready(p)}

        try:
            pods = until(lambda: len(r := ready_pods()) == len(nodes) and r, 120,
                         f"a Ready loader pod on each of {nodes}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{pod_logs(agent.root)}") from None
        for node in nodes:
            pod = pods[node]
            log = agent.pod_log(NAMESPACE, pod.metadata.name, "loader")
            init = pod.status.init_container_statuses[0]
            assert (init.name, init.state.terminated.exit_code) == ("own-tiers", 0), init
            for folder in ("/var/run/sllm-knative", "/dev/shm/sllm-knative", "/var/lib/sllm-knative/ssd"):
                st = agent.hostpath(node, folder).stat()
                assert (st.st_uid, st.st_gid) == (10001, 10001), f"{node}:{folder} not given to the loader's user"

            # Its node's NodeCache, published through the pod's own service account.
            node_uid = admin.core.read_node(node).metadata.uid
            obj = until(functools.partial(published, node), 30, f"the NodeCache of {node}")
            assert obj["metadata"]["ownerReferences"][0]["uid"] == node_uid
            assert [s["uri"] for s in obj["status"]["stores"]] == ["hf://"]
            assert f"kube_node={node}" in log, log[-2000:]

            # The socket and the tiers are the node's hostPath folders.
            sock = agent.hostpath(node, "/var/run/sllm-knative") / "loader.sock"
            assert sock.is_socket(), f"no socket at {sock}"
            with LoaderClient(f"unix://{sock}", timeout=30) as c:
                inv = c.inventory()
            assert inv.node == node
            assert {t.name: Path(t.directory) for t in inv.tiers} == {
                "dram": agent.hostpath(node, "/dev/shm/sllm-knative").resolve(),
                "ssd": agent.hostpath(node, "/var/lib/sllm-knative/ssd").resolve()}
        ds = admin.apps.read_namespaced_daemon_set(NAME, NAMESPACE)
        assert ds.status.number_ready >= len(nodes), ds.status
    finally:
        from kubernetes.client.rest import ApiException

        try:
            admin.apps.delete_namespaced_daemon_set(NAME, NAMESPACE, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            until(lambda: not admin.core.list_namespaced_pod(NAMESPACE, label_selector=LABEL).items, 60,
                  "the loader pods to be deleted")
        finally:
            agent.stop(delete_nodes=True)
            shutil.rmtree(root, ignore_errors=True)
