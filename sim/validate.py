"""The simulator against a real trace replay (issue 16 §2, "Validated against reality").

    python -m sim validate --replay out/replay/replay.json --out out/sim-validate

`bench/replay.py` writes what it sent (`shots`: send time, service, checkpoint, prompt and
output caps), the cluster's shape (`setup`), and per profile what came back (`outcomes`: when
each request was really sent, its TTFT and end, the instance that served it; the fresh
processes' cold starts). Its `replay-logs/` beside the JSON hold each sllm-type profile's
autoscaler and instance logs: per instance, the tier its checkpoint came from, how long the
lease (the load) took and how long from placement to ready.

This module turns one such run into the simulator's inputs and compares:

1. `measure`: this machine's numbers, from that run only (each one's source in `Measured.sources`):
   load seconds per tier (median lease time of that tier in the instance logs), the instance
   start overhead (median of ready time minus lease time per instance), the fresh-process start
   (median `ready_s - load_s` of knative-default's and kserve-localcache's cold starts), the
   fresh processes' own load (median `load_s`; `fresh_load_factor` compares it with the
   loader's from the same tier), the per-token prefill (median TTFT of warm requests over the
   prompt length) and the decode step (median gap between a warm request's tokens). `hardware`
   makes that a `HardwareProfile`, with `serial_prefill` (an instance here computes on one
   thread).
2. `inputs`: the same requests (arrival = the time the replay really sent each one in that
   profile; warm-up requests simulated but not counted, as the replay does), one model per
   service carrying the checkpoint it serves (services share checkpoints), the cluster's nodes
   and slots, containerConcurrency, max-scale, window and keep-alive.
3. `predict`: the real `Simulation` with the real policy (`REPLAY_POLICIES` maps a replay
   profile to one; ray-serve has none). The replay gives every profile the same keep-alive
   (its fresh-process controller stops an instance idle for `--keep-alive`), so the
   fresh-process policies run with the keep-alive here too.
4. `compare`: predicted over measured p50 and p99 TTFT, within `TOLERANCE` or not.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.replay_core import ttft_stats
from sim.cluster import SimConfig
from sim.engine import Simulation
from sim.hardware import GB, HardwareProfile
from sim.policies import get_policy
from sim.replay_logs import (
    SOURCES,
    fresh_timings,
    instance_timings,
    probe,
    shared_work,
    stamp,
    start_cores,
    stop_times,
    warm,
    work,
)
from sim.workload import BYTES_PER_PARAM, Model, Request
from sllm_knative.config.autoscaler import TICK_S
from sllm_knative.loader.hops import tier_rates
from sllm_knative.placement import Tier

#: Replay profile -> sim policy. ray-serve has none: Ray Serve's own autoscaler and proxy are
#: not the decider and activator the simulator runs.
REPLAY_POLICIES = {"sllm": "sllm", "no-dram-tier": "no-dram-tier", "no-locality": "no-locality",
                   "no-migration": "no-migration", "knative-default": "knative-default",
                   "kserve-localcache": "kserve-localcache"}
TOLERANCE = 0.25  # issue 16 §2: predicted p50 and p99 TTFT within 25% of the measured ones
SEEDS = 8  # simulated runs per profile; the prediction is their median
SIGMA_LOADS = 5  # a tier's own load spread is measured from at least this many of its leases
#: a measured quantile is one run's sample of it: `band` gives where the system's quantile lies with
#: this probability (order statistics), for runs too small for a 25% check of the point (the tiny test)
BAND_CONFIDENCE = 0.95
#: The replay's cluster tiers: `sllm-knative up --dram-gb 2 --ssd-gb 4` (bench/replay_profiles.py cluster()).
DRAM_TIER_BYTES = 2 * 2**30
SSD_TIER_BYTES = 4 * 2**30
@dataclass(frozen=True)
class Measured:
    """This machine's numbers, measured in one replay run; `sources` says where each came from."""

    checkpoint_bytes: int
    load_s: Mapping[Tier, float]  # median seconds of one load from each tier
    load_sigma: float  # the spread of log(load seconds) around each tier's median, pooled
    overhead_s: float  # instance start beyond the load (zygote fork, server, warm-up)
    fresh_process_s: float  # a fresh process's start beyond its load
    prefill_s_per_token: float  # pooled over every profile
    decode_step_s: float
    compute_sigma: float  # the spread of log(warm TTFT) around its median, pooled
    activation_s: float  # a cold start's first request beyond placement-to-ready and its prefill
    shared_cores: int = 0  # the CPUs every start shares (meta.machine.cpus)
    start_cores: float = 0.0  # the cores the fresh processes' starts shared in effect (`start_cores`)
    stop_s: float = 0.0  # an eviction's decision to its victim's slot being free (median; 0: none seen)
    #: per fresh-process profile: the median seconds its fresh processes took to load (their own
    #: read of the checkpoint, slower than the loader's from the same tier)
    fresh_load_s: Mapping[str, float] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    #: per profile: (prefill s/token, decode step s, sigma) of its own warm requests: the
    #: machine's speed while that profile ran (its CPU contention: fresh processes importing, other work)
    compute: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    #: per profile: its own activation_s (the median over its own cold starts' first requests)
    activation: Mapping[str, float] = field(default_factory=dict)
    #: per tier with at least SIGMA_LOADS leases from it: that tier's own spread (a DRAM map's
    #: jitter is a larger share of its time than an SSD read's); the others take `load_sigma`
    load_sigma_by_tier: Mapping[Tier, float] = field(default_factory=dict)


