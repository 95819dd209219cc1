"""The cluster simulator's own speed: simulated seconds per wall second and events per second.

    .venv/bin/python -m bench.sim --out DIR [--hour] [--large] [--policy sllm]

Runs `sim` (the discrete-event simulator on the real policy code) on the 8-GPU H100 profile:

  small   100 nodes x 8 GPUs, 100 models, the Azure conversation trace at 10x its rate
          (about 55 requests/s); target: at least 1000x faster than real time.
  large   (--large) 1000 nodes x 8 GPUs, 1000 models, the trace at 50x (about 275 requests/s);
          target: a simulated hour in under 10 minutes on these 2 cores.

Each runs for 10 simulated minutes of arrivals, or a full hour with --hour. Writes DIR/sim.json
(the summaries, with `sim_s_per_wall_s`, `events_per_s`, `wall_s`, `cpu_s` and `sim_s_per_cpu_s`,
and the machine's load average before and after) and prints one line per run. Speed depends on
what else the two cores run: the load average is recorded beside each number, and the process's
CPU seconds beside the wall seconds (less sensitive to the others' work than the wall clock).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from bench._common import machine, write_json
from sim.runner import Scenario, simulate

SMALL = Scenario(policy="sllm", hardware="h100x8", nodes=100, models=100, rate=10.0)
LARGE = Scenario(policy="sllm", hardware="h100x8", nodes=1000, models=1000, rate=50.0)
TARGETS = {"small": ("sim_s_per_wall_s", ">=", 1000.0), "large": ("wall_s", "<=", 600.0)}


def run(name: str, s: Scenario) -> dict[str, Any]:
    before = os.getloadavg()[0]
    row = simulate(s)
    metric, op, bound = TARGETS[name]
    value = row[metric]
    met = value >= bound if op == ">=" else value <= bound
    out = {"name": name, "load_before": before, "load_after": os.getloadavg()[0],
           "target": f"{metric} {op} {bound:g}" + (" (for an hour)" if name == "large" else ""),
           "met": met if (name == "small" or s.duration_s >= 3600) else None, **row}
    print(f"{name}: {s.nodes} nodes x 8 GPUs, {s.models} models, {row['requests']} requests over "
          f"{s.duration_s:g} s (simulated {row['simulated_s']:.0f} s): wall {row['wall_s']:.1f} s, "
          f"{row['sim_s_per_wall_s']:.0f}x real time ({row['sim_s_per_cpu_s']:.0f}x per CPU second, "
          f"cpu {row['cpu_s']:.1f} s), {row['events_per_s']:.0f} events/s, "
          f"load average {before:.1f} -> {out['load_after']:.1f}; target {out['target']}: "
          f"{'met' if met else 'not met'}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hour", action="store_true", help="an hour of arrivals instead of 10 minutes")
    ap.add_argument("--large", action="store_true", help="also the 1000-node run")
    ap.add_argument("--policy", default="sllm")
    a = ap.parse_args(argv)
    duration = 3600.0 if a.hour else 600.0
    rows = [run("small", dataclasses.replace(SMALL, policy=a.policy, duration_s=duration))]
    if a.large:
        rows.append(run("large", dataclasses.replace(LARGE, policy=a.policy, duration_s=duration)))
    path = write_json(a.out, "sim", {"machine": machine(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
