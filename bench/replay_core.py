"""The pure part of bench/replay.py: which trace rows are replayed, when, to which service, with
which caps; and what a profile's outcomes add up to (percentiles, SLO attainment, cold starts,
instance-seconds, the targets). No processes, no clocks: table-driven tests in
tests/bench/test_replay_core.py.

Rules, stated so that a run can be reproduced:

1. Window: the trace rows (sim.workload.read_trace, the vendored Azure conversation trace) with
   `start_s <= t < start_s + length_s`, their times made relative to `start_s`.
2. Sampling: row i of the window (0-based) is kept when `unit(seed, "sample", i) < rate`, where
   `unit` is a SHA-256 of the seed, a tag and the index read as a number in [0, 1): the same
   window and rate keep the same rows on every machine, and a lower rate keeps a subset of a
   higher rate's rows.
3. Compression: a kept row's send time is `t / compress`.
4. Services: request k (0-based among the kept rows) goes to service `s{r}` where r is drawn
   from Zipf(`zipf`) popularity over the ranks with `unit(seed, "service", k)` (rank 0 the most
   popular; the service names are the ranks). Service `s{r}` serves checkpoint `r % checkpoints`,
   so several services share one checkpoint.
5. Caps: prompt tokens `min(row.prompt, max_prompt_tokens)`, generated tokens
   `min(row.output, max_tokens)`; the prompt is token ids `(7 * k + j) % vocab + 1` for j in
   range(prompt tokens) (deterministic, not text; every profile sends the same ids).
6. Warm-up: with `warmup_s`, rules 1-5 apply to the window `[start_s - warmup_s, start_s +
   length_s)` and the shots before `start_s` are marked `warmup`: sent like the others (they
   bring the cluster to the state a running system is in: checkpoints in the tiers, instances
   up), but left out of the latency statistics (a failed one still counts as failed).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from bench._common import percentile
from sim.workload import TraceRow, zipf_weights

SLOS_S = (1.0, 5.0)
#: issue 16 §1: sllm's p99 TTFT this many times lower than each peer's; every ablation's worse.
P99_RATIO_TARGETS = {"knative-default": 10.0, "ray-serve": 10.0, "kserve-localcache": 3.0}
ABLATIONS = ("no-dram-tier", "no-locality", "no-migration")


@dataclass(frozen=True)
class Shot:
    """One replayed request: sent `at_s` seconds after the replay starts."""

    index: int  # among the kept rows
    at_s: float
    service: str
    checkpoint: int
    prompt_tokens: int
    max_tokens: int
    trace_t: float  # its time in the trace (seconds since the trace's first row)
    warmup: bool = False  # rule 6: sent, not counted in the latency statistics

    def prompt_ids(self, vocab: int) -> list[int]:
        return [(7 * self.index + j) % (vocab - 1) + 1 for j in range(self.prompt_tokens)]


def unit(seed: int, tag: str, index: int) -> float:
    """A deterministic number in [0, 1) from (seed, tag, index)."""
    h = hashlib.sha256(f"{seed}/{tag}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def window(rows: Sequence[TraceRow], start_s: float, length_s: float) -> list[TraceRow]:
    """Rule 1: the rows in [start_s, start_s + length_s), times relative to start_s."""
    if start_s < 0 or length_s <= 0:
        raise ValueError(f"window start must be >= 0 and length > 0, got {start_s}, {length_s}")
    lo = bisect.bisect_left([r.t for r in rows], start_s)
    out = []
    for r in rows[lo:]:
        if r.t >= start_s + length_s:
            break
        out.append(TraceRow(r.t - start_s, r.prompt, r.output))
    return out


def service_of(k: int, services: int, zipf: float, seed: int) -> int:
    """Rule 4: the popularity rank (0 = most popular) of request k's service."""
    if services < 1:
        raise ValueError(f"need at least one service, got {services}")
    cum = list(accumulate(zipf_weights(services, zipf)))
    return min(services - 1, bisect.bisect_right(cum, unit(seed, "service", k) * cum[-1]))