def _median(xs: Sequence[float], what: str) -> float:
    if not xs:
        raise ValueError(f"the replay records no {what}")
    return float(statistics.median(xs))


def measure(doc: Mapping[str, Any], logs: Mapping[str, Sequence[str]]) -> Measured:
    """`doc`: a replay.json; `logs`: profile -> its log lines (replay-logs/<profile>/**.log)."""
    profiles = doc["profiles"]
    cores = int(doc.get("meta", {}).get("machine", {}).get("cpus") or 0)
    meta = doc.get("meta", {})
    end = stamp(str(meta.get("machine", {}).get("time", "")))
    since = end - float(meta.get("bench_seconds", math.inf)) if math.isfinite(end) else -math.inf
    fresh_runs = [fresh_timings(logs.get(name, ()), since) for name in profiles
                  if name in REPLAY_POLICIES and get_policy(name).fresh_process]
    # the fresh processes' starts (python, torch's import, from_pretrained) side by side: how
    # many cores they shared in effect (the sllm-type starts are forks, too short to say)
    fresh_cores = start_cores(fresh_runs, "load_s", cores)
    per_profile = {name: instance_timings(logs[name]) for name in REPLAY_POLICIES
                   if name in logs and not get_policy(name).fresh_process}
    timings = [t for ts in per_profile.values() for t in ts]
    if not timings:
        raise ValueError("no instance timings: the replay's logs have no 'lease complete' and 'instance ready' "
                         "lines for an sllm-type profile")
    size = int(statistics.median(t["bytes"] for t in timings))
    overhead = _median([w for ts in per_profile.values() for w in work(ts, "lease_s", cores)], "instance starts")
    # a load from a tier: placement to ready of the instances placed to load from it, less the
    # start overhead (the lease's own `source` may say dram for a store load that reached the
    # DRAM tier before the lease was granted)
    by_tier = {tier: [max(0.0, t["ready_s"] - overhead) for t in timings if SOURCES[t["placed"]] == tier]
               for tier in SOURCES.values()}
    load_s = {tier: _median(xs, f"{tier} loads") for tier, xs in by_tier.items() if xs}
    # a tier no instance loaded from: the loader sidecars' own bandwidth probe of that run
    probed = tier_rates(probe(line for name in per_profile for line in logs[name])).tiers
    unseen = [t for t in SOURCES.values() if t not in load_s]
    for tier in unseen:
        if tier in probed:
            load_s[tier] = size / probed[tier]
    if Tier.SSD not in load_s and Tier.REMOTE in load_s:  # no SSD load seen: an SSD read is no slower than the store
        load_s[Tier.SSD] = load_s[Tier.REMOTE]
    if set(load_s) != set(SOURCES.values()):
        raise ValueError(f"the replay's logs have loads from {sorted(map(str, load_s))} only; need dram and remote")
    # the spread of a load: the loader's own lease times around their source's median
    leases = {tier: [t["lease_s"] for t in timings if SOURCES[t["source"]] == tier and t["lease_s"] > 0]
              for tier in SOURCES.values()}
    devs = {tier: [math.log(x / statistics.median(xs)) for x in xs] for tier, xs in leases.items() if xs}
    logs_dev = [d for ds in devs.values() for d in ds]
    sigma = statistics.pstdev(logs_dev) if len(logs_dev) > 1 else 0.0
    tier_sigma = {tier: statistics.pstdev(ds) for tier, ds in devs.items() if len(ds) >= SIGMA_LOADS}

    fresh = [w for ts in fresh_runs for w in shared_work(ts, "load_s", fresh_cores)]
    fresh_s = _median(fresh, "fresh-process cold starts") if fresh else overhead
    fresh_load = {name: float(statistics.median(xs)) for name, p in profiles.items()
                  if name in REPLAY_POLICIES and get_policy(name).fresh_process
                  and (xs := [c["load_s"] for c in p.get("cold_starts", []) if c.get("load_s") is not None])}
    prompt = {s["index"]: s["prompt_tokens"] for s in doc["shots"]}

    def speed(outs: Sequence[Mapping[str, Any]]) -> tuple[float, float, float]:
        per_token = [o["ttft_s"] / prompt[o["index"]] for o in outs if o["ttft_s"] > 0]
        mid = _median(per_token, "warm requests")
        return (mid, _median([(o["end_s"] - o["sent_s"] - o["ttft_s"]) / (o["tokens"] - 1) for o in outs
                              if o["tokens"] > 1], "warm requests of more than one token"),
                statistics.pstdev([math.log(x / mid) for x in per_token]) if len(per_token) > 1 else 0.0)

    concurrency = int(doc["setup"].get("container_concurrency", 0))
    per = {name: warm(p["outcomes"], concurrency) for name, p in profiles.items()
           if name in REPLAY_POLICIES and p.get("outcomes")}
    warms = [o for outs in per.values() for o in outs]
    prefill, step, spread = speed(warms)
    compute = {name: speed(outs) for name, outs in per.items() if len(outs) >= 5}
    extras: dict[str, list[float]] = {}
    for name, p in profiles.items():
        if name not in REPLAY_POLICIES:
            continue
        # each profile's own instances: every profile's cluster names them s0-1, s0-2, ... again
        ready = {t["instance"]: t["ready_s"] for t in per_profile.get(name, ())}
        ready.update({c["instance"]: c["ready_s"] for c in p.get("cold_starts", [])
                      if c.get("instance") and c.get("ready_s") is not None})
        seen: set[str] = set()
        pre = compute.get(name, (prefill, step, spread))[0]
        for o in sorted((o for o in p.get("outcomes", []) if o.get("ok") and o.get("instance")), key=lambda o: o["sent_s"]):
            if o["instance"] in seen or o["instance"] not in ready:
                continue
            seen.add(o["instance"])
            extra = o["ttft_s"] - ready[o["instance"]] - pre * prompt[o["index"]]
            if 0 <= extra < TICK_S / 2:
                extras.setdefault(name, []).append(extra)
    pooled = [x for xs in extras.values() for x in xs]
    activation = statistics.median(pooled) if pooled else 0.0
    n_fresh = len(fresh)
    stops = [s for name in per_profile for s in stop_times(logs[name])]
    return Measured(size, load_s, sigma, overhead, fresh_s, prefill, step, spread, activation, shared_cores=cores,
                    start_cores=fresh_cores,
                    fresh_load_s=fresh_load, stop_s=statistics.median(stops) if stops else 0.0,
                    load_sigma_by_tier=tier_sigma, sources={
        "checkpoint_bytes": f"median 'lease complete' bytes of {len(timings)} instances",
        "load_s": "median placement-to-ready seconds less overhead_s of the instances placed per tier: " + ", ".join(
            f"{t} {len(by_tier[t])} loads" for t in SOURCES.values()) + "".join(
            f"; {t}: none, from the loaders' 'bandwidth measured' probe" for t in unseen if t in probed),
        "load_sigma": "population stdev of log('lease complete' seconds / the median of its source)",
        "load_sigma_by_tier": (f"the same per source with at least {SIGMA_LOADS} leases: " + ", ".join(
            f"{t} {len(devs[t])} leases" for t in tier_sigma) if tier_sigma else f"no source with {SIGMA_LOADS} leases"),
        "overhead_s": (f"median of autoscaler 'instance ready' seconds minus lease seconds, {len(timings)} instances, "
                       f"each over max(1, starts in progress / {cores} cores) (time-averaged over its start)"),
        "fresh_process_s": (f"median of the fresh processes' ready 'seconds' minus 'load_s', {n_fresh} starts of "
                            "knative-default/kserve-localcache in this run, each under processor sharing of start_cores (shared_work)"
                            if n_fresh else "no fresh-process start in the logs: overhead_s"),
        "stop_s": (f"median seconds from the autoscaler's 'preempting ... action=evict' to the service's "
                   f"'instance starting', {len(stops)} evictions"
                   if stops else "no eviction with a measured stop in the logs: 0"),
        "fresh_load_s": "per fresh-process profile, the median 'load_s' of its cold starts (replay.json cold_starts)",
        "shared_cores": "meta.machine.cpus: every node's instances start on this machine's CPUs",
        "start_cores": (f"the cores in [1, {cores}] under which the fresh processes' start work (shared_work) is the "
                        "most alike, start to start (start_cores)" if n_fresh else "no fresh-process start: shared_cores"),
        "prefill_s_per_token": f"median TTFT / prompt tokens of {len(warms)} warm requests (HTTP path included; "
                               "sent to an instance with a free slot)",
        "decode_step_s": "median (end - sent - TTFT) / (tokens - 1) of the same warm requests",
        "compute_sigma": "population stdev of log(warm TTFT / its median) over the same warm requests",
        "compute": "per profile, the same three numbers over that profile's own warm requests",
        "activation_s": ("median over instances of their first request's TTFT minus the instance's placement-to-ready "
                         "seconds minus its prefill, those in [0, TICK_S / 2) (a first request that waited for a "
                         "slot waited for the scaler's tick)"),
        "activation": ("per profile with at least 2 such instances, the same median over its own: the sllm-type "
                       "and fresh-process paths differ (the activator's poke, placement, the zygote's fork; the "
                       "controller's poll, a new process); among the sllm-type profiles it is that profile's "
                       "measured condition, as `compute` is"),
    }, compute=compute, activation={name: float(statistics.median(xs)) for name, xs in extras.items() if len(xs) >= 2})


