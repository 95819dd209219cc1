"""Services the activator fronts, their ready instances, and waiting for one.

The autoscaler pushes each service's ready instances (`set_endpoints`; in Kubernetes mode the
revisions' EndpointSlices do, activator/kube/source.py); requests for a
service with none wait on `wait_for_instance`, which returns a slot-holding instance or
raises after the deadline. RoutedInstance objects are kept across updates so their outstanding
counts survive an endpoint refresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

from activator.balancer import Breaker, RoutedInstance, pick
from activator.stats import ConcurrencyWindow
from sllm_knative.api.activator import Endpoint
from sllm_knative.api.keys import ServiceKey


@dataclasses.dataclass(eq=False)
class Waiter:
    """A request waiting for an instance with room (`exclude`: instances it must not use), since
    `since` (monotonic seconds)."""

    exclude: frozenset[str]
    since: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class RoutedService:
    """One service as the activator routes its requests: its ready instances, their breaker,
    the concurrency window reported to the autoscaler and how many requests wait for room."""

    key: ServiceKey
    container_concurrency: int = 0
    hold_timeout_s: float | None = None  # the revision's; None: the activator's --cold-start-timeout
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))  # when it was first routed (unix s)
    instances: list[RoutedInstance] = dataclasses.field(default_factory=list)
    breaker: Breaker = dataclasses.field(default_factory=Breaker)
    window: ConcurrencyWindow = dataclasses.field(default_factory=lambda: ConcurrencyWindow(time.monotonic()))
    # Whether our autoscaler scales it (demand and stats go to it). Always in local mode; in
    # Kubernetes mode, revisions of the class llm.autoscaling.sllm-knative.io (activator/kube/).
    ours: bool = True
    # The endpoints of the last update (the autoscaler's push; in Kubernetes mode the revision's
    # EndpointSlices), and those of them kept out of rotation (a scale-down's victim, a draining
    # instance: id -> its instance object, if it had one), forgotten once an update no longer lists them.
    listed: list[Endpoint] = dataclasses.field(default_factory=list)
    withheld: dict[str, RoutedInstance | None] = dataclasses.field(default_factory=dict)
    # Instances that left the rotation with requests still outstanding on them, kept (and
    # reported) until those end: a preemption must not take an instance for idle while a request
    # the activator sent it is still on its way.
    departed: dict[str, RoutedInstance] = dataclasses.field(default_factory=dict)
    # The requests waiting for room (held), in arrival order: room goes to the first that can use it.
    waiters: list[Waiter] = dataclasses.field(default_factory=list)

    def turn(self, exclude: frozenset[str], me: Waiter | None = None) -> RoutedInstance | None:
        """The instance with room a request may take now: none while a request that came before
        it (`me`'s predecessors; every waiter for a newcomer) could take one."""
        for w in self.waiters:
            if w is me:
                break
            if pick(self.instances, w.exclude) is not None:
                return None
        return pick(self.instances, exclude)

    def loads(self) -> list[RoutedInstance]:
        """Every instance with requests of this service on it, in rotation or not (withheld,
        departed with requests outstanding)."""
        self.departed = {i: inst for i, inst in self.departed.items() if inst.outstanding > 0}
        out = list(self.instances)
        ids = {i.id for i in out}
        for inst in [*self.withheld.values(), *self.departed.values()]:
            if inst is not None and inst.id not in ids:
                out.append(inst)
                ids.add(inst.id)
        return out

    @contextlib.contextmanager
    def hold(self, exclude: frozenset[str]) -> Iterator[Waiter]:
        """A request's place in line, taken when it arrives (before the autoscaler hears of a
        cold start, which may take a while) and counted in `held` and `oldest_held_s` until it
        leaves the line, with an instance or without."""
        me = Waiter(exclude)
        self.waiters.append(me)
        try:
            yield me
        finally:
            self.waiters.remove(me)
            self.breaker.poke_soon()  # the next in line looks again

    @property
    def held(self) -> int:
        """How many requests wait for room."""
        return len(self.waiters)

    def oldest_held_s(self, now: float) -> float:
        """How long the longest-waiting held request has waited (0 with none)."""
        return max(0.0, now - self.waiters[0].since) if self.waiters else 0.0


class Registry:
    def __init__(self) -> None:
        self._services: dict[ServiceKey, RoutedService] = {}
        self._models: dict[str, ServiceKey] = {}
        self.known: set[ServiceKey] = set()

    def get(self, key: ServiceKey) -> RoutedService:
        return self._services[key]

    def services(self) -> list[RoutedService]:
        return list(self._services.values())

    def set_service(self, key: ServiceKey, container_concurrency: int = 0,
                    hold_timeout_s: float | None = None) -> RoutedService:
        svc = self._services.get(key)
        if svc is None:
            svc = self._services[key] = RoutedService(key)
            self.known.add(key)
        svc.container_concurrency = container_concurrency
        svc.hold_timeout_s = hold_timeout_s
        return svc

    def remove_service(self, key: ServiceKey) -> None:
        self._services.pop(key, None)
        self.known.discard(key)

    async def set_endpoints(self, key: ServiceKey, endpoints: Sequence[Endpoint]) -> None:
        svc = self._services[key]
        svc.listed = list(endpoints)
        listed = {e.id for e in endpoints}
        svc.withheld = {i: inst for i, inst in svc.withheld.items() if i in listed}
        self._rotate(svc)
        await svc.breaker.poke()

    def _rotate(self, svc: RoutedService) -> None:
        """The rotation: the last update's endpoints but the withheld ones; each instance object
        kept across updates (and across a withhold) with its outstanding count."""
        old = dict(svc.departed)
        old.update({i.id: i for i in svc.instances})
        old.update({i: inst for i, inst in svc.withheld.items() if inst is not None})
        fresh = []
        for e in svc.listed:
            if e.id in svc.withheld:
                continue
            inst = old.get(e.id) or RoutedInstance(e.id, e.url.rstrip("/"), e.node)
            inst.url = e.url.rstrip("/")
            inst.internal_url = (e.internal_url or "").rstrip("/")
            inst.capacity = svc.container_concurrency if e.capacity is None else e.capacity
            fresh.append(inst)
        kept = {i.id for i in fresh} | {i for i, inst in svc.withheld.items() if inst is not None}
        svc.departed = {i: inst for i, inst in old.items() if i not in kept and inst.outstanding > 0}
        svc.instances = fresh

    async def drop_instance(self, key: ServiceKey, instance_id: str) -> None:
        """Take a failed instance out of rotation until the next endpoint update (the autoscaler's
        push, or in Kubernetes mode the revision's next EndpointSlice change or resync)."""
        svc = self._services.get(key)
        if svc:
            for inst in svc.instances:
                if inst.id == instance_id and inst.outstanding > 0:
                    svc.departed[inst.id] = inst
            svc.instances = [i for i in svc.instances if i.id != instance_id]
            await svc.breaker.poke()

    async def withhold(self, key: ServiceKey, instance_id: str, withheld: bool = True) -> None:
        """Take an instance out of rotation for as long as the endpoint updates still list it (in
        Kubernetes mode, until its pod leaves the revision's EndpointSlices); `withheld=False`
        puts it back at once (a scale-down called off)."""
        svc = self._services.get(key)
        if svc is None:
            return
        if withheld:
            svc.withheld.setdefault(instance_id, next((i for i in svc.instances if i.id == instance_id), None))
        elif instance_id in svc.withheld:
            del svc.withheld[instance_id]
        else:
            return  # not withheld: nothing changes
        self._rotate(svc)
        await svc.breaker.poke()

    async def wait_for_instance(self, svc: RoutedService, deadline: float, me: Waiter) -> RoutedInstance | None:
        """An instance with room for `me` (a place in `svc.hold`'s line), waiting (cold start or
        full breakers) until the deadline, in arrival order: room goes to the longest-waiting
        request that can use it. The caller takes the slot before it awaits anything (the room is
        still there)."""
        while True:
            inst = svc.turn(me.exclude, me)
            if inst is not None:
                return inst
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await svc.breaker.wait_for_change(min(left, 1.0))
