"""Least privilege, measured: the loader publishes its node's NodeCache as its ServiceAccount
(`--kubeconfig` holding a token of `sllm-knative/sllm-loader`) with exactly the ClusterRole in
manifests/loader/rbac.yaml, through everything the publisher does: create the NodeCache, write
its status, publish a fetched checkpoint, rewrite a forged status, put back an owner reference
and spec someone else changed, create a deleted NodeCache again, and resync. The verbs it called
are read back from the API server's audit log (from this test's start) and compared with the
rules, both ways: nothing it called was refused, and nothing the ClusterRole grants went unused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sllm_knative.config.nodecache import CheckpointState
from sllm_knative.kube.client import NODECACHES, Kube
from testkit.kube.cluster import KubeCluster
from testkit.kube.nodeagent import NodeAgent
from tests.kube.audit import apply_docs, assert_exactly_granted, audit_offset
from tests.kube.conftest import until
from tests.kube.test_nodecache import RESYNC_S, Loader, checkpoint, nodecache, store  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "manifests" / "loader" / "rbac.yaml"
SA = ("sllm-knative", "sllm-loader")


@pytest.fixture
def loader_as_sa() -> Iterator[list[Loader]]:
    started: list[Loader] = []
    yield started
    for lo in started:
        lo.stop()


def test_the_loader_role_is_exactly_what_it_calls(kube: KubeCluster, api: Any, make_agent: Callable[..., NodeAgent],
                                                  store: Path, tmp_path: Path,  # noqa: F811
                                                  loader_as_sa: list[Loader]) -> None:
    admin = Kube(api)
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    apply_docs(api, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SA[0]}}, *docs])
    as_sa = Kube(kube.api_client_as(*SA))
    until(lambda: as_sa.list(NODECACHES) is not None, 15, "the ClusterRoleBinding to take effect")
    agent = make_agent(nodes=1)
    node = agent.specs[0].name
    node_uid = admin.core.read_node(node).metadata.uid
    audit_from = audit_offset(kube.audit_log)

    kubeconfig = kube.kubeconfig_as(*SA, tmp_path / "loader-kubeconfig")
    (tmp_path / "loader").mkdir()
    loader = Loader(tmp_path / "loader", node, kubeconfig, store)
    loader_as_sa.append(loader.run())

    # Created, owned by the Node, with the status written.
    until(lambda: (nodecache(api, node) or {}).get("status", {}).get("tiers"), 30, f"the NodeCache of {node}")
    # A fetched checkpoint: more status writes.
    model = f"file://{store}/tiny"
    with loader.client() as c:
        c.prefetch(model, tier="dram", wait=True)
    until(lambda: (checkpoint(nodecache(api, node), model) or {}).get("state") == CheckpointState.DOWNLOADED.value,
          15, f"{model} Downloaded")
    # A forged status: rewritten (seen through the watch).
    admin.custom.patch_cluster_custom_object_status(
        NODECACHES.group, NODECACHES.version, NODECACHES.plural, node,
        {"status": {"checkpoints": [], "summary": {"dram": "forged", "loading": 0, "failed": 0}}})
    until(lambda: checkpoint(nodecache(api, node), model), RESYNC_S - 2, "the forged status to be rewritten")
    # Owner reference and spec changed: put back (an update of the object itself).
    admin.custom.patch_cluster_custom_object(NODECACHES.group, NODECACHES.version, NODECACHES.plural, node,
                                             {"metadata": {"ownerReferences": None}, "spec": {"nodeName": "elsewhere"}})
    until(lambda: (o := nodecache(api, node)) and o["spec"]["nodeName"] == node
          and [r["uid"] for r in o["metadata"].get("ownerReferences") or []] == [node_uid], 5,
          "the owner reference and spec to be put back")
    # Deleted: created again.
    old_uid = (nodecache(api, node) or {})["metadata"]["uid"]
    admin.delete(NODECACHES, node)
    until(lambda: (o := nodecache(api, node)) and o["metadata"]["uid"] != old_uid and checkpoint(o, model), 10,
          "the NodeCache to be created again")
    time.sleep(RESYNC_S + 1)  # a resync: the Node read again, the status written unchanged
    loader.stop()
    log = loader.log()
    for line in ("NodeCache created", "rewritten from the loader's state", "putting it back",
                 "NodeCache deleted; creating it again"):
        assert line in log, f"the scenario did not make the loader do {line!r}:\n{loader.tail()}"

    assert_exactly_granted(kube.audit_log, f"system:serviceaccount:{SA[0]}:{SA[1]}", docs, "the loader",
                           since=audit_from)