def fresh_load_factor(m: Measured, profile: str) -> float:
    """How many times the loader's load from the tier `profile`'s fresh processes read from
    (the store, or the prestaged SSD of kserve-localcache) their own measured loads took; 1
    where the profile had no fresh-process load."""
    if profile not in m.fresh_load_s or profile not in REPLAY_POLICIES:
        return 1.0
    tier = Tier.SSD if get_policy(REPLAY_POLICIES[profile]).prestaged_ssd else Tier.REMOTE
    loader_s = max(m.load_s[tier], m.load_s[Tier.DRAM])  # the engine's rate: min(tier, DRAM)
    return max(m.fresh_load_s[profile] / loader_s, 1e-3) if loader_s > 0 else 1.0


def hardware(m: Measured, profile: str | None = None) -> HardwareProfile:
    """The this-machine profile from a replay's measurements (a slot is a "GPU"; rates are
    achieved); with `profile`, the compute speed measured while that profile ran and its fresh
    processes' load. An instance here computes on one thread (the replay's `instance_threads`),
    so its prefills run one after another (`serial_prefill`)."""
    params = m.checkpoint_bytes / BYTES_PER_PARAM
    prefill, step, spread = m.compute.get(profile or "", (m.prefill_s_per_token, m.decode_step_s, m.compute_sigma))
    return HardwareProfile(
        name="this-machine (measured)", gpus_per_node=2, gpu_mem_bytes=4 * GB,
        dram_tier_bytes=DRAM_TIER_BYTES, ssd_tier_bytes=SSD_TIER_BYTES,
        nominal={t: m.checkpoint_bytes / s for t, s in m.load_s.items()},
        efficiency={t: 1.0 for t in m.load_s},
        overhead_s=m.overhead_s, fresh_process_s=m.fresh_process_s,
        flops=2.0 * params / prefill, mfu=1.0,
        hbm_bytes_s=2.0 * params / step, hbm_eff=1.0,
        load_noise=m.load_sigma, tier_noise=dict(m.load_sigma_by_tier), shared_cores=m.shared_cores,
        start_cores=m.start_cores,
        compute_noise=spread,
        activation_s=m.activation.get(profile or "", m.activation_s),
        serial_prefill=True, fresh_load_factor=fresh_load_factor(m, profile or ""), stop_s=m.stop_s,
        notes=dict(m.sources))


