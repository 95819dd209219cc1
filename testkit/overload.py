"""Overload, end to end: more demand than slots, on a local cluster of real processes.

Four services over two checkpoints (s1 and s2 serve checkpoint a, s3 and s4 checkpoint b) on 3
nodes with 2 slots each, every instance serving one stream at a time (containerConcurrency 1).
A burst of seeded streaming completions arrives through the activator, sent with the official
openai client; each outcome records its time to first token, its text, how it ended, and whether
it was cut (an error after the first token, or an end with no finish reason). Every seeded
answer is compared with the same request run on an unloaded cluster first (exact numerics:
the text does not depend on the batch, and a migrated generation continues exactly).

Shared by tests/local/test_overload.py (one burst at about 3x what the slots serve, asserting
no failures, no cut streams, identical answers and fair first tokens) and bench/overload.py
(1x, 2x and 3x, our rules against the pre-fix settings, JSON and a plot).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from sllm_knative.local.manifests import ALLOW_ZERO_INITIAL_SCALE, service_manifest
from sllm_knative.models import ModelSpec
from sllm_knative.ports import free_port

CLI = [sys.executable, "-m", "sllm_knative.cli"]
SERVICES = {"s1": "a", "s2": "a", "s3": "b", "s4": "b"}  # service -> checkpoint
NODES, SLOTS = 3, 2
# Small, so six instances fit this machine, but each token costs a few milliseconds of compute.
SPEC_A = ModelSpec(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024)
SPEC_B = dataclasses.replace(SPEC_A, num_hidden_layers=3)
ARGS = ("--numerics", "exact", "--max-model-len", "512")
PROMPT = "Under load the scheduler must share the slots fairly between"
SEEDS = 4  # distinct seeds per checkpoint: each (checkpoint, seed) has one reference answer


@dataclasses.dataclass(frozen=True)
class Shot:
    """One request of the burst: when it is sent (seconds after the burst starts), to which service."""

    at_s: float
    service: str
    seed: int


def burst(seconds: float, rate: float, seed: int = 0, late: Mapping[str, float] | None = None) -> list[Shot]:
    """Arrivals at `rate` requests/s on average for `seconds` (exponential gaps), each to a service
    drawn at random among those that have begun. A service begins with a request of its own: at
    0.2 s intervals from the start, or at its time in `late` (a service that arrives when the
    others hold every slot: what fair share is for). Pure."""
    rng = random.Random(seed)
    late = dict(late or {})
    begins = {s: late.get(s, i * 0.2) for i, s in enumerate(SERVICES)}
    shots = [Shot(at, s, rng.randrange(SEEDS)) for s, at in begins.items()]
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return sorted(shots, key=lambda x: x.at_s)
        open_ = [s for s, at in begins.items() if at < t]
        if open_:
            shots.append(Shot(round(t, 3), rng.choice(open_), rng.randrange(SEEDS)))


@dataclasses.dataclass
class Outcome:
    shot: Shot
    sent_s: float = 0.0  # when it was sent, after the burst started
    end_s: float = 0.0  # when it ended (whole, cut or refused), after the burst started
    ttft_s: float | None = None
    text: str = ""
    finish: str | None = None
    tokens: int = 0
    error: str | None = None
    instance: str | None = None

    @property
    def failed(self) -> bool:
        """No first token: refused or timed out before the answer began."""
        return self.ttft_s is None

    @property
    def cut(self) -> bool:
        """Began but did not end whole: an error after the first token, or an end with no finish reason."""
        return self.ttft_s is not None and (self.error is not None or self.finish is None)


def stream(activator: str, service: str, seed: int, max_tokens: int, timeout_s: float = 300.0,
           started: float | None = None) -> Outcome:
    """One seeded streaming completion through the activator with the official openai client."""
    from openai import OpenAI

    out = Outcome(Shot(0.0, service, seed))
    client = OpenAI(base_url=f"{activator}/v1", api_key="unused", max_retries=0, timeout=timeout_s)
    t0 = time.monotonic()
    out.sent_s = t0 - started if started is not None else 0.0
    try:
        raw = client.completions.with_raw_response.create(
            model=service, prompt=PROMPT, max_tokens=max_tokens, stream=True, temperature=1.0, seed=seed,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        out.instance = raw.headers.get("x-sllm-instance")
        for chunk in raw.parse():
            if chunk.usage:
                out.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text and out.ttft_s is None:
                    out.ttft_s = time.monotonic() - t0
                out.text += choice.text
                out.finish = choice.finish_reason or out.finish
    except Exception as exc:  # noqa: BLE001 - an outcome, reported by the caller
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    out.end_s = out.sent_s + (time.monotonic() - t0)
    return out


def run_burst(activator: str, shots: Sequence[Shot], max_tokens: int,
              on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Send every shot at its time (one thread each) and wait for all of them."""
    start = time.monotonic()
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(shot: Shot) -> None:
        time.sleep(max(0.0, start + shot.at_s - time.monotonic()))
        out = stream(activator, shot.service, shot.seed, max_tokens, started=start)
        out.shot = shot
        with lock:
            outcomes.append(out)
        if on_done is not None:
            on_done(out)

    with ThreadPoolExecutor(max(1, len(shots))) as pool:
        list(pool.map(one, shots))
    return sorted(outcomes, key=lambda o: o.shot.at_s)


