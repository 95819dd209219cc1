"""Sidecar configuration: defaults, then parse (command line), then normalise, then validate.

Every flag has a default that works on a developer machine; in Kubernetes the DaemonSet and
the injected sidecar pass the node name, the hostPath SSD directory and the stores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import psutil

from loader_sidecar.refs import StoreRoot, parse_store
from sllm_knative.loader.address import default_listen, default_node
from sllm_knative.loader.errors import BadRequest
from sllm_knative.mounts import container_path, mount_root, unix_target

_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# A Kubernetes Node name: a DNS-1123 subdomain (as NodeCache's spec.nodeName).
_KUBE_NODE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1 << 10, "KI": 1 << 10, "M": 10**6, "MB": 10**6,
          "MIB": 1 << 20, "MI": 1 << 20, "G": 10**9, "GB": 10**9, "GIB": 1 << 30, "GI": 1 << 30,
          "T": 10**12, "TB": 10**12, "TIB": 1 << 40, "TI": 1 << 40}


def parse_size(text: str, where: str) -> int:
    """'512MiB' -> 536870912; plain numbers are bytes. Raises BadRequest naming `where`."""
    m = _SIZE.match(text)
    if not m:
        raise BadRequest(f"{where} = {text!r}: expected a byte count such as 512MiB, 10GB or 1048576")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    return int(value)


@dataclasses.dataclass(frozen=True)
class Config:
    node: str
    listen: str
    ssd_dir: Path
    ssd_bytes: int
    dram_dir: Path
    dram_bytes: int
    stores: tuple[StoreRoot, ...]
    connections: int = 4
    chunk_bytes: int = 16 << 20
    fill_segment_bytes: int = 64 << 20
    read_threads: int = 8
    timeout_s: float = 30.0
    # How long a DRAM fill waits for other instances' leases to end when only they hold the room
    # (a stopped instance's lease ends when its process exits, within its stop's 10 s grace).
    lease_wait_s: float = 10.0
    retries: int = 5
    retry_backoff_s: float = 0.5
    profile_bytes: int = 64 << 20
    metrics_addr: str | None = None
    s3_endpoint: str | None = None
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = dataclasses.field(default=None, repr=False)
    # Publishing the NodeCache: on when kube_node is set (--kube-node or $SLLM_NODE_NAME).
    kube_node: str | None = None
    kubeconfig: str | None = None  # None: $KUBECONFIG, else the pod's service account
    kube_resync_s: float = 30.0
    # $SLLM_MOUNT_ROOT (sllm_knative.mounts): where the container's mounts are when it has no
    # mount namespace (the test node agent); "" on a real node.
    mount_root: str = ""

    def validate(self) -> Config:
        checks = [
            (bool(_NODE.match(self.node)), "node", self.node, "letters, digits, '._-', at most 63"),
            (self.ssd_bytes > 0, "ssd-bytes", self.ssd_bytes, "must be positive"),
            (self.dram_bytes > 0, "dram-bytes", self.dram_bytes, "must be positive"),
            (1 <= self.connections <= 64, "connections", self.connections, "must be in [1, 64]"),
            (self.chunk_bytes >= 4096 and self.chunk_bytes % 4096 == 0, "chunk-bytes", self.chunk_bytes,
             "must be a positive multiple of 4096"),
            (self.fill_segment_bytes >= 4096 and self.fill_segment_bytes % 4096 == 0, "fill-segment-bytes",
             self.fill_segment_bytes, "must be a positive multiple of 4096"),
            (1 <= self.read_threads <= 256, "read-threads", self.read_threads, "must be in [1, 256]"),
            (self.timeout_s > 0, "timeout", self.timeout_s, "must be greater than 0"),
            (self.lease_wait_s >= 0, "lease-wait", self.lease_wait_s, "must not be negative"),
            (0 <= self.retries <= 100, "retries", self.retries, "must be in [0, 100]"),
            (self.retry_backoff_s >= 0, "retry-backoff", self.retry_backoff_s, "must not be negative"),
            (self.profile_bytes >= 4096 and self.profile_bytes % 4096 == 0, "profile-bytes", self.profile_bytes,
             "must be a positive multiple of 4096"),
            (bool(self.stores), "store", "", "at least one --store is needed"),
            (self.kube_node is None or (len(self.kube_node) <= 253 and bool(_KUBE_NODE.match(self.kube_node))),
             "kube-node", self.kube_node, "must be a Kubernetes Node name (lower-case letters, digits, '-' and '.', "
             "at most 253)"),
            (self.kubeconfig is None or Path(self.kubeconfig).is_file(), "kubeconfig", self.kubeconfig,
             "no such file"),
            (self.kube_resync_s >= 1, "kube-resync", self.kube_resync_s, "must be at least 1 (seconds)"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise BadRequest(f"{name} = {value!r}, {rule}")
        listen_address(self.listen)
        if self.metrics_addr is not None:
            host_port(self.metrics_addr, "metrics")
        return self


def listen_address(listen: str) -> str:
    """The grpc address for --listen: unix:///abs/path or host:port."""
    if listen.startswith("unix://"):
        path = listen[len("unix://"):]
        if not path.startswith("/"):
            raise BadRequest(f"listen = {listen!r}: a unix socket needs an absolute path (unix:///run/loader.sock)")
        return listen
    host, port = host_port(listen, "listen")
    return f"{host}:{port}"


