"""Models and requests: a catalog of real model sizes, and the Azure trace scaled to many models.

Models: `catalog(n, seed)` gives n models named `m000`, `m001`, ... whose sizes are drawn
(seeded) from real bf16 checkpoints between 1B and 70B parameters; each runs with tensor
parallelism over `tp` GPUs, the smallest power of two whose memory holds the weights in at
most `WEIGHT_SHARE` of it (the rest is the KV cache).

Scaling rule (`scale_trace`), stated so that a run can be reproduced:

1. The trace (rows: arrival time, context tokens, generated tokens) spans D seconds from its
   first row. The output spans `duration_s` and carries `rate` times the trace's request rate.
2. Copies: k = ceil(rate) copies of the trace per period of D seconds, for
   ceil(duration_s / D) periods. Copy j of period p is the trace shifted circularly by a seeded
   offset u(p, j) in [0, D), then moved to start at p * D.
3. Thinning: each request of those copies is kept with probability rate / k (seeded).
4. Models: each kept request goes to the model of popularity rank r with probability
   proportional to 1 / r ** zipf (rank 1 the most popular); which model has which rank is a
   seeded permutation, independent of the sizes.
5. Everything beyond `duration_s` is dropped; requests are sorted by arrival.

The same (trace, rate, duration, models, zipf, seed) gives the same requests.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from pathlib import Path

#: Real bf16 checkpoints between 1B and 70B parameters: (name, parameters); and SmolLM2-135M,
#: the model this machine serves (the this-machine profile; `--kinds smollm2-135m`).
SIZES: tuple[tuple[str, float], ...] = (
    ("smollm2-135m", 135e6),
    ("llama-3.2-1b", 1.24e9),
    ("llama-3.2-3b", 3.21e9),
    ("llama-3.1-8b", 8.03e9),
    ("llama-2-13b", 13.0e9),
    ("codellama-34b", 33.7e9),
    ("llama-3.1-70b", 70.6e9),
)
#: How often each size is drawn (small models are the common case in a serverless fleet;
#: SmolLM2-135M only when asked for by kind).
SIZE_WEIGHTS = (0.0, 0.25, 0.25, 0.25, 0.1, 0.1, 0.05)
#: The share of a model's GPUs' memory its weights may take (the rest holds the KV cache).
WEIGHT_SHARE = 0.6
BYTES_PER_PARAM = 2  # bf16

DEFAULT_TRACE = Path(__file__).resolve().parent / "data" / "AzureLLMInferenceTrace_conv.csv"  # vendored (PROVENANCE.md)


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # the real checkpoint it is sized after
    params: float
    tp: int
    checkpoint: str = ""  # the checkpoint it serves, when services share one (bench/replay); "": its own

    @property
    def size_bytes(self) -> int:
        return int(self.params * BYTES_PER_PARAM)

    @property
    def key(self) -> str:
        """What the tiers, the loader and placement know it by: its checkpoint."""
        return self.checkpoint or self.name


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float
    model: str
    prompt: int
    output: int


@dataclass(frozen=True)
class TraceRow:
    t: float  # seconds since the trace's first row
    prompt: int
    output: int


def tensor_parallel(params: float, gpu_mem_bytes: float, gpus_per_node: int) -> int:
    """The smallest power of two of GPUs whose memory holds the weights in WEIGHT_SHARE of it."""
    tp = 1
    while params * BYTES_PER_PARAM > WEIGHT_SHARE * gpu_mem_bytes * tp:
        tp *= 2
        if tp > gpus_per_node:
            raise ValueError(f"a model of {params / 1e9:.1f}B parameters does not fit on one node "
                             f"({gpus_per_node} GPUs of {gpu_mem_bytes / 1e9:.0f} GB)")
    return tp


def catalog(n: int, seed: int, gpu_mem_bytes: float, gpus_per_node: int,
            sizes: Sequence[tuple[str, float]] = SIZES, weights: Sequence[float] = SIZE_WEIGHTS) -> list[Model]:
    """n models with seeded sizes from `sizes` (drawn with `weights`)."""
    if n < 1:
        raise ValueError(f"need at least one model, got {n}")
    rng = random.Random(f"catalog/{seed}")
    out = []
    for i in range(n):
        kind, params = rng.choices(list(sizes), weights=list(weights))[0]
        out.append(Model(f"m{i:03d}" if n <= 1000 else f"m{i:04d}", kind, params,
                         tensor_parallel(params, gpu_mem_bytes, gpus_per_node)))
    return out


def read_trace(path: Path) -> list[TraceRow]:
    """The Azure LLM inference trace (TIMESTAMP,ContextTokens,GeneratedTokens). A malformed row
    raises ValueError naming the file and line."""
    rows: list[TraceRow] = []
    t0: datetime | None = None
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{path}:1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens, got {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                if len(row) != 3:
                    raise ValueError(f"expected 3 columns, got {len(row)}")
                ts = datetime.fromisoformat(row[0].strip()[:26])
                prompt, output = int(row[1]), int(row[2])
                if prompt < 1 or output < 0:
                    raise ValueError(f"token counts must be prompt >= 1, output >= 0, got {prompt}, {output}")
            except ValueError as e:
                raise ValueError(f"{path}:{line}: malformed trace row {row!r}: {e}") from None
            t0 = ts if t0 is None else t0
            t = (ts - t0).total_seconds()
            if rows and t < rows[-1].t:
                raise ValueError(f"{path}:{line}: timestamps go backwards ({row[0]})")
            rows.append(TraceRow(t, prompt, max(1, output)))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def zipf_weights(n: int, alpha: float) -> list[float]:
    if alpha < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {alpha}")
    return [1.0 / (r ** alpha) for r in range(1, n + 1)]


def scale_trace(rows: Sequence[TraceRow], models: Sequence[str], *, rate: float, duration_s: float,
                zipf: float = 1.0, seed: int = 0) -> list[Request]:
    """The trace scaled by the rule in this module's docstring."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration_s must be > 0, got {rate}, {duration_s}")
    if not models:
        raise ValueError("no models")
    span = rows[-1].t - rows[0].t
    period = span + (span / max(1, len(rows) - 1))  # one mean gap after the last row, so periods do not overlap
    copies = math.ceil(rate)
    keep = rate / copies
    rng = random.Random(f"trace/{seed}")
    ranked = list(models)
    rng.shuffle(ranked)  # rank 1 is ranked[0]
    cum = list(accumulate(zipf_weights(len(ranked), zipf)))
    total = cum[-1]
    out: list[tuple[float, int, int, str]] = []
    for p in range(math.ceil(duration_s / period)):
        for _ in range(copies):
            offset = rng.uniform(0.0, period)
            for row in rows:
                if keep < 1.0 and rng.random() >= keep:
                    continue
                t = p * period + (row.t + offset) % period
                if t >= duration_s:
                    continue
                model = ranked[bisect.bisect_left(cum, rng.random() * total)]
                out.append((t, row.prompt, row.output, model))
    out.sort()
    return [Request(i, t, m, pr, o) for i, (t, pr, o, m) in enumerate(out)]
