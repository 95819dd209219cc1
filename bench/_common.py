"""Small helpers shared by the benchmarks: machine facts, medians, cache eviction, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    tmp = p.with_suffix(".json.part")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, p)
    return p


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure to `path` through a temporary name (never a half-written PNG)."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
