"""Active/passive replicas: leader election through a `coordination.k8s.io/v1` Lease.

The algorithm is client-go's `leaderelection` (tools/leaderelection/leaderelection.go):

- A candidate that finds no Lease creates one naming itself.
- A Lease held by another is taken only after it has gone unchanged for `lease_duration_s` as
  measured on *this* candidate's clock from when it last saw the record change (so clocks need
  not agree across machines).
- The leader renews every `retry_period_s`; if it cannot renew for `renew_deadline_s` it stops
  leading (`on_stopped_leading`), and a process should then exit rather than keep acting.
- Writes are optimistic (resourceVersion), so two candidates never both win one term.
- On a graceful stop the leader releases the Lease (empty holder), so another takes over at once.

`decide` is the pure step; `LeaderElector` is the loop around it.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sllm_knative.kube.client import Kube, error_message, is_status
from sllm_knative.kube.times import rfc3339
from sllm_knative.log import get_logger

_log = get_logger("sllm_knative.kube.leader")


class Step(str, enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # ours: refresh renewTime
    TAKE = "take"  # another's, expired (or released): take it over
    WAIT = "wait"  # another's, live


@dataclass(frozen=True)
class Observed:
    """A Lease's record as a candidate saw it, and when (on the candidate's monotonic clock) it
    last changed."""

    holder: str
    duration_s: float
    changed_at: float


def decide(observed: Observed | None, me: str, now: float) -> Step:
    if observed is None:
        return Step.CREATE
    if observed.holder == me:
        return Step.RENEW
    if not observed.holder or now >= observed.changed_at + observed.duration_s:
        return Step.TAKE
    return Step.WAIT


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, *,
                 lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0, retry_period_s: float = 2.0,
                 on_started_leading: Callable[[], None] = lambda: None,
                 on_stopped_leading: Callable[[], None] = lambda: None,
                 on_new_leader: Callable[[str], None] = lambda _: None) -> None:
        if not lease_duration_s > renew_deadline_s > retry_period_s > 0:
            raise ValueError("need lease_duration_s > renew_deadline_s > retry_period_s > 0, got "
                             f"{lease_duration_s}, {renew_deadline_s}, {retry_period_s}")
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = (
            lease_duration_s, renew_deadline_s, retry_period_s)
        self.on_started_leading, self.on_stopped_leading, self.on_new_leader = (
            on_started_leading, on_stopped_leading, on_new_leader)
        self._observed: Observed | None = None
        self._observed_raw: tuple[str, str, int] | None = None  # (holder, renewTime, transitions)
        self._leader = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_holder = ""
        self._timeout = renew_deadline_s / 2  # one unanswered request must not outlast the renew deadline

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def wait_leading(self, timeout_s: float | None = None) -> bool:
        return self._leader.wait(timeout_s)

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name=f"leader-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry_period_s + 5)
        if release and self._leader.is_set():
            self._release()
        if self._leader.is_set():
            self._leader.clear()
            self.on_stopped_leading()

    # -- one try ----------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """One round: read the Lease, decide, write. True when this candidate leads afterwards."""
        from kubernetes import client

        now = time.monotonic()
        try:
            lease = self.kube.coordination.read_namespaced_lease(self.name, self.namespace,
                                                                 _request_timeout=self._timeout)
        except Exception as exc:
            if not is_status(exc, 404):
                raise
            lease = None
        if lease is not None:
            spec = lease.spec
            raw = (spec.holder_identity or "", str(spec.renew_time), spec.lease_transitions or 0)
            if raw != self._observed_raw:  # the record changed: restart the expiry clock
                self._observed_raw = raw
                self._observed = Observed(raw[0], float(spec.lease_duration_seconds or self.lease_duration_s), now)
                if raw[0] != self.last_holder:
                    self.last_holder = raw[0]
                    if raw[0]:
                        self.on_new_leader(raw[0])
        step = decide(self._observed if lease is not None else None, self.identity, now)
        if step is Step.WAIT:
            return False
        stamp = rfc3339(micro=True)
        if step is Step.CREATE:
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                  spec=client.V1LeaseSpec(holder_identity=self.identity,
                                                          lease_duration_seconds=int(self.lease_duration_s),
                                                          acquire_time=stamp, renew_time=stamp, lease_transitions=0))
            self.kube.coordination.create_namespaced_lease(self.namespace, body, _request_timeout=self._timeout)
        else:
            assert lease is not None
            spec = lease.spec
            if step is Step.TAKE:
                spec.lease_transitions = (spec.lease_transitions or 0) + 1
                spec.acquire_time = stamp
                _log.info("taking over the lease", lease=self.name, identity=self.identity,
                          previous=spec.holder_identity or None)
            spec.holder_identity = self.identity
            spec.lease_duration_seconds = int(self.lease_duration_s)
            spec.renew_time = stamp
            self.kube.coordination.replace_namespaced_lease(self.name, self.namespace, lease,  # 409 if raced
                                                           _request_timeout=self._timeout)
        self._observed_raw = None  # re-read next round; our own write starts no expiry clock for us
        return True

    def _release(self) -> None:
        try:
            lease = self.kube.coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = ""
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = rfc3339(micro=True)
            self.kube.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
            _log.info("released the lease", lease=self.name, identity=self.identity)
        except Exception as exc:
            _log.warning("could not release the lease", lease=self.name, identity=self.identity,
                         error=error_message(exc))

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        last_renew = 0.0
        while not self._stop.is_set():
            try:
                ok = self.try_acquire_or_renew()
            except Exception as exc:
                ok = False
                if not is_status(exc, 409):
                    _log.warning("lease round failed", lease=self.name, identity=self.identity,
                                 error=error_message(exc)[:200])
            now = time.monotonic()
            if ok:
                last_renew = now
                if not self._leader.is_set():
                    _log.info("started leading", lease=self.name, identity=self.identity)
                    self._leader.set()
                    self.last_holder = self.identity
                    self.on_started_leading()
            elif self._leader.is_set() and now - last_renew >= self.renew_deadline_s:
                _log.error("lost the lease: could not renew within the deadline", lease=self.name,
                           identity=self.identity, deadline_s=self.renew_deadline_s)
                self._leader.clear()
                self.on_stopped_leading()
            self._stop.wait(self.retry_period_s)


def leader_identity() -> str:
    """This process's candidate name: the pod name when it runs in a pod, plus host and pid."""
    import os
    import socket

    pod = os.environ.get("POD_NAME", "")
    return f"{pod or socket.gethostname()}_{os.getpid()}"

