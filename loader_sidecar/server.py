"""gRPC adapter (grpc.aio) of the sidecar core, and the process's serve loop.

Errors become status codes here, in one place (`status_for`); the core never sees grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import start_http_server

from loader_sidecar.config import Config, host_port, listen_address
from loader_sidecar.leases import Lease
from loader_sidecar.node import Node
from loader_sidecar.watermarks import Watermarks
from sllm_knative.loader import errors
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.loader import loader_pb2_grpc as pb_grpc
from sllm_knative.log import get_logger

if TYPE_CHECKING:
    from sllm_knative.kube.nodecache import NodeCachePublisher

_log = get_logger("loader_sidecar.server")

# Most specific first: Stalled is a StoreUnavailable.
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Stalled, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.CorruptData, grpc.StatusCode.DATA_LOSS),
    (errors.TierFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DiskError, grpc.StatusCode.INTERNAL),
    (errors.InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnknownLease, grpc.StatusCode.NOT_FOUND),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for an error of the core."""
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _granted(lease: Lease) -> pb.LeaseEvent:
    layout = lease.fill.layout.result()
    parts = [pb.PartitionFile(file=p.file, path=str(layout.directory / p.file), size=p.size, block_size=p.block_size)
             for p in layout.index.partitions]
    return pb.LeaseEvent(granted=pb.LeaseGranted(
        lease_id=lease.id, model=lease.ref.uri, key=lease.ref.key, directory=str(layout.directory),
        partitions=parts, files=sorted(layout.files), source=layout.source, total_bytes=layout.index.total_bytes,
        device=lease.device))


def _progress(wm: Watermarks) -> pb.LeaseEvent:
    return pb.LeaseEvent(progress=pb.Watermarks(filled=list(wm.filled), complete=wm.complete))


class LoaderService(pb_grpc.LoaderServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL and not isinstance(exc, errors.LoaderError):
            _log.error("internal error", exc_info=True, error=str(exc))
        await context.abort(code, message)

    async def Acquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.LeaseEvent]:
        try:
            lease = await self.node.acquire(request.model, request.device or "cpu", request.instance)
        except Exception as exc:
            await self._abort(context, exc)
            return
        try:
            yield _granted(lease)
            wm = lease.fill.watermarks
            assert wm is not None
            version = -1
            while not lease.ended.is_set():
                changed = asyncio.ensure_future(wm.wait_newer(version))
                ended = asyncio.ensure_future(lease.ended.wait())
                try:
                    await asyncio.wait({changed, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    ended.cancel()
                if lease.ended.is_set():
                    break
                version = wm.version
                if wm.error is not None:
                    await self._abort(context, wm.error)
                event = _progress(wm)
                yield event
                if event.progress.complete:  # not wm.complete: it may have changed during the send
                    await lease.ended.wait()
        finally:
            if lease.id in self.node.leases.leases:  # the client went away or the fill failed
                self.node.release(lease.id)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseReply:
        try:
            self.node.release(request.lease_id)
        except Exception as exc:
            await self._abort(context, exc)
        return pb.ReleaseReply()

    async def Prefetch(self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext) -> pb.PrefetchReply:
        tier = request.tier or "dram"
        try:
            source = await self.node.prefetch(request.model, tier, request.wait)
            model = self.node.resolve(request.model).uri
        except Exception as exc:
            await self._abort(context, exc)
            raise
        return pb.PrefetchReply(model=model, tier=tier, source=source)

    async def Evict(self, request: pb.EvictRequest, context: grpc.aio.ServicerContext) -> pb.EvictReply:
        try:
            tiers, nbytes = self.node.evict(request.model, request.tier)
        except Exception as exc:
            await self._abort(context, exc)
            raise
        return pb.EvictReply(tiers=tiers, bytes=nbytes)

    async def GetInventory(self, request: pb.InventoryRequest, context: grpc.aio.ServicerContext) -> pb.Inventory:
        return self.node.inventory()

    async def WatchInventory(self, request: pb.InventoryRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.Inventory]:
        version = -1
        while True:
            version = await self.node.notifier.wait_newer(version)
            yield self.node.inventory()


class Sidecar:
    """A started node plus its gRPC server (and metrics endpoint); `stop` undoes `start`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = Node(config)
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self._metrics_server: Any = None
        self.publisher: NodeCachePublisher | None = None  # --kube-node

    async def start(self) -> str:
        await self.node.start()
        if self.config.kube_node:
            from loader_sidecar.nodecache import start_publisher

            try:
                self.publisher = start_publisher(self.node)  # KubeConfigError before anything listens
            except BaseException:
                await self.node.aclose()
                raise
        self.server = grpc.aio.server()
        pb_grpc.add_LoaderServicer_to_server(LoaderService(self.node), self.server)
        address = listen_address(self.config.listen)
        if address.startswith("unix://"):
            sock = Path(address[len("unix://"):])
            sock.parent.mkdir(parents=True, exist_ok=True)
            sock.unlink(missing_ok=True)  # a stale socket of a killed sidecar
            self.address = address
            self.server.add_insecure_port(address)
        else:
            host, _ = host_port(address, "listen")
            port = self.server.add_insecure_port(address)
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            self.address = f"{host}:{port}"
        await self.server.start()
        if address.startswith("unix://"):
            # Owner only (as the socket of any local daemon). On Kubernetes a function container
            # of another, non-root user could not connect before either (no write bit for it).
            os.chmod(address[len("unix://"):], 0o600)
        if self.config.metrics_addr:
            host, port = host_port(self.config.metrics_addr, "metrics")
            self._metrics_server, _ = start_http_server(port, host, registry=self.node.metrics.registry)
        _log.info("listening", node=self.config.node, address=self.address, stores=",".join(
            s.uri for s in self.config.stores), ssd=str(self.config.ssd_dir), dram=str(self.config.dram_dir),
            kube_node=self.config.kube_node, pid=os.getpid())
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self.publisher is not None:
            await self.publisher.stop()
            self.publisher = None
        if self.server is not None:
            await self.server.stop(grace)
        await self.node.aclose()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    sidecar = Sidecar(config)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _log.info("stopping", node=config.node)
    await sidecar.stop()
