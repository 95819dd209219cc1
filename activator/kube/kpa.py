"""Demand of the revisions of Knative's classes (KPA), reported to Knative's autoscaler as Knative's
activator reports it, so they scale up from zero through this activator too.

The wire: one websocket to `ws://autoscaler.knative-serving.svc.cluster.local:8080`
(`cmd/activator/main.go`), binary messages, each a protobuf `WireStatMessages`
(`pkg/autoscaler/metrics/stat.proto`, vendored unmodified as activator/kube/stat.proto from
knative/serving 98e5ef90 with its Apache-2.0 header, compiled to stat_pb2.py by `make proto`), as
the autoscaler's stat server reads them (`pkg/autoscaler/statserver/server.go`: binary frames
only, one `WireStatMessages` each, messages without a `stat` skipped).

What is sent (`pkg/activator/handler/concurrency_reporter.go`, with networking's
`pkg/http/stats/request.go` for the averages):

- the first request of a revision with no stats entry is reported at once, as
  `average_concurrent_requests = 1, request_count = 1` (the scale-from-zero poke);
- every second, each revision with an entry: the time-weighted average concurrency and the
  requests of the period, less the one already reported by the poke (never below 0); an entry
  whose whole period had no request in flight is removed after that report (unless a request
  holds it), so the next request pokes again;
- `pod_name` is this activator's pod (`$POD_NAME`), the other fields 0, as Knative's activator
  leaves them.

The connection is durable (`knative.dev/pkg/websocket: NewDurableSendingConnection`): it is
redialled with backoff while down, and a batch sent while it is down is dropped with a warning,
as Knative's `ReportStats` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING

from activator.kube import stat_pb2
from sllm_knative.api.keys import ServiceKey
from sllm_knative.kube.workqueue import backoff_s
from sllm_knative.log import get_logger

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

_log = get_logger("activator")
REPORT_INTERVAL_S = 1.0  # concurrency_reporter.go: reportInterval


@dataclasses.dataclass(frozen=True)
class StatMessage:
    key: ServiceKey
    pod_name: str
    average_concurrent_requests: float
    request_count: float


def wire(messages: list[StatMessage]) -> bytes:
    """`metrics.ToWireStatMessages(...).Marshal()`."""
    out = stat_pb2.WireStatMessages()
    for m in messages:
        w = out.messages.add()
        w.namespace, w.name = m.key.namespace, m.key.name
        w.stat.pod_name = m.pod_name
        w.stat.average_concurrent_requests = m.average_concurrent_requests
        w.stat.request_count = m.request_count
    return out.SerializeToString()


class RequestStats:
    """networking's `stats.RequestStats` without the proxied counts (the activator has none):
    concurrency integrated over time; a report averages it over the seconds since the last one."""

    def __init__(self, now: float) -> None:
        self.concurrency = 0.0
        self.last_change = now
        self.request_count = 0.0
        self.computed = 0.0
        self.seconds = 0.0

    def _compute(self, now: float) -> None:
        if (d := now - self.last_change) > 0:
            self.seconds += d
            self.computed += self.concurrency * d
            self.last_change = now

    def request_in(self, now: float) -> None:
        self._compute(now)
        self.request_count += 1
        self.concurrency += 1

    def request_out(self, now: float) -> None:
        self._compute(now)
        self.concurrency -= 1

    def report(self, now: float) -> tuple[float, float]:
        """(average concurrency, requests) of the period; a new period starts."""
        self._compute(now)
        avg = self.computed / self.seconds if self.seconds > 0 else 0.0
        count = self.request_count
        self.computed = self.request_count = self.seconds = 0.0
        return avg, count


@dataclasses.dataclass
class _Entry:
    stats: RequestStats
    first_request: float = 1.0
    refs: int = 0


class ConcurrencyReporter:
    """concurrency_reporter.go's bookkeeping, time as a parameter (one event loop: no locks)."""

    def __init__(self, pod_name: str) -> None:
        self.pod_name = pod_name
        self._entries: dict[ServiceKey, _Entry] = {}

    def request_in(self, key: ServiceKey, now: float) -> StatMessage | None:
        """Count a request in; the poke to send at once when the revision had no entry."""
        entry = self._entries.get(key)
        poke = None
        if entry is None:
            entry = self._entries[key] = _Entry(RequestStats(now))
            poke = StatMessage(key, self.pod_name, 1.0, 1.0)
        entry.refs += 1
        entry.stats.request_in(now)
        return poke

    def request_out(self, key: ServiceKey, now: float) -> None:
        entry = self._entries[key]
        entry.stats.request_out(now)
        entry.refs -= 1

    def report(self, now: float) -> list[StatMessage]:
        out, idle = [], []
        for key, entry in self._entries.items():
            avg, count = entry.stats.report(now)
            first, entry.first_request = entry.first_request, 0.0
            if avg == 0:
                idle.append(key)
            out.append(StatMessage(key, self.pod_name, max(avg - first, 0.0), count - first))
        for key in idle:
            if self._entries[key].refs == 0:
                del self._entries[key]
        return out

    def tracked(self) -> set[ServiceKey]:
        return set(self._entries)


