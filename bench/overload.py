"""Overload: bursts of streaming requests at 1x, 2x and 3x what the slots serve, with our overload
rules and with them switched off, side by side in one run.

    .venv/bin/python -m bench.overload --out DIR [--seconds 60] [--loads 1,2,3] [--max-tokens 400]
                                       [--work DIR]

writes DIR/overload.json and DIR/overload.png. The topology is testkit/overload.py's: a local
cluster of 3 nodes with 2 slots each (real processes: loaders, zygotes, the autoscaler, the
activator), 4 services over 2 checkpoints, one stream per instance (containerConcurrency 1),
seeded streaming completions sent with the official openai client. s1 to s3 begin at once; s4
begins a third of the way in, when the others hold every slot (what fair share is for).

Capacity. A stream holds its instance for its whole answer, and an instance computes with one
thread (its share of the node: exact numerics). One stream alone takes `stream_s` (median of
three on a warm instance); at most min(slots, cores) streams compute at once, so the cluster
serves `min(6, cores) / stream_s` requests per second (on this 2-core machine the 6 slots are
not 6 streams' worth of compute), and load x sends Poisson arrivals at `x` times that for
`--seconds`.

Profiles, each on a fresh cluster:
  ours     the defaults: a fresh instance is protected for minResidency (10 s) and while its
           service has requests waiting; a service waiting past fairShareAfter (15 s) takes an
           instance of a service that holds two.
  rules-off  minResidency 0s and fairShareAfter 24h: placement may displace any ready instance of
           equal priority, and nothing guarantees a waiting service a slot. (The other fixes, an
           idle check that needs the instance's answer and the activator's count, reserved
           migration destinations, and streams that always end in [DONE] or an error, are not
           switchable: they are correctness, not policy.)

Reported per run: requests, failed (no first token), cut streams, answers that differ from the
unloaded reference, p50/p99 time to first token, the peak number of requests in the system,
and the autoscaler's preemptions (done / called off), migrated generations by outcome and
instances stopped while busy. The plot shows TTFT over the burst per run and the instances of
each service over time (sampled every 0.5 s from the autoscaler's API).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import Periodic, exit_on_sigterm, machine, save_figure, write_json
from testkit.overload import (
    NODES,
    SERVICES,
    SLOTS,
    Cluster,
    build_store,
    burst,
    computing_streams,
    local_cluster,
    manifests,
    peak_concurrency,
    references,
    run_burst,
    stream_seconds,
    summarize,
)

PROFILES: dict[str, dict[str, str]] = {
    "ours": {},
    "rules-off": {"minResidency": "0s", "fairShareAfter": "24h"},
}


class Sampler(Periodic):
    """The ready and starting instances of each service, every `interval` seconds."""

    def __init__(self, c: Cluster, interval: float = 0.5) -> None:
        super().__init__(interval, "sampler")
        self.c = c
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def tick(self) -> None:
        try:
            svcs = self.c.services()
        except Exception:  # noqa: BLE001 - a missed sample
            return
        self.rows.append({"t": round(time.monotonic() - self.t0, 2),
                          **{k.split("/", 1)[1]: len(v["instances"]) for k, v in svcs.items()}})

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        super().__enter__()
        return self


def one_run(root: Path, store: Path, profile: str, rate: float, seconds: float, max_tokens: int,
            want: dict[tuple[str, int], str] | None, seed: int) -> tuple[dict[str, Any], dict[tuple[str, int], str]]:
    with local_cluster(root, store) as c:
        c.apply(manifests(store, policy=PROFILES[profile] or None))
        want = want or references(c, max_tokens)
        shots = burst(seconds, rate, seed=seed, late={"s4": seconds / 3})
        with Sampler(c) as sampler:
            outcomes = run_burst(c.activator, shots, max_tokens)
        s = summarize(outcomes, want)
        counters = c.metrics()
    return {
        "profile": profile, "rate_rps": rate, "requests": s.requests, "failed": s.failed, "cut": s.cut,
        "mismatched": s.mismatched, "ttft_p50_s": s.ttft_p50_s, "ttft_p99_s": s.ttft_p99_s,
        "peak_in_system": peak_concurrency(outcomes), "first_token_s": s.first_token_s,
        "autoscaler": counters, "errors": s.errors[:20],
        "ttft": [[round(o.sent_s, 2), o.ttft_s, o.shot.service, o.cut] for o in outcomes],
        "instances": sampler.rows,
    }, want


def plot(path: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 7.5), squeeze=False)
    for k, run in enumerate(runs):
        ax = axes[0][k]
        for svc in SERVICES:
            pts = [(t, ttft) for t, ttft, s, _ in run["ttft"] if s == svc and ttft is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", label=svc)
        lost = [t for t, ttft, _, cut in run["ttft"] if ttft is None or cut]
        if lost:
            ax.plot(lost, [0] * len(lost), "rx", label="failed/cut")
        ax.set_title(f"{run['profile']} @ {run['load']}x: p99 {run['ttft_p99_s'] or 0:.1f}s, "
                     f"lost {run['failed'] + run['cut']}", fontsize=9)
        ax.set_xlabel("sent at (s)")
        ax.set_ylabel("time to first token (s)")
        ax.legend(fontsize=7)
        ax2 = axes[1][k]
        for svc in SERVICES:
            ax2.step([r["t"] for r in run["instances"]], [r.get(svc, 0) for r in run["instances"]], where="post",
                     label=svc)
        ax2.set_xlabel("time (s)")
        ax2.set_ylabel("instances")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.overload", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each burst")
    p.add_argument("--loads", default="1,2,3", help="multiples of what the slots serve")
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--work", type=Path, default=None, help="where the models and clusters live (kept)")
    args = p.parse_args(argv)
    exit_on_sigterm()
    loads = [float(x) for x in args.loads.split(",")]
    root = args.work or Path(tempfile.mkdtemp(prefix="sllm-overload-"))
    store = build_store(root)
    with local_cluster(root / "calibrate", store) as c:
        c.apply(manifests(store))
        want = references(c, args.max_tokens)
        stream_s = stream_seconds(c, args.max_tokens)
    computing = computing_streams()
    capacity = computing / stream_s
    print(f"one stream alone: {stream_s:.2f}s; {computing} streams compute at once ({NODES * SLOTS} slots, "
          f"{os.cpu_count()} cores, one thread an instance): {capacity:.2f} requests/s", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    for i, load in enumerate(loads):
        for profile in PROFILES:
            print(f"[{len(runs) + 1}/{len(loads) * len(PROFILES)}] {profile} at {load:g}x "
                  f"({load * capacity:.2f} requests/s for {args.seconds:g}s)", file=sys.stderr)
            run, _ = one_run(root / f"{profile}-{load:g}", store, profile, load * capacity, args.seconds,
                             args.max_tokens, want, seed=i)
            run["load"] = load
            runs.append(run)
            print(f"    p50/p99 TTFT {run['ttft_p50_s'] or 0:.2f}/{run['ttft_p99_s'] or 0:.2f}s, failed {run['failed']}, "
                  f"cut {run['cut']}, mismatched {run['mismatched']}, peak {run['peak_in_system']} in the system",
                  file=sys.stderr)
    single = statistics.median([o for o in (r["ttft_p50_s"] for r in runs if r["load"] == loads[0]) if o] or [0.0])
    doc = {
        "machine": machine(), "topology": {"nodes": NODES, "slots": SLOTS, "services": SERVICES},
        "stream_s": stream_s, "computing_streams": computing, "capacity_rps": capacity, "seconds": args.seconds, "max_tokens": args.max_tokens,
        "runs": runs,
        "ratios": {f"{r['profile']}@{r['load']:g}x_p99_over_1x_p50": (r["ttft_p99_s"] or 0) / single if single else None
                   for r in runs},
    }
    print(write_json(args.out, "overload", doc))  # creates the folder
    plot(args.out / "overload.png", runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
