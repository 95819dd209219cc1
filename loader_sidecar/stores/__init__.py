"""Model stores, one module per kind behind `Store` (base.py); `open_store` picks by scheme."""

from __future__ import annotations

from loader_sidecar.config import Config
from loader_sidecar.refs import StoreRoot
from loader_sidecar.stores.base import Store

__all__ = ["Store", "open_store"]


def open_store(root: StoreRoot, config: Config) -> Store:
    """The store for a configured root (imports the optional client it needs, e.g. boto3)."""
    if root.scheme == "file":
        from loader_sidecar.stores.file import FileStore

        return FileStore(root)
    if root.scheme in ("http", "https"):
        from loader_sidecar.stores.http import HttpStore

        return HttpStore(root, timeout_s=config.timeout_s, connections=config.connections)
    if root.scheme == "hf":
        from loader_sidecar.stores.hf import HfStore

        return HfStore(root, endpoint=config.hf_endpoint, token=config.hf_token, timeout_s=config.timeout_s,
                       connections=config.connections)
    if root.scheme == "s3":
        from loader_sidecar.stores.s3 import S3Store

        return S3Store(root, endpoint=config.s3_endpoint, timeout_s=config.timeout_s,
                       connections=config.connections)
    raise ValueError(f"store {root.uri}: no store for scheme {root.scheme!r}")
