"""Cold-start time to first token through the activator, by checkpoint tier, against a Knative default.

    .venv/bin/python -m bench.coldstart --out DIR [--runs 5] [--rate 10m] [--numerics exact|fast]
                                        [--threads N] [--work DIR] [--device cpu|cuda|cuda:N]
                                        [--tiers remote ssd dram] [--nodes 2]
                                        [--shape auto|llama-1b|llama-8b] [--model-bytes N] [--vocab N]

writes DIR/coldstart.json and DIR/coldstart.png. It builds a ~0.5 GB random-weight Llama
(`spec_for_size(512 MiB, vocab 8192)`; `--model-bytes` and `--vocab` change both, `--shape
llama-1b|llama-8b` takes a Llama-3-like shape instead, sllm_knative.models.SHAPES), converts it,
serves the store through nginx on loopback (`limit_rate RATE` per connection, so "remote" is a
network fetch), starts a local cluster (`sllm-knative up`: 2 nodes, loader sidecars, zygotes,
activator, autoscaler; each node's DRAM and SSD tier budgets 1 and 2 GiB, or 1.25 times the
checkpoint when that is more) and deploys the model as a Knative Service with a ScalingPolicy
keep-alive of 1 s.

`--tiers` picks the tiers measured (default all three). Without "remote" no nginx is started:
the store is the directory itself (file://WORK/store), as on a machine without nginx.

`--device cuda` (or cuda:N) runs every instance of both profiles on that GPU (`up --device`, and
the knative_default process's `--device`); it stops at once, saying why, when torch or the
loader extension sees no GPU. The JSON records the device and the targets it was judged by
(`limits.targets_used`): on the CPU dram 0.5 s, ssd 1 s and knative_default 10x dram; on a GPU
the issue's one target, an 8B model (`--shape llama-8b`) from DRAM within 2 s, the rest reported.

Profile "sllm" (the system as built). Each cold start: wait until the service is at zero
instances, put the checkpoint where the tier says, send one streaming completion through the
activator and read the autoscaler's record of the instance it started:

  dram    the DRAM-tier copy left on a node by the previous start (tmpfs, outlives instances)
  ssd     DRAM-tier copies evicted on every node (loader `Evict(tier="dram")`), the SSD-tier
          files dropped from the page cache (posix_fadvise DONTNEED)
  remote  both tiers evicted on every node: the loader fetches from nginx

Profile "knative_default" (the same activator and machine, none of the ServerlessLLM parts):
a service the autoscaler does not know is registered on the activator with no instance; the
request is sent and, as soon as the activator holds it, a random node is picked and a fresh
`python -m functions.llm --model <plain Hugging Face dir>` process is started (no zygote: it
pays interpreter and torch imports; no tiers: transformers `from_pretrained` reads
model.safetensors from the store directory, whose page cache is dropped first). When its
/health/ready answers, the instance is pushed to the activator, which forwards the held
request. Not modelled, all in this profile's favour: Kubernetes scheduling, image pull, and a
network between store and node (the store is a local directory read at disk speed).
The fresh instance is bench/_fresh.py's (shared with bench/replay.py).

Split of one cold start (wall clock; medians per field over the runs, so the fields of a row
need not add up exactly to its median TTFT):

  placement_s    the autoscaler's placement (node inventories + load-time model); for
                 knative_default, the random pick
  load_s         lease wait (sllm: from the instance's lease timing) + the instance's
                 model load phase (its /health/ready startup report)
  start_s        instance process start to ready, minus load_s (fork or exec, imports,
                 KV cache, warm-up, readiness poll)
  first_token_s  the rest of the TTFT: request -> activator -> autoscaler -> spawn, the
                 endpoint push, the forwarded request's prefill and first chunk
  warm_ttft_s    the same request sent again at once to the instance the cold start made:
                 the model's compute and the data path alone, the floor under ttft_s on
                 this machine
  overhead_s     ttft_s - warm_ttft_s of the same run: what the cold start itself adds,
                 independent of how fast the CPU computes the request

The headline is the cold-start overhead of knative_default over sllm's from DRAM (the targets'
`overhead_knative_default_over_dram`, beside the TTFT ratio `knative_default_over_dram`).

`--numerics` and `--threads` set SLLM_NUMERICS and OMP_NUM_THREADS for every instance of both
profiles (they reach the zygotes' children through the environment of `sllm-knative up`); by
default the function's own settings apply. The JSON records both, and the 1-minute load
average before every cold start (the machine may be shared).

Rounds interleave the tiers and the profiles (remote, ssd, dram, knative_default), one
discarded warm-up round first, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench._common import (
    down_keeping_logs,
    ensure_model,
    evict,
    exit_on_sigterm,
    machine,
    resident_fraction,
    save_figure,
    write_json,
)
from sllm_knative.api import auth
from sllm_knative.local.manifests import service_manifest

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "default"
SERVICE = "llm"
KD_SERVICE = "llm-kd"
PROMPT = "Serverless inference scales to zero and back again"
MAX_TOKENS = 4
KEEP_ALIVE = "1s"
MODEL_BYTES = 512 << 20
VOCAB = 8192
CONNECTIONS = 4  # the loader sidecar's default parallel range requests per fetch
TIERS = ("remote", "ssd", "dram")
TARGETS = {"dram_ttft_s": 0.5, "ssd_ttft_s": 1.0, "knative_default_over_dram": 10.0}
# The targets by device kind (cuda:N is cuda). On a GPU the one target: an 8B model
# (--shape llama-8b) from DRAM under 2 s to first token; the other checks are reported, not judged.
TARGETS_BY_DEVICE: dict[str, dict[str, float]] = {"cpu": TARGETS, "cuda": {"dram_ttft_s": 2.0}}
DRAM_TIER_BYTES, SSD_TIER_BYTES = 1 << 30, 2 << 30  # each node's tier budgets at least (today's)
TIER_HEADROOM = 1.25  # a tier's budget holds the checkpoint with this much to spare
FIELDS = ("ttft_s", "placement_s", "start_s", "load_s", "first_token_s", "warm_ttft_s", "overhead_s")


# -- the pure part ---------------------------------------------------------------------------------


def split(*, sent: float, ttft: float, placement: float, started: float, ready: float,
          lease_s: float, model_load_s: float) -> dict[str, float]:
    """One cold start's TTFT cut into placement / start / load / first token (wall-clock seconds).

    `sent` is when the request left the client, `started`/`ready` when the instance process was
    started and answered ready; the parts add up to `ttft`.
    """
    load = lease_s + model_load_s
    start = (ready - started) - load
    return {"ttft_s": ttft, "placement_s": placement, "start_s": start, "load_s": load,
            "first_token_s": ttft - placement - start - load,
            "before_spawn_s": started - sent, "after_ready_s": sent + ttft - ready}


def overhead(run: dict[str, float]) -> float:
    """What one cold start adds: its TTFT minus the warm TTFT of the same request on the same instance."""
    return run["ttft_s"] - run["warm_ttft_s"]


def summarize(profile: str, tier: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    """A JSON row: the median of each field over the runs (overhead_s: of the per-run overheads)."""
    runs = [{**r, "overhead_s": overhead(r)} for r in runs]  # the same value the run recorded
    return {"profile": profile, "tier": tier,
            **{f: round(statistics.median(r[f] for r in runs), 4) for f in FIELDS}}


def device_kind(device: str) -> str:
    """'cpu' or 'cuda' (of 'cuda:N'): the key of TARGETS_BY_DEVICE."""
    return device.partition(":")[0]


def check_targets(rows: list[dict[str, Any]], targets: dict[str, float] = TARGETS) -> list[dict[str, Any]]:
    """Each check against `targets` (a device's); a check without a target is reported, met None."""
    by = {(r["profile"], r["tier"]): r for r in rows}
    dram, ssd, kd = by.get(("sllm", "dram")), by.get(("sllm", "ssd")), by.get(("knative_default", "remote"))
    out = []

    def at_most(name: str, value: float) -> dict[str, Any]:
        if name not in targets:
            return {"name": name, "value": value, "target": "report", "met": None}
        return {"name": name, "value": value, "target": f"<= {targets[name]}", "met": value <= targets[name]}

    if dram:
        out.append(at_most("dram_ttft_s", dram["ttft_s"]))
    if ssd:
        out.append(at_most("ssd_ttft_s", ssd["ttft_s"]))
    if dram and kd:
        ratio = kd["ttft_s"] / dram["ttft_s"]
        name = "knative_default_over_dram"
        out.append({"name": name, "value": round(ratio, 2), "target": f">= {targets[name]}",
                    "met": ratio >= targets[name]} if name in targets else
                   {"name": name, "value": round(ratio, 2), "target": "report", "met": None})
        # the headline: what each cold start adds over the warm TTFT of the same request
        if dram["overhead_s"] > 0:
            out.append({"name": "overhead_knative_default_over_dram",
                        "value": round(kd["overhead_s"] / dram["overhead_s"], 2),
                        "knative_default_overhead_s": kd["overhead_s"], "dram_overhead_s": dram["overhead_s"],
                        "target": "report (headline)", "met": None})
    return out


def nginx_rate_bytes(rate: str) -> int:
    """nginx size syntax (`10m`, `512k`, `1048576`) in bytes per second."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = rate.strip().lower()
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError:
        raise ValueError(f"--rate {rate!r}: expected an nginx size such as 10m, 512k or 1048576") from None


def tier_budgets(model_bytes: int) -> tuple[int, int]:
    """Each node's (DRAM, SSD) tier budget in bytes: today's 1 and 2 GiB, or room for the
    checkpoint (TIER_HEADROOM times its bytes) when that is more."""
    need = math.ceil(model_bytes * TIER_HEADROOM)
    return max(DRAM_TIER_BYTES, need), max(SSD_TIER_BYTES, need)


def gib_arg(nbytes: int) -> str:
    """A byte count as `up`'s --dram-gb / --ssd-gb (1 GiB: "1"), never below `nbytes`."""
    text = f"{nbytes / 2**30:g}"
    return text if int(float(text) * 2**30) >= nbytes else repr(nbytes / 2**30 + 1e-9)


def model_spec(shape: str, model_bytes: int, vocab: int) -> tuple[Any, str]:
    """(ModelSpec, its description): `auto` is spec_for_size(model_bytes, vocab), bfloat16;
    `llama-1b` / `llama-8b` the named Llama-3-like shapes (sllm_knative.models.SHAPES)."""
    from sllm_knative.models import SHAPES, spec_for_size

    if shape == "auto":
        mib = f"{model_bytes / 2**20:g} MiB"
        return spec_for_size(model_bytes, vocab_size=vocab), f"spec_for_size({mib}, vocab_size={vocab}), bfloat16"
    spec = SHAPES[shape]
    return spec, (f"{shape}: hidden {spec.hidden_size}, {spec.num_hidden_layers} layers, intermediate "
                  f"{spec.intermediate_size}, heads {spec.num_attention_heads}/{spec.num_key_value_heads}, vocab "
                  f"{spec.vocab_size}, {'tied' if spec.tie_word_embeddings else 'untied'}, {spec.dtype}")


# -- the cluster, seen from outside ------------------------------------------------------------------


def _wait(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Bench:
    def __init__(self, cluster: dict[str, Any], state: Path, model: str, hf_dir: Path, log_dir: Path,
                 device: str = "cpu") -> None:
        self.cluster = cluster
        self.device = device
        self.state = state
        self.model = model
        self.hf_dir = hf_dir
        self.log_dir = log_dir
        # The activator's admin API wants the cluster's internal token (set in this process's
        # environment before `up`, which hands it to every component).
        self.http = httpx.Client(timeout=30, headers=auth.auth_headers(auth.token_from_env()))

    def close(self) -> None:
        self.http.close()

    # -- observation
    def service(self, name: str = SERVICE) -> dict[str, Any]:
        doc = self.http.get(f"{self.cluster['autoscaler']}/v1/services").json()
        return next(s for s in doc["services"] if s["key"] == f"{NAMESPACE}/{name}")

    def at_zero(self) -> bool:
        s = self.service()
        return s["ready"] == 0 and not s["instances"]

    def tiers(self, state: str = "ready") -> dict[str, set[str]]:
        """node -> the tiers holding a copy of the model in `state` (ready or filling)."""
        from sllm_knative.loader.client import LoaderClient

        out: dict[str, set[str]] = {}
        for node in self.cluster["nodes"]:
            with LoaderClient(node["loader"], timeout=10) as c:
                inv = c.inventory()
            out[node["name"]] = {t.name for t in inv.tiers for e in t.entries
                                 if e.model == self.model and e.state == state}
        return out

    def settled(self) -> bool:
        """No copy of the model is filling anywhere (e.g. the SSD copy made after a remote fetch)."""
        return not any(self.tiers("filling").values())

    # -- putting the checkpoint where a tier says
    def _evict(self, node: dict[str, Any], tier: str) -> None:
        from sllm_knative.loader.client import LoaderClient
        from sllm_knative.loader.errors import InUse, NotFound

        deadline = time.monotonic() + 120
        with LoaderClient(node["loader"], timeout=30) as c:
            while True:
                try:
                    c.evict(self.model, tier)
                    return
                except NotFound:
                    return
                except InUse:  # the last instance's lease is closing, or the SSD copy is still filling
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def _drop_ssd_page_cache(self) -> float:
        """posix_fadvise(DONTNEED) every SSD-tier file; returns the largest resident fraction left."""
        worst = 0.0
        for node in self.cluster["nodes"]:
            for p in (self.state / "nodes" / node["name"] / "ssd").rglob("*"):
                if p.is_file() and p.stat().st_size > 0:
                    evict(p)
                    worst = max(worst, resident_fraction(p))
        return worst

    def prepare(self, tier: str) -> dict[str, Any]:
        from sllm_knative.loader.client import LoaderClient

        nodes = self.cluster["nodes"]
        _wait(self.settled, 300, "background fills to finish")
        before = self.tiers()
        if tier == "remote":
            for node in nodes:
                self._evict(node, "")
        elif tier == "ssd":
            if not any("ssd" in t for t in before.values()):
                with LoaderClient(nodes[0]["loader"], timeout=600) as c:
                    c.prefetch(self.model, tier="ssd", wait=True)
            for node in nodes:
                self._evict(node, "dram")
        elif tier == "dram":
            if not any("dram" in t for t in before.values()):
                holder = next((n for n in nodes if before.get(n["name"])), nodes[0])
                with LoaderClient(holder["loader"], timeout=600) as c:
                    c.prefetch(self.model, tier="dram", wait=True)
        else:
            raise ValueError(f"tier {tier!r}: expected one of {', '.join(TIERS)}")
        resident = self._drop_ssd_page_cache()
        after = self.tiers()
        best = {"dram": 0, "ssd": 1}
        have = [min((best[t] for t in ts), default=2) for ts in after.values()]
        fastest = ("dram", "ssd", "remote")[min(have, default=2)]
        if fastest != tier:
            raise RuntimeError(f"could not prepare tier {tier}: the nodes hold {after}")
        return {"tiers": {k: sorted(v) for k, v in after.items()}, "ssd_resident_max": round(resident, 4)}

    # -- one cold start of each profile
    def sllm(self, tier: str) -> dict[str, Any]:
        from sllm_knative.commands.resources import invoke

        _wait(self.at_zero, 120, "the service to scale to zero")
        prep = self.prepare(tier)
        load = os.getloadavg()[0]
        sent = time.time()
        res = invoke(self.cluster["activator"], SERVICE, NAMESPACE, PROMPT, MAX_TOKENS, seed=1)
        warm = self.warm(SERVICE, res["instance"])
        svc = self.service()
        inst = next(i for i in svc["instances"] if i["id"] == res["instance"])
        placed = next(p for p in svc["placements"] if p["instance"] == res["instance"])
        lease, report = inst["lease"], inst["report"]["startup"]
        parts = split(sent=sent, ttft=res["ttft_s"], placement=placed["placement_s"], started=inst["started_at"],
                      ready=inst["ready_at"], lease_s=lease["lease_complete"] - lease["lease_requested"],
                      model_load_s=report["load_s"])
        return {**parts, "warm_ttft_s": warm, "overhead_s": parts["ttft_s"] - warm, "instance": inst["id"],
                "node": inst["node"],
                "placed_tier": placed["tier"],
                "lease_source": lease["source"], "lease_bytes": lease["bytes"],
                "lease_s": lease["lease_complete"] - lease["lease_requested"], "report": report,
                "estimate_s": placed["estimate_s"], "placement_reasons": placed["reasons"],
                "loadavg_1m": round(load, 2), **prep}

    def warm(self, service: str, instance: str) -> float:
        """TTFT of the same request again, on the instance the cold start just made: what the
        model's compute on this machine costs without any cold start (the floor under ttft_s)."""
        from sllm_knative.commands.resources import invoke

        res = invoke(self.cluster["activator"], service, NAMESPACE, PROMPT, MAX_TOKENS, seed=1)
        if res["instance"] != instance:
            raise RuntimeError(f"the warm request went to {res['instance']}, not to {instance}")
        return float(res["ttft_s"])

    def knative_default(self, index: int) -> dict[str, Any]:
        from bench import _fresh
        from sllm_knative.commands.resources import invoke

        admin = self.cluster["activator_admin"]
        _fresh.set_endpoints(self.http, admin, NAMESPACE, KD_SERVICE, [])
        resident = _fresh.drop_page_cache(self.hf_dir)
        result: dict[str, Any] = {}
        load = os.getloadavg()[0]

        def client() -> None:
            try:
                result["res"] = invoke(self.cluster["activator"], KD_SERVICE, NAMESPACE, PROMPT, MAX_TOKENS, seed=1)
            except Exception as exc:  # reported by the caller
                result["error"] = exc

        def held() -> bool:
            return _fresh.held(self.http, admin).get(KD_SERVICE, (0, 0))[0] > 0

        sent = time.time()
        thread = threading.Thread(target=client, name="kd-client")
        thread.start()
        inst = None
        try:
            _wait(held, 60, "the activator to hold the request", every=0.005)
            t0 = time.perf_counter()
            node = random.choice(self.cluster["nodes"])["name"]
            placement = time.perf_counter() - t0
            inst = _fresh.spawn(self.hf_dir, KD_SERVICE, f"{KD_SERVICE}-{index}", node,
                                self.log_dir / f"knative-default-{index}.log", device=self.device)
            report = inst.wait_ready(self.http, timeout=300)
            _fresh.set_endpoints(self.http, admin, NAMESPACE, KD_SERVICE, [inst.endpoint()])
            thread.join(300)
            if thread.is_alive():
                raise TimeoutError("the knative_default request did not finish within 300 s of the instance")
            if "error" in result:
                raise RuntimeError(f"knative_default request failed: {result['error']}")
            res = result["res"]
            warm = self.warm(KD_SERVICE, inst.id)
        finally:
            with contextlib.suppress(httpx.HTTPError):
                _fresh.set_endpoints(self.http, admin, NAMESPACE, KD_SERVICE, [])
            if inst is not None:
                inst.stop(grace_s=10.0)
            thread.join(60)
        assert inst.ready_at is not None
        startup = report["startup"]
        parts = split(sent=sent, ttft=res["ttft_s"], placement=placement, started=inst.started, ready=inst.ready_at,
                      lease_s=0.0, model_load_s=startup["load_s"])
        return {**parts, "warm_ttft_s": warm, "overhead_s": parts["ttft_s"] - warm, "node": node, "report": startup,
                "store_resident_max": round(resident, 4),
                "loadavg_1m": round(load, 2)}


def build_inputs(work: Path, spec: Any, init_device: str = "cpu") -> tuple[Path, Path]:
    """(plain Hugging Face dir, converted checkpoint dir), both in work/store (kept between runs);
    the random weights drawn on init_device (a GPU draws an 8B model's in a second)."""
    from sllm_knative import format as fmt
    from sllm_knative.convert import convert

    hf, ckpt = work / "store" / "llm-hf", work / "store" / "llm"
    if ensure_model(hf, spec, init_device) or not fmt.is_checkpoint(ckpt):
        convert(hf, ckpt, overwrite=True)
    for f in ckpt.iterdir():  # nginx serves them; build_model may leave 0600 files
        f.chmod(0o644)
    return hf, ckpt


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sllm_knative import format as fmt
    from sllm_knative.local.cluster import up_detached
    from sllm_knative.ports import free_port
    from testkit.servers import Nginx

    tiers = [t for t in TIERS if t in args.tiers]  # always in this order: remote, ssd, dram
    remote = "remote" in tiers
    rate_bytes = nginx_rate_bytes(args.rate)
    # Inherited by the cluster's processes (zygote children) and the knative_default instances alike.
    # The internal token too: `up` takes it from here, and the bench's admin calls send it.
    os.environ.setdefault(auth.TOKEN_ENV, secrets.token_urlsafe(24))
    if args.numerics:
        os.environ["SLLM_NUMERICS"] = args.numerics
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.work or REPO / ".bench" / "coldstart").resolve()
    spec, spec_desc = model_spec(args.shape, args.model_bytes, args.vocab)
    hf, ckpt = build_inputs(work, spec, "cuda" if args.device.startswith("cuda") else "cpu")
    index = fmt.read_index(ckpt)
    dram_bytes, ssd_bytes = tier_budgets(index.total_bytes)
    targets = TARGETS_BY_DEVICE[device_kind(args.device)]
    out = Path(args.out)
    logs = out / "coldstart-logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="bench-coldstart-state-"))
    t_begin = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    warmup: list[dict[str, Any]] = []
    # The remote tier is nginx on loopback; without it (and without nginx: the GPU machine has
    # none) the store is the work directory itself, file://WORK/store.
    with Nginx(work / "store", slow_rate=args.rate) if remote else contextlib.nullcontext() as web:
        store = f"{web.url}/slow" if web is not None else f"file://{work / 'store'}"
        model = f"{store}/llm"
        try:
            cluster = up_detached(["--state-dir", str(state), "--nodes", str(args.nodes), "--slots", "2",
                                   "--dram-gb", gib_arg(dram_bytes), "--ssd-gb", gib_arg(ssd_bytes),
                                   "--port", str(free_port()), "--store", store,
                                   *(["--device", args.device] if args.device != "cpu" else [])], state)
            (state / "svc.yaml").write_text(service_manifest(SERVICE, model, namespace=NAMESPACE,
                                                             keep_alive=KEEP_ALIVE, max_scale=1,
                                                             container_concurrency=1))
            r = httpx.post(f"{cluster['autoscaler']}/v1/apply", content=(state / "svc.yaml").read_bytes(), timeout=30)
            r.raise_for_status()
            bench = Bench(cluster, state, model, hf, logs, device=args.device)
            try:
                for rnd in range(args.runs + 1):
                    record = warmup if rnd == 0 else None
                    for tier in tiers:
                        one = bench.sllm(tier)
                        print(json.dumps({"round": rnd, "profile": "sllm", "tier": tier,
                                          **{k: round(one[k], 3) for k in FIELDS}}), flush=True)
                        (record if record is not None else runs.setdefault(("sllm", tier), [])).append(one)
                    one = bench.knative_default(rnd)
                    print(json.dumps({"round": rnd, "profile": "knative_default", "tier": "remote",
                                      **{k: round(one[k], 3) for k in FIELDS}}), flush=True)
                    (record if record is not None else runs.setdefault(("knative_default", "remote"), [])).append(one)
                nodes_after = httpx.get(f"{cluster['autoscaler']}/v1/nodes", timeout=30).json()["nodes"]
            finally:
                bench.close()
        finally:
            down_keeping_logs(state, logs)
    rows = [summarize(p, t, rs) for (p, t), rs in runs.items()]
    order = {("sllm", t): i for i, t in enumerate(("dram", "ssd", "remote"))} | {("knative_default", "remote"): 3}
    rows.sort(key=lambda r: order[(r["profile"], r["tier"])])
    remote_runs = runs.get(("sllm", "remote"), [])
    observed = [r["lease_bytes"] / r["lease_s"] for r in remote_runs if r["lease_s"] > 0]
    counted = [(rnd + 1, t, r) for (p, t), rs in runs.items() if p == "sllm" for rnd, r in enumerate(rs)]
    mismatched = [{"round": rnd, "tier": t, "placed_tier": r["placed_tier"], "lease_source": r["lease_source"],
                   "node": r["node"], "placement_reasons": r["placement_reasons"]}
                  for rnd, t, r in [(0, t, r) for t, r in zip(tiers, warmup, strict=False)] + counted
                  if r["placed_tier"] != t or r["lease_source"] != t]
    warms = [r["warm_ttft_s"] for rs in runs.values() for r in rs]
    cpu = args.device == "cpu"
    if remote:
        remote_limits: dict[str, Any] = {
            "remote_store": "nginx on loopback, limit_rate per connection",
            "nginx_limit_rate": args.rate, "nginx_limit_rate_bytes_per_s": rate_bytes,
            "loader_connections": CONNECTIONS, "nominal_remote_cap_bytes_per_s": rate_bytes * CONNECTIONS,
            "nginx_first_second_allowance": "nginx sends each request's first second's worth at once "
                                            "(limit_rate counts from t+1 s); the observed rate is higher",
            "observed_remote_bytes_per_s": round(statistics.median(observed)) if observed else None}
    else:
        remote_limits = {"remote_store": None, "store": "file://WORK/store (no remote tier, no nginx)"}
    return {
        "rows": rows,
        "targets": check_targets(rows, targets),
        "limits": {
            "warm_ttft_s": round(statistics.median(warms), 4) if warms else None,
            "warm_ttft_note": "the same request on the instance a cold start just made (median over every "
                              "run of both profiles): the model's compute plus the data path, no cold start",
            **remote_limits,
            "nodes": args.nodes, "slots_per_node": 2, "dram_tier_bytes": dram_bytes, "ssd_tier_bytes": ssd_bytes,
            "device": args.device,
            **({"shared_machine": "2 cores shared with other agents' builds and tests"} if cpu else {}),
            "targets_used": {"device": device_kind(args.device), **targets}, "targets_by_device": TARGETS_BY_DEVICE,
        },
        "meta": {
            "model": {"bytes": index.total_bytes, "spec": spec_desc,
                      "store_uri": "http://127.0.0.1:PORT/slow/llm" if remote else "file://WORK/store/llm"},
            "request": {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0},
            "numerics": args.numerics or ("default (exact on cpu)" if cpu else "default (fast on cuda)"),
            "intra_op_threads": args.threads or "default (torch: one per core)", "keep_alive": KEEP_ALIVE,
            "loadavg_1m_at_start": load_start, "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "runs_per_row": args.runs, "rounds": ", ".join([*tiers, "knative_default"]),
            "tier_mismatches": mismatched, "nodes_after": nodes_after,
            "runs": {f"{p}/{t}": rs for (p, t), rs in runs.items()}, "warmup_round": warmup,
            "machine": machine(), "bench_seconds": round(time.monotonic() - t_begin, 1),
            "command": " ".join([".venv/bin/python", "-m", "bench.coldstart", *sys.argv[1:]]),
        },
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = [f"{r['profile']}\n{r['tier']}" if r["profile"] == "sllm" else "knative_default\n(from_pretrained)"
              for r in rows]
    parts = (("placement_s", "placement"), ("start_s", "instance start"), ("load_s", "load"),
             ("first_token_s", "first token (rest)"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 4]})
    near = [i for i, r in enumerate(rows) if r["tier"] != "remote" or r["profile"] != "sllm"]
    for ax, subset, title in ((axes[0], near, "DRAM / SSD against knative_default"),
                              (axes[1], list(range(len(rows))), "all")):
        bottom = [0.0] * len(subset)
        for key, label in parts:
            vals = [max(0.0, rows[i][key]) for i in subset]
            ax.bar(range(len(subset)), vals, 0.6, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for x, i in enumerate(subset):
            ax.text(x, bottom[x], f"{rows[i]['ttft_s']:.2f}s\n(cold +{rows[i]['overhead_s']:.2f}s)", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(range(len(subset)), [labels[i] for i in subset], fontsize=8)
        ax.set_ylabel("seconds (median)")
        ax.set_title(title, fontsize=10)
    targets = TARGETS_BY_DEVICE[device_kind(doc["limits"]["device"])]
    for key, name in (("dram_ttft_s", "DRAM target"), ("ssd_ttft_s", "SSD target")):
        if key not in targets:
            continue
        target = targets[key]
        axes[0].axhline(target, ls="--", lw=0.8, color="gray")
        axes[0].text(-0.4, target, name, fontsize=7, va="bottom", color="gray")
    if doc["limits"].get("warm_ttft_s"):
        axes[0].axhline(doc["limits"]["warm_ttft_s"], ls=":", lw=0.8, color="black")
        axes[0].text(-0.4, doc["limits"]["warm_ttft_s"], "warm TTFT (no cold start)", fontsize=7, va="bottom")
    axes[0].legend(fontsize=7)
    limits = doc["limits"]
    remote = (f"remote = nginx limit_rate {limits['nginx_limit_rate']} x {limits['loader_connections']} connections"
              if limits.get("remote_store") else "store = a local directory (no remote tier)")
    fig.suptitle(f"cold-start TTFT through the activator, {doc['meta']['model']['bytes'] / 1e9:.2f} GB model, "
                 f"{limits['device'].upper()}, {remote}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu/check.py's dry run parses its own argv with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=5, help="cold starts per tier and profile (after one warm-up round)")
    p.add_argument("--rate", default="10m", help="nginx limit_rate per connection for the remote store (default 10m)")
    p.add_argument("--numerics", choices=["exact", "fast"], default=None,
                   help="SLLM_NUMERICS for every instance of both profiles (default: the function's own, "
                        "exact on cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every instance of both profiles (default: torch's, one per core)")
    p.add_argument("--work", default=None, help="where the model is built and kept (default: .bench/coldstart)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N: `up --device` and the knative_default instances; "
                        "refused at once when no GPU can be used")
    p.add_argument("--tiers", nargs="+", choices=TIERS, default=list(TIERS), metavar="TIER",
                   help="the sllm tiers to measure, of remote ssd dram (default: all three); without remote "
                        "no nginx is started and the store is file://WORK/store")
    p.add_argument("--shape", choices=("auto", "llama-1b", "llama-8b"), default="auto",
                   help="auto (default): spec_for_size(--model-bytes, --vocab); llama-1b / llama-8b: the "
                        "Llama-3-like shapes of sllm_knative.models.SHAPES (bf16; --model-bytes and --vocab unused)")
    p.add_argument("--model-bytes", type=int, default=None,
                   help=f"the auto shape's size in bytes (default {MODEL_BYTES}, 512 MiB)")
    p.add_argument("--vocab", type=int, default=None, help=f"the auto shape's vocabulary (default {VOCAB})")
    p.add_argument("--nodes", type=int, default=2,
                   help="local nodes (default 2); each may keep an SSD copy of the checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    exit_on_sigterm()
    if args.runs < 1:
        p.error(f"--runs = {args.runs}, must be at least 1")
    if args.shape != "auto" and (args.model_bytes is not None or args.vocab is not None):
        p.error(f"--shape {args.shape} fixes the model: --model-bytes and --vocab are for --shape auto")
    args.model_bytes = MODEL_BYTES if args.model_bytes is None else args.model_bytes
    args.vocab = VOCAB if args.vocab is None else args.vocab
    if args.model_bytes < 1 << 20 or args.vocab < 512:
        p.error(f"--model-bytes = {args.model_bytes}, --vocab = {args.vocab}: at least 1 MiB and 512")
    if not 1 <= args.nodes <= 64:
        p.error(f"--nodes = {args.nodes}, must be between 1 and 64")
    nginx_rate_bytes(args.rate)
    from sllm_knative.local.cluster import check_device_usable, parse_device

    try:
        parse_device(args.device)
        check_device_usable(args.device)  # before the model is built and the cluster started
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = run(args)
    out = Path(args.out)
    path = write_json(out, "coldstart", doc)
    plot(doc, out / "coldstart.png")
    for row in doc["rows"]:
        print(json.dumps(row))
    for t in doc["targets"]:
        print(json.dumps(t))
    print(f"wrote {path} and {out / 'coldstart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
