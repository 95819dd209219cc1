"""Overload end to end: a burst of streaming requests at three times what the cluster serves, on
a local cluster of real processes (testkit/overload.py: 4 services over 2 checkpoints, 3 nodes
with 2 slots, one stream per instance), sent with the official openai client. One service (s4)
arrives a third of the way in, when the others hold every slot.

Nothing is lost: no request fails, no stream is cut, every seeded answer is the one the same
request gets on an unloaded cluster (exact numerics: migrated generations continue exactly),
no instance is stopped while it runs generations, and every service gets its first token
within its fair-share bound (plus START_ALLOWANCE_S for the estimate's error) of its first
request. bench/overload.py runs the same at 1x, 2x and 3x for 60 s; this test's burst is
20 s, so that it fits `make test` (its backlog alone is a minute of compute on 2 cores). It is
marked `alone`: `make test` runs it after the parallel suite, by itself.
"""

from __future__ import annotations

import pytest

from testkit.overload import (
    NODES,
    SLOTS,
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

FAIR_SHARE_S = 10.0
# Fair share is decided in time for the bound by the load-time model's estimate of the preemption
# and the start (placement.place_within); this covers that estimate's error: a first preemption's
# stop not yet observed (about 1 s), a start slower under load. Five runs on 2026-12-06 (after the
# held requests kept their place from arrival) gave s4 its first instance 9.5-11.0 s in.
START_ALLOWANCE_S = 5.0
MAX_TOKENS = 400
BURST_S = 20.0
LOAD = 3.0


@pytest.mark.alone
def test_a_burst_past_capacity_loses_no_request_and_starves_no_service(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("overload")
    store = build_store(root)
    with local_cluster(root / "state", store) as c:
        # A 600 s hold: how long a request may wait is the revision's to say, and this test is
        # about losing nothing under overload, not about where a backlog meets the hold.
        c.apply(manifests(store, policy={"fairShareAfter": f"{FAIR_SHARE_S:g}s"}, hold_s=600))
        want = references(c, MAX_TOKENS)
        rate = LOAD * computing_streams() / stream_seconds(c, MAX_TOKENS)
        shots = burst(BURST_S, rate, seed=1, late={"s4": BURST_S / 3})
        outcomes = run_burst(c.activator, shots, MAX_TOKENS)
        s = summarize(outcomes, want)
        counters = c.metrics()
        placements = {k: v["placements"] for k, v in c.services().items()}
        late = {svc: t for svc, t in s.first_token_s.items() if t is None or t > FAIR_SHARE_S + START_ALLOWANCE_S}
        timelines = "\n\n".join(f"{svc}:\n{c.timeline(svc)}" for svc in late)
    assert s.requests == len(shots)
    # It was an overload: far more requests in the system at once than instances to serve them.
    assert peak_concurrency(outcomes) >= 2 * NODES * SLOTS, peak_concurrency(outcomes)
    assert (s.failed, s.cut) == (0, 0), "\n".join(s.errors)
    assert s.mismatched == 0
    assert counters.get("autoscaler_stopped_busy_total", 0.0) == 0.0, counters
    assert not late, f"{late} (all: {s.first_token_s}; s4's placements {placements['default/s4']})\n{timelines}"
