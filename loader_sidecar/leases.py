"""Leases: which instance holds which checkpoint in the DRAM tier, on which device.

A lease pins its DRAM entry (fills.Hold) from the moment it is asked for, so neither LRU
eviction nor `cache evict` can remove bytes an instance maps. It ends on Release, or when the
Acquire stream ends (the instance exited or dropped the call): `release` runs exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time

from loader_sidecar.fills import Fill, Hold
from loader_sidecar.refs import ModelRef
from sllm_knative.loader.errors import BadRequest, UnknownLease

_DEVICE = re.compile(r"^(cpu|cuda)(?::([0-9]{1,3}))?$")
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}$")


def parse_device(text: str, gpus: int) -> str:
    """'cpu' or 'cuda:N' (N < gpus; 'cuda' means cuda:0); raises BadRequest otherwise."""
    m = _DEVICE.match(text or "cpu")
    if not m:
        raise BadRequest(f"device {text!r}: expected 'cpu' or 'cuda:N'")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise BadRequest(f"device {text!r}: the CPU device has no index other than 0")
        return "cpu"
    n = int(index or 0)
    if n >= gpus:
        raise BadRequest(f"device {text!r}: this node has {gpus} GPU(s)")
    return f"cuda:{n}"


def check_instance(text: str) -> str:
    if text and not _INSTANCE.match(text):
        raise BadRequest(f"instance {text!r}: letters, digits and '._:/-' only, at most 253")
    return text


@dataclasses.dataclass
class Lease:
    """The loader's record of one lease it granted (a client holds a
    `sllm_knative.loader.client.LeaseHandle` on it)."""

    id: str
    ref: ModelRef
    device: str
    instance: str
    since: float
    fill: Fill
    hold: Hold
    ended: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class LeaseTable:
    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    def add(self, ref: ModelRef, device: str, instance: str, fill: Fill, hold: Hold) -> Lease:
        lease = Lease(secrets.token_hex(8), ref, device, instance, time.time(), fill, hold)
        self.leases[lease.id] = lease
        return lease

    def release(self, lease_id: str) -> Lease:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise UnknownLease(f"lease {lease_id!r} is not held here (released already, or the sidecar restarted)")
        lease.hold.release()
        lease.ended.set()
        return lease

    def release_all(self) -> None:
        for lease_id in list(self.leases):
            self.release(lease_id)
