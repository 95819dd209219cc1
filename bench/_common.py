"""Small helpers shared by the benchmarks: machine facts, medians, cache eviction, output."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sllm_knative import atomic
from sllm_knative.pagecache import evict, resident_fraction  # noqa: F401 - re-exported for benchmarks


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def median_runs(fn: Callable[[], float], runs: int) -> dict[str, Any]:
    """Run fn `runs + 1` times: the first is reported apart, the median over the rest."""
    first = fn()
    rest = [fn() for _ in range(runs)]
    return {"first_s": first, "seconds": statistics.median(rest), "runs_s": rest}


def write_json(out: Path, name: str, doc: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / f"{name}.json"
    atomic.write_json(p, doc, durable=False, indent=2)
    return p


def ensure_model(out_dir: Path, spec: Any) -> bool:
    """Build the random model `spec` into out_dir unless the one there was built from the same
    spec by the current recipe (`sllm_knative.models.RECIPE`); True when it (re)built it, so
    the caller converts again. The stamp lives beside the directory, not in it."""
    from sllm_knative.models import RECIPE, build_model

    stamp = out_dir.with_name(out_dir.name + ".recipe.json")
    want = {"recipe": RECIPE, "spec": dataclasses.asdict(spec)}
    try:
        if (out_dir / "config.json").exists() and json.loads(stamp.read_text()) == want:
            return False
    except (OSError, ValueError):
        pass
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"building a random {spec.nbytes() / 2**30:.2f} GiB Llama-like model in {out_dir}", flush=True)
    build_model(out_dir, spec)
    stamp.write_text(json.dumps(want))
    return True


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure to `path` through a temporary name (never a half-written PNG)."""
    import matplotlib.pyplot as plt

    with atomic.open_atomic(path, "wb", durable=False) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
