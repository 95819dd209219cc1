"""The node's inventory: tiers and their checkpoints, bandwidths, devices, leases.

`build` is a function of the sidecar's state (no I/O besides asking the devices); `Notifier`
tells watchers that something changed. State changes bump at once; fill progress bumps at
most every `min_interval` seconds, with a trailing bump so the last value is always sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from loader_sidecar.leases import Lease
from loader_sidecar.profile import Profile
from loader_sidecar.tiers import TierStore
from sllm_knative.loader import loader_pb2 as pb
from sllm_knative.log import get_logger

_log = get_logger("loader_sidecar.inventory")


class Notifier:
    def __init__(self, min_interval: float = 0.1) -> None:
        self.version = 0
        self._event = asyncio.Event()
        self._min_interval = min_interval
        self._last = 0.0
        self._trailing: asyncio.TimerHandle | None = None

    def bump(self) -> None:
        self.version += 1
        self._last = time.monotonic()
        self._event.set()
        self._event = asyncio.Event()

    def bump_throttled(self) -> None:
        wait = self._min_interval - (time.monotonic() - self._last)
        if wait <= 0:
            self.bump()
        elif self._trailing is None:
            self._trailing = asyncio.get_running_loop().call_later(wait, self._fire_trailing)

    def _fire_trailing(self) -> None:
        self._trailing = None
        self.bump()

    async def wait_newer(self, version: int) -> int:
        while self.version <= version:
            await self._event.wait()
        return self.version


@functools.cache
def _nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


PROC_GPUS = Path("/proc/driver/nvidia/gpus")


def proc_gpus(root: Path = PROC_GPUS, dev: Path = Path("/dev")) -> list[pb.Device]:
    """The NVIDIA driver's GPUs from /proc (one folder per PCI address, in PCI order, as NVML
    numbers them), else its device files (/dev/nvidia0, ...), without memory figures: the count
    when nvidia-ml-py is not installed (it is the `gpu` extra; `make install` leaves it out).
    Every sidecar on a machine sees all of its GPUs, so local nodes sharing one GPU each accept
    cuda:0."""
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        folders = []
    if not folders:
        try:
            count = sum(1 for p in dev.iterdir() if re.fullmatch(r"nvidia[0-9]+", p.name))
        except OSError:
            count = 0
        return [pb.Device(kind="gpu", index=i, name="NVIDIA GPU") for i in range(count)]
    out = []
    for i, folder in enumerate(folders):
        name = "NVIDIA GPU"
        with contextlib.suppress(OSError):
            for line in (folder / "information").read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model" and value.strip():
                    name = value.strip()
        out.append(pb.Device(kind="gpu", index=i, name=name))
    return out


def devices() -> list[pb.Device]:
    """GPUs through nvidia-ml-py when present (else the driver's /proc listing), and always the
    CPU with host memory (psutil)."""
    out: list[pb.Device] = []
    pynvml = _nvml()
    if pynvml is None:
        out += proc_gpus()
    else:
        try:
            pynvml.nvmlInit()
            try:
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                    name = pynvml.nvmlDeviceGetName(h)
                    out.append(pb.Device(kind="gpu", index=i, name=name.decode() if isinstance(name, bytes) else name,
                                         memory_total=int(mem.total), memory_free=int(mem.free)))
            finally:
                pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            _log.debug("no NVIDIA devices", error=str(exc))
    vm = psutil.virtual_memory()
    out.append(pb.Device(kind="cpu", index=0, name=f"{psutil.cpu_count() or 0} cores", memory_total=int(vm.total),
                         memory_free=int(vm.available)))
    return out


def gpu_count(devs: Iterable[pb.Device]) -> int:
    return sum(1 for d in devs if d.kind == "gpu")


def _tier(t: TierStore) -> pb.TierInventory:
    entries = [pb.CheckpointEntry(model=e.model, key=e.key, size=e.size, state=e.state.value,
                                  filled=min(e.filled, e.size), last_use=e.last_use, leases=e.leases,
                                  readers=e.readers)
               for e in sorted(t.entries.values(), key=lambda e: e.key)]
    return pb.TierInventory(name=t.name, directory=str(t.root), capacity=t.budget, used=t.used, free=t.free,
                            entries=entries)


def build(node: str, version: int, tiers: Sequence[TierStore], profile: Profile, devs: Sequence[pb.Device],
          leases: Iterable[Lease], stores: Sequence[str], now: float) -> pb.Inventory:
    return pb.Inventory(
        node=node, version=version, tiers=[_tier(t) for t in tiers],
        bandwidths=[pb.Bandwidth(hop=hop, bytes_per_second=v, samples=n) for hop, (v, n) in profile.snapshot().items()],
        devices=list(devs),
        leases=[pb.LeaseInfo(lease_id=x.id, model=x.ref.uri, device=x.device, instance=x.instance, since=x.since)
                for x in sorted(leases, key=lambda x: x.since)],
        stores=list(stores), time=now)
