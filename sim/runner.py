"""One simulated run, a sweep over request rates, and their summaries (JSON-ready dicts) and plots.

    summary = simulate(Scenario(policy="sllm", hardware="h100x8", nodes=4, models=32, rate=2.0))
    rows = sweep(base_scenario, policies, rates)       # one summary per (policy, rate)
    plot_sweep(rows, out_dir)                            # p50/p99 TTFT and SLO against load

A summary holds: TTFT p50/p90/p99/max/mean, end-to-end p50/p99, SLO attainment at TTFT <= 1 s and
<= 5 s, GPU-hours, cold starts by tier, migrations and the tokens they moved, preemptions,
and the simulator's own speed (events, wall seconds, simulated seconds per wall second).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.cluster import SimConfig
from sim.engine import Simulation
from sim.hardware import get_profile
from sim.policies import get_policy
from sim.workload import DEFAULT_TRACE, SIZE_WEIGHTS, SIZES, catalog, read_trace, scale_trace

SLO_S = (1.0, 5.0)


@dataclass(frozen=True)
class Scenario:
    policy: str = "sllm"
    hardware: str = "h100x8"
    nodes: int = 4
    models: int = 32
    rate: float = 1.0  # times the trace's request rate (5.5 requests/s for the conversation trace)
    duration_s: float = 600.0
    zipf: float = 1.0
    seed: int = 0
    capacity: int = 8
    keep_alive_s: float = 60.0
    kinds: str = ""  # comma-separated checkpoint kinds to draw sizes from (workload.SIZES); empty: all
    trace: str = str(DEFAULT_TRACE)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def sizes_of(kinds: str) -> tuple[list[tuple[str, float]], list[float]]:
    """The sizes and weights to draw models from: those of `kinds` (equal weights), else all."""
    if not kinds:
        return list(SIZES), list(SIZE_WEIGHTS)
    known = dict(SIZES)
    names = [k for k in kinds.split(",") if k]
    for k in names:
        if k not in known:
            raise ValueError(f"unknown model kind {k!r}; known: {', '.join(known)}")
    return [(k, known[k]) for k in names], [1.0] * len(names)


def build(s: Scenario) -> Simulation:
    hw = get_profile(s.hardware)
    policy = get_policy(s.policy)
    models = catalog(s.models, s.seed, hw.gpu_mem_bytes, hw.gpus_per_node, *sizes_of(s.kinds))
    requests = scale_trace(read_trace(Path(s.trace)), [m.name for m in models], rate=s.rate,
                           duration_s=s.duration_s, zipf=s.zipf, seed=s.seed)
    cfg = SimConfig(nodes=s.nodes, capacity=s.capacity, keep_alive_s=s.keep_alive_s, seed=s.seed)
    return Simulation(hw, policy, models, requests, cfg)


def summarize(sim: Simulation, wall_s: float) -> dict[str, Any]:
    ttft = sim.ttfts()
    e2e = sim.latencies()
    n = len(ttft)
    st = sim.stats
    served = len(sim.end)
    sim_s = sim.now
    return {
        "policy": sim.policy.name,
        "hardware": sim.hw.name,
        "nodes": len(sim.nodes),
        "gpus": len(sim.nodes) * sim.hw.gpus_per_node,
        "models": len(sim.models),
        "requests": n,
        "served": served,
        "unserved": n - served,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_max_s": max(ttft) if ttft else math.nan,
        "ttft_mean_s": sum(ttft) / n if n else math.nan,
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "slo_ttft_1s": sum(1 for x in ttft if x <= SLO_S[0]) / n if n else math.nan,
        "slo_ttft_5s": sum(1 for x in ttft if x <= SLO_S[1]) / n if n else math.nan,
        "gpu_hours": st.gpu_seconds / 3600.0,
        "cold_starts": dict(sorted(st.cold_starts.items())),
        "migrations": st.migrations,
        "migrated_tokens": st.migrated_tokens,
        "preemptions": st.preemptions,
        "restarted_generations": st.restarted,
        "lost_tokens": st.lost_tokens,
        "evictions": st.evictions,
        "called_off": st.called_off,
        "placements": st.placements,
        "unplaced_attempts": st.unplaced,
        "events": st.events,
        "simulated_s": sim_s,
        "wall_s": wall_s,
        "sim_s_per_wall_s": sim_s / wall_s if wall_s > 0 else math.inf,
        "events_per_s": st.events / wall_s if wall_s > 0 else math.inf,
    }


def simulate(s: Scenario) -> dict[str, Any]:
    sim = build(s)
    t0, c0 = time.perf_counter(), time.process_time()
    sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds beside wall seconds: on a shared machine the wall clock counts the others' work too.
    return {"scenario": dataclasses.asdict(s), "request_rate_per_s": len(sim.requests) / s.duration_s,
            **summarize(sim, wall), "cpu_s": cpu, "sim_s_per_cpu_s": sim.now / cpu if cpu > 0 else math.inf}


def sweep(base: Scenario, policies: Sequence[str], rates: Sequence[float], log: Any = None) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        for policy in policies:
            row = simulate(dataclasses.replace(base, policy=policy, rate=rate))
            rows.append(row)
            if log is not None:
                log(f"{policy:18s} rate x{rate:<5g} {row['request_rate_per_s']:7.2f} req/s  "
                    f"ttft p50 {row['ttft_p50_s']:8.3f} s  p99 {row['ttft_p99_s']:8.3f} s  "
                    f"slo1 {row['slo_ttft_1s']:.3f}  gpu-h {row['gpu_hours']:7.2f}  "
                    f"migr {row['migrations']:5d}  preempt {row['preemptions']:4d}  "
                    f"wall {row['wall_s']:6.1f} s")
    return rows


def plot_sweep(rows: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """p50 and p99 TTFT, and SLO attainment, against the request rate, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for p in policies:
        mine = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["request_rate_per_s"])
        x = [r["request_rate_per_s"] for r in mine]
        axes[0].plot(x, [r["ttft_p50_s"] for r in mine], marker="o", label=p)
        axes[1].plot(x, [r["ttft_p99_s"] for r in mine], marker="o", label=p)
        axes[2].plot(x, [r["slo_ttft_5s"] for r in mine], marker="o", label=p)
    for ax, name in zip(axes, ("TTFT p50 (s)", "TTFT p99 (s)", "SLO attainment, TTFT <= 5 s"), strict=True):
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ttft_vs_load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
