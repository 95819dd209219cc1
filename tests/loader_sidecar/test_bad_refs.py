"""Bad input to the loader's gRPC API, end to end over its socket, with a `file://` store (what the
pure tests of refs.py and stores/file.py do not cover: the status a client gets on every RPC that
takes a model, symlinked checkpoint directories, checkpoints that claim huge sizes, and the file
system around the store and the tiers, which must not change).

Every refusal is a gRPC status with a message that says what is wrong; nothing outside the store is
read (the outside targets include a FIFO: opening it would hang the call) and nothing outside the
tiers is written (a snapshot of the whole tree before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest

from sllm_knative.loader import errors
from sllm_knative.loader import loader_pb2 as pb

HUGE = 1 << 62


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    src = build_model(tmp_path_factory.mktemp("bad-refs-src") / "tiny")
    out = tmp_path_factory.mktemp("bad-refs-ckpt") / "tiny"
    convert(src, out)
    return out


@pytest.fixture
def layout(tmp_path, tiny_checkpoint) -> Path:
    """tmp_path/root: store/ (tiny, the symlinks out, the huge ones) and outside/ (what they point at)."""
    root = tmp_path / "root"
    store, outside = root / "store", root / "outside"
    shutil.copytree(tiny_checkpoint, store / "tiny")
    shutil.copytree(tiny_checkpoint, outside / "tiny")  # a whole checkpoint, outside the store
    (outside / "secret").write_text("not for the loader")
    os.mkfifo(outside / "fifo")  # opened, it would block the call forever
    (store / "dir-link").symlink_to(outside / "tiny", target_is_directory=True)
    shutil.copytree(tiny_checkpoint, store / "file-link")
    (store / "file-link" / "partition-0.bin").unlink()
    (store / "file-link" / "partition-0.bin").symlink_to(outside / "fifo")
    shutil.copytree(tiny_checkpoint, store / "config-link")
    (store / "config-link" / "config.json").unlink()
    (store / "config-link" / "config.json").symlink_to(outside / "secret")
    (store / "parent-link").symlink_to(root, target_is_directory=True)  # store/parent-link/outside/tiny
    shutil.copytree(tiny_checkpoint, store / "huge-index")
    index_path = store / "huge-index" / "sllm-index.json"
    index = json.loads(index_path.read_text())
    index["partitions"][0]["size"] = HUGE
    index_path.write_text(json.dumps(index))
    hf = store / "huge-hf"  # a plain Hugging Face checkpoint whose weights file is 1 TiB (sparse)
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, hf / name)
    with open(hf / "model.safetensors", "wb") as f:
        f.truncate(1 << 40)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: its kind and, for files, size, mtime and a hash of the first MiB."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # symlinks are not followed
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_fifo():
                out[str(p)] = ("fifo",)
            elif p.is_file():
                with open(p, "rb") as f:
                    out[str(p)] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(f.read(1 << 20)).hexdigest())
            else:
                out[str(p)] = ("dir",)
    return out


def tier_files(thread) -> list[Path]:
    return [p for d in (thread.config.ssd_dir, thread.config.dram_dir) if d.exists()
            for p in d.rglob("*") if p.is_file()]


def rpc_status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__next__"):
            next(result)  # Acquire answers with a stream: its first message, or the error
    return info.value.code(), info.value.details()


MALFORMED = [
    pytest.param("", "non-empty", id="empty"),
    pytest.param("../tiny", "not a valid name", id="dotdot"),
    pytest.param("tiny/../../outside/tiny", "not a valid name", id="dotdot-inside"),
    pytest.param("..", "not a valid name", id="dotdot-only"),
    pytest.param("/etc/passwd", "not a valid name", id="absolute"),
    pytest.param("file:///etc/passwd", "not under a configured store", id="file-uri-outside"),
    pytest.param("file://{root}/outside/tiny", "not under a configured store", id="file-uri-sibling"),
    pytest.param("file://{root}/store/../outside/tiny", "not a valid name", id="file-uri-dotdot"),
    pytest.param("file://{root}/store/%2e%2e/outside/tiny", "escapes", id="percent-dotdot"),
    pytest.param("tiny\\..\\..\\outside", "escapes", id="backslashes"),
    pytest.param("tiny\x00", "", id="nul"),
    pytest.param("tiny\n", "", id="newline"),
    pytest.param("t" * 10_000, "(10000 characters)", id="10k-name"),
    pytest.param("file://{root}/store/" + "t" * 5_000, "at most 1024 characters", id="5k-uri"),
    pytest.param("/".join(["a"] * 200), "at most", id="200-segments"),
    pytest.param("tiny@main", "only for hf://", id="revision-not-hf"),
    pytest.param("http://127.0.0.1:9/tiny", "not under a configured store", id="other-store"),
    pytest.param("gopher://x/tiny", "", id="other-scheme"),
]


@pytest.mark.parametrize("model, message", MALFORMED)
def test_malformed_refs_are_invalid_argument_on_every_rpc(layout, sidecar, model, message):
    thread, client = sidecar([f"file://{layout}/store"])
    model = model.replace("{root}", str(layout))
    before = snapshot(layout)
    calls = {
        "Acquire": lambda: client.stub.Acquire(pb.AcquireRequest(model=model, device="cpu"), timeout=10),
        "Prefetch": lambda: client.stub.Prefetch(pb.PrefetchRequest(model=model, tier="ssd", wait=True), timeout=10),
        "Evict": lambda: client.stub.Evict(pb.EvictRequest(model=model), timeout=10),
    }
    for name, call in calls.items():
        code, details = rpc_status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert message in details and len(details) < 2000, (name, details)
        assert details.strip(), name
    assert snapshot(layout) == before
    assert tier_files(thread) == []
    with client.acquire("tiny") as lease:  # still serving
        lease.wait_complete(timeout=30)


@pytest.mark.parametrize("model", ["dir-link", "file-link", "config-link", "parent-link/outside/tiny"])
def test_symlinks_out_of_the_store_are_refused_unread(layout, sidecar, model):
    thread, client = sidecar([f"file://{layout}/store"])
    before = snapshot(layout)
    def acquire() -> None:
        with client.acquire(model) as lease:  # granted from the index; the fill then refuses the file
            lease.wait_complete(timeout=20)

    for call in (acquire, lambda: client.prefetch(model, tier="ssd")):
        with pytest.raises(errors.BadRequest, match="resolves outside the store"):
            call()  # a read of the FIFO would block: the call would time out instead
    code, details = rpc_status(lambda: client.stub.Prefetch(pb.PrefetchRequest(model=model, tier="dram", wait=True),
                                                            timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "symlink to" in details, details
    assert snapshot(layout) == before
    assert not [p for p in tier_files(thread) if p.stat().st_size > 0], tier_files(thread)
    assert all(e.leases == 0 for t in client.inventory().tiers for e in t.entries)


@pytest.mark.parametrize("model, error", [
    pytest.param("huge-index", (errors.TierFull, errors.CorruptData), id="index-claims-4-EiB"),
    pytest.param("huge-hf", (errors.TierFull,), id="1-TiB-weights"),
])
def test_huge_sizes_are_refused_before_anything_is_written(layout, sidecar, model, error):
    thread, client = sidecar([f"file://{layout}/store"])
    before = snapshot(layout)
    with pytest.raises(error) as info:
        lease = client.acquire(model)
        lease.wait_complete(timeout=30)
    assert "bytes" in str(info.value) or "size" in str(info.value), info.value
    with pytest.raises(error):
        client.prefetch(model, tier="ssd")
    assert snapshot(layout) == before
    capacity = 64 << 20
    assert sum(p.stat().st_blocks * 512 for p in tier_files(thread)) <= capacity, tier_files(thread)
    assert all(p.stat().st_size <= capacity for p in tier_files(thread)), tier_files(thread)
    with client.acquire("tiny") as lease:  # the sidecar goes on serving
        lease.wait_complete(timeout=30)
    assert all(e.leases == 0 for t in client.inventory().tiers for e in t.entries)
