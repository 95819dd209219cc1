"""The order `make test` runs the parallel suite in: the longest modules first.

`make test` runs it with `--dist loadfile --no-loadscope-reorder`: pytest-xdist hands each of the
two workers one whole module at a time, in collection order, and the next as one frees up
(greedy list scheduling; a module's fixtures are never set up on both workers). In pytest's own
order the long modules come late (`tests/kube/` after most of the tree, `tests/test_lint.py`'s
mypy run last of all), so the suite could end with one worker on a minute of mypy or an
end-to-end test while the other idled. Starting the longest modules first (the largest-first
rule for list scheduling) leaves short modules for the end, where they even the two workers out.
Whole modules move, each in its own order.

`LONGEST` is from the durations `make test` prints (--durations=25), longest first; a module
missing from it keeps its place after them. A stale entry costs balance, never correctness.
"""

from __future__ import annotations

import os

import pytest

from sllm_knative import ports

LONGEST = (
    "tests/kube/test_e2e.py",
    "tests/kube/test_preemption.py",
    "tests/kube/test_install_e2e.py",
    "tests/migration/test_handoff.py",
    "tests/functions/test_fuzz_openapi.py",
    "tests/local/test_preemption.py",
    "tests/bench/test_soak.py",
    "tests/test_lint.py",
    "tests/migration/test_recovery.py",
    "tests/functions/test_llm_dtypes.py",
    "tests/local/test_cluster.py",
    "tests/checkpoint/test_gguf.py",
    "tests/migration/test_non_streaming.py",
    "tests/checkpoint/test_fuzz.py",
    "tests/bench/test_gpu_check.py",
    "tests/local/test_restarts.py",
    "tests/functions/test_llm_migration.py",
    "tests/realmodel/test_migration.py",
    "tests/realmodel/test_openai.py",
    "tests/kube/test_nodeagent.py",
    "tests/realmodel/test_cluster.py",
    "tests/kube/test_autoscaler_failover.py",
)


def _rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return LONGEST.index(path) if path in LONGEST else len(LONGEST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: each module's own order, and the rest's, are kept


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker draws ports from its own slice of the range below the ephemeral
    one (sllm_knative/ports.py), and so do the processes its tests start (they inherit it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if not worker.startswith("gw") or os.environ.get(ports.ENV):
        return
    span = ports.port_range()
    if span is not None:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        lo, hi = ports.split_range(span, int(worker[2:]), count)
        os.environ[ports.ENV] = f"{lo}-{hi}"
