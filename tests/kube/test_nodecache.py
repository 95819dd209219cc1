"""The loader publishes its node's NodeCache, against the real control plane.

A real `python -m loader_sidecar --kube-node NODE --kubeconfig K` per test, for a Node the test
node agent registered, with a file store holding a small checkpoint. Checked on the real API
server: the object appears with the node's tiers and an owner reference to the Node, and
parses; a fetched checkpoint shows up Downloaded with its tiers, and `kubectl get ncache` shows
it in the DRAM and SSD columns; a status someone else writes is rewritten from the loader's
state, a deleted NodeCache comes back; deleting the Node makes the garbage collector
(kube-controller-manager) delete the NodeCache; and a loader that cannot reach the API server
keeps serving, logs it, and publishes what happened meanwhile once it can again.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sllm_knative.config.nodecache import CheckpointState, parse_node_cache
from sllm_knative.kube.client import NODECACHES, Kube, is_status
from sllm_knative.kube.nodecache import with_warm
from sllm_knative.loader.client import LoaderClient
from sllm_knative.ports import free_port
from testkit.kube.cluster import BIN_DIR, KubeCluster
from testkit.kube.nodeagent import NodeAgent
from testkit.proc import Proc
from tests.kube.conftest import until

REPO = Path(__file__).resolve().parents[2]
RESYNC_S = 5  # --kube-resync: the backoff's cap too, so a test waits for at most this after an outage


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file store holding `tiny` in the loading format."""
    from sllm_knative.convert import convert
    from sllm_knative.models import TINY, build_model

    root = tmp_path_factory.mktemp("nc-store")
    convert(build_model(root / "src" / "tiny", TINY), root / "models" / "tiny")
    return root / "models"


class Loader(Proc):
    """`python -m loader_sidecar` publishing the NodeCache of `node`."""

    def __init__(self, tmp: Path, node: str, kubeconfig: Path, store: Path) -> None:
        super().__init__(f"the loader of {node}")
        self.node = node
        self.socket = tmp / "loader.sock"
        self.target = f"unix://{self.socket}"
        self.dram = Path("/dev/shm") / f"sllm-nc-{uuid.uuid4().hex[:8]}"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.argv = [sys.executable, "-m", "loader_sidecar", "--node", node, "--listen", self.target,
                     "--store", f"file://{store}", "--ssd-dir", str(tmp / "ssd"), "--dram-dir", str(self.dram),
                     "--ssd-bytes", "64MiB", "--dram-bytes", "64MiB", "--profile-bytes", "1MiB",
                     "--metrics", self.metrics, "--kube-node", node, "--kubeconfig", str(kubeconfig),
                     "--kube-resync", str(RESYNC_S)]
        self.log_file = tmp / "loader.log"

    def run(self) -> Loader:
        self.start(self.argv, self.log_file, env={"PYTHONPATH": str(REPO), "HF_ENDPOINT": "", "HF_TOKEN": ""},
                   unset=("KUBECONFIG", "SLLM_NODE_NAME"))
        self.wait_until(self.socket.exists, 60, "listening")
        return self

    def client(self) -> LoaderClient:
        return LoaderClient(self.target, timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://{self.metrics}/metrics", timeout=5).text
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, grace: float = 15.0) -> int:
        code = super().stop(grace)
        import shutil

        shutil.rmtree(self.dram, ignore_errors=True)
        return code


@pytest.fixture
def loaders(tmp_path: Path) -> Iterator[Callable[..., Loader]]:
    started: list[Loader] = []

    def make(node: str, kubeconfig: Path, store: Path) -> Loader:
        d = tmp_path / f"loader{len(started)}"
        d.mkdir()
        started.append(Loader(d, node, kubeconfig, store).run())
        return started[-1]

    yield make
    for lo in started:
        lo.stop()


