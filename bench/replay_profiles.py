"""The profiles of bench/replay.py (its docstring says what each is): the sllm-type ones on a
local cluster as shipped, knative-default and kserve-localcache as fresh processes behind the
same activator (bench/_fresh.py), ray-serve through bench/replay_ray.py."""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench._common import Periodic, down_keeping_logs
from bench.replay_client import NAMESPACE, NODES, SLOTS, Sampler, drain, replay
from bench.replay_core import Shot, tier_counts

SLLM_PROFILES: dict[str, dict[str, Any]] = {"sllm": {}, "no-dram-tier": {}, "no-locality": {"placement": "random"},
                                            "no-migration": {"policy": {"migration": False}}}
#: How long the activator holds a request waiting for an instance: Knative's default revision
#: timeoutSeconds (300 s), for every profile behind the activator.
HOLD_S = 300
PROFILES = (*SLLM_PROFILES, "knative-default", "kserve-localcache", "ray-serve")


@contextlib.contextmanager
def cluster(state: Path, store: Path, logs: Path, placement: str = "load-time", dram_gb: float = 2.0) -> Any:
    from sllm_knative.local.cluster import up_detached
    from sllm_knative.ports import free_port

    try:
        yield up_detached(["--state-dir", str(state), "--nodes", str(NODES), "--slots", str(SLOTS),
                           "--dram-gb", f"{dram_gb:g}", "--ssd-gb", "4", "--port", str(free_port()),
                           "--store", f"file://{store}", "--placement", placement], state)
    finally:
        down_keeping_logs(state, logs)


def manifests(store: Path, services: int, checkpoints: int, keep_alive: float,
              policy: Mapping[str, object] | None, max_scale: int = 1) -> str:
    from sllm_knative.local.manifests import ALLOW_ZERO_INITIAL_SCALE, service_manifest

    docs = [service_manifest(f"s{r}", f"file://{store}/c{r % checkpoints}", namespace=NAMESPACE,
                             keep_alive=f"{keep_alive:g}s", window="6s", max_scale=max_scale,
                             container_concurrency=4, initial_scale=0, args=("--max-model-len", "512"),
                             policy=policy, timeout_seconds=HOLD_S)
            for r in range(services)]
    return "---\n".join([*docs, ALLOW_ZERO_INITIAL_SCALE])


class DramEvictor(Periodic):
    """no-dram-tier: every `every` s, evict each node's DRAM-tier copies that no instance leases."""

    def __init__(self, nodes: Sequence[Mapping[str, Any]], every: float = 0.2) -> None:
        super().__init__(every, "dram-evictor")
        self.nodes = nodes
        self.evicted = 0

    def tick(self) -> None:
        from sllm_knative.loader.client import LoaderClient
        from sllm_knative.loader.errors import InUse, NotFound

        for node in self.nodes:
            with contextlib.suppress(Exception), LoaderClient(node["loader"], timeout=5) as c:
                for t in c.inventory().tiers:
                    if t.name != "dram":
                        continue
                    for e in t.entries:
                        if e.state != "ready":
                            continue
                        with contextlib.suppress(InUse, NotFound):
                            c.evict(e.model, "dram")
                            self.evicted += 1