def plan(rows: Sequence[TraceRow], *, start_s: float, length_s: float, sample: float, compress: float,
         services: int, checkpoints: int, zipf: float, max_prompt_tokens: int, max_tokens: int,
         seed: int = 0, warmup_s: float = 0.0) -> list[Shot]:
    """Rules 1-6: the shots of one replay, in send order."""
    if not 0 < sample <= 1:
        raise ValueError(f"sample must be in (0, 1], got {sample}")
    if compress <= 0:
        raise ValueError(f"compress must be > 0, got {compress}")
    if checkpoints < 1 or max_prompt_tokens < 1 or max_tokens < 1:
        raise ValueError("checkpoints, max_prompt_tokens and max_tokens must be >= 1")
    if not 0 <= warmup_s <= start_s:
        raise ValueError(f"warmup_s must be in [0, start_s = {start_s}], got {warmup_s}")
    begin = start_s - warmup_s
    kept = [r for i, r in enumerate(window(rows, begin, warmup_s + length_s)) if unit(seed, "sample", i) < sample]
    out = []
    for k, r in enumerate(kept):
        rank = service_of(k, services, zipf, seed)
        out.append(Shot(k, round(r.t / compress, 4), f"s{rank}", rank % checkpoints,
                        min(r.prompt, max_prompt_tokens), min(r.output, max_tokens), round(r.t + begin, 4),
                        warmup=r.t < warmup_s))
    return out


# -- outcomes -> summary ------------------------------------------------------------------------------


def slo_attainment(ttfts: Sequence[float | None], slo_s: float) -> float:
    """The fraction of requests whose first token came within slo_s (a failed request misses)."""
    if not ttfts:
        return 0.0
    return sum(1 for t in ttfts if t is not None and t <= slo_s) / len(ttfts)


def ttft_stats(ttfts: Sequence[float | None]) -> dict[str, Any]:
    """Nearest-rank p50/p90/p99/max over the requests that got a first token, and SLO attainment
    over all of them."""
    ok = [t for t in ttfts if t is not None]
    out: dict[str, Any] = {f"ttft_{k}_s": round(percentile(ok, q), 4) if ok else None
                           for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
    for slo in SLOS_S:
        out[f"slo_{slo:g}s"] = round(slo_attainment(ttfts, slo), 4)
    return out


def instance_seconds(samples: Sequence[Mapping[str, Any]]) -> float:
    """The integral of the instance count over time from samples {"t": s, service: count, ...}
    (each count held until the next sample; the last sample closes the run)."""
    total = 0.0
    for a, b in zip(samples, samples[1:], strict=False):
        total += sum(v for k, v in a.items() if k != "t") * (b["t"] - a["t"])
    return round(total, 2)


def tier_counts(tiers: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tiers:
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


def check_targets(rows: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """issue 16 §1's targets over the per-profile rows (a row: ttft_p99_s, failed, instance_s).
    A target whose profiles are missing or have no p99 is reported with met None."""
    out: list[dict[str, Any]] = []
    sllm = rows.get("sllm", {})
    base = sllm.get("ttft_p99_s")

    def ratio(name: str) -> float | None:
        other = rows.get(name, {}).get("ttft_p99_s")
        return round(other / base, 2) if other is not None and base else None

    for peer, want in P99_RATIO_TARGETS.items():
        r = ratio(peer)
        out.append({"name": f"p99_{peer}_over_sllm", "value": r, "target": f">= {want:g}",
                    "met": None if r is None else r >= want})
    for ab in ABLATIONS:
        r = ratio(ab)
        out.append({"name": f"p99_{ab}_over_sllm", "value": r, "target": "> 1 (the ablation is worse)",
                    "met": None if r is None else r > 1.0})
    failed = {p: row.get("failed") for p, row in rows.items()}
    out.append({"name": "failed_requests", "value": failed, "target": "0 in every profile",
                "met": bool(failed) and all(v == 0 for v in failed.values())})
    kd = rows.get("knative-default", {}).get("instance_s")
    mine = sllm.get("instance_s")
    out.append({"name": "instance_s_sllm_vs_knative_default", "value": [mine, kd], "target": "sllm <= knative-default",
                "met": None if mine is None or kd is None else mine <= kd})
    return out


def p99_ratios(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Each profile's p99 TTFT over sllm's."""
    base = rows.get("sllm", {}).get("ttft_p99_s")
    return {p: (round(r["ttft_p99_s"] / base, 2) if base and r.get("ttft_p99_s") is not None else None)
            for p, r in rows.items()}