def nodecache(api: Any, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = Kube(api).get(NODECACHES, name)
    except Exception as exc:
        if is_status(exc, 404):
            return None
        raise
    return obj


def checkpoint(obj: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    return next((c for c in ((obj or {}).get("status") or {}).get("checkpoints") or [] if c["model"] == model), None)


def kubectl(kube: KubeCluster, *args: str) -> str:
    out = subprocess.run([str(BIN_DIR / "kubectl"), "--kubeconfig", str(kube.kubeconfig), *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_nodecache_shows_the_nodes_truth_and_comes_back_when_changed_or_deleted(
        kube: KubeCluster, api: Any, make_agent: Callable[..., NodeAgent], loaders: Callable[..., Loader],
        store: Path) -> None:
    agent = make_agent(nodes=1)
    node = agent.specs[0].name
    node_uid = Kube(api).core.read_node(node).metadata.uid
    loader = loaders(node, kube.kubeconfig, store)

    # It appears: named after the node, owned by the Node, with the node's tiers; it parses.
    obj = until(lambda: (o := nodecache(api, node)) and (o.get("status") or {}).get("tiers") and o, 30,
                f"the NodeCache of {node}")
    assert obj["spec"] == {"nodeName": node}
    assert obj["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": node,
                                                   "uid": node_uid}]
    cache = parse_node_cache(obj)
    tiers = {t.tier.value: t for t in cache.tiers}
    assert set(tiers) == {"dram", "ssd", "remote"}
    assert tiers["dram"].capacity_bytes == tiers["ssd"].capacity_bytes == 64 << 20
    assert tiers["ssd"].bandwidth and tiers["dram"].bandwidth  # measured at start
    assert [s.uri for s in cache.stores] == [f"file://{store}"] and cache.checkpoints == ()

    # A fetched checkpoint shows up, Downloaded, in both tiers, and in the printer columns.
    model = f"file://{store}/tiny"
    with loader.client() as c:
        c.prefetch(model, tier="dram", wait=True)
    obj = until(lambda: (o := nodecache(api, node)) and (checkpoint(o, model) or {}).get("tiers") == ["dram", "ssd"]
                and o, 15, f"{model} in the NodeCache's dram and ssd tiers")
    cp = checkpoint(obj, model)
    assert cp is not None and cp["state"] == CheckpointState.DOWNLOADED.value and cp["sizeBytes"] > 0
    cache = parse_node_cache(obj)
    assert cache.summary.dram == cache.summary.ssd == model
    table = kubectl(kube, "get", "ncache", node).splitlines()
    assert table[0].split() == ["NAME", "NODE", "DRAM", "SSD", "LOADING", "OBSERVED", "AGE"], table
    assert table[1].split()[:5] == [node, node, model, model, "0"], table
    assert "FAILED" in kubectl(kube, "get", "ncache", node, "-o", "wide").splitlines()[0]

    # Someone else's status is rewritten from the loader's state within seconds.
    Kube(api).custom.patch_cluster_custom_object_status(
        NODECACHES.group, NODECACHES.version, NODECACHES.plural, node,
        {"status": {"checkpoints": [], "summary": {"dram": "forged", "loading": 0, "failed": 0}}})
    obj = until(lambda: (o := nodecache(api, node)) and checkpoint(o, model) and o, RESYNC_S - 2,
                "the forged status to be rewritten (the watch, not the resync)")
    assert obj["status"]["summary"]["dram"] == model
    until(lambda: "written by someone else" in loader.log(), 5, "the loader to log the overwrite")
    assert loader.metric("sllm_loader_nodecache_publishes_total", outcome="overwritten") >= 1

    # Someone else's owner reference or spec is put back.
    Kube(api).custom.patch_cluster_custom_object(
        NODECACHES.group, NODECACHES.version, NODECACHES.plural, node,
        {"metadata": {"ownerReferences": None}, "spec": {"nodeName": "elsewhere"}})
    until(lambda: (o := nodecache(api, node)) and o["spec"]["nodeName"] == node
          and [r["uid"] for r in o["metadata"].get("ownerReferences") or []] == [node_uid], 5,
          "the owner reference and spec to be put back")

    # A deleted NodeCache is created again, with the status.
    Kube(api).delete(NODECACHES, node)
    old_uid = obj["metadata"]["uid"]
    obj = until(lambda: (o := nodecache(api, node)) and o["metadata"]["uid"] != old_uid and checkpoint(o, model)
                and o, 10, "the NodeCache to be created again")
    assert obj["metadata"]["ownerReferences"][0]["uid"] == node_uid
    assert loader.metric("sllm_loader_nodecache_last_publish_timestamp_seconds") > 0
    lines = [ln for ln in loader.log().splitlines() if "checkpoint state published" in ln]
    assert any(f"node={node}" in ln and f"checkpoint={model}" in ln and "state=Downloaded" in ln for ln in lines), \
        loader.tail()


def test_a_warm_request_in_the_spec_fills_the_nodes_dram(
        kube: KubeCluster, api: Any, make_agent: Callable[..., NodeAgent], loaders: Callable[..., Loader],
        store: Path) -> None:
    """The autoscaler's warm request (spec.warm, as KubeBackend.warm writes it) makes the loader
    fetch the checkpoint into DRAM before any pod asks; a stale request is ignored."""
    agent = make_agent(nodes=1)
    node = agent.specs[0].name
    loader = loaders(node, kube.kubeconfig, store)
    until(lambda: (o := nodecache(api, node)) and (o.get("status") or {}).get("tiers"), 30, f"the NodeCache of {node}")
    model, stale = f"file://{store}/tiny", f"file://{store}/gone"
    warm = [{"model": stale, "tier": "dram", "requestedAt": "2026-01-01T00:00:00Z"},
            *with_warm(None, model, "dram", time.time())]
    Kube(api).custom.patch_cluster_custom_object(NODECACHES.group, NODECACHES.version, NODECACHES.plural, node,
                                                 {"spec": {"warm": warm}})
    until(lambda: (checkpoint(nodecache(api, node), model) or {}).get("tiers") == ["dram", "ssd"], 30,
          f"{model} warmed into DRAM by the spec's request")
    assert "warming: the autoscaler placed an instance here" in loader.log()
    assert checkpoint(nodecache(api, node), stale) is None  # too old: not fetched, no DownloadError
    with loader.client() as c:
        assert [lease.model for lease in c.inventory().leases] == []  # a fill, not a lease


def test_deleting_the_node_garbage_collects_its_nodecache(
        api: Any, make_agent: Callable[..., NodeAgent], loaders: Callable[..., Loader], kube: KubeCluster,
        store: Path) -> None:
    agent = make_agent(nodes=1)
    node = agent.specs[0].name
    loader = loaders(node, kube.kubeconfig, store)
    until(lambda: (nodecache(api, node) or {}).get("status"), 30, f"the NodeCache of {node}")

    agent.kill_node(node)  # the machine is gone: no more heartbeats
    Kube(api).core.delete_node(node)
    # kube-controller-manager's garbage collector finds the owner gone (it learns new resource
    # types from discovery every 30 s, so allow for that).
    until(lambda: nodecache(api, node) is None, 90, f"the garbage collector to delete the NodeCache of {node}")
    until(lambda: f"Node {node} does not exist" in loader.log(), 15, "the loader to log the missing Node")
    # Without its Node, the loader does not create it again.
    with contextlib.suppress(AssertionError):
        until(lambda: nodecache(api, node) is not None, RESYNC_S + 2, "")
    assert nodecache(api, node) is None, "the loader created a NodeCache for a Node that does not exist"
    with loader.client() as c:
        assert c.inventory().node == node  # and it keeps serving


class Switch:
    """A TCP forwarder to the API server that can be taken down (connections cut, port refused)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def up(self) -> Switch:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def down(self) -> None:
        s, self._listener = self._listener, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def test_the_loader_keeps_serving_while_the_api_server_is_unreachable(
        api: Any, make_agent: Callable[..., NodeAgent], loaders: Callable[..., Loader], kube: KubeCluster,
        store: Path, tmp_path: Path) -> None:
    agent = make_agent(nodes=1)
    node = agent.specs[0].name
    server = urllib.parse.urlsplit(kube.server)
    assert server.hostname and server.port
    switch = Switch(server.hostname, server.port).up()
    config = yaml.safe_load(kube.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{switch.port}"  # in the serving cert
    kubeconfig = tmp_path / "through-the-switch"
    kubeconfig.write_text(yaml.safe_dump(config))
    try:
        loader = loaders(node, kubeconfig, store)
        until(lambda: (nodecache(api, node) or {}).get("status"), 30, f"the NodeCache of {node}")

        switch.down()
        model = f"file://{store}/tiny"
        with loader.client() as c:  # the loader's service does not depend on the API server
            assert c.prefetch(model, tier="dram", wait=True).source == "remote"
            assert any(e.model == model for t in c.inventory().tiers for e in t.entries)
        until(lambda: "NodeCache not published; retrying" in loader.log(), 15, "the loader to log the outage")
        line = next(ln for ln in loader.log().splitlines() if "NodeCache not published" in ln)
        assert f"node={node}" in line and "error=" in line, line
        assert loader.metric("sllm_loader_nodecache_publishes_total", outcome="error") >= 1
        assert checkpoint(nodecache(api, node), model) is None  # nothing got through meanwhile

        switch.up()
        until(lambda: (checkpoint(nodecache(api, node), model) or {}).get("state") == "Downloaded", RESYNC_S + 15,
              "what happened during the outage to be published once the API server is reachable")
        # Logged once the write has returned: it may come a moment after the object shows it.
        until(lambda: "NodeCache published again" in loader.log(), 15, "the loader to log the recovery")
    finally:
        switch.down()


def test_a_loader_without_a_usable_kubeconfig_refuses_to_start(tmp_path: Path, store: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("not: [a kubeconfig")
    p = Proc("loader").start([sys.executable, "-m", "loader_sidecar", "--node", "x", "--store", f"file://{store}",
                              "--listen", f"unix://{tmp_path}/l.sock", "--ssd-dir", str(tmp_path / "ssd"),
                              "--ssd-bytes", "64MiB", "--dram-dir", str(tmp_path / "dram"), "--dram-bytes", "64MiB",
                              "--profile-bytes", "1MiB", "--kube-node", "x", "--kubeconfig", str(bad)],
                             tmp_path / "loader.log", env={"PYTHONPATH": str(REPO)})
    assert p.wait(60) == 2
    assert f"error: publishing the NodeCache of x: kubeconfig {bad}" in p.log(), p.tail()
