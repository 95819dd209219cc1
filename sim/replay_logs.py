"""What one `bench/replay.py` run's logs and outcomes say, read for the validation (sim/validate.py).

The log-line parsers (`fields`, `stamp`; per instance `instance_timings`, per fresh process
`fresh_timings`, per eviction `stop_times`, the loaders' bandwidth `probe`), the measures of
starts that shared the CPU (`sharing`, `work`, `shared_work`, `start_cores`), and which requests
were warm (`warm`). `measure` in sim/validate.py builds this machine's profile from them.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sllm_knative.placement import Tier

#: the tier names of the autoscaler's `placed` lines and the loader's `lease complete` lines
SOURCES = {"dram": Tier.DRAM, "ssd": Tier.SSD, "remote": Tier.REMOTE}

_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    """The key=value fields of one log line (values may be double-quoted)."""
    return {k: v[1:-1] if v.startswith('"') else v for k, v in _KV.findall(line)}


def stamp(line: str) -> float:
    """A log line's time (its leading ISO timestamp, UTC) in seconds; nan when it has none."""
    try:
        return datetime.fromisoformat(line[:23]).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return math.nan


def instance_timings(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Per instance, from the autoscaler's and the instances' log lines of one profile: the tier
    its lease came from, the bytes, the lease seconds, the seconds from placement to ready, and
    when it was ready (`end`, the autoscaler line's time). Instances without both a lease and a
    ready line are left out."""
    lease: dict[str, dict[str, str]] = {}
    ready: dict[str, tuple[float, float]] = {}
    placed: dict[str, str] = {}
    for line in lines:
        if 'msg="lease complete"' in line:
            f = fields(line)
            lease[f["instance"]] = f
        elif 'msg="instance ready"' in line:
            f = fields(line)
            ready[f["instance"]] = (float(f["seconds"]), stamp(line))
        elif "msg=placed" in line:
            f = fields(line)
            placed[f["instance"]] = f.get("tier", "")
    return [{"instance": i, "source": f["source"], "placed": placed.get(i, f["source"]), "bytes": int(f["bytes"]),
             "lease_s": float(f["seconds"]), "ready_s": ready[i][0], "end": ready[i][1]}
            for i, f in sorted(lease.items()) if i in ready and placed.get(i, f["source"]) in SOURCES]


def fresh_timings(lines: Iterable[str], since: float = -math.inf) -> list[dict[str, Any]]:
    """Per fresh process (bench/_fresh.py's instances log `msg=ready ... seconds load_s` with no
    lease), from its ready line at or after `since`: seconds from spawn to ready, its load
    seconds, and when it was ready (`end`)."""
    out = []
    for line in lines:
        if "msg=ready" in line and "load_s=" in line and "lease_s=" not in line:
            f, t = fields(line), stamp(line)
            if t >= since:
                out.append({"instance": f["instance"], "ready_s": float(f["seconds"]), "load_s": float(f["load_s"]),
                            "end": t})
    return out


def stop_times(lines: Iterable[str]) -> list[float]:
    """Per eviction in the autoscaler's log, the seconds from its decision (`msg=preempting ...
    action=evict`) to the new instance of that service starting (`msg="instance starting"`):
    how long the victim's slot took to free. (Newer logs also carry it as `stop_s` on the
    `placed` line; the timestamps serve older ones too.)"""
    pending: dict[str, float] = {}
    out = []
    for line in lines:
        if "msg=preempting" in line and "action=evict" in line:
            pending[fields(line).get("service", "")] = stamp(line)
        elif 'msg="instance starting"' in line:
            t0 = pending.pop(fields(line).get("service", ""), None)
            if t0 is not None and math.isfinite(t0):
                out.append(stamp(line) - t0)
    return out


def sharing(timings: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per start (`end - ready_s` to `end`), the time-averaged number of starts in progress
    (itself included): how many shared the CPU with it."""
    spans = [(t["end"] - t["ready_s"], t["end"]) for t in timings]
    out = []
    for a, b in spans:
        if b <= a:
            out.append(1.0)
            continue
        overlap = sum(max(0.0, min(b, d) - max(a, c)) for c, d in spans)
        out.append(overlap / (b - a))
    return out


def read_logs(profile_dir: Path) -> list[str]:
    lines: list[str] = []
    for f in sorted(profile_dir.rglob("*.log")):
        lines.extend(f.read_text(errors="replace").splitlines())
    return lines


def probe(lines: Iterable[str]) -> dict[str, float]:
    """A loader sidecar's bandwidth probe (`msg="bandwidth measured" hop=... bytes=... seconds=...`
    lines) as hop -> bytes/s, the median over the lines of each hop."""
    seen: dict[str, list[float]] = {}
    for line in lines:
        if 'msg="bandwidth measured"' in line:
            f = fields(line)
            if float(f.get("seconds", 0)) > 0:
                seen.setdefault(f["hop"], []).append(int(f["bytes"]) / float(f["seconds"]))
    return {hop: statistics.median(xs) for hop, xs in seen.items()}


def work(timings: Sequence[Mapping[str, Any]], load: str, cores: float) -> list[float]:
    """Each start's overhead beyond its load (`ready_s - timings[load]`), divided by how many
    starts shared the `cores` with it (`sharing`; 0 cores: none)."""
    return [(t["ready_s"] - t[load]) / (max(1.0, k / cores) if cores else 1.0)
            for t, k in zip(timings, sharing(timings), strict=True)]


def shared_work(timings: Sequence[Mapping[str, Any]], load: str, cores: float) -> list[float]:
    """Each start's work beyond its load under processor sharing of `cores`, as the simulator
    runs fresh processes (`Simulation._share`): over its work phase (from `end - ready_s` to its
    load, the last `timings[load]` seconds), each moment counts min(1, cores / the starts in
    their work phase then)."""
    spans = [(t["end"] - t["ready_s"], t["end"] - t[load]) for t in timings]
    cuts = sorted({x for span in spans for x in span})
    pieces = [(a, b, sum(1 for c, d in spans if c <= a and b <= d)) for a, b in zip(cuts, cuts[1:], strict=False)]
    return [sum((b - a) * min(1.0, cores / n) for a, b, n in pieces if n and c <= a and b <= d) for c, d in spans]


def start_cores(runs: Sequence[Sequence[Mapping[str, Any]]], load: str, cpus: int, step: float = 0.05) -> float:
    """The cores that starts sharing the CPU got in effect: the count in [1, `cpus`] (in `step`s)
    under which their work (`shared_work`, over each run of `runs` in turn) is the most alike from start
    to start: the least spread of log(work). A start alone fixes the work; the starts that
    overlapped others then say how much of the CPU they shared. Those took longer than sharing
    all `cpus` says, where other work (the replay's clients, the serving instances) took its
    share. `cpus` when no start overlapped another (every count fits alike) or no run has two."""
    if cpus <= 1 or sum(len(ts) for ts in runs) < 2:
        return float(cpus)
    best, least = float(cpus), math.inf
    for k in range(int(round((cpus - 1) / step)), -1, -1):  # from all the CPUs down: a tie keeps the most
        cores = 1.0 + k * step
        logs = [math.log(w) for ts in runs for w in shared_work(ts, load, cores) if w > 0]
        spread = statistics.pstdev(logs) if len(logs) > 1 else 0.0
        if spread < least - 1e-9:
            best, least = cores, spread
    return round(best, 2)


def warm(outcomes: Sequence[Mapping[str, Any]], concurrency: int = 0) -> list[Mapping[str, Any]]:
    """The requests sent to an instance that had already produced a first token (no cold start
    in their TTFT) and, with `concurrency` > 0, had room for them: fewer than `concurrency` other
    requests of that instance sent before and not yet ended. A request sent to a full instance
    waits in the activator for a slot, and its TTFT is that wait, not the compute (a deep queue
    once made the per-token prefill 0.45 s instead of 5-8 ms)."""
    first: dict[str, float] = {}
    out = []
    done = sorted((o for o in outcomes if o.get("ok") and o.get("instance")), key=lambda o: o["sent_s"])
    for k, o in enumerate(done):
        inst = o["instance"]
        busy = sum(1 for p in done[:k] if p["instance"] == inst and p["end_s"] > o["sent_s"])
        if inst in first and first[inst] < o["sent_s"] and (concurrency <= 0 or busy < concurrency):
            out.append(o)
        first[inst] = min(first.get(inst, math.inf), o["sent_s"] + o["ttft_s"])
    return out


def logs_of(replay_json: Path) -> dict[str, list[str]]:
    """replay-logs/<profile>/**.log beside the replay JSON, per profile."""
    root = replay_json.parent / "replay-logs"
    return {d.name: read_logs(d) for d in sorted(root.iterdir()) if d.is_dir()} if root.is_dir() else {}
