"""Soak: bursts from the Azure conversation trace with idle gaps long enough to scale every
service to zero, again and again, on a local cluster of real processes; what the processes and
the disk hold is measured throughout.

    .venv/bin/python -m bench.soak --out DIR [--minutes 10] [--work DIR]

writes DIR/soak.json and DIR/soak.png. The topology is testkit/overload.py's: 3 nodes with 2
slots each, 4 services over 2 checkpoints (containerConcurrency 1), here with a ScalingPolicy
keep-alive of `--keep-alive` seconds so that each gap brings every service back to zero.

One cycle: a burst, then the gap. The burst replays `--burst` seconds of the trace (the window
after the previous cycle's, wrapping at the end of the trace), sampled at `--sample` and
compressed `--compress` times (bench/replay_core.plan: its rules for the window, the sampling and
the request -> service mapping; the trace's token counts are capped at `--max-tokens` generated
tokens and a fixed prompt). Every request is a seeded streaming completion through the
activator with the official openai client. The gap waits until the autoscaler reports no
instance of any service, then `--settle` seconds more. Cycles repeat until `--minutes` have
passed.

Sampled every `--every` seconds, per component (the activator, the autoscaler, each loader and
each zygote, by the pids in the cluster file; a restarted component is a new pid and counts as
a finding): resident memory, open file descriptors, threads and child processes (a zygote's
children are its instances; zombies are counted apart). And on disk: the DRAM tiers' files and
bytes, the Unix sockets, the SSD tiers' staging files, and the files under the instances' logs.

Warm-up is every loader fetching both checkpoints once and the first cycle; the checks compare
the idle sample (every service at zero) after the first cycle with the last one:

- zero failed requests (no first token, or a stream cut);
- no growth in file descriptors (at most FD_GROWTH more), threads (THREAD_GROWTH) or child
  processes (none: at idle a zygote has no instance left), and no zombie;
- memory flat: at the last idle point each component's RSS is within RSS_GROWTH (relative) or
  RSS_GROWTH_MB (absolute) of its first idle point, whichever is larger. The slope of the idle
  points' RSS over time (least squares, MB per minute) is reported beside it;
- the disk bounded at the last idle point: the instances' log files within what the local
  backend keeps (LOGS_KEPT instances), the DRAM tiers within their budgets, no SSD staging file;
- nothing left after `down`: no process of the cluster alive, no socket directory, no DRAM-tier
  files, no SSD staging directory left non-empty.

The short version (`--minutes 1`) runs in `make test` (tests/bench/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from autoscaler.backends.local import LOGS_KEPT
from bench._common import Periodic, machine, save_figure, write_json
from bench.replay_core import plan
from sim.workload import DEFAULT_TRACE, read_trace
from sllm_knative.local.cluster import runtime_dirs
from testkit.overload import (
    NODES,
    SERVICES,
    SLOTS,
    Cluster,
    Outcome,
    Shot,
    build_store,
    local_cluster,
    manifests,
    run_burst,
)

FD_GROWTH = 8
THREAD_GROWTH = 4
RSS_GROWTH = 0.10
RSS_GROWTH_MB = 32.0
DRAM_BUDGET = 1 << 30  # testkit.overload.local_cluster: up --dram-gb 1
# A start prunes the instance logs to LOGS_KEPT before it writes its own, so the files at rest
# are those of LOGS_KEPT instances plus the starts that were under way at once.
LOG_FILES = 2 * (LOGS_KEPT + NODES * SLOTS)


# -- pure: the load and the verdicts ---------------------------------------------------------------


def cycle_shots(rows: Sequence[Any], cycle: int, *, burst_s: float, sample: float, compress: float,
                max_tokens: int, seed: int = 0) -> list[Shot]:
    """Cycle `cycle`'s burst: the trace window [cycle * burst_s, + burst_s) (wrapping around the
    trace's end), by bench/replay_core.plan's rules; popularity rank r goes to service s{r+1}."""
    span = rows[-1].t - rows[0].t
    windows = max(1, int(span // burst_s))
    start = (cycle % windows) * burst_s
    shots = plan(rows, start_s=start, length_s=burst_s, sample=sample, compress=compress,
                 services=len(SERVICES), checkpoints=2, zipf=1.0, max_prompt_tokens=1, max_tokens=max_tokens,
                 seed=seed)
    names = list(SERVICES)
    return [Shot(s.at_s, names[int(s.service[1:])], s.index % 4) for s in shots]


def slope_mb_per_min(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, bytes) points, in MB per minute; None under two points."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60 / 1e6


def check(first: Mapping[str, Mapping[str, int]], last: Mapping[str, Mapping[str, int]], failed: int,
          left_after_down: Sequence[str], disk: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """The soak's targets from the first and last idle samples (component -> stats) and the
    last idle sample's disk (`disk_stats`)."""
    out = [{"target": "zero failed requests", "value": failed, "met": failed == 0}]
    if disk is not None:
        out += [
            {"target": f"instance log files <= {LOG_FILES} (a log and a timing file each of the {LOGS_KEPT} "
                       f"kept and of the starts under way, at most one a slot)",
             "value": disk["instance_logs"], "met": disk["instance_logs"] <= LOG_FILES},
            {"target": f"DRAM tiers within their budgets (<= {NODES} x {DRAM_BUDGET >> 30} GiB)",
             "value": disk["dram_bytes"], "met": disk["dram_bytes"] <= NODES * DRAM_BUDGET},
            {"target": "no SSD staging file at idle", "value": disk["ssd_staging_files"],
             "met": disk["ssd_staging_files"] == 0},
        ]
    for name in sorted(first):
        a, b = first[name], last.get(name)
        if b is None or b.get("pid") != a.get("pid"):
            out.append({"target": f"{name}: the same process throughout", "value": None, "met": False})
            continue
        rss_bound = max(a["rss"] * (1 + RSS_GROWTH), a["rss"] + RSS_GROWTH_MB * 1e6)
        out += [
            {"target": f"{name}: RSS flat (<= {rss_bound / 1e6:.0f} MB)", "value": round(b["rss"] / 1e6, 1),
             "met": b["rss"] <= rss_bound},
            {"target": f"{name}: fds grow <= {FD_GROWTH}", "value": b["fds"] - a["fds"],
             "met": b["fds"] - a["fds"] <= FD_GROWTH},
            {"target": f"{name}: threads grow <= {THREAD_GROWTH}", "value": b["threads"] - a["threads"],
             "met": b["threads"] - a["threads"] <= THREAD_GROWTH},
            {"target": f"{name}: no child process at idle", "value": b["children"],
             "met": b["children"] == 0 or not name.startswith("zygote")},
            {"target": f"{name}: no zombie", "value": b["zombies"], "met": b["zombies"] == 0},
        ]
    out.append({"target": "nothing left after down", "value": list(left_after_down), "met": not left_after_down})
    return out


