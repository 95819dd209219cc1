"""The test cluster's pod network: a bridge, one network namespace per node, an address per pod.

Kubernetes refuses loopback addresses in Endpoints and EndpointSlices
(`ValidateEndpointIP`: "may not be in the loopback range"), so pods cannot simply bind 127.0.x.y
if the real endpoint controllers are to publish them. Instead the test cluster gets a small
network of its own, built the way a CNI plugin builds one, entirely inside this machine:

- a Linux bridge `sb<pid>` (`sb<pid>x1`, ... for more in one process) in the root namespace
  holding the host's address on the cluster network, 10.X.0.1/16 (X is the first of 200..254
  whose /16 is unused on this machine); the kube-apiserver listens there, so pods can reach it;
- one network namespace per node, `sllm<pid>n<i>`, joined to the bridge by a veth pair; the
  node's InternalIP is 10.X.i.1;
- one /32 address per pod, 10.X.i.k on the node's namespace; the pod's processes run in
  that namespace (setns before exec) and bind their pod IP.

Every address is on-link through the bridge, so the test process, the control plane and every
pod reach each other with no routing or NAT; nothing leaves the machine. `<pid>` is the
owning process: `sweep_stale()` removes namespaces and bridges whose owner is gone (a run
killed with SIGKILL). Needs root and iproute2 (`ip`), as every machine of this project has.

Another process can add nodes to a network it did not create: the cluster writes
`network.json` (`save`: bridge, second_octet) next to its kubeconfig, and
`ClusterNetwork.load(path)` attaches to it (the by-hand node agent does). Node indexes are
picked under a lock file per bridge, from those the bridge's veths already use, so processes
sharing one network never hand out the same node address. A process's namespaces are its own
(`sllm<its pid>n<i>`): it removes them (`remove_node`), or `sweep_stale` does once it is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sllm_knative.local.procs import alive

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_NETNS_RE = re.compile(r"^sllm(\d+)n\d+$")
_BRIDGE_RE = re.compile(r"^sb(\d+)(?:x\d+)?$")
_VETH_RE = re.compile(r"^sv\d+n(\d+)$")
NETWORK_FILE = "network.json"  # what the cluster writes next to its kubeconfig (`save`)
_NODE_LOCK = threading.Lock()  # node indexes of one process; the lock file guards across processes


def _ip(*args: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r.stdout


def enter_netns(name: str) -> None:
    """Move the calling thread (a child between fork and exec) into network namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def sweep_stale() -> list[str]:
    """Delete namespaces and bridges left by test clusters whose owning process is gone."""
    removed = []
    for line in _ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NETNS_RE.match(name)
        if m and not alive(int(m.group(1))):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = _BRIDGE_RE.match(name)
        if m and not alive(int(m.group(1))):
            _ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


def _free_second_octet() -> int:
    used: set[int] = set()
    for line in _ip("-4", "-o", "addr", "show").splitlines() + _ip("-4", "route", "show").splitlines():
        used.update(int(m) for m in re.findall(r"\b10\.(\d+)\.\d+\.\d+", line))
    for x in range(200, 255):
        if x not in used:
            return x
    raise RuntimeError("no free 10.X.0.0/16 (X in 200..254) for the test cluster network")


@dataclass
class NodeNetwork:
    """A node's namespace and veth; hands out pod addresses 10.X.i.k."""

    netns: str
    veth: str
    ip: str
    _subnet: ipaddress.IPv4Network
    _free: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        hosts = [str(h) for h in self._subnet.hosts()]
        self._free = [h for h in hosts if h != self.ip]

    def add_pod_ip(self) -> str:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"{self.netns}: no pod address left in {self._subnet}")
            addr = self._free.pop(0)
        _ip("-n", self.netns, "addr", "add", f"{addr}/32", "dev", "eth0")
        return addr

    def release_pod_ip(self, addr: str) -> None:
        _ip("-n", self.netns, "addr", "del", f"{addr}/32", "dev", "eth0", check=False)
        with self._lock:
            if addr not in self._free:
                self._free.append(addr)

    def enter(self) -> None:
        enter_netns(self.netns)

    def cut(self) -> None:
        """Take the node off the network, the way a machine that dies drops off it."""
        _ip("link", "set", self.veth, "down", check=False)

    def destroy(self) -> None:
        _ip("netns", "delete", self.netns, check=False)  # takes its veth end, and so the pair, with it
        _ip("link", "delete", self.veth, check=False)


