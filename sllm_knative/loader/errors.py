"""The loader sidecar's exception tree, shared by the sidecar and its clients.

The sidecar raises these and maps each to a gRPC status (loader_sidecar/server.py,
`status_for`); the client maps the status back to the class (client.py, `error_from_rpc`).

    LoaderError
     ├── BadRequest            a model reference, tier or device that is not valid here
     ├── NotFound              the store has no such checkpoint / file (HTTP 404, NoSuchKey, ENOENT)
     ├── AccessDenied          the store refused us (HTTP 401/403, S3 AccessDenied)
     ├── StoreUnavailable      the store kept failing after every retry (5xx, refused, cut)
     │    └── Stalled          no bytes arrived within the read timeout, after every retry
     ├── CorruptData           bytes that do not match the checkpoint's checksums or sizes
     ├── TierFull              a tier cannot make room without evicting leased / in-use entries
     ├── DiskError             a local tier file could not be written or read (ENOSPC, EIO)
     ├── InUse                 an eviction of a checkpoint that is leased, being read or filling
     └── UnknownLease          release of a lease id this sidecar does not hold

Foreign errors (httpx, botocore, OSError, sllm_knative.format) are translated where they
occur (loader_sidecar/stores/, loader_sidecar/fetch.py); nothing else leaves the sidecar's core.
"""

from __future__ import annotations


class LoaderError(Exception):
    """Base of every error the sidecar reports to a client."""


class BadRequest(LoaderError):
    pass


class NotFound(LoaderError):
    pass


class AccessDenied(LoaderError):
    pass


class StoreUnavailable(LoaderError):
    """A transient store failure; the fetcher retries these and raises the last one."""


class Stalled(StoreUnavailable):
    pass


class CorruptData(LoaderError):
    pass


class TierFull(LoaderError):
    """`transient`: the room is held only by entries being read, so it frees up by itself.
    `leased`: it would fit once the leases on it end too (an instance that stopped releases its
    lease when its process has exited)."""

    transient = False
    leased = False


class DiskError(LoaderError):
    pass


class InUse(LoaderError):
    pass


class UnknownLease(LoaderError):
    pass
