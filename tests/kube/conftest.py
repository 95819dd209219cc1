"""Fixtures for every test under tests/kube: a real control plane, and test nodes that run pods.

- `kube` (session): a real control plane on the cluster's own pod network, one per test session
  and so one per xdist worker that runs a test from here (about 10 s each; the tests do not
  depend on sharing one). Binaries come from `make kube-bins`; without them the tests skip,
  except with CI=true, where they fail.
- `api` (session): an official `kubernetes` ApiClient for it, as the admin; `k`: the API groups
  the tests use, on that client.
- `namespace`: a fresh namespace labelled `sllm-test: <name>`, returned once its default
  ServiceAccount exists (the ServiceAccount admission plugin refuses pods until then); deleted
  afterwards.
- `node_agent` (module scope): a NodeAgent with two nodes (4 CPU, 8Gi, 1 GPU each), labelled
  `sllm-knative.io/test-agent=<tag>` so pods can be pinned to it with `agent_selector(agent)`,
  on the cluster's pod network (`kube.network`).
- `make_agent`: a factory for agents a test may break (kill_node); all stopped afterwards.

Helpers for test modules: `until` (poll a condition), `agent_selector`, `Clients`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sllm_knative.log import get_logger
from testkit.kube.cluster import BIN_DIR, KubeCluster, missing_binaries
from testkit.kube.nodeagent import NodeAgent, NodeSpec
from testkit.kube.util import until  # noqa: F401  (the tests import it from here)

_log = get_logger("tests.kube")
AGENT_LABEL = "sllm-knative.io/test-agent"



# --- the control plane ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    missing = missing_binaries()
    if missing:
        msg = f"{BIN_DIR} lacks {', '.join(missing)}: run `make kube-bins`"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    cluster = KubeCluster.up(tmp_path_factory.mktemp("kube"))
    _log.info("control plane up", **{k: f"{v:.2f}s" for k, v in cluster.startup_s.items()})
    try:
        yield cluster
    finally:
        cluster.down()


@dataclass
class Clients:
    core: Any
    apps: Any
    discovery: Any
    auth: Any
    coord: Any


@pytest.fixture(scope="session")
def api(kube: KubeCluster) -> Any:
    """The admin's `kubernetes.client.ApiClient` for the cluster."""
    return kube.api_client()


@pytest.fixture(scope="session")
def k(api: Any) -> Clients:
    from kubernetes import client

    return Clients(client.CoreV1Api(api), client.AppsV1Api(api), client.DiscoveryV1Api(api),
                   client.AuthenticationV1Api(api), client.CoordinationV1Api(api))


def ensure_namespace(core: Any, name: str, timeout_s: float = 60.0) -> None:
    """The namespace `name` exists and is Active: created if missing, waited for if an earlier test
    on this control plane is still deleting it (a Terminating namespace refuses new objects)."""
    from kubernetes.client.rest import ApiException

    def active() -> bool:
        try:
            return bool(core.read_namespace(name).status.phase == "Active")
        except ApiException as e:
            if e.status != 404:
                raise
        try:
            core.create_namespace({"metadata": {"name": name}})
        except ApiException as e:
            if e.status != 409:  # created meanwhile, or still terminating: look again
                raise
        return False

    until(active, timeout_s, f"namespace {name} to be Active")


@pytest.fixture
def namespace(k: Clients) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    k.core.create_namespace({"metadata": {"name": name, "labels": {"sllm-test": name}}})
    # The ServiceAccount admission plugin refuses pods until the namespace has its default
    # ServiceAccount, which the controller manager's serviceaccount controller creates.
    until(lambda: k.core.read_namespaced_service_account("default", name), 30, f"the default ServiceAccount in {name}")
    try:
        yield name
    finally:
        k.core.delete_namespace(name)


# --- test nodes -------------------------------------------------------------------------------


def start_agent(kube: KubeCluster, root: Path, nodes: int = 2, **kw: Any) -> NodeAgent:
    # A label value that reads as a string in every YAML: PyYAML (YAML 1.1) dumps hex such as
    # "12e345" unquoted, and kubectl's Go YAML reads that back as a number (a nodeSelector of
    # type number: the apply is refused). A leading letter rules it out.
    tag = "t" + uuid.uuid4().hex[:6]
    specs = [NodeSpec(f"na-{tag}-{i}", cpu="4", memory="8Gi", gpus=1, labels={AGENT_LABEL: tag})
             for i in range(nodes)]
    assert kube.network is not None
    kw.setdefault("network", kube.network)  # pods live on the cluster's own pod network
    return NodeAgent(kube.kubeconfig, root, specs, **kw).start()


def agent_selector(agent: NodeAgent) -> dict[str, str]:
    """A nodeSelector that pins pods to this agent's nodes."""
    return {AGENT_LABEL: agent.specs[0].labels[AGENT_LABEL]}


@pytest.fixture(scope="module")
def node_agent(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    agent = start_agent(kube, tmp_path_factory.mktemp("agent"))
    try:
        yield agent
    finally:
        agent.stop(delete_nodes=True)


@pytest.fixture
def make_agent(kube: KubeCluster, tmp_path: Path) -> Iterator[Callable[..., NodeAgent]]:
    agents: list[NodeAgent] = []

    def make(nodes: int = 2, **kw: Any) -> NodeAgent:
        agents.append(start_agent(kube, tmp_path / f"agent{len(agents)}", nodes, **kw))
        return agents[-1]

    try:
        yield make
    finally:
        for a in agents:
            a.stop(delete_nodes=True)
