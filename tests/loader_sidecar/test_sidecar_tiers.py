"""Tiers: LRU eviction that never touches leased/in-use entries, markers, restart recovery."""

from __future__ import annotations

import json

import pytest

from loader_sidecar.tiers import MARKER, Entry, State, TierStore, plan_eviction, read_marker
from sllm_knative.loader.errors import InUse, TierFull


def E(key: str, size: int, last_use: float, state: State = State.READY, leases: int = 0, readers: int = 0) -> Entry:
    return Entry(key, f"file:///m/{key}", size, state, last_use, leases=leases, readers=readers)


@pytest.mark.parametrize("entries, budget, need, victims", [
    pytest.param([], 100, 100, [], id="empty-fits-exactly"),
    pytest.param([E("a", 40, 1)], 100, 60, [], id="fits-in-free"),
    pytest.param([E("a", 40, 2), E("b", 40, 1)], 100, 50, ["b"], id="oldest-first"),
    pytest.param([E("a", 40, 1), E("b", 40, 2)], 100, 90, ["a", "b"], id="two-victims"),
    pytest.param([E("a", 40, 1, leases=1), E("b", 40, 2)], 100, 50, ["b"], id="skips-leased"),
    pytest.param([E("a", 40, 1, readers=1), E("b", 40, 2)], 100, 50, ["b"], id="skips-read"),
    pytest.param([E("a", 40, 1, state=State.FILLING), E("b", 40, 2)], 100, 50, ["b"], id="skips-filling"),
    pytest.param([E("b", 30, 1), E("a", 30, 1)], 100, 50, ["a"], id="tie-broken-by-key"),
    pytest.param([E("a", 10, 1)], 100, 0, [], id="nothing-needed"),
])
def test_plan_eviction(entries, budget, need, victims):
    assert plan_eviction(entries, budget, need) == victims


@pytest.mark.parametrize("entries, budget, need, message, transient, leased", [
    pytest.param([], 100, 101, "whole budget is 100", False, False, id="larger-than-budget"),
    pytest.param([E("a", 60, 1, leases=1)], 100, 50, r"only 40 of 100 can be freed.*1 leases", False, True,
                 id="leased"),
    pytest.param([E("a", 60, 1, state=State.FILLING)], 100, 50, "filling", False, False, id="filling"),
    pytest.param([E("a", 60, 1, readers=1)], 100, 50, "1 readers", True, True, id="only-read-frees-soon"),
    pytest.param([E("a", 30, 1, readers=1), E("b", 30, 1, leases=1)], 100, 80, "readers", False, True,
                 id="read-and-leased"),
    pytest.param([E("a", 30, 1, leases=1), E("b", 40, 1, state=State.FILLING)], 100, 70, "filling", False, False,
                 id="leased-and-filling-too-much"),
])
def test_plan_eviction_full(entries, budget, need, message, transient, leased):
    with pytest.raises(TierFull, match=message) as err:
        plan_eviction(entries, budget, need, "dram")
    assert (err.value.transient, err.value.leased) == (transient, leased)


@pytest.mark.parametrize("lease_wait, released_after, want", [
    # An instance stopped: its lease ends a moment later, and the fill for the next one waits.
    pytest.param(5.0, 0.1, "b-000000000000", id="waits-for-the-lease-to-end"),
    pytest.param(0.0, 0.1, "TierFull", id="no-lease-wait-fails-at-once"),
    pytest.param(0.2, None, "TierFull", id="a-lease-that-stays-fails-after-the-wait"),
])
def test_reserve_waits_for_a_lease_to_end_up_to_lease_wait(tmp_path, lease_wait, released_after, want):
    import asyncio
    import time

    async def run() -> tuple[str, float]:
        tier = TierStore("dram", tmp_path, 100)
        _fill(tier, "a-000000000000", 60)
        tier.add_lease("a-000000000000", 1)
        if released_after is not None:
            asyncio.get_running_loop().call_later(released_after, tier.add_lease, "a-000000000000", -1)
        t0 = time.monotonic()
        try:
            got = (await tier.reserve_when_free("b-000000000000", "file:///m/b", 50, timeout=30,
                                                lease_wait=lease_wait)).key
        except TierFull:
            got = "TierFull"
        return got, time.monotonic() - t0

    got, took = asyncio.run(run())
    assert got == want
    assert took < max(lease_wait, 0.1) + 1.0  # never the 30 s timeout