class StatSink:
    """A durable websocket to Knative's autoscaler: redialled with backoff while down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.sent = 0  # batches sent
        self.dropped = 0  # batches dropped while the connection was down

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="knative-autoscaler-websocket")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        failures = 0
        while True:
            try:
                async with connect(self.url, compression=None, proxy=None, open_timeout=5,
                                   ping_interval=30, ping_timeout=30) as ws:
                    _log.info("Knative autoscaler connection established", url=self.url)
                    failures = 0
                    self._conn = ws
                    self.connected.set()
                    await ws.wait_closed()
                    _log.warning("Knative autoscaler connection lost", url=self.url,
                                 code=getattr(ws.close_code, "value", ws.close_code))
            except (OSError, TimeoutError, WebSocketException) as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    _log.warning("cannot reach Knative's autoscaler; KPA revisions' demand is not reported",
                                 url=self.url, error=f"{type(exc).__name__}: {exc}", attempts=failures)
            finally:
                self._conn = None
                self.connected.clear()
            await asyncio.sleep(backoff_s(max(failures, 1), 0.1, 5.0))

    async def send(self, messages: list[StatMessage]) -> bool:
        """Send one batch; False (and a warning) when the connection is down."""
        ws = self._conn
        if ws is None:
            self.dropped += 1
            _log.warning("Knative's autoscaler is not reachable from the activator; stats were not sent",
                         url=self.url, stat_message_count=len(messages))
            return False
        try:
            await ws.send(wire(messages))
        except Exception as exc:  # the connection broke under us: the loop redials
            self.dropped += 1
            _log.warning("sending stats to Knative's autoscaler failed", url=self.url,
                         error=f"{type(exc).__name__}: {exc}", stat_message_count=len(messages))
            return False
        self.sent += 1
        return True


class KnativeStats:
    """The reporter and the sink together: `request_in`/`request_out` around each request of a
    revision of Knative's classes, and a report every second while anything is tracked."""

    def __init__(self, url: str, pod_name: str, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.reporter = ConcurrencyReporter(pod_name)
        self.sink = StatSink(url)
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[bool]] = set()

    def start(self) -> None:
        self.sink.start()
        self._task = asyncio.create_task(self._loop(), name="knative-stats")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sink.stop()

    def _send(self, messages: list[StatMessage]) -> None:
        # Sent on a task of its own so a request never waits on the websocket (ReportStats does
        # the same with a goroutine per batch).
        task = asyncio.create_task(self.sink.send(messages))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def request_in(self, key: ServiceKey) -> None:
        poke = self.reporter.request_in(key, time.monotonic())
        if poke is not None:
            self._send([poke])

    def request_out(self, key: ServiceKey) -> None:
        self.reporter.request_out(key, time.monotonic())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            messages = self.reporter.report(time.monotonic())
            if messages:
                self._send(messages)