@dataclass
class ClusterNetwork:
    bridge: str
    second_octet: int
    nodes: dict[str, NodeNetwork] = field(default_factory=dict)
    owns_bridge: bool = True  # False when attached (`load`): `destroy` then leaves the bridge alone

    @property
    def host_ip(self) -> str:
        return f"10.{self.second_octet}.0.1"

    @property
    def cidr(self) -> str:
        return f"10.{self.second_octet}.0.0/16"

    @classmethod
    def create(cls) -> ClusterNetwork:
        """A new bridge, sb<pid> (sb<pid>x<n> for this process's next ones), on a free 10.X/16."""
        sweep_stale()
        # Choosing the /16 and taking it is one step across processes (two test runs on one
        # machine once picked the same 10.X and each saw the other's pods answer "refused").
        with _NODE_LOCK, open(Path(tempfile.gettempdir()) / "sllm-net-octets.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            x = _free_second_octet()
            names = (f"sb{os.getpid()}" + (f"x{n}" if n else "") for n in range(100))
            bridge = next(b for b in names if not Path(f"/sys/class/net/{b}").exists())
            _ip("link", "add", bridge, "type", "bridge")
            net = cls(bridge=bridge, second_octet=x)
            try:
                _ip("addr", "add", f"{net.host_ip}/16", "dev", net.bridge)
                _ip("link", "set", net.bridge, "up")
            except BaseException:
                net.destroy()
                raise
        return net

    def save(self, path: Path) -> None:
        """Write what `load` needs to attach to this network (bridge, second_octet) as JSON."""
        path.write_text(json.dumps({"bridge": self.bridge, "second_octet": self.second_octet}) + "\n")

    @classmethod
    def load(cls, path: Path) -> ClusterNetwork:
        """Attach to a network another process created and `save`d to `path`."""
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no cluster network file (`python -m testkit.kube.cluster up` "
                                    "writes one next to its kubeconfig)") from None
        return cls.attach(str(d["bridge"]), int(d["second_octet"]))

    @classmethod
    def attach(cls, bridge: str, second_octet: int) -> ClusterNetwork:
        """A handle on an existing bridge: add and remove nodes on it, never delete the bridge."""
        if not Path(f"/sys/class/net/{bridge}").exists():
            raise RuntimeError(f"bridge {bridge} does not exist: is the test cluster still up?")
        return cls(bridge=bridge, second_octet=second_octet, owns_bridge=False)

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        """Held while picking and claiming a node index: every process on this bridge takes it."""
        with _NODE_LOCK, open(Path(tempfile.gettempdir()) / f"sllm-net-{self.bridge}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _used_indexes(self) -> set[int]:
        """Node indexes on this bridge (any process's veths), and this process's namespaces."""
        used: set[int] = set()
        for line in _ip("-o", "link", "show", "master", self.bridge, check=False).splitlines():
            parts = line.split(":")
            m = _VETH_RE.match(parts[1].strip().split("@")[0]) if len(parts) > 1 else None
            if m:
                used.add(int(m.group(1)))
        used.update(i for i in range(1, 255) if netns_exists(f"sllm{os.getpid()}n{i}"))
        return used

    def add_node(self, index: int | None = None) -> NodeNetwork:
        """Namespace sllm<pid>n<index> on the bridge; node address 10.X.index.1. Without an index,
        the lowest one (1..254) no node on this bridge uses, whichever process added it."""
        with self._index_lock():
            if index is None:
                used = self._used_indexes()
                index = next((i for i in range(1, 255) if i not in used), None)
                if index is None:
                    raise RuntimeError(f"the cluster network on {self.bridge} has no free node index")
            return self._add_node(index)

    def _add_node(self, index: int) -> NodeNetwork:
        if not 1 <= index <= 254:
            raise ValueError(f"node index {index} must be within 1..254")
        netns = f"sllm{os.getpid()}n{index}"
        veth = f"sv{os.getpid() % 100000}n{index}"
        ip = f"10.{self.second_octet}.{index}.1"
        node = NodeNetwork(netns, veth, ip, ipaddress.IPv4Network(f"10.{self.second_octet}.{index}.0/24"))
        try:
            _ip("netns", "add", netns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", netns, "addr", "add", f"{ip}/16", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")
        except BaseException:
            node.destroy()
            raise
        self.nodes[netns] = node
        return node

    def remove_node(self, node: NodeNetwork) -> None:
        """Delete the node's namespace and veth (its pods' addresses go with them)."""
        node.destroy()
        if self.nodes.get(node.netns) is node:
            del self.nodes[node.netns]

    def destroy(self) -> None:
        """Remove this handle's nodes, and the bridge when this handle created it."""
        for node in self.nodes.values():
            node.destroy()
        self.nodes.clear()
        if self.owns_bridge:
            with contextlib.suppress(Exception):
                _ip("link", "delete", self.bridge, check=False)
            (Path(tempfile.gettempdir()) / f"sllm-net-{self.bridge}.lock").unlink(missing_ok=True)


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()
