"""Many clients at once: one fetch per checkpoint, different checkpoints in parallel, and
eviction racing acquire without ever serving a wrong byte."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from sllm_knative import format as fmt
from sllm_knative.loader import errors
from sllm_knative.loader.client import LoaderClient
from sllm_knative.ports import free_port


def partitions_of(model_dir: Path) -> list[bytes]:
    index = fmt.read_index(model_dir)
    return [(model_dir / p.file).read_bytes() for p in index.partitions]


def test_many_acquires_of_one_model_share_one_fetch(nginx, sidecar, store_root):
    port = free_port()
    thread, _ = sidecar([f"{nginx.url}/slow/models"], "--connections", "4", "--chunk-bytes", "1MiB",
                        "--metrics", f"127.0.0.1:{port}")
    expected = partitions_of(store_root / "models" / "small")
    before = len(nginx.requests("/slow/models/small/partition-"))
    barrier = threading.Barrier(12)

    def one(i: int) -> tuple[str, list[bytes]]:
        with LoaderClient(thread.address) as c:
            barrier.wait()
            with c.acquire("small", instance=f"pod-{i}") as lease:
                lease.wait_complete(timeout=60)
                return lease.source, [Path(p.path).read_bytes() for p in lease.partitions]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert all(parts == expected for _, parts in results)
    assert {src for src, _ in results} <= {"remote", "dram"}
    spans = sum(-(-len(p) // (1 << 20)) for p in expected)
    assert len(nginx.requests("/slow/models/small/partition-")) - before == spans  # each byte fetched once
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'sllm_loader_fetches_total{hop="remote"} 1.0' in metrics


def test_different_models_at_once(nginx, sidecar, store_root):
    thread, _ = sidecar([f"{nginx.url}/models"])
    models = ["small", "tiny", "tiny-hf", "corrupt", "missing"] * 2

    def one(model: str) -> object:
        with LoaderClient(thread.address) as c:
            try:
                with c.acquire(model) as lease:
                    lease.wait_complete(timeout=60)
                    return [Path(p.path).read_bytes() for p in lease.partitions]
            except errors.LoaderError as exc:
                return type(exc)

    expected = {"small": partitions_of(store_root / "models" / "small"),
                "tiny": partitions_of(store_root / "models" / "tiny"),
                "tiny-hf": partitions_of(store_root / "models" / "tiny"),  # converted on the node
                "corrupt": errors.CorruptData, "missing": errors.NotFound}
    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(one, models))
    for model, got in zip(models, results, strict=True):
        assert got == expected[model], model


def test_eviction_racing_acquire(nginx, sidecar, store_root):
    # The DRAM budget holds one of the two models at a time: every acquire must evict the other.
    thread, client = sidecar([f"{nginx.url}/models"], "--dram-bytes", "5000000")
    expected = {m: partitions_of(store_root / "models" / m) for m in ("small", "tiny")}
    served: dict[str, int] = {"small": 0, "tiny": 0}
    refused: list[type] = []
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def user(model: str) -> None:
        with LoaderClient(thread.address) as c:
            for _ in range(8):
                try:
                    with c.acquire(model) as lease:
                        lease.wait_complete(timeout=60)
                        assert [Path(p.path).read_bytes() for p in lease.partitions] == expected[model]
                        served[model] += 1
                except errors.TierFull as exc:
                    refused.append(type(exc))
                except BaseException as exc:  # any other error or a wrong byte fails the test
                    unexpected.append(exc)

    def evictor() -> None:
        rng = random.Random(0)
        with LoaderClient(thread.address) as c:
            while not stop.is_set():
                try:
                    c.evict(rng.choice(["small", "tiny"]), rng.choice(["dram", "ssd", ""]))
                except (errors.InUse, errors.NotFound) as exc:
                    refused.append(type(exc))
                except BaseException as exc:
                    unexpected.append(exc)

    users = [threading.Thread(target=user, args=(m,)) for m in ("small", "tiny", "small", "tiny")]
    ev = threading.Thread(target=evictor)
    ev.start()
    for t in users:
        t.start()
    for t in users:
        t.join(120)
    stop.set()
    ev.join(30)
    assert unexpected == []
    assert served["small"] + served["tiny"] > 0  # (no fairness promised: one model may starve the other)
    for model in ("tiny", "small", "tiny"):  # once the race is over, each evicts the other in turn
        with client.acquire(model) as lease:
            lease.wait_complete(timeout=60)
            assert [Path(p.path).read_bytes() for p in lease.partitions] == expected[model]
    inv = client.inventory()
    assert not inv.leases
    dram = next(t for t in inv.tiers if t.name == "dram")
    assert dram.used <= dram.capacity and all(e.leases == 0 for e in dram.entries)
    on_disk = sorted(p.name for p in thread.config.dram_dir.iterdir())
    assert on_disk == sorted(e.key for e in dram.entries)  # nothing stray, nothing half-filled
