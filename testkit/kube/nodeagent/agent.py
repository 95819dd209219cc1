"""NodeAgent: kubelet + containerd for N test nodes, in threads of this process."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from sllm_knative.log import get_logger, setup
from testkit.kube.network import ClusterNetwork
from testkit.kube.nodeagent.api import Api
from testkit.kube.nodeagent.nodes import NodeRunner
from testkit.kube.nodeagent.spec import IMAGES, ImageConfig, NodeSpec

_log = get_logger("nodeagent")


class NodeAgent:
    """Kubelet + containerd for N test nodes, in threads of this process.

    `network` is the cluster's pod network (testkit/kube/network.py): each node becomes a network
    namespace on it, removed again by `stop`."""

    def __init__(self, kubeconfig: Path, root: Path, nodes: Sequence[NodeSpec], *, network: ClusterNetwork,
                 lease_renew_s: float = 2.0, status_update_s: float = 4.0, backoff_base_s: float = 1.0,
                 backoff_cap_s: float = 10.0, backoff_reset_s: float = 60.0, watch_timeout_s: int = 60,
                 volume_resync_s: float = 10.0, images: Mapping[str, ImageConfig] | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        names = [n.name for n in nodes]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"node names must be given and distinct: {names}")
        if not isinstance(network, ClusterNetwork):
            raise TypeError(f"network must be the cluster's ClusterNetwork (testkit/kube/network.py), not {network!r}")
        self.kubeconfig, self.root = Path(kubeconfig), Path(root).resolve()
        self.specs = list(nodes)
        self.network = network
        self.lease_renew_s, self.status_update_s = lease_renew_s, status_update_s
        self.backoff_base_s, self.backoff_cap_s, self.backoff_reset_s = backoff_base_s, backoff_cap_s, backoff_reset_s
        self.watch_timeout_s, self.volume_resync_s = watch_timeout_s, volume_resync_s
        self.images = dict(images if images is not None else IMAGES)
        self.extra_env = dict(extra_env or {})
        # A letter first: an id such as "1234e567" goes into YAML unquoted (PyYAML reads it as a
        # string) and kubectl reads it back as a number, refusing it as a label value.
        self.agent_id = "a" + uuid.uuid4().hex[:7]
        shm = Path("/dev/shm")
        self.shm_root = (shm if shm.is_dir() and os.access(shm, os.W_OK) else self.root) / f"sllm-nodeagent-{self.agent_id}"
        self.api: Api = None  # type: ignore[assignment]
        self.kubelet_version = "v0.0.0"
        self.nodes: dict[str, NodeRunner] = {}
        self._started = False

    def start(self) -> NodeAgent:
        setup()
        self.root.mkdir(parents=True, exist_ok=True)
        self.api = Api(self.kubeconfig)
        with contextlib.suppress(Exception):
            self.kubelet_version = self.api.version.get_code(_request_timeout=10).git_version
        self._started = True
        try:
            for spec in self.specs:
                runner = NodeRunner(self, spec, self.network.add_node())
                self.nodes[spec.name] = runner
                runner.register()
            for runner in self.nodes.values():
                runner.start()
        except BaseException:
            self.stop()
            raise
        _log.info("node agent up", nodes=",".join(f"{n.name}={n.ip}" for n in self.nodes.values()),
                  network=f"{self.network.bridge} {self.network.cidr}", root=self.root)
        return self

    def kill_node(self, name: str, mark_not_ready: bool = False) -> None:
        """SIGKILL the node's containers, take it off the network, stop its heartbeats, leases and
        pod status writes: the node lifecycle controller marks it NotReady after its grace period
        (with `mark_not_ready` the agent reports the node and its pods not ready itself, at once)."""
        self.nodes[name].kill(mark_not_ready)

    def node_ip(self, name: str) -> str:
        return self.nodes[name].ip

    def hostpath(self, node: str, path: str = "/") -> Path:
        """Where a hostPath volume `path` lives for pods on `node`."""
        return self.nodes[node].hostpath_root / path.lstrip("/")

    def pod_dir(self, namespace: str, name: str) -> Path:
        """The folder (logs, volumes, rootfs) of the newest pod of that name."""
        found = sorted((self.root / "pods").glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no pod {namespace}/{name} ran under {self.root}")
        return found[-1]

    def pod_log(self, namespace: str, name: str, container: str) -> str:
        p = self.pod_dir(namespace, name) / f"{container}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def pids(self) -> list[int]:
        """Every container process now running (for tests that check nothing is left)."""
        out = []
        for n in self.nodes.values():
            with n._mu:
                workers = list(n.workers.values())
            out += [c.proc.pid for w in workers for c in w.inits + w.ctrs if c.proc is not None]
        return out

    def stop(self, delete_nodes: bool = False) -> None:
        """End every container process and thread, remove the nodes' namespaces; optionally delete
        the Node objects (their pods then go through the pod garbage collector). Safe to call again."""
        if self._started:
            for runner in self.nodes.values():
                if not runner.dead:
                    runner.stop()
            shutil.rmtree(self.shm_root, ignore_errors=True)
            for runner in self.nodes.values():
                self.network.remove_node(runner.net)
            self._started = False
            _log.info("node agent stopped", nodes=",".join(self.nodes))
        if delete_nodes:
            for name in list(self.nodes):
                with contextlib.suppress(Exception):
                    self.api.core.delete_node(name, _request_timeout=10)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