def profile_document(hw: HardwareProfile) -> dict[str, Any]:
    """`hw` as a profile file (`--hardware file.json`, sim/hardware.py `profile_from_json`)."""
    doc: dict[str, Any] = {"base": "this-machine", **dataclasses.asdict(hw)}
    for key in ("nominal", "efficiency", "tier_noise"):
        doc[key] = {str(t): v for t, v in getattr(hw, key).items()}
    doc["notes"] = dict(hw.notes)
    return doc


def inputs(doc: Mapping[str, Any], profile: str, size_bytes: int) -> tuple[list[Model], list[Request], SimConfig]:
    """The simulator's models, requests and config for one replay profile's run."""
    s = doc["setup"]
    if s.get("slots_per_node") != 2:
        raise ValueError(f"the measured profile has 2 slots per node; the replay had {s.get('slots_per_node')}")
    ckpt = {sh["service"]: f"c{sh['checkpoint']}" for sh in doc["shots"]}
    models = [Model(svc, "replay", size_bytes / BYTES_PER_PARAM, 1, checkpoint=c) for svc, c in sorted(ckpt.items())]
    sent = {o["index"]: o["sent_s"] for o in doc["profiles"].get(profile, {}).get("outcomes", [])}
    reqs = sorted(((sent.get(sh["index"], sh["at_s"]), sh) for sh in doc["shots"]), key=lambda x: (x[0], x[1]["index"]))
    requests = [Request(sh["index"], t, sh["service"], sh["prompt_tokens"], sh["max_tokens"]) for t, sh in reqs]
    cfg = SimConfig(nodes=int(s["nodes"]), capacity=int(s["container_concurrency"]), keep_alive_s=float(s["keep_alive_s"]),
                    max_scale=int(s["max_scale"]), stable_window_s=6.0, seed=int(s.get("seed", 0)), tail_s=600.0,
                    kpa_stand_in=get_policy(REPLAY_POLICIES[profile]).fresh_process)
    return models, requests, cfg


