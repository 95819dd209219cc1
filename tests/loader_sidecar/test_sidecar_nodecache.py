"""The NodeCache a loader publishes, built from its state (loader_sidecar.nodecache.node_cache, pure),
and the fill bookkeeping it reads (fills under way, failed fills) on a real in-process sidecar."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from loader_sidecar.fetch import Failure
from loader_sidecar.nodecache import node_cache, snapshot
from sllm_knative.config.nodecache import CheckpointState, node_cache_document, parse_node_cache
from sllm_knative.kube.times import rfc3339
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.loader.errors import NotFound
from sllm_knative.placement import QueuedLoad, Tier

A, B, C = "hf://org/a", "hf://org/b", "hf://org/c"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def entry(model: str, size: int = 100, state: str = "ready", filled: int | None = None,
          last_use: float = 0.0) -> pb.CheckpointEntry:
    return pb.CheckpointEntry(model=model, key=model.replace("/", "-"), size=size, state=state,
                              filled=size if filled is None else filled, last_use=last_use)


def inventory(dram: list[pb.CheckpointEntry] = (), ssd: list[pb.CheckpointEntry] = (),  # type: ignore[assignment]
              hops: dict[str, float] | None = None, stores: tuple[str, ...] = ("hf://",)) -> pb.Inventory:
    return pb.Inventory(
        node="n", version=7, stores=list(stores),
        tiers=[pb.TierInventory(name="ssd", capacity=10_000, used=sum(e.size for e in ssd), entries=list(ssd)),
               pb.TierInventory(name="dram", capacity=1_000, used=sum(e.size for e in dram), entries=list(dram))],
        bandwidths=[pb.Bandwidth(hop=h, bytes_per_second=v, samples=1) for h, v in (hops or {}).items()])


def failure(kind: str = "NotFound", message: str = "hf://org/c: not in the store") -> Failure:
    return Failure(kind, message, NOW - 5)


@pytest.mark.parametrize("inv, in_flight, failures, want", [
    pytest.param(inventory(), {}, {}, [], id="empty-node"),
    pytest.param(inventory(dram=[entry(A, last_use=NOW - 60)], ssd=[entry(A, last_use=NOW - 90)]), {}, {},
                 [(A, "Downloaded", ("dram", "ssd"), (), 100, rfc3339(NOW - 60))], id="in-both-tiers"),
    pytest.param(inventory(dram=[entry(A, state="filling", filled=30)], ssd=[entry(A, state="filling", filled=30)]),
                 {A: "dram"}, {}, [(A, "Downloading", (), ("dram", "ssd"), 100, None)],
                 id="remote-fetch-into-dram-and-ssd-at-once"),
    pytest.param(inventory(dram=[entry(A, state="filling", filled=10)], ssd=[entry(A)]), {A: "dram"}, {},
                 [(A, "Downloaded", ("ssd",), ("dram",), 100, None)], id="ssd-copy-being-filled-into-dram"),
    pytest.param(inventory(ssd=[entry(A, state="filling", filled=0)]), {A: "ssd"}, {},
                 [(A, "Downloading", (), ("ssd",), 100, None)], id="prefetch-to-ssd"),
    pytest.param(inventory(), {B: "dram"}, {}, [(B, "Pending", (), (), None, None)], id="asked-for-no-bytes-yet"),
    pytest.param(inventory(), {}, {C: failure()},
                 [(C, "DownloadError", (), (), None, None)], id="failed"),
    pytest.param(inventory(ssd=[entry(C)]), {}, {C: failure("TierFull", "dram tier: full")},
                 [(C, "Downloaded", ("ssd",), (), 100, None)], id="a-copy-outranks-a-failure"),
    pytest.param(inventory(), {C: "dram"}, {C: failure()}, [(C, "Pending", (), (), None, None)],
                 id="a-retry-outranks-a-failure"),
])
def test_checkpoint_states(inv: pb.Inventory, in_flight: dict[str, str], failures: dict[str, Failure],
                           want: list[tuple[Any, ...]]) -> None:
    cache = node_cache("gpu-1", inv, in_flight, failures, NOW)
    got = [(c.model, c.state.value, tuple(t.value for t in c.tiers), tuple(t.value for t in c.filling), c.size_bytes,
            c.last_used_time) for c in cache.checkpoints]
    assert got == want
    assert parse_node_cache(node_cache_document(cache)) == cache  # what the loader writes is a valid NodeCache
    for c in cache.checkpoints:
        assert (c.message is not None) == (c.state == CheckpointState.DOWNLOAD_ERROR)


def test_a_failure_names_its_kind_and_cause() -> None:
    cache = node_cache("gpu-1", inventory(), {}, {C: failure()}, NOW)
    assert cache.checkpoints[0].message == "NotFound: hf://org/c: not in the store"
    assert node_cache_document(cache)["status"]["summary"] == {"loading": 0, "failed": 1}


@pytest.mark.parametrize("dram, ssd, want", [
    pytest.param([entry(A, state="filling", filled=30)], [entry(A, state="filling", filled=30)],
                 (QueuedLoad(A, 70, Tier.REMOTE),), id="one-fetch-is-one-load"),
    pytest.param([entry(A, state="filling", filled=10)], [entry(A)], (QueuedLoad(A, 90, Tier.SSD),),
                 id="from-the-ssd-copy"),
    pytest.param([entry(A)], [entry(A, state="filling", filled=0)], (), id="the-ssd-copy-of-a-fresh-fetch-is-no-load"),
    pytest.param([entry(A, 100, "filling", 10), entry(B, 50, "filling", 0)], [entry(A), entry(C, 300, "filling", 250)],
                 (QueuedLoad(B, 50, Tier.REMOTE), QueuedLoad(C, 50, Tier.REMOTE), QueuedLoad(A, 90, Tier.SSD)),
                 id="fewest-remaining-first"),
])
def test_load_queue(dram: list[pb.CheckpointEntry], ssd: list[pb.CheckpointEntry],
                    want: tuple[QueuedLoad, ...]) -> None:
    assert node_cache("gpu-1", inventory(dram, ssd), {}, {}, NOW).load_queue == want


@pytest.mark.parametrize("hops, tiers, stores", [
    pytest.param({}, {"dram": None, "ssd": None, "remote": None}, {"hf://": None, "s3://m": None},
                 id="nothing-measured-yet"),
    pytest.param({"disk_read": 2e9, "dram_copy": 5e9, "dram_map": 15e9, "remote:s3://m": 1e8},
                 {"dram": 15e9, "ssd": 2e9, "remote": 1e8}, {"hf://": None, "s3://m": 1e8}, id="measured"),
])
def test_tiers_and_stores(hops: dict[str, float], tiers: dict[str, float | None],
                          stores: dict[str, float | None]) -> None:
    cache = node_cache("gpu-1", inventory(hops=hops, stores=("hf://", "s3://m")), {}, {}, NOW)
    assert {t.tier.value: t.bandwidth for t in cache.tiers} == tiers
    assert [t.tier for t in cache.tiers] == [Tier.DRAM, Tier.SSD, Tier.REMOTE]
    assert (cache.tiers[0].capacity_bytes, cache.tiers[1].capacity_bytes, cache.tiers[2].capacity_bytes) == \
        (1_000, 10_000, None)
    assert {s.uri: s.bandwidth for s in cache.stores} == stores
    assert (cache.observed_time, cache.inventory_version) == ("2026-01-01T00:00:00Z", 7)


def test_a_failed_fill_is_remembered_until_a_fill_of_it_succeeds(sidecar, store_root, tmp_path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    thread, client = sidecar([f"file://{store}"])
    model = f"file://{store}/tiny"

    with pytest.raises(NotFound):
        client.prefetch(model, tier="dram", wait=True)
    fetcher = thread.node.fetcher
    assert fetcher.failures[model].kind == "NotFound" and model in fetcher.failures[model].message
    assert fetcher.in_flight() == {}
    [cp] = thread.call(_snapshot(thread)).checkpoints
    assert (cp.model, cp.state, cp.message and cp.message.startswith("NotFound: ")) == \
        (model, CheckpointState.DOWNLOAD_ERROR, True)

    shutil.copytree(store_root / "models" / "tiny", store / "tiny")
    client.prefetch(model, tier="dram", wait=True)
    assert model not in fetcher.failures
    [cp] = thread.call(_snapshot(thread)).checkpoints
    assert (cp.state, cp.tiers[0], cp.message) == (CheckpointState.DOWNLOADED, Tier.DRAM, None)  # SSD copy may follow


async def _snapshot(thread: Any) -> Any:
    return snapshot(thread.node, "gpu-1")