def run_sllm(name: str, shots: Sequence[Shot], store: Path, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    opts: Mapping[str, Any] = SLLM_PROFILES[name]
    state = Path(tempfile.mkdtemp(prefix=f"bench-replay-{name}-"))
    with cluster(state, store, logs / name, opts.get("placement", "load-time"), args.dram_gb) as doc:
        r = httpx.post(f"{doc['autoscaler']}/v1/apply", timeout=60,
                       content=manifests(store, args.services, args.checkpoints, args.keep_alive,
                                         opts.get("policy"), args.max_scale).encode())
        r.raise_for_status()
        placements: dict[str, dict[str, Any]] = {}

        def probe() -> dict[str, int]:
            svcs = httpx.get(f"{doc['autoscaler']}/v1/services", timeout=5).json()["services"]
            for s in svcs:
                for p in s.get("placements", []):
                    placements.setdefault(p["instance"], {"service": s["key"].split("/", 1)[1], "node": p["node"],
                                                          "placed_tier": p["tier"], "action": p.get("action")})
                for i in s["instances"]:  # the tier the load came from, once the lease has it
                    source = (i.get("lease") or {}).get("source")
                    if source and i["id"] in placements:
                        placements[i["id"]]["lease_source"] = source
            return {s["key"].split("/", 1)[1]: len(s["instances"]) for s in svcs}

        evictor = DramEvictor(doc["nodes"]) if name == "no-dram-tier" else contextlib.nullcontext()
        with evictor, Sampler(probe) as sampler:
            outcomes = replay(shots, lambda _s: f"{doc['activator']}/v1")
            drain(sampler, args.keep_alive)
        counters = httpx.get(f"{doc['autoscaler']}/metrics", timeout=10).text
    migrated = sum(float(line.rsplit(" ", 1)[1]) for line in counters.splitlines()
                   if line.startswith("autoscaler_migrated_generations_total"))
    return {"outcomes": outcomes, "samples": sampler.rows, "cold_starts": list(placements.values()),
            # the tier each load came from (the lease's source), else the tier placement expected
            "cold_starts_by_tier": tier_counts(p.get("lease_source", p["placed_tier"]) for p in placements.values()),
            "migrated_generations": migrated,
            "dram_evictions": getattr(evictor, "evicted", None)}


class FreshController:
    """A KPA-like scaler of bench/_fresh.py instances behind the activator: start one (random
    node with a free slot) for a service whose requests the activator holds and that has none;
    stop it after `idle_s` with nothing held or in flight."""

    def __init__(self, cluster_doc: Mapping[str, Any], model_dir: Callable[[str, str], Path], services: Sequence[str],
                 idle_s: float, drop_cache: bool, tier: str, logs: Path, seed: int = 0) -> None:
        self.doc, self.model_dir, self.services = cluster_doc, model_dir, list(services)
        self.idle_s, self.drop_cache, self.tier, self.logs = idle_s, drop_cache, tier, logs
        self.http = httpx.Client(timeout=30, headers=_auth_headers())
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.instances: dict[str, Any] = {}  # service -> FreshInstance (starting or ready)
        self.ready: set[str] = set()
        self.last_busy: dict[str, float] = {}
        # Instances stopped but whose process has not exited yet, per service: they still hold
        # their slot's memory (a GPU), so they count in the instance-seconds, as the sllm-type
        # profiles' instances count until their process is gone.
        self.stopping: dict[str, int] = {}
        self.cold_starts: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fresh-controller")
        self._starts: list[threading.Thread] = []

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {s: int(s in self.instances) + self.stopping.get(s, 0) for s in self.services}

    def _stop_counted(self, service: str, inst: Any) -> None:
        try:
            inst.stop(grace_s=5.0)
        finally:
            with self.lock:
                self.stopping[service] -= 1

    def _spawn(self, service: str, node: str, index: int) -> None:
        """Start the process from the controller's own thread: PR_SET_PDEATHSIG (procs.spawn) fires
        when the *thread* that forked the child exits, so a short-lived thread would take its
        instance with it. Readiness is awaited on another thread."""
        from bench import _fresh

        try:
            d = self.model_dir(service, node)
            resident = _fresh.drop_page_cache(d) if self.drop_cache else None
            inst = _fresh.spawn(d, service, f"{service}-fresh-{index}", node, self.logs / f"{service}-{index}.log",
                                max_concurrency=4)
        except Exception as exc:  # noqa: BLE001 - recorded; the held requests wait for the next try
            self.errors.append(f"spawn {service} on {node}: {type(exc).__name__}: {exc}"[:300])
            with self.lock:
                self.instances.pop(service, None)
            return
        with self.lock:
            self.instances[service] = inst
        t = threading.Thread(target=self._await, args=(service, inst, resident), daemon=True)
        self._starts.append(t)
        t.start()

    def _await(self, service: str, inst: Any, resident: float | None) -> None:
        from bench import _fresh

        try:
            report = inst.wait_ready(self.http, timeout=300)
            _fresh.set_endpoints(self.http, self.doc["activator_admin"], NAMESPACE, service, [inst.endpoint()], 4,
                                  HOLD_S)
            with self.lock:
                self.ready.add(service)
                self.last_busy[service] = time.monotonic()
            self.cold_starts.append({"service": service, "instance": inst.id, "node": inst.node, "tier": self.tier,
                                     "page_cache_left": resident,
                                     "load_s": report.get("startup", {}).get("load_s"),
                                     "ready_s": round((inst.ready_at or 0) - inst.started, 3)})
        except Exception as exc:  # noqa: BLE001 - recorded; the held requests wait for the next try
            self.errors.append(f"start {service} on {inst.node}: {type(exc).__name__}: {exc}"[:300])
            with self.lock:
                self.instances.pop(service, None)
            inst.stop(grace_s=2.0)

    def _run(self) -> None:
        from bench import _fresh

        admin = self.doc["activator_admin"]
        nodes = [n["name"] for n in self.doc["nodes"]]
        while not self._stop.wait(0.05):
            try:
                stats = _fresh.held(self.http, admin)
            except Exception as exc:  # noqa: BLE001 - a missed poll; the loop must not die
                if len(self.errors) < 50:
                    self.errors.append(f"stats: {type(exc).__name__}: {exc}"[:300])
                continue
            now = time.monotonic()
            for s in self.services:
                held, inflight = stats.get(s, (0, 0))
                with self.lock:
                    if held + inflight > 0:
                        self.last_busy[s] = now
                    inst = self.instances.get(s)
                    used = {n: sum(1 for i in self.instances.values() if i.node == n) for n in nodes}
                if inst is None and held > 0:
                    free = [n for n in nodes if used[n] < SLOTS]
                    if free:
                        self._n += 1
                        node = self.rng.choice(free)
                        with self.lock:  # claim the slot
                            self.instances[s] = _Pending(node)
                        self._spawn(s, node, self._n)
                elif (inst is not None and s in self.ready and held + inflight == 0
                      and now - self.last_busy.get(s, now) >= self.idle_s):
                    with contextlib.suppress(httpx.HTTPError):
                        _fresh.set_endpoints(self.http, admin, NAMESPACE, s, [], 4, HOLD_S)
                    with self.lock:
                        self.instances.pop(s, None)
                        self.ready.discard(s)
                        self.stopping[s] = self.stopping.get(s, 0) + 1
                    stop = threading.Thread(target=self._stop_counted, args=(s, inst), daemon=True)
                    self._starts.append(stop)
                    stop.start()

    def __enter__(self) -> FreshController:
        from bench import _fresh

        for s in self.services:
            _fresh.set_endpoints(self.http, self.doc["activator_admin"], NAMESPACE, s, [], 4, HOLD_S)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for t in self._starts:
            t.join(60)
        with self.lock:
            left = list(self.instances.values())
            self.instances.clear()
        for inst in left:
            if not isinstance(inst, _Pending):
                inst.stop(grace_s=5.0)
        self.http.close()


@dataclass
class _Pending:
    """A slot claimed for an instance whose process is not spawned yet."""

    node: str

    def stop(self, grace_s: float = 0.0) -> None:
        return None


def _auth_headers() -> dict[str, str]:
    from sllm_knative.api import auth

    return auth.auth_headers(auth.token_from_env())


def run_fresh(name: str, shots: Sequence[Shot], store: Path, hfs: Sequence[Path], args: argparse.Namespace,
              logs: Path, work: Path) -> dict[str, Any]:
    from bench import _fresh

    services = sorted({f"s{r}" for r in range(args.services)})
    ckpt = {f"s{r}": r % args.checkpoints for r in range(args.services)}
    if name == "kserve-localcache":
        local = work / "kserve-local"
        for n in range(1, NODES + 1):
            for k, hf in enumerate(hfs):
                dst = local / f"node-{n}" / f"c{k}"
                if not (dst / "config.json").exists() or (dst / "model.safetensors").stat().st_size != (
                        hf / "model.safetensors").stat().st_size:
                    shutil.rmtree(dst, ignore_errors=True)
                    shutil.copytree(hf, dst)
                _fresh.drop_page_cache(dst)

        def model_dir(service: str, node: str) -> Path:
            return local / node / f"c{ckpt[service]}"
        drop, tier = False, "node-local disk"
    else:
        def model_dir(service: str, node: str) -> Path:
            return hfs[ckpt[service]]
        drop, tier = True, "store (page cache dropped)"
    state = Path(tempfile.mkdtemp(prefix=f"bench-replay-{name}-"))
    (logs / name).mkdir(parents=True, exist_ok=True)
    with cluster(state, store, logs / name, dram_gb=args.dram_gb) as doc:
        with FreshController(doc, model_dir, services, args.keep_alive, drop, tier, logs / name) as ctl, \
                Sampler(ctl.counts) as sampler:
            outcomes = replay(shots, lambda _s: f"{doc['activator']}/v1")
            drain(sampler, args.keep_alive)
    return {"outcomes": outcomes, "samples": sampler.rows, "cold_starts": ctl.cold_starts,
            "cold_starts_by_tier": tier_counts(c["tier"] for c in ctl.cold_starts), "errors": ctl.errors}


def run_ray(shots: Sequence[Shot], hfs: Sequence[Path], args: argparse.Namespace) -> dict[str, Any]:
    from bench.replay_ray import RayServe
    from sllm_knative.ports import free_port

    models = {f"s{r}": hfs[r % args.checkpoints] for r in range(args.services)}
    ray = RayServe(models, free_port(), args.keep_alive)
    try:
        ray.start()
        with Sampler(ray.replicas) as sampler:
            outcomes = replay(shots, ray.base_url)
            drain(sampler, args.keep_alive)
    finally:
        ray.stop()
    replicas = sorted({o.instance for o in outcomes if o.instance})
    return {"outcomes": outcomes, "samples": sampler.rows,
            "cold_starts": [{"instance": r, "tier": "store (page cache dropped)"} for r in replicas],
            "cold_starts_by_tier": {"store (page cache dropped)": len(replicas)}}
