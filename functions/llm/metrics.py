"""Prometheus metrics of one instance (its own registry, served at /metrics).

    sllm_function_batch_size             running sequences in the engine (continuous batch)
    sllm_function_parked_sequences       prefill-only sequences held for a migration
    sllm_function_requests_in_flight     requests holding a concurrency slot
    sllm_function_requests_total         by endpoint and status code
    sllm_function_prompt_tokens_total / sllm_function_generation_tokens_total
    sllm_function_step_seconds           one packed forward step
    sllm_function_step_rows              rows (tokens) per step
    sllm_function_time_to_first_token_seconds
    sllm_function_startup_seconds        by phase: imports, load, warmup, total
    sllm_function_ready                  1 once the weights are loaded and warmed up
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from functions.llm.engine import Engine
    from functions.llm.sequence import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FunctionMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_size = Gauge("sllm_function_batch_size", "Running sequences in the engine", registry=r)
        self.parked = Gauge("sllm_function_parked_sequences", "Prefill-only sequences held for a migration",
                            registry=r)
        self.in_flight = Gauge("sllm_function_requests_in_flight", "Requests holding a concurrency slot",
                               registry=r)
        self.requests = Counter("sllm_function_requests_total", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("sllm_function_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("sllm_function_generation_tokens_total", "Tokens generated", registry=r)
        self.stalled_streams = Counter("sllm_function_stalled_streams_total",
                                       "Streams ended because their client stopped reading (--stall-timeout)",
                                       registry=r)
        self.step_seconds = Histogram("sllm_function_step_seconds", "Duration of one packed forward step",
                                      buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.step_rows = Histogram("sllm_function_step_rows", "Rows per step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.ttft = Histogram("sllm_function_time_to_first_token_seconds", "Submission to first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.startup = Gauge("sllm_function_startup_seconds", "Startup time by phase", ["phase"], registry=r)
        self.ready = Gauge("sllm_function_ready", "1 once the model is loaded and warmed up", registry=r)

    # engine hooks (engine thread)
    def boundary(self, engine: Engine) -> None:
        self.batch_size.set(engine.batch_size)
        self.parked.set(engine.parked)

    def step(self, seconds: float, rows: int) -> None:
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)

    def finished(self, seq: Sequence) -> None:
        self.generation_tokens.inc(seq.generated)
        if seq.first_token_at is not None:
            self.ttft.observe(seq.first_token_at - seq.submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Stopwatch:
    """Phase timings of the startup, measured from the process start."""

    def __init__(self, process_start: float) -> None:
        self.process_start = process_start
        self.phases: dict[str, float] = {}
        self._last = time.time()

    def lap(self, phase: str) -> float:
        now = time.time()
        self.phases[phase] = now - self._last
        self._last = now
        return self.phases[phase]

    def total(self) -> float:
        return self._last - self.process_start