def build_store(root: Path) -> Path:
    """The two checkpoints, converted, under root/store (kept between runs when built already)."""
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    store = root / "store"
    for name, spec in (("a", SPEC_A), ("b", SPEC_B)):
        if not (store / name / "sllm-index.json").exists():
            convert(build_model(root / "hf" / name, spec), store / name)
    return store


def manifests(store: Path, policy: Mapping[str, object] | None = None, max_scale: int = 3,
              hold_s: int | None = None, keep_alive: str = "20s") -> str:
    """The four services' YAML; `hold_s`: their timeoutSeconds, how long the activator holds a
    request (None: its --cold-start-timeout, 300 s)."""
    docs = [service_manifest(s, f"file://{store}/{ckpt}", keep_alive=keep_alive, window="6s", max_scale=max_scale,
                             container_concurrency=1, initial_scale=0, args=ARGS, policy=policy,
                             timeout_seconds=hold_s)
            for s, ckpt in SERVICES.items()]
    return "---\n".join([*docs, ALLOW_ZERO_INITIAL_SCALE])


@dataclasses.dataclass
class Cluster:
    state: Path
    doc: dict[str, Any]

    def cli(self, *args: str) -> str:
        r = subprocess.run([*CLI, *args, "--state-dir", str(self.state)], capture_output=True, text=True,
                           timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"sllm-knative {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def apply(self, text: str) -> None:
        path = self.state / "overload.yaml"
        path.write_text(text)
        self.cli("apply", "-f", str(path))

    @property
    def activator(self) -> str:
        return str(self.doc["activator"])

    def services(self) -> dict[str, Any]:
        r = httpx.get(f"{self.doc['autoscaler']}/v1/services", timeout=10)
        return {s["key"]: s for s in r.json()["services"]}

    def metrics(self) -> dict[str, float]:
        """The autoscaler's counters of preemptions, migrated generations and busy stops."""
        text = httpx.get(f"{self.doc['autoscaler']}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(("autoscaler_preemptions_total", "autoscaler_migrated_generations_total",
                                "autoscaler_stopped_busy_total")):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def timeline(self, service: str, limit: int = 40) -> str:
        """What the autoscaler and the activator logged about `service`'s instances: its
        placements and preemptions (as asker or victim), readiness and where its held requests
        went, in time order; for a failure message."""
        keys = ("msg=preempting", "msg=placed", "msg=preempted", 'msg="instance ready"', 'msg="held request routed"',
                'msg="scale decided"')
        lines = []
        for log in ("autoscaler.log", "activator.log"):
            path = self.state / "logs" / log
            if path.exists():
                lines += [line[:300] for line in path.read_text(errors="replace").splitlines()
                          if any(k in line for k in keys)
                          and (f"service=default/{service} " in line or f"victim={service}-" in line)]
        lines.sort()
        return "\n".join(lines[:limit])


