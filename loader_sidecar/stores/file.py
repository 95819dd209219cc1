"""`file://` store: a local directory (also a mounted PVC or NFS export)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from loader_sidecar.refs import ModelRef, StoreRoot
from loader_sidecar.stores.base import READ_CHUNK, Store
from sllm_knative.loader.errors import AccessDenied, BadRequest, NotFound, StoreUnavailable


class FileStore(Store):
    def __init__(self, root: StoreRoot) -> None:
        super().__init__(root)
        self._base = "/" + root.prefix

    def _path(self, ref: ModelRef, file: str) -> str:
        path = os.path.join(self._base, ref.name, file)
        real, base = os.path.realpath(path), os.path.realpath(self._base)
        if not real.startswith(base.rstrip("/") + "/"):
            raise BadRequest(f"{path}: resolves outside the store {self.root.uri} (symlink to {real})")
        return path

    def location(self, ref: ModelRef, file: str) -> str:
        return os.path.join(self._base, ref.name, file)

    async def size(self, ref: ModelRef, file: str) -> int | None:
        path = self._path(ref, file)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise AccessDenied(f"{path}: {exc.strerror}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"{path}: {exc.strerror or exc}") from exc
        return st.st_size if os.path.isfile(path) else None

    async def read(self, ref: ModelRef, file: str, start: int, end: int) -> AsyncIterator[bytes]:
        path = self._path(ref, file)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"{path}: not found") from exc
        except PermissionError as exc:
            raise AccessDenied(f"{path}: {exc.strerror}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"{path}: {exc.strerror or exc}") from exc
        try:
            pos = start
            while pos < end:
                try:
                    chunk = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, end - pos), pos)
                except OSError as exc:
                    raise StoreUnavailable(f"{path} at offset {pos}: {exc.strerror or exc}") from exc
                if not chunk:
                    return
                pos += len(chunk)
                yield chunk
        finally:
            os.close(fd)