def host_port(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadRequest(f"{where} = {text!r}: expected host:port such as 127.0.0.1:7070")
    return host, int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", default=None, help="node name (default: the host name)")
    p.add_argument("--listen", default=None,
                   help="unix:///path or host:port (default: unix:///tmp/sllm-knative/NODE/loader.sock)")
    p.add_argument("--store", action="append", default=[], metavar="URI",
                   help="a model store root the loader may fetch from; repeat for several; the first is "
                        "the default for bare names (file:///dir, http(s)://host/prefix, hf://[org], s3://bucket/prefix)")
    p.add_argument("--ssd-dir", default=None, help="SSD cache directory (default: ~/.cache/sllm-knative/NODE/ssd)")
    p.add_argument("--ssd-bytes", default=None, help="SSD budget (default: half the free space there)")
    p.add_argument("--dram-dir", default=None, help="DRAM tier on tmpfs (default: /dev/shm/sllm-knative/NODE)")
    p.add_argument("--dram-bytes", default=None, help="DRAM budget (default: a quarter of physical memory)")
    p.add_argument("--connections", type=int, default=4, help="parallel range requests per fetch")
    p.add_argument("--chunk-bytes", default="16MiB", help="bytes per range request (rounded to checksum blocks)")
    p.add_argument("--fill-segment-bytes", default="64MiB", help="SSD->DRAM watermark step")
    p.add_argument("--read-threads", type=int, default=8, help="threads of the direct SSD reads")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without bytes before a request stalls")
    p.add_argument("--lease-wait", type=float, default=10.0,
                   help="seconds a DRAM fill for an instance waits for other instances' leases to end when only "
                        "they hold the room (default 10: a stopped instance's process exits within its grace)")
    p.add_argument("--retries", type=int, default=5, help="attempts per range after a transient failure")
    p.add_argument("--retry-backoff", type=float, default=0.5, help="first retry delay in seconds (doubles)")
    p.add_argument("--profile-bytes", default="64MiB", help="scratch file size of the start-up bandwidth probe")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus metrics there")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint override (default: $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--kube-node", default=None, metavar="NAME",
                   help="publish this node's NodeCache for the Kubernetes Node NAME (default: $SLLM_NODE_NAME; "
                        "unset: no publishing)")
    p.add_argument("--kubeconfig", default=None, metavar="PATH",
                   help="kubeconfig for publishing (default: $KUBECONFIG, else the pod's service account)")
    p.add_argument("--kube-resync", type=float, default=30.0, metavar="SECONDS",
                   help="rewrite the NodeCache at least this often, changed or not")


def from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    """Parse and normalise the command line; `validate()` is applied before returning."""
    env = dict(os.environ) if env is None else env
    root = mount_root(env)  # paths are the container's: under $SLLM_MOUNT_ROOT when it is set
    kube_node = args.kube_node or env.get("SLLM_NODE_NAME") or None
    node = args.node or env.get("SLLM_NODE") or kube_node or default_node()
    cache_home = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    ssd_dir = container_path(args.ssd_dir or cache_home / "sllm-knative" / node / "ssd", root).resolve()
    dram_dir = container_path(args.dram_dir or Path("/dev/shm/sllm-knative") / node, root).resolve()
    kubeconfig = str(container_path(args.kubeconfig, root)) if args.kubeconfig else None
    listen = _listen_in(args.listen or default_listen(node), root)
    ssd_bytes = parse_size(args.ssd_bytes, "ssd-bytes") if args.ssd_bytes else _half_free(ssd_dir)
    dram_bytes = (parse_size(args.dram_bytes, "dram-bytes") if args.dram_bytes
                  else psutil.virtual_memory().total // 4)
    stores = tuple(parse_store(s) for s in _unique(args.store))
    return Config(
        node=node, listen=listen, ssd_dir=ssd_dir, ssd_bytes=ssd_bytes,
        dram_dir=dram_dir, dram_bytes=dram_bytes, stores=stores, connections=args.connections,
        chunk_bytes=parse_size(args.chunk_bytes, "chunk-bytes"),
        fill_segment_bytes=parse_size(args.fill_segment_bytes, "fill-segment-bytes"),
        read_threads=args.read_threads, timeout_s=args.timeout, lease_wait_s=args.lease_wait, retries=args.retries,
        retry_backoff_s=args.retry_backoff, profile_bytes=parse_size(args.profile_bytes, "profile-bytes"),
        metrics_addr=args.metrics, s3_endpoint=args.s3_endpoint or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL"), hf_endpoint=(env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
        hf_token=env.get("HF_TOKEN") or None, kube_node=kube_node, kubeconfig=kubeconfig,
        kube_resync_s=args.kube_resync, mount_root=root,
    ).validate()


def _listen_in(listen: str, root: str) -> str:
    """A unix socket's path under the mount root (sllm_knative.mounts.unix_target)."""
    return unix_target(listen, root)


def _unique(items: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for s in items:
        seen.setdefault(s, None)
    return list(seen)


def _half_free(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free // 2