@contextmanager
def local_cluster(state: Path, store: Path) -> Iterator[Cluster]:
    """`sllm-knative up` in `state` with NODES nodes of SLOTS slots over `store` (build_store's);
    down at the end."""
    state.mkdir(parents=True, exist_ok=True)
    c = Cluster(state, {})
    c.cli("up", "--detach", "--nodes", str(NODES), "--slots", str(SLOTS), "--store", f"file://{store}",
          "--port", str(free_port()), "--dram-gb", "1", "--ssd-gb", "1")
    try:
        c.doc = json.loads((state / "cluster.json").read_text())
        yield c
    finally:
        subprocess.run([*CLI, "down", "--state-dir", str(state)], capture_output=True, timeout=120)


def references(c: Cluster, max_tokens: int) -> dict[tuple[str, int], str]:
    """Each (checkpoint, seed)'s answer with nothing else running: one request at a time."""
    want: dict[tuple[str, int], str] = {}
    for ckpt in sorted(set(SERVICES.values())):
        service = next(s for s, k in SERVICES.items() if k == ckpt)
        for seed in range(SEEDS):
            out = stream(c.activator, service, seed, max_tokens)
            if out.error or out.finish != "length":
                raise RuntimeError(f"the unloaded reference of {service} (seed {seed}) failed: {out.error}")
            want[(ckpt, seed)] = out.text
    return want


def stream_seconds(c: Cluster, max_tokens: int, runs: int = 3) -> float:
    """How long one stream takes alone on a warm instance (median of `runs`)."""
    service = next(iter(SERVICES))
    times = []
    for seed in range(runs):
        t0 = time.monotonic()
        out = stream(c.activator, service, seed, max_tokens)
        if out.error:
            raise RuntimeError(f"calibration stream failed: {out.error}")
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def computing_streams() -> int:
    """Streams that compute at once: one thread an instance, so at most one per core (on this
    2-core machine the 6 slots are not 6 streams' worth of compute)."""
    return min(NODES * SLOTS, os.cpu_count() or 1)


def wait_idle(c: Cluster, timeout_s: float = 120.0) -> None:
    """Until every service is back at zero instances (keep-alive passed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not s["instances"] for s in c.services().values()):
            return
        time.sleep(0.5)
    raise RuntimeError("the services did not scale back to zero")


@dataclasses.dataclass(frozen=True)
class Summary:
    requests: int
    failed: int
    cut: int
    mismatched: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    # per service: from its first request sent to its first token (of whichever request; None when
    # none of its requests got one)
    first_token_s: dict[str, float | None]
    errors: list[str]


def peak_concurrency(outcomes: Sequence[Outcome]) -> int:
    """The most requests in the system at once (sent and not yet ended): the demand on the slots."""
    events = sorted([(o.sent_s, 1) for o in outcomes] + [(o.end_s, -1) for o in outcomes])
    peak = now = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def first_tokens(outcomes: Sequence[Outcome]) -> dict[str, float | None]:
    """Per service, the seconds from its first request sent to its first token, whichever request
    that token answered (pure). With containerConcurrency 1 the activator serves a service's held
    requests in the order they arrived, and two sent a moment apart may arrive in either order:
    the first request scheduled is not always the first served."""
    sent: dict[str, float] = {}
    token: dict[str, float] = {}
    for o in outcomes:
        svc = o.shot.service
        sent[svc] = min(sent.get(svc, math.inf), o.sent_s)
        if o.ttft_s is not None:
            token[svc] = min(token.get(svc, math.inf), o.sent_s + o.ttft_s)
    return {svc: token[svc] - t0 if svc in token else None for svc, t0 in sent.items()}


def summarize(outcomes: Sequence[Outcome], want: dict[tuple[str, int], str]) -> Summary:
    """What a user sees of a burst (pure)."""
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    mismatched = [o for o in outcomes if not o.failed and not o.cut
                  and o.text != want.get((SERVICES[o.shot.service], o.shot.seed))]
    first = first_tokens(outcomes)
    errors = [f"{o.shot.service} @{o.shot.at_s:.1f}s: {o.error or 'no finish reason'}"
              for o in outcomes if o.failed or o.cut]
    return Summary(len(outcomes), sum(o.failed for o in outcomes), sum(o.cut for o in outcomes), len(mismatched),
                   percentile(ttfts, 50), percentile(ttfts, 99), first, errors)
