"""`s3://bucket/prefix` store through boto3 (the `s3` extra), with an endpoint override.

boto3 is synchronous and thread-safe: each call runs in a worker thread. Retries are the
fetcher's job, so botocore's own retries are turned off (one attempt per call).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from loader_sidecar.refs import ModelRef, StoreRoot
from loader_sidecar.stores.base import READ_CHUNK, Store
from sllm_knative.loader.errors import (
    AccessDenied,
    BadRequest,
    LoaderError,
    NotFound,
    Stalled,
    StoreUnavailable,
)

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"401", "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}


def client_error(code: str, where: str) -> LoaderError:
    """The sidecar error for an S3 error code (pure; table-tested)."""
    if code in _MISSING:
        return NotFound(f"{where}: {code}, not found")
    if code in _DENIED:
        return AccessDenied(f"{where}: {code}, access denied")
    return StoreUnavailable(f"{where}: S3 error {code}")


class S3Store(Store):
    def __init__(self, root: StoreRoot, *, endpoint: str | None, timeout_s: float, connections: int) -> None:
        super().__init__(root)
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError as exc:
            raise BadRequest(f"store {root.uri}: S3 stores need boto3 (pip install 'sllm-knative[s3]')") from exc
        self._client = boto3.client(
            "s3", endpoint_url=endpoint,
            config=BotoConfig(max_pool_connections=max(10, connections * 4), connect_timeout=timeout_s,
                              read_timeout=timeout_s, retries={"max_attempts": 1, "mode": "standard"}))
        self._timeout_s = timeout_s

    def _key(self, ref: ModelRef, file: str) -> str:
        return f"{ref.path}/{file}"

    def location(self, ref: ModelRef, file: str) -> str:
        return f"s3://{self.root.host}/{self._key(ref, file)}"

    def _translate(self, exc: Exception, where: str) -> LoaderError:
        from botocore.exceptions import ClientError, ConnectTimeoutError, ReadTimeoutError

        if isinstance(exc, ClientError):
            return client_error(str(exc.response.get("Error", {}).get("Code", "")), where)
        if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
            return Stalled(f"{where}: no bytes within {self._timeout_s:g} s")
        return StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}")

    async def size(self, ref: ModelRef, file: str) -> int | None:
        where = self.location(ref, file)
        try:
            head = await asyncio.to_thread(self._client.head_object, Bucket=self.root.host,
                                           Key=self._key(ref, file))
        except Exception as exc:
            err = self._translate(exc, where)
            if isinstance(err, NotFound):
                return None
            raise err from exc
        return int(head["ContentLength"])

    async def read(self, ref: ModelRef, file: str, start: int, end: int) -> AsyncIterator[bytes]:
        where = f"{self.location(ref, file)} bytes {start}-{end - 1}"
        body: Any = None
        try:
            obj = await asyncio.to_thread(self._client.get_object, Bucket=self.root.host,
                                          Key=self._key(ref, file), Range=f"bytes={start}-{end - 1}")
            body = obj["Body"]
            left = end - start
            while left > 0:
                chunk = await asyncio.to_thread(body.read, min(READ_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk
        except LoaderError:
            raise
        except Exception as exc:
            raise self._translate(exc, where) from exc
        finally:
            if body is not None:
                body.close()
