"""Whether the simulator's outputs for fixed seeds are byte-identical to a saved set: the check
that a speed-up of the simulator (or of the policy code it runs) changed nothing it computes.

    .venv/bin/python -m bench.sim_identical --out DIR              # write DIR/<run>.json
    .venv/bin/python -m bench.sim_identical --out DIR2 --against DIR   # and compare with DIR

Runs every policy on 4 nodes (two loads), the load-time and preemption policies on 40 nodes
(where placement gets a shortlist), the 100-node run of bench.sim for 10 minutes, and a
replay-like configuration (max-scale 1, a 6 s window). Each run's file holds
the summary without the speed fields, every request's TTFT and end-to-end latency (repr: every
bit), the start trace, and each service's final decider state and metric window. Exit status
1 when a run's file differs from the one in --against (the first differing line is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from sim.cluster import SimConfig
from sim.engine import Simulation
from sim.hardware import get_profile
from sim.policies import POLICIES, get_policy
from sim.runner import Scenario, build, sizes_of, summarize
from sim.workload import catalog, read_trace, scale_trace

SPEED = ("wall_s", "sim_s_per_wall_s", "events_per_s")


def _replay_like(policy: str) -> Simulation:
    s = Scenario(policy=policy, nodes=2, models=6, rate=1.0, duration_s=600.0, kinds="llama-3.1-8b")
    hw = get_profile(s.hardware)
    models = catalog(s.models, s.seed, hw.gpu_mem_bytes, hw.gpus_per_node, *sizes_of(s.kinds))
    requests = scale_trace(read_trace(Path(s.trace)), [m.name for m in models], rate=s.rate,
                           duration_s=s.duration_s, zipf=s.zipf, seed=s.seed)
    cfg = SimConfig(nodes=s.nodes, capacity=4, keep_alive_s=20.0, max_scale=1, stable_window_s=6.0, tail_s=600.0)
    return Simulation(hw, get_policy(policy), models, requests, cfg)


def runs() -> dict[str, Callable[[], Simulation]]:
    out: dict[str, Callable[[], Simulation]] = {}
    for p in POLICIES:
        for rate in (2.0, 8.0):
            s = Scenario(policy=p, nodes=4, models=32, rate=rate, duration_s=600.0)
            out[f"{p}-4n-x{rate:g}"] = partial(build, s)
    for p in ("sllm", "serverlessllm", "preemption-based", "locality-blind"):
        s = Scenario(policy=p, nodes=40, models=80, rate=6.0, duration_s=600.0)
        out[f"{p}-40n-x6"] = partial(build, s)
    s = Scenario(policy="sllm", nodes=100, models=100, rate=10.0, duration_s=600.0)
    out["sllm-100n-x10"] = partial(build, s)
    for p in ("sllm", "knative-default"):
        out[f"{p}-replay-like"] = partial(_replay_like, p)
    return out


def fingerprint(sim: Simulation) -> dict[str, Any]:
    summary = {k: v for k, v in summarize(sim, 1.0).items() if k not in SPEED}
    return {
        "summary": {k: repr(v) if isinstance(v, float) else v for k, v in summary.items()},
        "ttfts": [repr(x) for x in sim.ttfts()],
        "latencies": [repr(x) for x in sim.latencies()],
        "trace": [[a, b, c, d, repr(t)] for a, b, c, d, t in sim.trace],
        "services": {name: {"state": repr(svc.state), "window": repr(svc.window), "desired": svc.desired,
                            "active": svc.active}
                     for name, svc in sim.services.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_identical", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--against", type=Path, help="a directory an earlier run wrote")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    only = {x for x in a.only.split(",") if x}
    bad = 0
    for name, make in runs().items():
        if only and name not in only:
            continue
        text = json.dumps(fingerprint(make().run()), indent=1, sort_keys=True) + "\n"
        (a.out / f"{name}.json").write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        verdict = ""
        if a.against is not None:
            old = (a.against / f"{name}.json").read_text()
            if old == text:
                verdict = "identical"
            else:
                bad += 1
                diff = next(((i, x, y) for i, (x, y) in enumerate(zip(old.splitlines(), text.splitlines(),
                                                                        strict=False)) if x != y), None)
                verdict = f"DIFFERS (line {diff[0] + 1}: {diff[1].strip()} -> {diff[2].strip()})" if diff \
                    else "DIFFERS (length)"
        print(f"{name:32s} {digest} {verdict}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
