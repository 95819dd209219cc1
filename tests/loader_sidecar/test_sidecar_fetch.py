"""Fetching through the real sidecar (gRPC) from real stores, with faults: every case ends in a clear
error or a successful retry/resume, and no corrupt or partial file is ever served or kept."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sllm_knative import format as fmt
from sllm_knative.loader import errors
from testkit.servers import CutProxy


def partitions_of(model_dir: Path) -> list[bytes]:
    index = fmt.read_index(model_dir)
    return [(model_dir / p.file).read_bytes() for p in index.partitions]


def lease_partitions(lease) -> list[bytes]:  # type: ignore[no-untyped-def]
    lease.wait_complete(timeout=60)
    return [Path(p.path).read_bytes() for p in lease.partitions]


def tier(inventory, name: str):  # type: ignore[no-untyped-def]
    return next(t for t in inventory.tiers if t.name == name)


def wait_for(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
    return value


def ssd_states(client) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.state for e in tier(client.inventory(), "ssd").entries]


def assert_nothing_kept(client, thread) -> None:  # type: ignore[no-untyped-def]
    """After a failed fetch: no entry in any tier, no bytes on disk but empty staging."""
    inv = client.inventory()
    assert [e.model for t in inv.tiers for e in t.entries] == []
    assert list(thread.config.dram_dir.iterdir()) == []
    leftovers = [p for p in thread.config.ssd_dir.rglob("*") if p.is_file()]
    assert leftovers == []


@pytest.mark.parametrize("store, model, env", [
    pytest.param("{nginx}/models", "small", None, id="http"),
    pytest.param("hf://", "hf://org/small", {"HF_ENDPOINT": "{nginx}/hf", "HF_TOKEN": "{token}"}, id="hf"),
    pytest.param("s3://models-bucket/ckpt", "small", {"AWS_ENDPOINT_URL": "{s3}"}, id="s3"),
    pytest.param("file://{root}/models", "small", None, id="file"),
])
def test_acquire_from_each_store_kind(request, sidecar, store_root, hf_token, store, model, env):
    fill = {"root": str(store_root), "token": hf_token}
    if "{nginx}" in store + str(env):
        fill["nginx"] = request.getfixturevalue("nginx").url
    if "{s3}" in str(env):
        fill["s3"] = request.getfixturevalue("s3")
    env = {k: v.format(**fill) for k, v in (env or {}).items()}
    thread, client = sidecar([store.format(**fill)], env=env)
    with client.acquire(model, instance="pod-1") as lease:
        assert lease.source == "remote"
        assert lease_partitions(lease) == partitions_of(store_root / "models" / "small")
        assert {"config.json", "tokenizer.json", fmt.INDEX_NAME} <= set(lease.files)
        assert fmt.read_index(lease.directory).total_bytes == lease.total_bytes
        inv = client.inventory()
        assert [(e.state, e.leases) for e in tier(inv, "dram").entries] == [("ready", 1)]
        wait_for(lambda: ssd_states(client) == ["ready"])  # the SSD copy is flushed after DRAM is ready
        assert [x.instance for x in inv.leases] == ["pod-1"]
        assert any(b.hop.startswith("remote:") and b.bytes_per_second > 0 for b in inv.bandwidths)
    assert client.inventory().leases == []
    # Second acquire: a DRAM hit, no transfer.
    with client.acquire(model) as lease:
        assert lease.source == "dram"


def test_dram_tier_loads_as_a_model(nginx, sidecar, store_root):
    import torch

    from sllm_knative import loading

    _, client = sidecar([f"{nginx.url}/models"])
    with client.acquire("tiny") as lease:
        lease.wait_complete(timeout=30)
        model = loading.load_model(lease.directory)
        reference = loading.load_state_dict(store_root / "models" / "tiny")
        for name, t in model.state_dict().items():
            if name in reference:
                assert torch.equal(t, reference[name]), name


def test_plain_hugging_face_checkpoint_is_converted_once_on_the_node(nginx, sidecar, store_root):
    thread, client = sidecar([f"{nginx.url}/models"])
    with client.acquire("tiny-hf") as lease:
        got = lease_partitions(lease)
    assert got == partitions_of(store_root / "models" / "tiny")  # same bytes as the converter's output
    assert ssd_states(client) == ["ready"]
    assert fmt.is_checkpoint(thread.config.ssd_dir / lease.key)
    assert not (thread.config.ssd_dir / lease.key / "model.safetensors").exists()


def test_a_gguf_file_is_converted_once_on_the_node_with_its_config_and_tokenizer(sidecar, tmp_path):
    from sllm_knative import loading
    from sllm_knative.convert import convert
    from tests.checkpoint.gguf_files import write_tiny_gguf

    (tmp_path / "store" / "tiny-gguf").mkdir(parents=True)
    gguf = write_tiny_gguf(tmp_path / "store" / "tiny-gguf" / "model.gguf")
    reference = convert(gguf, tmp_path / "reference")
    thread, client = sidecar([f"file://{tmp_path / 'store'}"])
    with client.acquire("tiny-gguf") as lease:
        lease.wait_complete(timeout=30)
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                fmt.INDEX_NAME} <= set(lease.files)
        assert lease_partitions(lease) == partitions_of(reference)  # what `sllm-knative convert` writes
        model = loading.load_model(lease.directory)
        assert next(model.parameters()).dtype.is_floating_point and model.config.model_type == "llama"
    assert ssd_states(client) == ["ready"]
    assert not (thread.config.ssd_dir / lease.key / "model.gguf").exists()


def test_a_corrupt_gguf_file_is_a_clear_error(sidecar, tmp_path):
    from tests.checkpoint.gguf_files import write_tiny_gguf

    (tmp_path / "store" / "bad").mkdir(parents=True)
    gguf = write_tiny_gguf(tmp_path / "store" / "bad" / "model.gguf")
    gguf.write_bytes(gguf.read_bytes()[:-100])
    thread, client = sidecar([f"file://{tmp_path / 'store'}"])
    with pytest.raises(errors.CorruptData, match=r"bad: the GGUF checkpoint cannot be converted: .*model.gguf: "
                                                 r"tensor '.*': truncated"):
        client.acquire("bad")
    assert_nothing_kept(client, thread)


def test_ssd_hit_fills_dram_with_direct_reads(nginx, sidecar, store_root):
    thread, client = sidecar([f"{nginx.url}/models"])
    assert client.prefetch("small", tier="ssd").source == "remote"
    fetched = len(nginx.requests("/models/small/partition-"))
    with client.acquire("small") as lease:
        assert lease.source == "ssd"
        assert lease_partitions(lease) == partitions_of(store_root / "models" / "small")
    assert len(nginx.requests("/models/small/partition-")) == fetched  # nothing fetched again
    hops = {b.hop for b in client.inventory().bandwidths}
    assert {"disk_read", "dram_copy"} <= hops


def test_watermarks_rise_before_the_fill_ends(nginx, sidecar, store_root):
    """Slow store (nginx limit_rate): the lease is granted at once, bytes below the watermark are
    already final while the rest is still arriving."""
    thread, client = sidecar([f"{nginx.url}/slow/models"], "--connections", "2")
    expected = partitions_of(store_root / "models" / "small")[0]
    with client.acquire("small") as lease:
        assert lease.source == "remote" and not lease.complete
        seen = [lease.wait(0, n, timeout=30) for n in (65536, 300_000, 600_000)]
        assert not lease.complete and seen == sorted(seen) and seen[-1] < lease.partitions[0].size
        mark = lease.filled[0]
        with open(lease.partitions[0].path, "rb") as f:
            assert f.read(mark) == expected[:mark]


def test_not_found_is_a_clear_error(nginx, sidecar):
    thread, client = sidecar([f"{nginx.url}/models"])
    with pytest.raises(errors.NotFound, match=r"missing.*neither sllm-index.json nor config.json"):
        client.acquire("missing")
    assert_nothing_kept(client, thread)


def test_server_error_is_retried_then_reported(nginx, sidecar):
    thread, client = sidecar([f"{nginx.url}/err500"], "--retries", "2")
    with pytest.raises(errors.StoreUnavailable, match="HTTP 500"):
        client.acquire("small")
    assert len(nginx.requests("/err500/small/sllm-index.json")) == 3  # first try + 2 retries
    assert_nothing_kept(client, thread)


def test_connection_cut_mid_file_resumes(nginx, sidecar, store_root):
    with CutProxy(nginx.port, after=150_000, faulty=3) as proxy:
        thread, client = sidecar([f"{proxy.url}/models"])
        with client.acquire("small") as lease:
            assert lease_partitions(lease) == partitions_of(store_root / "models" / "small")
        assert proxy.broken == 3
    resumed = [line for line in nginx.requests("/models/small/partition-") if "206" in line]
    assert len(resumed) > len(partitions_of(store_root / "models" / "small"))


def test_connection_cut_every_time_gives_up_cleanly(nginx, sidecar):
    with CutProxy(nginx.port, after=2_000, faulty=1000) as proxy:
        thread, client = sidecar([f"{proxy.url}/models"], "--retries", "2")
        with pytest.raises(errors.StoreUnavailable, match="gave up after 3 attempts"):
            client.acquire("small").wait_complete(timeout=30)
        assert_nothing_kept(client, thread)


def test_stalled_server_times_out_and_resumes(nginx, sidecar, store_root):
    with CutProxy(nginx.port, after=100_000, faulty=1, mode="stall") as proxy:
        thread, client = sidecar([f"{proxy.url}/models"], "--timeout", "0.5", "--connections", "1")
        with client.acquire("small") as lease:
            assert lease_partitions(lease) == partitions_of(store_root / "models" / "small")
        assert proxy.broken == 1


def test_stalled_server_forever_is_reported(nginx, sidecar):
    with CutProxy(nginx.port, after=100_000, faulty=1000, mode="stall") as proxy:
        thread, client = sidecar([f"{proxy.url}/models"], "--timeout", "0.3", "--retries", "1")
        with pytest.raises(errors.Stalled, match="no bytes within 0.3 s"):
            client.acquire("small").wait_complete(timeout=30)
        assert_nothing_kept(client, thread)


def test_checksum_mismatch_is_never_served(nginx, sidecar):
    thread, client = sidecar([f"{nginx.url}/models"])
    lease = client.acquire("corrupt")
    with pytest.raises(errors.CorruptData, match=r"partition-1.bin: block 5 .* store's copy is corrupt"):
        lease.wait_complete(timeout=30)
    assert lease.filled[1] <= 5 * 65536  # the watermark never covered the bad block
    lease.release()
    assert_nothing_kept(client, thread)


def test_a_checkpoint_over_the_ssd_budget_goes_to_dram_only(nginx, sidecar):
    """An instance waiting on a checkpoint the SSD tier cannot hold gets it from DRAM: the SSD
    copy is what is given up, not the cold start. A prefetch into the SSD tier alone fails with
    the reason."""
    thread, client = sidecar([f"{nginx.url}/models"], "--ssd-bytes", "1MiB")
    with client.acquire("small") as lease:
        lease.wait_complete(timeout=30)
        assert lease.source == "remote"
    inv = client.inventory()
    assert [e.model for e in tier(inv, "ssd").entries] == []
    assert [e.state for e in tier(inv, "dram").entries] == ["ready"]
    assert [p for p in thread.config.ssd_dir.rglob("*") if p.is_file()] == []
    with pytest.raises(errors.TierFull, match=r"ssd tier: needs 4\d+ bytes but its whole budget is 1048576"):
        client.prefetch("small", tier="ssd", wait=True)
    with client.acquire("tiny") as lease:  # what fits goes to both tiers
        lease.wait_complete(timeout=30)
    wait_for(lambda: ssd_states(client) == ["ready"])


def test_full_dram_budget_of_leased_checkpoints(nginx, sidecar):
    thread, client = sidecar([f"{nginx.url}/models"], "--dram-bytes", "5000000")
    small = client.acquire("small")
    small.wait_complete(timeout=30)
    with pytest.raises(errors.TierFull, match=r"dram tier: needs \d+ bytes.*small .*1 leases"):
        client.acquire("tiny")
    small.release()
    with client.acquire("tiny") as lease:  # the idle checkpoint is evicted for it
        lease.wait_complete(timeout=30)
        dram = tier(client.inventory(), "dram")
        assert [e.model.rsplit("/", 1)[1] for e in dram.entries] == ["tiny"]


def test_only_configured_stores_and_valid_names(nginx, sidecar):
    _, client = sidecar([f"{nginx.url}/models"])
    before = len(nginx.requests())
    for model, message in [("../tiny", "not a valid name"), ("http://127.0.0.1:1/models/tiny", "not under"),
                           (f"{nginx.url}/slow/tiny", "not under a configured store")]:
        with pytest.raises(errors.BadRequest, match=message):
            client.acquire(model)
    with pytest.raises(errors.BadRequest, match="device 'cuda:0': this node has 0 GPU"):
        client.acquire("tiny", device="cuda:0")
    assert len(nginx.requests()) == before


def test_corrupt_ssd_copy_is_dropped_not_served(nginx, sidecar, store_root):
    thread, client = sidecar([f"{nginx.url}/models"])
    client.prefetch("small", tier="ssd")
    key = tier(client.inventory(), "ssd").entries[0].key
    with open(thread.config.ssd_dir / key / "partition-0.bin", "r+b") as f:  # bit rot on the node's disk
        f.seek(200_000)
        f.write(b"\x00\x01\x02")
    lease = client.acquire("small")
    assert lease.source == "ssd"
    with pytest.raises(errors.CorruptData, match="SSD copy of .*small failed verification and was dropped"):
        lease.wait_complete(timeout=30)
    lease.release()
    assert_nothing_kept(client, thread)
    with client.acquire("small") as lease:  # fetched again from the store, verified
        assert lease.source == "remote"
        assert lease_partitions(lease) == partitions_of(store_root / "models" / "small")
