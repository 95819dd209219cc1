"""Each store kind against a real server: sizes, range reads, absent files, refusals."""

from __future__ import annotations

import asyncio
import os

import pytest

from loader_sidecar.refs import parse_store, resolve
from loader_sidecar.stores.file import FileStore
from loader_sidecar.stores.hf import HfStore
from loader_sidecar.stores.http import HttpStore
from loader_sidecar.stores.s3 import S3Store
from sllm_knative.loader import errors


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _read(store, ref, name: str, start: int, end: int) -> bytes:  # type: ignore[no-untyped-def]
    try:
        return b"".join([c async for c in store.read(ref, name, start, end)])
    finally:
        await store.aclose()


def _expected(store_root, model: str, name: str, start: int, end: int) -> bytes:
    with open(store_root / "models" / model / name, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def test_file_store(store_root, tmp_path):
    root = parse_store(f"file://{store_root}/models")
    store = FileStore(root)
    ref = resolve("small", [root])
    size = os.path.getsize(store_root / "models" / "small" / "partition-1.bin")
    assert _run(store.size(ref, "partition-1.bin")) == size
    assert _run(store.size(ref, "absent.bin")) is None
    assert _run(_read(store, ref, "partition-1.bin", 70_000, 1_500_000)) == \
        _expected(store_root, "small", "partition-1.bin", 70_000, 1_500_000)
    with pytest.raises(errors.NotFound):
        _run(_read(store, ref, "absent.bin", 0, 10))


def test_file_store_refuses_symlinks_out_of_the_store(tmp_path):
    (tmp_path / "store" / "m").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", tmp_path / "store" / "m" / "config.json")
    root = parse_store(f"file://{tmp_path}/store")
    with pytest.raises(errors.BadRequest, match="resolves outside the store"):
        _run(FileStore(root).size(resolve("m", [root]), "config.json"))


def test_http_store_ranges_and_statuses(nginx, store_root):
    root = parse_store(f"{nginx.url}/models")
    ref = resolve("small", [root])
    store = HttpStore(root, timeout_s=5, connections=2)
    size = _run(store.size(ref, "partition-0.bin"))
    assert size == os.path.getsize(store_root / "models" / "small" / "partition-0.bin")
    assert _run(HttpStore(root, timeout_s=5, connections=2).size(ref, "absent.bin")) is None
    got = _run(_read(HttpStore(root, timeout_s=5, connections=2), ref, "partition-0.bin", 65_536, 200_000))
    assert got == _expected(store_root, "small", "partition-0.bin", 65_536, 200_000)
    assert nginx.requests('"GET /models/small/partition-0.bin')[-1].split('"')[2].split()[0] == "206"
    with pytest.raises(errors.NotFound, match="HTTP 404"):
        _run(_read(HttpStore(root, timeout_s=5, connections=2), ref, "absent.bin", 0, 10))
    broken = parse_store(f"{nginx.url}/err500")
    with pytest.raises(errors.StoreUnavailable, match="HTTP 500"):
        _run(_read(HttpStore(broken, timeout_s=5, connections=2), resolve("small", [broken]), "x.bin", 0, 10))


def test_hf_store_uses_resolve_urls_and_token(nginx, store_root, hf_token):
    root = parse_store("hf://")
    ref = resolve("hf://org/small", [root])

    def store(token):  # type: ignore[no-untyped-def]
        return HfStore(root, endpoint=f"{nginx.url}/hf", token=token, timeout_s=5, connections=2)

    assert _run(store(hf_token).size(ref, "partition-1.bin")) == \
        os.path.getsize(store_root / "models" / "small" / "partition-1.bin")
    got = _run(_read(store(hf_token), ref, "partition-1.bin", 4096, 80_000))
    assert got == _expected(store_root, "small", "partition-1.bin", 4096, 80_000)
    assert nginx.requests("GET /hf/org/small/resolve/main/partition-1.bin")
    with pytest.raises(errors.AccessDenied, match="HTTP 401"):
        _run(store("wrong").size(ref, "partition-1.bin"))


def test_s3_store(s3, store_root):
    root = parse_store("s3://models-bucket/ckpt")
    ref = resolve("small", [root])

    def store():  # type: ignore[no-untyped-def]
        return S3Store(root, endpoint=s3, timeout_s=5, connections=2)

    assert _run(store().size(ref, "partition-0.bin")) == \
        os.path.getsize(store_root / "models" / "small" / "partition-0.bin")
    assert _run(store().size(ref, "absent.bin")) is None
    got = _run(_read(store(), ref, "partition-0.bin", 1000, 300_000))
    assert got == _expected(store_root, "small", "partition-0.bin", 1000, 300_000)
    with pytest.raises(errors.NotFound, match="NoSuchKey"):
        _run(_read(store(), ref, "absent.bin", 0, 10))