# -- measuring ---------------------------------------------------------------------------------------


def process_stats(pid: int) -> dict[str, int] | None:
    """RSS, fds, threads, children (zombies apart) of `pid`; None when it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            kids = p.children(recursive=True)
            zombies = sum(1 for k in kids if k.status() == psutil.STATUS_ZOMBIE)
            return {"pid": pid, "rss": p.memory_info().rss, "fds": p.num_fds(), "threads": p.num_threads(),
                    "children": len(kids) - zombies, "zombies": zombies}
    except psutil.Error:
        return None


def disk_stats(state: Path) -> dict[str, int]:
    sockets, dram = runtime_dirs(state)
    dram_files = [p for p in dram.rglob("*") if p.is_file()] if dram.exists() else []
    staging = [p for p in (state / "nodes").glob("*/ssd/.staging/**/*") if p.is_file()]
    logs = [p for p in (state / "logs" / "instances").rglob("*") if p.is_file()]
    return {"dram_files": len(dram_files), "dram_bytes": sum(p.stat().st_size for p in dram_files),
            "sockets": sum(1 for p in sockets.rglob("*") if p.is_socket()) if sockets.exists() else 0,
            "ssd_staging_files": len(staging), "instance_logs": len(logs)}


class Recorder(Periodic):
    """Samples of every component, the instances and the disk, every `every` seconds, in a thread."""

    def __init__(self, c: Cluster, every: float) -> None:
        super().__init__(every, "recorder")
        self.c = c
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def sample(self, phase: str) -> dict[str, Any]:
        doc = json.loads((self.c.state / "cluster.json").read_text())
        comps = {name: process_stats(int(pid)) for name, pid in doc.get("components", {}).items()}
        try:
            instances = sum(len(s["instances"]) for s in self.c.services().values())
        except Exception:  # noqa: BLE001 - a missed reading, not a failure of the soak
            instances = -1
        row = {"t": round(time.monotonic() - self.t0, 2), "phase": phase, "instances": instances,
               "components": {k: v for k, v in comps.items() if v is not None}, "disk": disk_stats(self.c.state)}
        self.rows.append(row)
        return row

    def tick(self) -> None:
        self.sample("run")


def wait_zero(c: Cluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not s["instances"] for s in c.services().values()):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the services did not scale back to zero within {timeout_s:.0f}s")


def warm_loaders(c: Cluster, store: Path) -> None:
    """Warm-up: every node's loader fetches both checkpoints into its DRAM tier once, so that a
    loader's first fill (its transfer threads and buffers) is not read as growth later."""
    from sllm_knative.loader.client import LoaderClient

    for node in c.doc["nodes"]:
        with LoaderClient(node["loader"], timeout=120) as client:
            for ckpt in sorted(set(SERVICES.values())):
                client.prefetch(f"file://{store}/{ckpt}", tier="dram", wait=True)