def predict(doc: Mapping[str, Any], profile: str, hw: HardwareProfile, size_bytes: int,
            seeds: int = SEEDS) -> dict[str, Any]:
    """Simulate one replay profile `seeds` times (seeds 0, 1, ...: the load noise and the random
    placements differ); the TTFT statistics over the counted requests as the replay computes
    them, the median over the seeds (with their range): one run's p99 is its second-largest
    TTFT of about a hundred, so one seed's is mostly that seed's noise."""
    models, requests, cfg = inputs(doc, profile, size_bytes)
    policy = dataclasses.replace(get_policy(REPLAY_POLICIES[profile]), keep_alive=True)
    warmup = {s["index"] for s in doc["shots"] if s.get("warmup")}
    runs = []
    for seed in range(seeds):
        sim = Simulation(hw, policy, models, requests, dataclasses.replace(cfg, seed=seed)).run()
        ttft = [t for r, t in zip(sim.requests, sim.ttfts(), strict=True) if r.id not in warmup]
        runs.append({**ttft_stats(ttft), "cold_starts": dict(sorted(sim.stats.cold_starts.items())),
                     "unserved": len(sim.requests) - len(sim.end)})
    out: dict[str, Any] = {}
    for q in ("p50", "p99"):
        xs = [r[f"ttft_{q}_s"] for r in runs]
        out[f"ttft_{q}_s"] = round(statistics.median(xs), 4)
        out[f"ttft_{q}_range_s"] = [min(xs), max(xs)]
    return {**out, "cold_starts": runs[0]["cold_starts"], "unserved": max(r["unserved"] for r in runs)}


def rank_band(n: int, q: float, confidence: float = BAND_CONFIDENCE) -> tuple[int, int]:
    """The 1-based ranks (lo, hi) among `n` sorted samples between which the population's
    q-quantile lies with probability at least `confidence`: the number of samples below it is
    Binomial(n, q), and each side leaves out at most (1 - confidence) / 2 (1 or n where that
    side cannot leave out so little)."""
    if n < 1 or not 0 < q < 1:
        raise ValueError(f"rank_band needs n >= 1 and 0 < q < 1, got n={n}, q={q}")
    tail = (1.0 - confidence) / 2
    cdf, acc = [], 0.0
    for k in range(n + 1):
        acc += math.comb(n, k) * q**k * (1 - q) ** (n - k)
        cdf.append(acc)  # P(X <= k)
    lo = max([k + 1 for k in range(n + 1) if cdf[k] <= tail], default=1)  # P(X < lo) <= tail
    hi = min([u for u in range(1, n + 1) if 1.0 - cdf[u - 1] <= tail], default=n)  # P(X >= hi) <= tail
    return lo, hi


def band(ttfts: Sequence[float], q: float) -> tuple[float, float]:
    """`rank_band`'s samples of `ttfts`: where the q-quantile of the system that produced them
    lies (95%), given that they are only len(ttfts) samples of it."""
    xs = sorted(ttfts)
    lo, hi = rank_band(len(xs), q)
    return xs[lo - 1], xs[hi - 1]


