"""manifests/networkpolicy/: the NetworkPolicies for the internal APIs, checked against the real API
server and against the rest of the install.

- The API server accepts both (its NetworkPolicy validation: selectors, port ranges with
  `endPort`), the activator's in `knative-serving` as kustomize builds it, the function pods' in
  a namespace of revisions, as `kubectl apply -n NS -f` puts it there.
- Their selectors select what the install runs: the activator's policy selects the pods of
  manifests/activator/deployment.yaml and not Knative's own activator (`app: activator` only);
  the peers they admit are the autoscaler's pods (manifests/autoscaler/deployment.yaml, in the
  namespace of manifests/namespace.yaml) and our activator's; the function policy selects a
  revision's pods (the labels Knative puts on them, testkit.kube.knative).
- Their ports: the protected port (the activator's admin port, the function's default internal
  port) only from those peers; every other TCP port from anyone, with no gap (a pod selected by
  an Ingress policy takes only what some policy admits) and no overlap.

Not shown here: enforcement. The test pod network (testkit/kube/network.py) is a bridge with no
NetworkPolicy controller, so these policies select and admit on paper only; a cluster needs a
network plugin that enforces them (docs/kubernetes.md, "NetworkPolicies").
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from autoscaler.backends.kube import INTERNAL_PORT as FUNCTION_INTERNAL_PORT
from autoscaler.kube.activators import ADMIN_PORT
from autoscaler.kube.activators import NAMESPACE as KNATIVE_NS
from testkit.kube.cluster import BIN_DIR, KubeCluster
from testkit.kube.knative import revision_objects
from tests.kube.conftest import Clients, ensure_namespace

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for d in _docs(path) if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        have, op, values = e["key"] in labels, e["operator"], e.get("values") or []
        ok = {"Exists": have, "DoesNotExist": not have, "In": have and labels[e["key"]] in values,
              "NotIn": not have or labels[e["key"]] not in values}[op]
        if not ok:
            return False
    return True


def _ranges(ports: list[dict[str, Any]]) -> list[tuple[int, int]]:
    assert all(p.get("protocol", "TCP") == "TCP" for p in ports), ports
    return sorted((int(p["port"]), int(p.get("endPort", p["port"]))) for p in ports)


def _check_ports(policy: dict[str, Any], protected: int) -> list[dict[str, Any]]:
    """The policy's open rule covers every TCP port but `protected`, exactly; its other rule admits
    only `protected`. Returns that rule's peers."""
    open_rules = [r for r in policy["spec"]["ingress"] if "from" not in r]
    peer_rules = [r for r in policy["spec"]["ingress"] if "from" in r]
    assert len(open_rules) == 1 and len(peer_rules) == 1, policy["spec"]["ingress"]
    assert _ranges(open_rules[0]["ports"]) == [(1, protected - 1), (protected + 1, 65535)]
    assert _ranges(peer_rules[0]["ports"]) == [(protected, protected)]
    return list(peer_rules[0]["from"])


def _pod_labels(deployment: Path) -> dict[str, str]:
    return dict(_one(deployment, "Deployment")["spec"]["template"]["metadata"]["labels"])


def test_the_network_policies_are_accepted_and_select_the_install(kube: KubeCluster, k: Clients, api: Any,
                                                                   namespace: str) -> None:
    from kubernetes import client

    net = client.NetworkingV1Api(api)
    install_ns = _one(MANIFESTS / "namespace.yaml", "Namespace")["metadata"]["name"]
    activator_pods = _pod_labels(MANIFESTS / "activator" / "deployment.yaml")
    autoscaler_pods = _pod_labels(MANIFESTS / "autoscaler" / "deployment.yaml")
    knatives_activator = {"app": "activator", "role": "activator"}  # Knative's own activator pods

    # The activator's, as kustomize builds it (labels added), accepted in knative-serving.
    built = subprocess.run([str(BIN_DIR / "kubectl"), "kustomize", str(MANIFESTS / "networkpolicy")],
                           check=True, capture_output=True, text=True, timeout=60).stdout
    [admin] = [d for d in yaml.safe_load_all(built) if d]
    assert admin["kind"] == "NetworkPolicy" and admin["metadata"]["namespace"] == KNATIVE_NS
    assert admin["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sllm-knative"
    assert _selects(admin["spec"]["podSelector"], activator_pods)
    assert not _selects(admin["spec"]["podSelector"], knatives_activator)
    [peer] = _check_ports(admin, ADMIN_PORT)
    assert _selects(peer["podSelector"], autoscaler_pods)
    assert _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": install_ns})
    assert not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})

    # The function pods', in a namespace of revisions (as `kubectl apply -n NS -f` puts it).
    fn = _one(MANIFESTS / "networkpolicy" / "function-internal.yaml", "NetworkPolicy")
    assert "namespace" not in fn["metadata"]
    deployment, _ = revision_objects("chat-00001", namespace, "uid-1", [{"name": "user-container", "image": "f"}],
                                     {}, {})
    assert _selects(fn["spec"]["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert not _selects(fn["spec"]["podSelector"], autoscaler_pods)
    peers = _check_ports(fn, FUNCTION_INTERNAL_PORT)
    assert len(peers) == 2
    by_ns = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]: p["podSelector"] for p in peers}
    assert set(by_ns) == {KNATIVE_NS, install_ns}
    assert _selects(by_ns[KNATIVE_NS], activator_pods) and not _selects(by_ns[KNATIVE_NS], knatives_activator)
    assert _selects(by_ns[install_ns], autoscaler_pods)

    # The API server's own validation takes both (and reads them back unchanged in substance).
    ensure_namespace(k.core, KNATIVE_NS)
    made = []
    try:
        for doc, ns in ((admin, KNATIVE_NS), (fn, namespace)):
            obj = net.create_namespaced_network_policy(ns, doc)
            made.append((obj.metadata.name, ns))
            back = api.sanitize_for_serialization(net.read_namespaced_network_policy(obj.metadata.name, ns))
            assert back["spec"]["ingress"] == doc["spec"]["ingress"], back["spec"]
            assert back["spec"]["podSelector"] == doc["spec"]["podSelector"]
    finally:
        for name, ns in made:
            net.delete_namespaced_network_policy(name, ns)