def test_reserve_waits_for_readers_not_for_fills(tmp_path):
    import asyncio

    async def run() -> tuple[str, str]:
        tier = TierStore("dram", tmp_path, 100)
        _fill(tier, "a-000000000000", 60)
        tier.add_reader("a-000000000000", 1)
        waiting = asyncio.ensure_future(tier.reserve_when_free("b-000000000000", "file:///m/b", 50, timeout=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        tier.add_reader("a-000000000000", -1)  # the read ends: a is evicted for b
        got = (await asyncio.wait_for(waiting, 5)).key
        with pytest.raises(TierFull) as err:
            await tier.reserve_when_free("c-000000000000", "file:///m/c", 60, timeout=5)
        return got, str(err.value)

    got, message = asyncio.run(run())
    assert got == "b-000000000000" and "(50 bytes, filling)" in message  # no waiting for a fill


def _fill(tier: TierStore, key: str, size: int) -> None:
    tier.reserve(key, f"file:///m/{key}", size)
    d = tier.path(key)
    d.mkdir(parents=True)
    (d / "partition-0.bin").write_bytes(b"x" * size)
    tier.publish(key, d, {"partition-0.bin": size})


def test_reserve_evicts_lru_and_keeps_leased(tmp_path):
    clock = iter(range(100)).__next__
    evicted = []
    tier = TierStore("ssd", tmp_path, 100, clock=lambda: float(clock()), on_evict=lambda t, e: evicted.append(e.key))
    for key in ("a-000000000000", "b-000000000000", "c-000000000000"):
        _fill(tier, key, 30)
    tier.touch("a-000000000000")           # a is now the most recently used
    tier.add_lease("b-000000000000", 1)    # b is leased: never evicted
    tier.reserve("d-000000000000", "file:///m/d", 40)
    assert evicted == ["c-000000000000"]
    assert not tier.path("c-000000000000").exists()
    with pytest.raises(TierFull, match="in use"):
        tier.reserve("e-000000000000", "file:///m/e", 70)
    with pytest.raises(InUse, match="1 leases"):
        tier.evict("b-000000000000")
    tier.add_lease("b-000000000000", -1)
    assert tier.evict("b-000000000000").size == 30


def test_published_entry_has_verified_marker(tmp_path):
    tier = TierStore("ssd", tmp_path, 1000)
    tier.reserve("k-0123456789ab", "file:///m/k", 10)
    staging = tier.staging_dir("k-0123456789ab")
    (staging / "partition-0.bin").write_bytes(b"y" * 10)
    tier.publish("k-0123456789ab", staging, {"partition-0.bin": 10})
    assert not staging.exists()
    doc = read_marker(tmp_path / "k-0123456789ab")
    assert doc is not None and doc["verified"] is True and doc["files"] == {"partition-0.bin": 10}
    assert tier.entries["k-0123456789ab"].state is State.READY


def test_recover_drops_partial_and_unverified(tmp_path):
    tier = TierStore("dram", tmp_path, 1000)
    _fill(tier, "good-0123456789ab", 10)
    _fill(tier, "short-0123456789ab", 10)
    (tmp_path / "short-0123456789ab" / "partition-0.bin").write_bytes(b"x" * 5)   # truncated after marker
    (tmp_path / "nomarker-0123456789ab").mkdir()                                 # killed mid-fill
    (tmp_path / "nomarker-0123456789ab" / "partition-0.bin").write_bytes(b"z" * 10)
    bad = tmp_path / "badmarker-0123456789ab"
    bad.mkdir()
    (bad / MARKER).write_text(json.dumps({"version": 1, "key": "other", "model": "m", "files": {}, "verified": True}))
    (tmp_path / ".staging" / "x-0123456789ab.abcd").mkdir(parents=True)        # SSD download in flight
    (tmp_path / "notes.txt").write_text("not ours")                            # left alone
    fresh = TierStore("dram", tmp_path, 1000)
    dropped = fresh.recover()
    assert sorted(fresh.entries) == ["good-0123456789ab"]
    assert sorted(dropped) == [".staging/x-0123456789ab.abcd", "badmarker-0123456789ab", "nomarker-0123456789ab",
                               "short-0123456789ab"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good-0123456789ab", "notes.txt"]


def test_recover_keeps_lru_order_and_budget(tmp_path):
    clock = iter(range(100)).__next__
    tier = TierStore("ssd", tmp_path, 100, clock=lambda: 1_000_000.0 + clock())
    for key in ("a-000000000000", "b-000000000000", "c-000000000000"):
        _fill(tier, key, 30)
    tier.touch("a-000000000000")
    smaller = TierStore("ssd", tmp_path, 60)   # restarted with a smaller budget
    smaller.recover()
    assert sorted(smaller.entries) == ["a-000000000000", "c-000000000000"]  # b was least recently used


# The filesystem under a tier may hold less than its budget (a disk shared with other data, or
# smaller than configured): the room is what the entries hold on it plus its free bytes.
@pytest.mark.parametrize("disk_free, entries, want", [
    pytest.param(10_000, [], (1000, "its whole budget"), id="a-large-disk-leaves-the-budget"),
    pytest.param(300, [], (300, "the room on its disk (300 bytes free under {root})"), id="a-small-disk"),
    pytest.param(300, [("a", 400, 400, State.READY)], (700, "the room on its disk (300 bytes free under {root})"),
                 id="ready-entries-count-whole"),
    pytest.param(300, [("a", 400, 100, State.FILLING)], (400, "the room on its disk (300 bytes free under {root})"),
                 id="a-fill-counts-what-it-wrote"),
    pytest.param(900, [("a", 400, 400, State.READY)], (1000, "its whole budget"), id="room-over-the-budget"),
])
def test_limit(tmp_path, disk_free, entries, want):
    tier = TierStore("ssd", tmp_path, 1000, disk_free=lambda root: disk_free)
    for key, size, filled, state in entries:
        tier.entries[key] = Entry(key, f"file:///m/{key}", size, state, 1.0, filled=filled)
    assert tier.limit() == (want[0], want[1].format(root=tmp_path))


def test_reserve_evicts_for_the_disk_not_only_the_budget(tmp_path):
    free = [1000]
    tier = TierStore("ssd", tmp_path, 10_000, disk_free=lambda root: free[0])
    _fill(tier, "a-000000000000", 600)
    free[0] = 400  # the disk: a's 600 bytes, 400 free
    tier.reserve("b-000000000000", "file:///m/b", 700)  # fits the budget, not the disk: a goes
    assert set(tier.entries) == {"b-000000000000"} and not tier.path("a-000000000000").exists()
    free[0] = 100
    with pytest.raises(TierFull, match=r"ssd tier: needs 900 bytes but the room on its disk \(100 bytes free under "
                                       r".*\) is 100 bytes"):
        tier.reserve("c-000000000000", "file:///m/c", 900)
