"""The client side of bench/replay.py: each request a streaming completion from its own thread
with its own official `openai` client, at its time; a sampler of the instances per service."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bench._common import Periodic
from bench.replay_core import Shot

NAMESPACE = "default"
VOCAB = 8192
NODES, SLOTS = 2, 2


def log(msg: str) -> None:
    print(f"[replay {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the client side ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    service: str
    at_s: float  # when it was due
    sent_s: float = 0.0  # when it was sent (after the replay started)
    ttft_s: float | None = None
    end_s: float | None = None
    ok: bool = False
    tokens: int = 0
    instance: str | None = None
    error: str | None = None
    warmup: bool = False  # a warm-up request (replay_core rule 6): not in the latency statistics


def stream(base_url: str, shot: Shot, t0: float, timeout_s: float = 600.0) -> Outcome:
    """One streaming completion with the official openai client; ok when it ended with a finish reason."""
    from openai import OpenAI

    out = Outcome(shot.index, shot.service, shot.at_s, warmup=shot.warmup)
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout_s)
    sent = time.monotonic()
    out.sent_s = round(sent - t0, 4)
    finish = None
    try:
        raw = client.completions.with_raw_response.create(
            model=shot.service, prompt=shot.prompt_ids(VOCAB), max_tokens=shot.max_tokens, stream=True,
            temperature=0, extra_body={"ignore_eos": True})
        out.instance = raw.headers.get("x-sllm-instance")
        for chunk in raw.parse():
            for choice in chunk.choices:
                if choice.text and out.ttft_s is None:
                    out.ttft_s = round(time.monotonic() - sent, 4)
                if choice.text:
                    out.tokens += 1
                finish = choice.finish_reason or finish
        out.ok = out.ttft_s is not None and finish is not None
        if not out.ok:
            out.error = f"stream ended without {'a first token' if out.ttft_s is None else 'a finish reason'}"
    except Exception as exc:  # noqa: BLE001 - an outcome, reported in the JSON
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    out.end_s = round(time.monotonic() - t0, 4)
    return out


def replay(shots: Sequence[Shot], base_url: Callable[[str], str]) -> list[Outcome]:
    """Every shot from its own thread at its time; progress on stderr every 10 s."""
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(shot: Shot) -> None:
        time.sleep(max(0.0, t0 + shot.at_s - time.monotonic()))
        out = stream(base_url(shot.service), shot, t0)
        with lock:
            outcomes.append(out)

    threads = [threading.Thread(target=one, args=(s,), daemon=True, name=f"req-{s.index}") for s in shots]
    for t in threads:
        t.start()
    last = 0.0
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            with lock:
                done, bad = len(outcomes), sum(1 for o in outcomes if not o.ok)
            log(f"  t={time.monotonic() - t0:5.1f}s  {done}/{len(shots)} done, {bad} failed")
    return sorted(outcomes, key=lambda o: o.index)


class Sampler(Periodic):
    """Calls `probe()` (service -> instances) every `interval` s; keeps {"t": s, service: n} rows,
    one more at the start and at the end of the block."""

    def __init__(self, probe: Callable[[], Mapping[str, int]], interval: float = 0.5) -> None:
        super().__init__(interval, "sampler")
        self.probe = probe
        self.rows: list[dict[str, float]] = []
        self.errors = 0
        self.t0 = time.monotonic()

    def tick(self) -> None:
        try:
            counts = self.probe()
        except Exception:  # noqa: BLE001 - a missed sample, counted
            self.errors += 1
            return
        self.rows.append({"t": round(time.monotonic() - self.t0, 2), **counts})

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self.tick()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.tick()


def drain(sampler: Sampler, keep_alive: float, timeout: float = 90.0) -> None:
    """After the last request: wait until every service is at zero (the instance-seconds include
    the keep-alive tail every profile pays alike)."""
    deadline = time.monotonic() + timeout
    time.sleep(keep_alive)
    while time.monotonic() < deadline:
        if sampler.rows and not any(v for k, v in sampler.rows[-1].items() if k != "t"):
            return
        time.sleep(0.5)
