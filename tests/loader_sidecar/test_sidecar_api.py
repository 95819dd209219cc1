"""The gRPC API end to end: inventory stream, prefetch/evict, leases, metrics, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from sllm_knative.loader import errors
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.loader import loader_pb2_grpc as pb_grpc
from sllm_knative.loader.client import LoaderClient
from sllm_knative.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
    return value


def settled(client: LoaderClient) -> bool:
    """No fill under way: every entry ready and nobody reading it (the SSD copy of a remote
    fetch is made from the DRAM copy right after the instance got its bytes)."""
    return all(e.state == "ready" and e.readers == 0 for t in client.inventory().tiers for e in t.entries)


def entries(inv, tier: str) -> dict[str, tuple[str, int]]:  # type: ignore[no-untyped-def]
    t = next(t for t in inv.tiers if t.name == tier)
    return {e.model.rsplit("/", 1)[1]: (e.state, e.leases) for e in t.entries}


def test_inventory_stream_pushes_every_change(nginx, sidecar):
    thread, client = sidecar([f"{nginx.url}/models", f"{nginx.url}/slow/models"])
    seen: list[pb.Inventory] = []
    stop = threading.Event()

    def watch() -> None:
        with LoaderClient(thread.address) as watcher:
            for inv in watcher.watch():
                seen.append(inv)
                if stop.is_set():
                    return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    wait_for(lambda: seen)
    assert seen[0].node == "test" and {d.kind for d in seen[0].devices} >= {"cpu"}
    assert {b.hop for b in seen[0].bandwidths} >= {"disk_read", "dram_copy"}
    assert client.prefetch(f"{nginx.url}/slow/models/tiny", wait=False).source == "started"
    wait_for(lambda: entries(seen[-1], "dram").get("tiny", ("",))[0] == "filling")
    wait_for(lambda: entries(seen[-1], "dram").get("tiny", ("",))[0] == "ready")
    lease = client.acquire("small", instance="pod-7")
    wait_for(lambda: [x.instance for x in seen[-1].leases] == ["pod-7"])
    lease.release()
    wait_for(lambda: not seen[-1].leases and entries(seen[-1], "dram")["small"] == ("ready", 0))
    wait_for(lambda: settled(client))
    client.evict("small", "dram")
    wait_for(lambda: "small" not in entries(seen[-1], "dram"))
    versions = [inv.version for inv in seen]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    stop.set()
    client.prefetch("tiny", tier="ssd")  # one more change lets the watcher see stop
    t.join(10)


def test_prefetch_and_evict(nginx, sidecar):
    thread, client = sidecar([f"{nginx.url}/models"])
    assert client.prefetch("small", tier="ssd").source == "remote"
    assert client.prefetch("small", tier="ssd").source == "ssd"
    assert client.prefetch("small", tier="dram").source == "ssd"
    assert client.prefetch("small", tier="dram").source == "dram"
    with client.acquire("small") as lease:
        lease.wait_complete(timeout=30)
        with pytest.raises(errors.InUse, match="cannot evict .* 1 leases"):
            client.evict("small", "dram")
        assert client.evict("small", "ssd").tiers == ["ssd"]  # the DRAM copy stays in use
    reply = client.evict("small")
    assert list(reply.tiers) == ["dram"] and reply.bytes > 4_000_000
    with pytest.raises(errors.NotFound, match="not in the ssd or dram tier"):
        client.evict("small")
    with pytest.raises(errors.BadRequest, match="tier 'disk'"):
        client.prefetch("small", tier="disk")
    assert not any(p.name != ".staging" for p in thread.config.ssd_dir.iterdir())


def test_lease_ends_when_the_instance_goes_away(nginx, sidecar):
    thread, client = sidecar([f"{nginx.url}/models"])
    channel = grpc.insecure_channel(thread.address)
    call = pb_grpc.LoaderStub(channel).Acquire(pb.AcquireRequest(model="tiny", instance="doomed"))
    assert next(call).WhichOneof("event") == "granted"
    assert [x.instance for x in client.inventory().leases] == ["doomed"]
    channel.close()  # the instance dies without releasing
    wait_for(lambda: not client.inventory().leases and settled(client))
    assert client.evict("tiny", "dram").tiers == ["dram"]


def test_release_of_unknown_lease(nginx, sidecar):
    _, client = sidecar([f"{nginx.url}/models"])
    with pytest.raises(errors.NotFound, match="lease 'nope' is not held here"):
        client.release("nope")
    with pytest.raises(grpc.RpcError) as raw:
        client.stub.Release(pb.ReleaseRequest(lease_id="nope"))
    assert raw.value.code() is grpc.StatusCode.NOT_FOUND


def test_metrics_endpoint(nginx, sidecar):
    port = free_port()
    _, client = sidecar([f"{nginx.url}/models"], "--metrics", f"127.0.0.1:{port}")
    with client.acquire("tiny") as lease:
        lease.wait_complete(timeout=30)
    # The watermark reaches the end just before the fill publishes the entry: an acquire in
    # between joins the fill (a join, neither hit nor miss). Wait until it is published.
    wait_for(lambda: settled(client))
    with client.acquire("tiny"):
        pass
    wait_for(lambda: settled(client))
    client.evict("tiny", "dram")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    for line in ['sllm_loader_hits_total{tier="dram"} 1.0', 'sllm_loader_misses_total{tier="dram"} 1.0',
                 'sllm_loader_fetches_total{hop="remote"} 1.0', 'sllm_loader_evictions_total{tier="dram"} 1.0',
                 'sllm_loader_transfer_seconds_count{hop="remote"} 1.0', 'sllm_loader_tier_capacity_bytes{tier="ssd"}']:
        assert line in text, line
    assert 'sllm_loader_tier_bytes{tier="ssd"} 0.0' not in text


def test_metrics_count_a_joined_fill(nginx, sidecar):
    """A second acquire while the first one's DRAM fill is under way joins it: one miss, one join."""
    port = free_port()
    _, client = sidecar([f"{nginx.url}/slow/models"], "--metrics", f"127.0.0.1:{port}")
    with client.acquire(f"{nginx.url}/slow/models/small") as first:  # a few seconds from the slow store
        with client.acquire(f"{nginx.url}/slow/models/small") as second:
            assert not first.complete
            second.wait_complete(timeout=120)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    for line in ['sllm_loader_misses_total{tier="dram"} 1.0', 'sllm_loader_joins_total{tier="dram"} 1.0']:
        assert line in text, line
    assert 'sllm_loader_hits_total{tier="dram"} 1.0' not in text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllm_knative.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_cache_ls_prefetch_evict(nginx, sidecar):
    thread, _ = sidecar([f"{nginx.url}/models"])
    base = ["cache", "--loader", thread.address]
    out = _cli(*base, "prefetch", "small", "--tier", "ssd")
    assert out.returncode == 0 and "small: ssd tier ready (from remote)" in out.stdout
    assert _cli(*base, "prefetch", "tiny").returncode == 0
    with LoaderClient(thread.address) as client:
        wait_for(lambda: settled(client))
    out = _cli(*base, "ls")
    assert out.returncode == 0
    for text in ("SSD", "DRAM", "/models/small", "/models/tiny", "ready", "4.3 MiB", "device     cpu:0"):
        assert text in out.stdout, text
    out = _cli(*base, "ls", "--json")
    assert json.loads(out.stdout)["node"] == "test"
    out = _cli(*base, "evict", "tiny", "--tier", "dram")
    assert out.returncode == 0 and "evicted from dram" in out.stdout
    out = _cli(*base, "evict", "tiny", "--tier", "dram")
    assert out.returncode == 1 and "error: " in out.stderr and "not in the dram tier" in out.stderr