def left_behind(state: Path, pids: Sequence[int]) -> list[str]:
    """What `down` should have removed and did not."""
    sockets, dram = runtime_dirs(state)
    out = [f"process {pid}" for pid in pids if psutil.pid_exists(pid)
           and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    if sockets.exists():
        out.append(f"socket directory {sockets}")
    if dram.exists() and any(p.is_file() for p in dram.rglob("*")):
        out.append(f"DRAM-tier files under {dram}")
    out += [f"staging {p}" for p in (state / "nodes").glob("*/ssd/.staging/*")]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work or tempfile.mkdtemp(prefix="sllm-soak-"))
    store = build_store(work)
    rows = read_trace(DEFAULT_TRACE)
    state = work / "state"
    outcomes: list[Outcome] = []
    idle: list[dict[str, Any]] = []
    pids: list[int] = []
    deadline = time.monotonic() + args.minutes * 60
    with local_cluster(state, store) as c:
        c.apply(manifests(store, keep_alive=f"{args.keep_alive}s"))
        warm_loaders(c, store)
        with Recorder(c, args.every) as rec:
            cycle = 0
            while cycle == 0 or time.monotonic() < deadline:
                shots = cycle_shots(rows, cycle, burst_s=args.burst, sample=args.sample, compress=args.compress,
                                    max_tokens=args.max_tokens, seed=args.seed)
                got = run_burst(c.activator, shots, args.max_tokens)
                outcomes += got
                wait_zero(c, args.keep_alive + 120)
                time.sleep(args.settle)
                idle.append(rec.sample("idle"))
                failed = sum(1 for o in got if o.failed or o.cut)
                print(f"cycle {cycle + 1}: {len(got)} requests, {failed} failed, "
                      f"{max(0.0, deadline - time.monotonic()):.0f}s left", file=sys.stderr, flush=True)
                cycle += 1
        for comp in idle[-1]["components"].values():
            pids.append(comp["pid"])
        pids += [p.pid for pid in list(pids) if psutil.pid_exists(pid)
                 for p in psutil.Process(pid).children(recursive=True)]
    left = left_behind(state, pids)
    failed = sum(1 for o in outcomes if o.failed or o.cut)
    first, last = idle[0]["components"], idle[-1]["components"]
    slopes = {name: slope_mb_per_min([(r["t"], r["components"][name]["rss"]) for r in idle
                                      if name in r["components"]]) for name in first}
    return {
        "bench": "soak", "machine": machine(), "cycles": len(idle),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "requests": len(outcomes), "failed": failed,
        "errors": [o.error for o in outcomes if o.error][:20],
        "ttft_s": sorted(o.ttft_s for o in outcomes if o.ttft_s is not None),
        "first_idle": idle[0], "last_idle": idle[-1], "rss_slope_mb_per_min": slopes,
        "left_after_down": left, "targets": check(first, last, failed, left, idle[-1]["disk"]),
        "samples": rec.rows,
    }


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    names = sorted({n for r in doc["samples"] for n in r["components"]})
    for name in names:
        pts = [(r["t"], r["components"][name]["rss"] / 1e6) for r in doc["samples"] if name in r["components"]]
        top.plot([t for t, _ in pts], [v for _, v in pts], label=name, linewidth=1)
    top.set_ylabel("RSS (MB)")
    top.legend(fontsize=7, ncol=3)
    top.set_title(f"soak: {doc['cycles']} cycles, {doc['requests']} requests, {doc['failed']} failed")
    bottom.step([r["t"] for r in doc["samples"]], [max(0, r["instances"]) for r in doc["samples"]], where="post")
    bottom.set_ylabel("instances")
    bottom.set_xlabel("seconds")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--work", default=None, help="where the store and the cluster live (default: a temp dir)")
    p.add_argument("--burst", type=float, default=30.0, help="seconds of trace per burst")
    p.add_argument("--sample", type=float, default=0.2, help="fraction of the trace's requests sent")
    p.add_argument("--compress", type=float, default=2.0, help="time compression of the trace")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--keep-alive", type=float, default=2.0, help="ScalingPolicy keep-alive (s)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds at zero before the idle sample")
    p.add_argument("--every", type=float, default=1.0, help="sampling period (s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    doc = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_json(args.out, "soak", doc))
    print(plot(doc, args.out / "soak.png"))
    for t in doc["targets"]:
        if not t["met"]:
            print(f"NOT MET: {t['target']}: {t['value']}", file=sys.stderr)
    return 0 if all(t["met"] for t in doc["targets"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

