"""A synchronous client of the loader sidecar, for instances, the autoscaler, the CLI and tests.

    with LoaderClient() as loader:                      # $SLLM_LOADER or the node's default socket
        with loader.acquire("hf://org/name", device="cpu", instance="pod-1") as lease:
            for i, part in enumerate(lease.partitions):
                lease.wait(i, part.size)                 # or wait(i, n) chunk by chunk, to pipeline
            model = loading.load_model(lease.directory)  # maps the DRAM-tier files on the CPU

A lease's events are consumed by a background thread; `wait(partition, nbytes)` returns as soon
as the first nbytes of that partition are filled and verified, so a device copy can follow the
fill. Errors come back as the sidecar's own exception classes (errors.py).
This module is the library's: it needs grpc and the generated stubs, never the sidecar's code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import TracebackType

import grpc

from sllm_knative.loader import errors
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.loader import loader_pb2_grpc as pb_grpc
from sllm_knative.loader.address import default_target

_FROM_STATUS: dict[grpc.StatusCode, type[errors.LoaderError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.BadRequest,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.PERMISSION_DENIED: errors.AccessDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Stalled,
    grpc.StatusCode.UNAVAILABLE: errors.StoreUnavailable,
    grpc.StatusCode.DATA_LOSS: errors.CorruptData,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.TierFull,
    grpc.StatusCode.INTERNAL: errors.DiskError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.InUse,
}


def error_from_rpc(exc: grpc.RpcError) -> errors.LoaderError:
    code = exc.code()
    cls = _FROM_STATUS.get(code, errors.LoaderError)
    return cls(f"{exc.details()} [{code.name}]")


class LeaseHandle:
    """The client's handle on a granted lease (the loader's own record of it is
    `loader_sidecar.leases.Lease`); watermarks follow the fill until it completes."""

    def __init__(self, client: LoaderClient, call: grpc.Future, granted: pb.LeaseGranted,
                 events: Iterator[pb.LeaseEvent]) -> None:
        self._client = client
        self._call = call
        self.id = granted.lease_id
        self.model = granted.model
        self.key = granted.key
        self.directory = granted.directory
        self.partitions = list(granted.partitions)
        self.files = list(granted.files)
        self.source = granted.source
        self.total_bytes = granted.total_bytes
        self.device = granted.device
        self.filled = [0] * len(self.partitions)
        self.complete = False
        self.error: errors.LoaderError | None = None
        self._released = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._follow, args=(events,), name=f"lease-{self.id}", daemon=True)
        self._thread.start()

    def _follow(self, events: Iterator[pb.LeaseEvent]) -> None:
        try:
            for ev in events:
                if ev.WhichOneof("event") == "progress":
                    with self._cond:
                        self.filled = list(ev.progress.filled)
                        self.complete = ev.progress.complete
                        self._cond.notify_all()
            error = None if self.complete else errors.LoaderError("the lease ended before the fill completed")
        except grpc.RpcError as exc:
            error = None if self._released else error_from_rpc(exc)
        with self._cond:
            if error is not None and not self._released:
                self.error = error
            self._cond.notify_all()

    def wait(self, partition: int, nbytes: int, timeout: float | None = None) -> int:
        """Block until the first nbytes of a partition are filled; returns the watermark."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.filled[partition] >= nbytes or self.error is not None or self._released, timeout)
            if self.error is not None:
                raise self.error
            if self._released:
                raise errors.UnknownLease(f"lease {self.id} was released")
            if not ok:
                raise TimeoutError(f"partition {partition} of {self.model}: {self.filled[partition]} of {nbytes} "
                                   f"bytes after {timeout} s")
            return self.filled[partition]

    def wait_complete(self, timeout: float | None = None) -> None:
        for i, p in enumerate(self.partitions):
            self.wait(i, p.size, timeout)

    def release(self) -> None:
        with self._cond:
            if self._released:
                return
            self._released = True
            self._cond.notify_all()
        try:
            self._client.stub.Release(pb.ReleaseRequest(lease_id=self.id), timeout=10)
        except grpc.RpcError:
            pass  # gone already (or the sidecar is): cancelling the stream ends the lease too
        self._call.cancel()
        self._thread.join(timeout=10)

    def __enter__(self) -> LeaseHandle:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class LoaderClient:
    def __init__(self, target: str | None = None, *, timeout: float | None = None) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.LoaderStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LoaderClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _unary(self, method: str, request: object, timeout: float | None = None) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def acquire(self, model: str, device: str = "cpu", instance: str = "") -> LeaseHandle:
        """Lease a checkpoint; returns once it is granted (its files may still be filling)."""
        call = self.stub.Acquire(pb.AcquireRequest(model=model, device=device, instance=instance))
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        except StopIteration:
            raise errors.LoaderError("the sidecar ended the lease before granting it") from None
        if first.WhichOneof("event") != "granted":
            call.cancel()
            raise errors.LoaderError(f"protocol error: first lease event is {first.WhichOneof('event')!r}")
        return LeaseHandle(self, call, first.granted, call)

    def release(self, lease_id: str) -> None:
        """End a lease by id (a LeaseHandle's own `release` also stops following it)."""
        self._unary("Release", pb.ReleaseRequest(lease_id=lease_id))

    def prefetch(self, model: str, tier: str = "dram", wait: bool = True) -> pb.PrefetchReply:
        return self._unary("Prefetch", pb.PrefetchRequest(model=model, tier=tier, wait=wait))  # type: ignore[return-value]

    def evict(self, model: str, tier: str = "") -> pb.EvictReply:
        return self._unary("Evict", pb.EvictRequest(model=model, tier=tier))  # type: ignore[return-value]

    def inventory(self) -> pb.Inventory:
        return self._unary("GetInventory", pb.InventoryRequest())  # type: ignore[return-value]

    def watch(self) -> Iterator[pb.Inventory]:
        """The inventory now and after every change, until the caller stops iterating."""
        call = self.stub.WatchInventory(pb.InventoryRequest())
        try:
            yield from call
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                raise error_from_rpc(exc) from None
        finally:
            call.cancel()
