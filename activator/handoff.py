"""The activator's side of live migration: which requests can move (the stream table), the relay
of a stream that may be switched, finishing a non-streaming request elsewhere, the two triggers
(`migrate`, `drain`) that the admin API exposes, and recovery: every relayed stream's state is
exported from its instance every `--export-interval` seconds (`start`), so a stream whose
instance dies (kill -9, a node lost) resumes from it on another instance, or on a new one once it
is ready, instead of being cut. The protocol itself is in activator/migration/."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import httpx
from starlette.types import Send

from activator import errors, metrics
from activator.balancer import RoutedInstance
from activator.capacity import Capacity
from activator.metrics import ServiceMeters
from activator.migration import (
    InstanceClient,
    MigrationResult,
    StreamTable,
    Tracked,
    migrate_instance,
    pick_destination,
    resume_whole,
    splice,
)
from activator.migration.client import SourceFailed, SourceFinished
from activator.registry import Registry, RoutedService
from activator.request import response_headers
from activator.respond import prepend, send_whole
from sllm_knative.api.instance import GenerationState
from sllm_knative.api.keys import ServiceKey
from sllm_knative.log import get_logger

_log = get_logger("activator")


class Migrations:
    def __init__(self, registry: Registry, client: InstanceClient, capacity: Capacity) -> None:
        self.registry = registry
        self.client = client
        self.capacity = capacity  # where a resume with no instance to go to waits for one
        self.streams = StreamTable()  # requests by generation id (what a migration can move)
        self._export_loop: asyncio.Task[None] | None = None
        self._exports: set[asyncio.Task[None]] = set()

    # -- periodic exports ------------------------------------------------------------------

    def start(self) -> None:
        """Export every relayed stream's state every `export_interval_s` (0: only during migrations)."""
        interval = self.client.cfg.export_interval_s
        if interval > 0 and self._export_loop is None:
            self._export_loop = asyncio.get_running_loop().create_task(self._exporting(interval))

    async def stop(self) -> None:
        tasks = [*self._exports, *([self._export_loop] if self._export_loop else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._export_loop = None

    async def _exporting(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for tracked in self.streams.exportable():
                tracked.exporting = True
                task = asyncio.get_running_loop().create_task(self._export(tracked))
                self._exports.add(task)
                task.add_done_callback(self._exports.discard)

    async def _export(self, tracked: Tracked) -> None:
        """One export of a stream's state from the instance it runs on (kept if it still runs there)."""
        inst = tracked.instance
        tracked.mark()
        try:
            state = await self.client.export(inst, tracked.id)
        except SourceFinished:  # ended there (or several choices: they are not exported)
            metrics.observe_export("finished")
            return
        except SourceFailed as exc:
            metrics.observe_export("failed")
            _log.debug("export failed", id=tracked.id, instance=inst.id, error=str(exc))
            return
        finally:
            tracked.exporting = False
        metrics.observe_export("ok")
        if tracked.instance is inst and not tracked.ended:
            tracked.checkpoint(state)

    # -- the request path ------------------------------------------------------------------

    @contextlib.contextmanager
    def track(self, gen_id: str | None, svc: RoutedService, inst: RoutedInstance) -> Iterator[Tracked | None]:
        """A request the activator named, movable from the moment it is sent to `inst` (if that has
        an internal API) until the block ends.

        The entry belongs to the request, not to its capacity slot: a stream relayed inside the
        block keeps its entry while migrations move it (and its slot) from instance to instance,
        so it can be migrated again; it leaves the table when the relay ends. (Tying it to the
        source's slot removed it at the first handoff, when that slot is given back.)"""
        if gen_id is None or not inst.internal_url:
            yield None
            return
        tracked = Tracked(gen_id, svc.key, inst, svc.breaker)
        self.streams.add(tracked)
        try:
            yield tracked
        finally:
            self.streams.remove(tracked)

    def track_stream(self, gen_id: str, svc: RoutedService, inst: RoutedInstance, tracked: Tracked | None) -> Tracked:
        """The stream of generation `gen_id` (its `x-sllm-generation-id` answer): the tracked request, or a new entry
        when the instance chose its own id."""
        if tracked is None or tracked.id != gen_id:
            tracked = Tracked(gen_id, svc.key, inst, svc.breaker)
            self.streams.add(tracked)
        tracked.streaming = True
        return tracked

    async def relay(self, first: bytes, rest: AsyncIterator[bytes], tracked: Tracked) -> AsyncGenerator[bytes, None]:
        """The plain relay for a stream a migration may switch: chunks pass through (and are kept,
        unparsed) until a migration starts, then `splice` takes over frame by frame."""
        broken = False
        held = b""  # a chunk received after the migration began: splice must see it (it may be the detach)
        if first:
            tracked.keep(first)
            yield first
        try:
            while not tracked.migrating:
                chunk = await anext(rest, None)
                if chunk is None:
                    if not tracked.migrating:
                        return
                    break
                if tracked.migrating:
                    held = chunk
                    break
                tracked.keep(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            if not tracked.migrating:
                if tracked.last_state is None:
                    _log.warning("upstream stream broke after the first byte", id=tracked.id,
                                 instance=tracked.instance.id, error=f"{type(exc).__name__}: {exc}")
                    yield errors.error_frame(errors.StreamCut(
                        f"instance {tracked.instance.id} broke off the stream before any export of its state"))
                    return
                # The instance died (or its connection did): resume from the last export elsewhere.
                _log.warning("upstream stream broke: resuming it from its last export", id=tracked.id,
                             service=str(tracked.key), instance=tracked.instance.id, node=tracked.instance.node,
                             position=tracked.last_state.position, error=f"{type(exc).__name__}: {exc}")
                await self.registry.drop_instance(tracked.key, tracked.instance.id)
            broken = True
        async for out in splice(self.client, tracked, prepend(held, rest), self.resume_candidates, broken=broken,
                                wait=self.wait_for_destination):
            yield out

    async def finish_whole(self, send: Send, svc: RoutedService, tracked: Tracked, state: GenerationState | None) -> None:
        """Answer a non-streaming request whose generation left its instance (state None: the
        instance died mid-migration, use the last export) from the instance that finishes it."""
        self.streams.add(tracked)  # still movable while it runs on the destination
        try:
            resp = await resume_whole(self.client, tracked, state, self.resume_candidates)
        finally:
            self.streams.remove(tracked)
            tracked.ended = True
        if resp is None:
            raise errors.UpstreamFailed(f"{svc.key}: the migrated request {tracked.id} could not be resumed")
        out = response_headers([(k.lower(), v) for k, v in resp.headers.raw], tracked.instance.id)
        await send_whole(send, resp.status_code, out, resp.content)

    def resume_candidates(self, tracked: Tracked, tried: frozenset[str]) -> list[RoutedInstance]:
        """Where a detached (or orphaned) generation may resume: its destination first, then any other."""
        out = [tracked.destination] if tracked.destination and tracked.destination.id not in tried else []
        with contextlib.suppress(KeyError):
            for inst in self.registry.get(tracked.key).instances:
                if inst.id not in tried and inst.internal_url and inst not in out and inst.id != tracked.instance.id:
                    out.append(inst)
        return out

    async def wait_for_destination(self, tracked: Tracked, tried: frozenset[str]) -> RoutedInstance | None:
        """An instance of the stream's service with room for its resume when none is there now:
        waits as a held request does (the autoscaler hears of the demand; a cold start), up to the
        service's hold. None past it."""
        try:
            svc = self.registry.get(tracked.key)
        except KeyError:
            return None
        hold = svc.hold_timeout_s or self.capacity.config.cold_start_timeout_s
        _log.info("no instance to resume the stream on: waiting for one", id=tracked.id, service=str(svc.key),
                  hold_s=hold)
        try:
            return await self.capacity.wait_for_room(svc, tried | {tracked.instance.id}, time.monotonic() + hold,
                                                     ServiceMeters.of(svc.key))
        except errors.ActivatorError as exc:  # too many held, or the hold ran out
            _log.warning("no instance to resume the stream on", id=tracked.id, service=str(svc.key), error=exc.message)
            return None

    # -- the triggers ----------------------------------------------------------------------

    async def drain(self, instance_id: str) -> list[MigrationResult]:
        """Take an instance out of rotation in every service and migrate its streams (where possible)."""
        results: list[MigrationResult] = []
        for svc in self.registry.services():
            if any(i.id == instance_id for i in svc.instances):
                await self.registry.withhold(svc.key, instance_id)
            if self.streams.on_instance(svc.key, instance_id):
                try:
                    results += await self.migrate(svc.key, instance_id, None)
                except errors.NoDestination as exc:
                    _log.warning("drain: nowhere to migrate", instance=instance_id, error=exc.message)
        return results

    async def migrate(self, key: ServiceKey, source: str, destination: str | None) -> list[MigrationResult]:
        """Move every stream running on `source` (in parallel) to `destination` (None: the least loaded)."""
        svc = self.registry.get(key)
        streams = self.streams.on_instance(key, source)

        def choose(tried: frozenset[str]) -> RoutedInstance | None:
            if destination is not None:
                named = [i for i in svc.instances if i.id == destination and i.id not in tried]
                return named[0] if named and named[0].internal_url else None
            return pick_destination(svc.instances, source, tried)

        if streams and choose(frozenset()) is None:
            raise errors.NoDestination(f"{key}: no ready instance to migrate {source}'s generations to")
        results = await migrate_instance(self.client, streams, choose)
        for r in results:
            metrics.observe_migration(r.outcome, r.seconds)
        _log.info("migrated", service=str(key), instance=source, generations=len(results),
                  outcomes=",".join(str(r.outcome) for r in results))
        return results
