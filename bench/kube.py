"""The Kubernetes path, measured on the real control plane: warm-path latency through the
activator in Kubernetes mode against nginx, and cold-start TTFT against the local path.

    .venv/bin/python -m bench.kube --out DIR [--quick] [--reps 3] [--rounds 2000]

writes DIR/kube.json and DIR/kube.png (logs under DIR/kube-logs). Everything runs on this
machine: the real etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(testkit.kube.cluster, binaries from `make kube-bins`), the test node agent with two nodes
whose pods run as processes on the cluster's pod network (testkit.kube.nodeagent), one loader
per node (`python -m loader_sidecar --kube-node`, its socket and DRAM tier in the node's
hostPath folders, which live under /dev/shm here as on a real node), `python -m autoscaler
--kube` with its placement webhook, `python -m activator --kube`, and the stand-ins for
Knative's reconcilers (testkit.kube.knative: the Revision's Deployment and PodAutoscaler, SKS
status, the private Service whose EndpointSlices the activator reads): testkit.kube.stack, the
same stack tests/kube/test_e2e.py runs on. The function pods run
the image `sllm-knative/function` (`python -m functions.llm`) on the tiny random Llama
(`sllm_knative.models.TINY`, about 0.5 MB), from a file store served by nginx at 256 KiB/s per
connection, so a load from the store takes about two seconds and a load from DRAM milliseconds.
The placement's estimates do not see that difference (the 0.56 MB fetch is under the loader's
1 MiB sample floor, so the store's rate is never measured; docs/benchmarks.md): the JSON records
every placement's reasons and any cold start not served from DRAM. tests/kube/test_e2e.py uses
a 5.8 MB model for that reason.

1. Warm path. The revision's ScalingPolicy holds one pod (minScale 1); a cheap request is sent
   to that pod three ways, the same bytes on each (they carry Knative's revision headers):

     direct     the pod's IP, port 8012 (what the private Service targets)
     activator  our activator in Kubernetes mode, routed by `Knative-Serving-Revision` and
                `Knative-Serving-Namespace` to the pod it found in the EndpointSlices
     nginx      nginx `proxy_pass` to the pod's IP:8012 (the peer baseline; bench/proxy.py's
                config: one worker, upstream keepalive 16, HTTP/1.1, no buffering)

   with bench/proxy.py's method (bench._common: raw-socket keep-alive client, one connection per
   path, warm-up rounds, rounds in an order rotated every round, added = percentile(path) -
   percentile(direct); requests/s with 8 connections, paths interleaved over 3 cycles). Two
   requests: `GET /v1/models` and a non-streaming max_tokens-1 completion.

2. Cold start. minScale back to 0 (keep-alive 1 s), the checkpoint in one node's DRAM tier. One
   streamed completion (bench/coldstart.py's prompt, max_tokens 4, greedy) from zero replicas:

     kube   to the activator with the revision headers: it holds the request and reports the
            demand, the autoscaler places the instance on the node whose NodeCache shows the
            checkpoint in DRAM (intent -> replicas -> ReplicaSet -> gated pod -> pinned, gate
            lifted -> kube-scheduler -> node agent), the function leases from that node's loader
     local  `sllm-knative up` (2 nodes, 2 slots; the same store, the checkpoint in one node's
            DRAM), the same request through its activator, as bench/coldstart.py drives it

   `--reps` of each (after one discarded warm-up round each, unless `--quick`), alternated, the
   first path of a round alternating too, each started only when both systems are at zero.
   The kube TTFT is cut where it is cheap, on this process's clock: the pod as first seen by a
   watch (created), its scheduling gate lifted (placed), its nodeName set (scheduled), phase
   Running (container started), the function's own `ready` log line (imports, lease, load),
   the pod's Ready condition (readiness probe, period 1 s), its EndpointSlice endpoint ready,
   and the first token. The local one as bench/coldstart.py splits it.

`--numerics` and `--threads` (default fast, 1) go to every function instance of both paths
(the pods' env, the local cluster's environment).
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench._common import (
    NGINX_CONFIG,
    Conn,
    NginxProxy,
    ensure_model,
    latencies,
    machine,
    save_figure,
    throughput,
    write_json,
)
from bench.coldstart import MAX_TOKENS, PROMPT
from bench.coldstart import split as local_split
from bench.proxy import summarize, target
from testkit.kube.util import until

REPO = Path(__file__).resolve().parents[1]
NS = "bench-kube"  # the revision's namespace
INSTALL_NS = "bench-kube-sys"  # the autoscaler's leases
SERVICE = "chat"
REV = f"{SERVICE}-00001"
SERVED_NAME = "tiny"
LOCAL_SERVICE = "llm"
KEEP_ALIVE = "1s"
STORE_RATE = "256k"
AGENT_LABEL = "sllm-knative.io/test-agent"
REQUESTS = {"models": "GET /v1/models", "completion": "POST /v1/completions (max_tokens 1, non-streaming)"}
# The kube cold start's milestones, in order, and the segment that ends at each.
MILESTONES = (("created", "to_pod_created_s"), ("ungated", "placement_s"), ("scheduled", "scheduling_s"),
              ("running", "container_start_s"), ("function_ready", "function_start_s"),
              ("pod_ready", "readiness_probe_s"), ("endpoint_ready", "endpoints_s"), ("first_token", "to_first_token_s"))
SEGMENTS = tuple(seg for _, seg in MILESTONES)
LOCAL_FIELDS = ("placement_s", "start_s", "load_s", "first_token_s")


# -- the pure part ---------------------------------------------------------------------------------


def build_request(kind: str) -> bytes:
    """The warm-path request, with the headers Knative's ingress adds (ignored by the pod and nginx)."""
    head = (f"Host: {REV}.{NS}.svc.cluster.local\r\nKnative-Serving-Revision: {REV}\r\n"
            f"Knative-Serving-Namespace: {NS}\r\n")
    if kind == "models":
        return f"GET /v1/models HTTP/1.1\r\n{head}\r\n".encode()
    if kind == "completion":
        body = json.dumps({"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
        return (f"POST /v1/completions HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    raise ValueError(f"request kind {kind!r}: expected one of {', '.join(REQUESTS)}")


def log_time(stamp: str) -> float:
    """`2026-11-24T10:00:00.123Z` (sllm_knative.log) -> Unix seconds."""
    base, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + (int(frac) / 10 ** len(frac) if frac else 0.0)


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def log_line(text: str, msg: str) -> tuple[float, dict[str, str]] | None:
    """The first sllm_knative.log line with `msg=<msg>` in `text`: (its time, its fields)."""
    for line in text.splitlines():
        if f" msg={msg} " in line + " " or f' msg="{msg}"' in line:
            fields = {k: v.strip('"') for k, v in _FIELD.findall(line)}
            return log_time(line.split(" ", 1)[0]), fields
    return None


def segments(t: dict[str, float], sent: float) -> dict[str, float | None]:
    """Seconds between consecutive milestones (None where one was not observed)."""
    out: dict[str, float | None] = {}
    prev: float | None = sent
    for name, seg in MILESTONES:
        cur = t.get(name)
        out[seg] = round(cur - prev, 4) if cur is not None and prev is not None else None
        prev = cur
    return out


def stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def medians(runs: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for f in fields:
        vals = [r[f] for r in runs if r.get(f) is not None]
        out[f] = round(statistics.median(vals), 4) if vals else None
    return out


def stream_ttft(url: str, headers: dict[str, str], model: str, timeout: float = 300.0) -> dict[str, Any]:
    """One streamed completion (bench/coldstart.py's request, sent with `headers`); TTFT = first
    data chunk, and `sent` on the wall clock of this process (Unix seconds)."""
    from sllm_knative.commands.resources import invoke

    sent = time.time()
    res = invoke(url, model, "", PROMPT, MAX_TOKENS, seed=1, timeout=timeout, headers=headers)
    if res["ttft_s"] is None:
        raise RuntimeError("the completion streamed no chunk")
    return {"sent": sent, **res}


# -- the Kubernetes side ---------------------------------------------------------------------------


class PodTimeline:
    """When this process first saw each milestone of each pod of the revision (Unix seconds,
    through watches on pods and on the revision's EndpointSlices)."""

    def __init__(self, kube: Any) -> None:
        from sllm_knative.kube.informer import Informer

        sel = f"serving.knative.dev/revision={REV}"
        self.seen: dict[str, dict[str, float]] = {}
        self.raw: dict[str, dict[str, Any]] = {}
        self._mu = threading.Lock()
        self.pods = Informer("bench-pods", kube.core.list_namespaced_pod, NS, label_selector=sel, resync_s=3600)
        self.slices = Informer("bench-slices", kube.discovery.list_namespaced_endpoint_slice, NS,
                               label_selector=sel, resync_s=3600)
        self.pods.add_handler(self._pod)
        self.slices.add_handler(self._slice)

    def start(self) -> PodTimeline:
        for inf in (self.pods, self.slices):
            inf.start()
            inf.wait_synced()
        return self

    def stop(self) -> None:
        for inf in (self.pods, self.slices):
            inf.stop()

    def _mark(self, pod: str, milestone: str, now: float) -> None:
        self.seen.setdefault(pod, {}).setdefault(milestone, now)

    def _pod(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        if kind in ("DELETED", "SYNC"):
            return
        now = time.time()
        name = obj["metadata"]["name"]
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        with self._mu:
            self.raw[name] = obj
            self._mark(name, "created", now)
            if not spec.get("schedulingGates"):
                self._mark(name, "ungated", now)
            if spec.get("nodeName"):
                self._mark(name, "scheduled", now)
            if status.get("phase") == "Running":
                self._mark(name, "running", now)
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
                self._mark(name, "pod_ready", now)

    def _slice(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        if kind in ("DELETED", "SYNC"):
            return
        now = time.time()
        with self._mu:
            for ep in obj.get("endpoints") or []:
                ref = (ep.get("targetRef") or {}).get("name")
                if ref and (ep.get("conditions") or {}).get("ready") is not False:
                    self._mark(ref, "endpoint_ready", now)

    def of(self, pod: str) -> tuple[dict[str, float], dict[str, Any]]:
        with self._mu:
            return dict(self.seen.get(pod, {})), dict(self.raw.get(pod, {}))


def pod_timestamps(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod's own timestamps (second resolution in the API), for the record."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    return {"creationTimestamp": meta.get("creationTimestamp"), "startTime": status.get("startTime"),
            "conditions": {c.get("type"): c.get("lastTransitionTime") for c in status.get("conditions") or []}}


class KubeStack:
    """The Kubernetes path: a control plane and a node agent of its own, with
    `testkit.kube.stack.Stack` (what tests/kube/test_e2e.py runs on) on them."""

    def __init__(self, store: Path, store_url: str, model: str, logs: Path, env: dict[str, str]) -> None:
        self.store, self.store_url, self.model, self.logs, self.env = store, store_url, model, logs, env
        self.stack = contextlib.ExitStack()
        self.startup_s: dict[str, float] = {}

    # -- bring-up
    def up(self) -> KubeStack:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        from sllm_knative.kube.client import Kube
        from testkit.kube.cluster import KubeCluster, missing_binaries
        from testkit.kube.nodeagent import NodeAgent, NodeSpec
        from testkit.kube.stack import Stack

        t0 = time.monotonic()
        missing = missing_binaries()
        if missing:
            raise FileNotFoundError(f".kube-bins lacks {', '.join(missing)}: run `make kube-bins`")
        work = Path(tempfile.mkdtemp(prefix="bench-kube-"))
        self.stack.callback(shutil.rmtree, work, True)
        self.cluster = KubeCluster.up(work / "cluster")
        self.stack.callback(self.cluster.down)
        self.startup_s["control_plane"] = round(time.monotonic() - t0, 2)
        self.k = k = Kube(self.cluster.api_client())
        from kubernetes import client

        self.version = str(client.VersionApi(k.api).get_code().git_version)
        k.core.create_namespace({"metadata": {"name": NS, "labels": {"sllm-test": NS}}})
        k.core.create_namespace({"metadata": {"name": INSTALL_NS}})
        until(lambda: k.core.read_namespaced_service_account("default", NS), 60, f"the default ServiceAccount in {NS}")

        # Two nodes; the agent's root (and so the nodes' hostPath folders: the loader's socket and
        # DRAM tier) under /dev/shm, memory as on a real node, and short for the socket's path.
        root = Path(tempfile.mkdtemp(prefix="sllm-kb-", dir="/dev/shm"))
        self.stack.callback(shutil.rmtree, root, True)
        tag = uuid.uuid4().hex[:6]
        specs = [NodeSpec(f"kb-{tag}-{i}", cpu="4", memory="8Gi", gpus=1, labels={AGENT_LABEL: tag}) for i in range(2)]
        assert self.cluster.network is not None
        self.agent = NodeAgent(self.cluster.kubeconfig, root, specs, network=self.cluster.network).start()
        self.stack.callback(self._save_pod_logs)
        self.stack.callback(self.agent.stop, True)
        self.nodes = [s.name for s in specs]

        self.s = s = Stack(self.cluster, self.agent, NS, INSTALL_NS, self.store_url, self.logs, work=work,
                           identity="bench", start_timeout_s=120.0)
        self.stack.callback(s.stop)
        s.start_loaders()
        self.startup_s["nodes_and_loaders"] = round(time.monotonic() - t0, 2)
        self.holder = self.nodes[1]  # the node whose DRAM tier holds the checkpoint
        s.prefetch(self.holder, self.model)
        s.start()
        self.as_url, self.act_url, self.act_port, self.act_admin = s.as_url, s.act_url, s.act_port, s.act_admin
        until(lambda: s.autoscaler_sees_dram(self.holder, self.model), 30,
              f"the autoscaler to see {self.holder}'s DRAM copy")
        self.startup_s["control_loop"] = round(time.monotonic() - t0, 2)

        self.timeline = PodTimeline(k).start()
        self.stack.callback(self.timeline.stop)
        # The Service's ScalingPolicy (one pod held for the warm phase), then its Revision as
        # Knative makes it (no queue-proxy: the container serves 8012).
        s.scaling_policy(f"{SERVICE}-keepalive", SERVICE, keepAlive=KEEP_ALIVE, minScale=1)
        s.function_revision(REV, SERVICE, self.model, served_name=SERVED_NAME, env=self.env,
                            annotations={"autoscaling.knative.dev/max-scale": "1"}, replicas=1)

    def _save_pod_logs(self) -> None:
        for f in (self.agent.root / "pods").glob(f"{NS}_*/*.log"):
            dst = self.logs / "pods" / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(f, dst)

    def down(self) -> None:
        self.stack.close()

    # -- observation
    def in_dram(self, node: str) -> bool:
        return self.s.in_dram(node, self.model)

    def autoscaler_sees_dram(self, node: str) -> bool:
        return self.s.autoscaler_sees_dram(node, self.model)

    def pods(self, include_deleting: bool = False) -> list[Any]:
        return self.s.pods(REV, include_deleting)

    def ready_pod(self) -> Any:
        return self.s.ready_pod(REV)

    def rotation(self) -> list[str]:
        return list(self.s.rotation(REV))

    def leases(self, node: str) -> list[tuple[str, str]]:
        return self.s.loaders[node].leases()

    def at_zero(self) -> bool:
        return (self.s.replicas(REV) == 0 and not self.pods(include_deleting=True) and not self.rotation()
                and not any(self.leases(n) for n in self.nodes))

    def set_min_scale(self, value: int) -> None:
        self.s.patch_policy(f"{SERVICE}-keepalive", {"minScale": value})

    def placement(self, pod: str) -> dict[str, Any] | None:
        """The autoscaler's record of the placement that made `pod` (its /v1/services), if it has one."""
        with contextlib.suppress(Exception):
            return self.s.placement(REV, pod)
        return None

    def events(self, pod: str) -> list[dict[str, Any]]:
        return [{"reason": e.reason, "message": e.message, "source": getattr(e.source, "component", None)}
                for e in self.s.events(pod)]

    # -- one cold start
    def cold_start(self) -> dict[str, Any]:
        until(self.at_zero, 180, "the revision at zero (replicas 0, no pod, no lease)")
        if not (self.in_dram(self.holder) and self.autoscaler_sees_dram(self.holder)):
            raise RuntimeError(f"{self.holder} no longer shows the checkpoint in DRAM")
        load = os.getloadavg()[0]
        res = stream_ttft(self.act_url, {"Knative-Serving-Revision": REV, "Knative-Serving-Namespace": NS},
                          SERVED_NAME)
        first_token = res["sent"] + res["ttft_s"]
        pod = res["instance"] or ""
        seen, raw = self.timeline.of(pod)
        if not seen or seen.get("created", 0.0) < res["sent"]:
            raise RuntimeError(f"kube: the request was served by {pod!r}, not a pod created after it was sent")
        log = self.agent.pod_log(NS, pod, "user-container")
        ready = log_line(log, "ready")
        lease = log_line(log, "lease complete")
        t = {**seen, "first_token": first_token}
        if ready:
            t["function_ready"] = ready[0]
        node = (raw.get("spec") or {}).get("nodeName")
        phases = {k: float(v) for k, v in (ready[1] if ready else {}).items() if k.endswith("_s") or k == "seconds"}
        return {"ttft_s": res["ttft_s"], **segments(t, res["sent"]),
                "function_imports_s": phases.get("imports_s"),
                "function_lease_load_s": round(sum(phases.get(f, 0.0) for f in ("lease_s", "load_s", "warmup_s")), 4)
                if ready else None,
                "pod": pod, "node": node,
                "on_dram_node": node == self.holder,
                "lease_source": lease[1].get("source") if lease else None,
                "lease_s": float(lease[1]["seconds"]) if lease and "seconds" in lease[1] else None,
                "function_phases_s": phases,
                "milestones": {k: round(v - res["sent"], 4) for k, v in sorted(t.items(), key=lambda kv: kv[1])},
                "placement": self.placement(pod), "events": self.events(pod), "pod_timestamps": pod_timestamps(raw),
                "text": res["text"], "loadavg_1m": round(load, 2)}


# -- the local side --------------------------------------------------------------------------------


class LocalPath:
    """`sllm-knative up` (2 nodes, 2 slots), the service applied, driven as bench/coldstart.py does."""

    def __init__(self, store_url: str, model: str, logs: Path) -> None:
        self.store_url, self.model, self.logs = store_url, model, logs
        self.state = Path(tempfile.mkdtemp(prefix="bench-kube-local-"))
        self.cluster: dict[str, Any] | None = None

    def up(self) -> LocalPath:
        from bench.coldstart import Bench
        from sllm_knative.local.cluster import up_detached
        from sllm_knative.local.manifests import service_manifest
        from sllm_knative.ports import free_port

        try:
            self.cluster = up_detached(["--state-dir", str(self.state), "--nodes", "2", "--slots", "2", "--dram-gb",
                                        "1", "--ssd-gb", "2", "--port", str(free_port()), "--store", self.store_url],
                                       self.state)
            doc = service_manifest(LOCAL_SERVICE, self.model, keep_alive=KEEP_ALIVE, max_scale=1,
                                   container_concurrency=1)
            httpx.post(f"{self.cluster['autoscaler']}/v1/apply", content=doc.encode(), timeout=30).raise_for_status()
            self.bench = Bench(self.cluster, self.state, self.model, self.state / "unused-hf", self.logs)
            # Knative's default initial scale starts one instance at apply: let it come (and go,
            # in cold_start's wait for zero) so that it cannot answer a measured request.
            with contextlib.suppress(AssertionError):
                until(lambda: self.bench.service()["instances"], 30, "the initial-scale instance")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        from sllm_knative.local.cluster import down

        with contextlib.suppress(AttributeError):
            self.bench.close()
        down(self.state)
        src = self.state / "logs"
        for f in src.rglob("*.log") if src.exists() else []:
            dst = self.logs / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(f, dst)
        shutil.rmtree(self.state, ignore_errors=True)

    def at_zero(self) -> bool:
        return bool(self.bench.at_zero())

    def cold_start(self) -> dict[str, Any]:
        assert self.cluster is not None
        until(self.at_zero, 120, "the local service at zero")
        prep = self.bench.prepare("dram")
        load = os.getloadavg()[0]
        res = stream_ttft(self.cluster["activator"], {"host": f"{LOCAL_SERVICE}.default.example.com"}, LOCAL_SERVICE)
        svc = self.bench.service()
        inst = next(i for i in svc["instances"] if i["id"] == res["instance"])
        if inst["started_at"] < res["sent"]:
            raise RuntimeError(f"local: {inst['id']} started before the request was sent: not a cold start")
        placed = next(p for p in svc["placements"] if p["instance"] == res["instance"])
        lease, report = inst["lease"], inst["report"]["startup"]
        parts = local_split(sent=res["sent"], ttft=res["ttft_s"], placement=placed["placement_s"],
                            started=inst["started_at"], ready=inst["ready_at"],
                            lease_s=lease["lease_complete"] - lease["lease_requested"], model_load_s=report["load_s"])
        return {**{k: round(v, 4) for k, v in parts.items()}, "instance": inst["id"], "node": inst["node"],
                "placed_tier": placed["tier"], "lease_source": lease["source"],
                "lease_s": round(lease["lease_complete"] - lease["lease_requested"], 4),
                "function_phases_s": report, "tiers": prep["tiers"], "text": res["text"],
                "loadavg_1m": round(load, 2)}


# -- the run -----------------------------------------------------------------------------------------


def warm_path(stack: KubeStack, kinds: list[str], rounds: int, warmup: int, seconds: float,
              concurrency: int, logs: Path) -> dict[str, Any]:
    pod = until(stack.ready_pod, 240, "the revision's pod ready (minScale 1)")
    until(lambda: pod.metadata.name in stack.rotation(), 60, "the pod in the activator's rotation")
    pod_ip = pod.status.pod_ip
    nginx = NginxProxy((pod_ip, 8012), logs).start()
    out: dict[str, Any] = {"pod": pod.metadata.name, "node": pod.spec.node_name, "pod_ip": pod_ip}
    try:
        targets: dict[str, Any] = {"direct": (pod_ip, 8012), "activator": stack.act_port, "nginx": nginx.port}
        for kind in kinds:
            request = build_request(kind)
            for p, a in targets.items():  # every path answers
                c = Conn(a, request)
                try:
                    status, body = c.roundtrip()
                finally:
                    c.close()
                if status != 200:
                    raise RuntimeError(f"{p} ({kind}): HTTP {status}: {body[:200]!r}")
            t0, load = time.monotonic(), round(os.getloadavg()[0], 2)
            lat = latencies(targets, request, rounds, warmup)
            rps: dict[str, list[float]] = {p: [] for p in targets}
            for _ in range(3):
                for p, a in targets.items():
                    rps[p].append(throughput(a, request, concurrency, seconds))
            rows, pct = summarize(lat, rps)
            tgt = target(rows, pct)
            out[kind] = {"request": REQUESTS[kind], "rows": rows, "paths": pct, "rps_cycles": rps,
                         "activator_over_nginx_p50_added": tgt["value"],
                         "paired_median_ratio": tgt["paired_median_ratio"], "mean_added_ratio": tgt["mean_added_ratio"],
                         "seconds": round(time.monotonic() - t0, 1), "loadavg_1m": load}
            by = {r["proxy"]: r for r in rows}
            print(f"[warm] {kind}: direct p50 {pct['direct']['p50_ms']:.3f} ms; added p50 activator "
                  f"{by['activator']['p50_added_ms']:.3f} ms, nginx {by['nginx']['p50_added_ms']:.3f} ms "
                  f"({tgt['value']}x); rps direct {pct['direct']['rps']:.0f}, activator {by['activator']['rps']:.0f}, "
                  f"nginx {by['nginx']['rps']:.0f}", flush=True)
    finally:
        nginx.stop()
        out["nginx"] = {"version": nginx.version(), "config": NGINX_CONFIG, "stopped_clean": nginx.stopped_clean}
    return out


def cold_summary(runs: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, Any]:
    return {"ttft_s": stats([r["ttft_s"] for r in runs]), "breakdown_median_s": medians(runs, fields)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sllm_knative import format as fmt
    from sllm_knative.convert import convert
    from sllm_knative.log import setup
    from sllm_knative.models import TINY
    from testkit.servers import Nginx

    setup("WARNING")  # this process: the node agent and informers at INFO would flood the progress lines
    t_begin = time.monotonic()
    env = {"SLLM_NUMERICS": args.numerics, "OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env)  # the local cluster's instances inherit it; the pods get it in their env
    out = Path(args.out)
    logs = out / "kube-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or REPO / ".bench" / "kube")
    store = work / "store"
    ckpt = store / SERVED_NAME
    if ensure_model(work / "tiny-hf", TINY) or not fmt.is_checkpoint(ckpt):
        convert(work / "tiny-hf", ckpt, overwrite=True)
    for f in ckpt.iterdir():  # nginx serves them
        f.chmod(0o644)
    load_start = round(os.getloadavg()[0], 2)
    kinds = ["models", "completion"]
    cold: dict[str, list[dict[str, Any]]] = {"kube": [], "local": []}
    warmup_runs: dict[str, list[dict[str, Any]]] = {"kube": [], "local": []}
    with Nginx(store, slow_rate=STORE_RATE) as web:
        store_url = f"{web.url}/slow"
        model = f"{store_url}/{SERVED_NAME}"
        print("[setup] control plane, node agent (2 nodes), loaders, autoscaler --kube, activator --kube", flush=True)
        stack = KubeStack(store, store_url, model, logs, env).up()
        local: LocalPath | None = None
        try:
            print(f"[setup] up in {stack.startup_s['control_loop']:.1f} s "
                  f"(control plane {stack.startup_s['control_plane']:.1f} s); the revision created", flush=True)
            warm = warm_path(stack, kinds, args.rounds, args.warmup, args.seconds, args.concurrency, logs)
            stack.set_min_scale(0)
            print("[local] sllm-knative up (2 nodes, 2 slots)", flush=True)
            lp = local = LocalPath(store_url, model, logs / "local").up()
            paths: dict[str, Callable[[], dict[str, Any]]] = {"kube": stack.cold_start, "local": lp.cold_start}
            first = 0 if args.quick else -1
            for rnd in range(first, args.reps):
                order = ("kube", "local") if rnd % 2 == 0 else ("local", "kube")
                for name in order:
                    until(lambda: stack.at_zero() and lp.at_zero(), 180, "both paths at zero")
                    one = paths[name]()
                    (warmup_runs if rnd < 0 else cold)[name].append(one)
                    where = f"{one['node']}, lease from {one['lease_source']}"
                    print(f"[cold] round {rnd if rnd >= 0 else 'warm-up'} {name}: TTFT {one['ttft_s']:.3f} s "
                          f"({where})", flush=True)
            # What the placements were decided from: each autoscaler's view of the nodes.
            assert lp.cluster is not None
            nodes_after = {"kube": httpx.get(f"{stack.as_url}/v1/nodes", timeout=10).json()["nodes"],
                           "local": httpx.get(f"{lp.cluster['autoscaler']}/v1/nodes", timeout=10).json()["nodes"]}
        finally:
            print("[teardown]", flush=True)
            if local is not None:
                local.down()
            stack.down()
    kube_s = cold_summary(cold["kube"], (*SEGMENTS, "function_imports_s", "function_lease_load_s"))
    local_s = cold_summary(cold["local"], LOCAL_FIELDS)
    km, lm = kube_s["ttft_s"]["median"], local_s["ttft_s"]["median"]
    ratio = round(km / lm, 2) if km and lm else None
    mismatched = [{"path": p, "node": r["node"], "lease_source": r["lease_source"]}
                  for p, rs in cold.items() for r in rs if r["lease_source"] != "dram"]
    return {
        "warm": warm,
        "cold": {"kube": {**kube_s, "runs": cold["kube"]}, "local": {**local_s, "runs": cold["local"]},
                 "ratio_kube_over_local_median": ratio,
                 "ratio_kube_over_local_min": round(kube_s["ttft_s"]["min"] / local_s["ttft_s"]["min"], 2)
                 if kube_s["ttft_s"]["min"] and local_s["ttft_s"]["min"] else None,
                 "not_from_dram": mismatched, "warmup_runs": warmup_runs},
        "ratios": {f"warm_{k}_activator_over_nginx_p50_added": warm[k]["activator_over_nginx_p50_added"]
                   for k in kinds} | {"cold_ttft_kube_over_local_median": ratio},
        "meta": {
            "model": {"spec": "sllm_knative.models.TINY", "bytes": fmt.read_index(ckpt).total_bytes,
                      "store": f"nginx on loopback, limit_rate {STORE_RATE} per connection"},
            "cold_request": {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0},
            "env": env, "keep_alive": KEEP_ALIVE, "reps": args.reps, "quick": args.quick,
            "warm_rounds": args.rounds, "warm_warmup_rounds": args.warmup, "throughput_seconds": args.seconds,
            "throughput_concurrency": args.concurrency, "throughput_cycles": 3,
            "kube": {"version": stack.version, "nodes": stack.nodes, "dram_node": stack.holder,
                     "startup_s": stack.startup_s, "cluster_startup_s": stack.cluster.startup_s,
                     "readiness_probe_period_s": 1, "revision": f"{NS}/{REV}"},
            "kube_breakdown": dict(MILESTONES),
            "local": {"nodes": 2, "slots_per_node": 2, "service": f"default/{LOCAL_SERVICE}"},
            "nodes_after": nodes_after,
            "loadavg_1m_at_start": load_start, "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "machine": machine(), "bench_seconds": round(time.monotonic() - t_begin, 1),
            "command": " ".join([".venv/bin/python", "-m", "bench.kube", *sys.argv[1:]]),
        },
    }


def _stack(ax: Any, parts: list[tuple[str, float | None]], ttft: dict[str, Any], title: str) -> None:
    bottom = 0.0
    for j, (label, v) in enumerate(parts):
        v = max(0.0, v or 0.0)
        ax.bar(0, v, 0.5, bottom=bottom, color=f"C{j % 10}", label=f"{label} {v:.3f}")
        bottom += v
    ax.text(0, bottom, f"TTFT {ttft['median']:.3f} s\n[{ttft['min']:.3f}, {ttft['max']:.3f}]", ha="center",
            va="bottom", fontsize=8)
    ax.set_xlim(-0.6, 1.9)
    ax.set_xticks([])
    ax.set_ylim(0, bottom * 1.15 if bottom > 0 else 1)
    ax.set_ylabel("seconds (medians)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper right")


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [4, 3, 3]})
    ax = axes[0]
    kinds = [k for k in REQUESTS if k in doc["warm"]]
    width = 0.2
    for i, (proxy, q) in enumerate((("activator", "p50"), ("nginx", "p50"), ("activator", "p99"), ("nginx", "p99"))):
        vals = [next(r for r in doc["warm"][k]["rows"] if r["proxy"] == proxy)[f"{q}_added_ms"] for k in kinds]
        ax.bar([x + (i - 1.5) * width for x in range(len(kinds))], vals, width, label=f"{proxy} {q}",
               color="C0" if proxy == "activator" else "C1", alpha=1.0 if q == "p50" else 0.45)
    ax.set_xticks(range(len(kinds)),
                  [f"{doc['warm'][k]['request'].split(' (')[0]}\np50 ratio {doc['warm'][k]['activator_over_nginx_p50_added']}x"
                   for k in kinds], fontsize=8)
    ax.set_ylabel("added latency vs direct to the pod IP (ms)")
    ax.set_title("warm path: activator --kube vs nginx proxy_pass, same pod", fontsize=9)
    ax.legend(fontsize=7)

    cold = doc["cold"]
    k = cold["kube"]["breakdown_median_s"]
    fn = k.get("function_start_s") or 0.0
    ll = k.get("function_lease_load_s") or 0.0
    _stack(axes[1], [("request -> pod created", k.get("to_pod_created_s")), ("placed (gate lifted)", k.get("placement_s")),
                     ("scheduled", k.get("scheduling_s")), ("container started", k.get("container_start_s")),
                     ("function: process + imports", fn - ll), ("function: lease + load + engine", ll),
                     ("readiness probe", k.get("readiness_probe_s")), ("EndpointSlice", k.get("endpoints_s")),
                     ("-> first token", k.get("to_first_token_s"))], cold["kube"]["ttft_s"],
           f"cold start, Kubernetes path (kube / local = {cold['ratio_kube_over_local_median']}x)")
    lo = cold["local"]["breakdown_median_s"]
    _stack(axes[2], [("placement", lo.get("placement_s")), ("instance start", lo.get("start_s")),
                     ("lease + load", lo.get("load_s")), ("first token (rest)", lo.get("first_token_s"))],
           cold["local"]["ttft_s"], "cold start, local path (zygote fork)")
    fig.suptitle(f"bench.kube: tiny model, checkpoint in one node's DRAM; {doc['meta']['machine']['cpus']} CPUs, "
                 f"load {doc['meta']['loadavg_1m_at_start']} at start", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true",
                   help="500 rounds, 100 warm-up, 1 s throughput cycles, 2 cold starts per path, no warm-up round")
    p.add_argument("--reps", type=int, default=None, help="counted cold starts per path (default 3; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="warm latency rounds per request (default 2000)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds before them (default 200)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per path per throughput cycle (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="connections for the throughput runs")
    p.add_argument("--numerics", choices=["exact", "fast"], default="fast")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every function instance")
    p.add_argument("--work", default=None, help="where the tiny model is built and kept (default: .bench/kube)")
    args = p.parse_args(argv)
    q = args.quick
    args.reps = args.reps if args.reps is not None else (2 if q else 3)
    args.rounds = args.rounds if args.rounds is not None else (500 if q else 2000)
    args.warmup = args.warmup if args.warmup is not None else (100 if q else 200)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if q else 2.0)
    if args.reps < 1 or args.rounds < 100 or args.seconds <= 0 or args.concurrency < 1:
        p.error("need --reps >= 1, --rounds >= 100, --seconds > 0 and --concurrency >= 1")
    doc = run(args)
    out = Path(args.out)
    path = write_json(out, "kube", doc)
    plot(doc, out / "kube.png")
    print(json.dumps({"ratios": doc["ratios"], "cold_ttft_s": {k: doc["cold"][k]["ttft_s"] for k in ("kube", "local")}}))
    print(f"wrote {path} and {out / 'kube.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