def compare(measured: Mapping[str, Any], predicted: Mapping[str, Any],
            bands: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Per statistic (p50, p99): measured, predicted, predicted / measured, within TOLERANCE; and
    with `bands` (the measured quantile's 95% band, `band`), whether the prediction lies in that
    band widened by TOLERANCE (`within_band`)."""
    out: dict[str, Any] = {}
    for q in ("p50", "p99"):
        m, p = measured.get(f"ttft_{q}_s"), predicted.get(f"ttft_{q}_s")
        ratio = p / m if m and p is not None else None
        out[q] = {"measured_s": m, "predicted_s": p, "ratio": None if ratio is None else round(ratio, 3),
                  "within": ratio is not None and abs(ratio - 1.0) <= TOLERANCE}
        if bands is not None and q in bands:
            lo, hi = bands[q]
            out[q]["band_s"] = [lo, hi]
            out[q]["within_band"] = p is not None and lo * (1 - TOLERANCE) <= p <= hi * (1 + TOLERANCE)
    out["within"] = all(out[q]["within"] for q in ("p50", "p99"))
    return out


def validate(doc: Mapping[str, Any], logs: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    m = measure(doc, logs)
    rows = []
    measured_rows = {r["profile"]: r for r in doc["rows"]}
    for name, row in measured_rows.items():
        if name not in REPLAY_POLICIES or row.get("ttft_p50_s") is None:
            rows.append({"profile": name, "skipped": "no sim policy" if name not in REPLAY_POLICIES else "no numbers"})
            continue
        pred = predict(doc, name, hardware(m, name), m.checkpoint_bytes)
        counted = [o["ttft_s"] for o in doc["profiles"].get(name, {}).get("outcomes", [])
                   if o.get("ok") and not o.get("warmup") and o.get("ttft_s") is not None]
        bands = {f"p{round(q * 100)}": band(counted, q) for q in (0.5, 0.99)} if counted else None
        rows.append({"profile": name, "policy": REPLAY_POLICIES[name], **compare(row, pred, bands),
                     "predicted_range_s": {q: pred[f"ttft_{q}_range_s"] for q in ("p50", "p99")},
                     "measured_cold_starts": row.get("cold_starts_by_tier"),
                     "predicted_cold_starts_seed0": pred["cold_starts"], "unserved": pred["unserved"]})
    return {"tolerance": TOLERANCE, "seeds": SEEDS, "measured": {
                "checkpoint_bytes": m.checkpoint_bytes, "load_s": {str(t): round(v, 4) for t, v in m.load_s.items()},
                "load_sigma": round(m.load_sigma, 3),
                "load_sigma_by_tier": {str(t): round(v, 3) for t, v in m.load_sigma_by_tier.items()},
                "overhead_s": round(m.overhead_s, 4),
                "fresh_process_s": round(m.fresh_process_s, 3),
                "fresh_load_s": {k: round(v, 4) for k, v in m.fresh_load_s.items()},
                "stop_s": round(m.stop_s, 4), "shared_cores": m.shared_cores,
                "start_cores": m.start_cores, "prefill_s_per_token": round(m.prefill_s_per_token, 5),
                "decode_step_s": round(m.decode_step_s, 4), "sources": dict(m.sources),
                "compute_sigma": round(m.compute_sigma, 3), "activation_s": round(m.activation_s, 4),
                "activation_per_profile": {k: round(a, 4) for k, a in m.activation.items()},
                "compute_per_profile": {k: {"prefill_s_per_token": round(a, 5), "decode_step_s": round(b, 4),
                                            "compute_sigma": round(c, 3)} for k, (a, b, c) in m.compute.items()}},
            "rows": rows}


def plot(result: Mapping[str, Any], out: Path, title: str) -> Path:
    """Measured and predicted p50 and p99 TTFT per profile, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "p50" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    for ax, q in zip(axes, ("p50", "p99"), strict=True):
        ax.bar([i - 0.2 for i in x], [r[q]["measured_s"] for r in rows], 0.4, label="measured (replay)")
        ax.bar([i + 0.2 for i in x], [r[q]["predicted_s"] for r in rows], 0.4, label="predicted (sim)")
        for i, r in enumerate(rows):
            ax.text(i, max(r[q]["measured_s"], r[q]["predicted_s"]), f"x{r[q]['ratio']}", ha="center",
                    va="bottom", fontsize=8, color="black" if r[q]["within"] else "red")
        ax.set_xticks(list(x), [r["profile"] for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"TTFT {q} (s)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "validate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
