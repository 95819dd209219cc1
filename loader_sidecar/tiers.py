"""A cache tier: a directory with a byte budget, one subdirectory per checkpoint.

Entry lifecycle: `reserve` (room is made now, evicting idle entries least recently used first)
-> FILLING -> `publish` (the verified marker is written, the entry is READY) or `abort` (files
removed). A checkpoint directory counts as complete only when its marker `.sllm-entry.json`
exists; the marker is written (temporary name, fsync, rename) after every byte was checked
against the format's checksums, so a restart after `kill -9` drops whatever has no marker.

    SSD tier:  bytes land in `.staging/<key>-<nonce>/`; the marker is written there and the
               directory is renamed to `<key>/` (temporary name, verify, rename).
    DRAM tier: partition files are created at full size in `<key>/` and filled in place,
               because instances map them while they fill (a rename would break open-by-path);
               readers only touch bytes below the watermark, which only covers verified bytes,
               and the marker written at the end plays the part of the rename.

Eviction never touches an entry that is leased, being read (a fill source) or filling.
`plan_eviction` is the pure decision; `TierStore` applies it to the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from sllm_knative import atomic
from sllm_knative.loader.errors import InUse, TierFull
from sllm_knative.log import get_logger

MARKER = ".sllm-entry.json"
BUDGET = "its whole budget"  # what limits a tier's entries, unless its disk has less room
STAGING = ".staging"
MARKER_VERSION = 1
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}-[0-9a-f]{12}$")

_log = get_logger("loader_sidecar.tiers")


class State(str, enum.Enum):
    FILLING = "filling"
    READY = "ready"


@dataclasses.dataclass
class Entry:
    key: str
    model: str
    size: int
    state: State
    last_use: float
    filled: int = 0
    leases: int = 0
    readers: int = 0
    files: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def evictable(self) -> bool:
        return self.state is State.READY and self.leases == 0 and self.readers == 0


def _describe(e: Entry) -> str:
    why = "filling" if e.state is State.FILLING else f"{e.leases} leases, {e.readers} readers"
    return f"{e.model} ({e.size} bytes, {why})"


def plan_eviction(entries: Iterable[Entry], budget: int, need: int, tier: str = "tier",
                  what: str = BUDGET) -> list[str]:
    """Keys to evict, least recently used first, so that `need` more bytes fit in `budget`
    (`what` names that limit in errors: the configured budget, or the room its disk has).

    Raises TierFull (naming what holds the space) when even evicting every idle entry is not enough.
    """
    entries = list(entries)
    free = budget - sum(e.size for e in entries)
    if need <= free:
        return []
    if need > budget:
        raise TierFull(f"{tier} tier: needs {need} bytes but {what} is {budget} bytes")
    victims: list[str] = []
    for e in sorted((e for e in entries if e.evictable), key=lambda e: (e.last_use, e.key)):
        victims.append(e.key)
        free += e.size
        if free >= need:
            return victims
    held = [e for e in entries if not e.evictable]
    # Entries that are only being read (a fill's source, the SSD copy of a fresh fetch) free up
    # by themselves soon: a caller may wait and try again.
    reading = sum(e.size for e in held if e.state is State.READY and e.leases == 0)
    leased = sum(e.size for e in held if e.state is State.READY and e.leases > 0)
    err = TierFull(f"{tier} tier: needs {need} bytes, only {free} of {budget} can be freed"
                   f"{'' if what == BUDGET else f' ({what})'}; in use: "
                   + "; ".join(_describe(e) for e in held))
    err.transient = free + reading >= need
    err.leased = free + reading + leased >= need
    raise err


def is_key(name: str) -> bool:
    return bool(_KEY.match(name))


def read_marker(entry_dir: Path) -> dict | None:
    """The marker of a complete entry, or None when it is missing, unreadable or inconsistent."""
    try:
        doc = json.loads((entry_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != MARKER_VERSION or doc.get("key") != entry_dir.name:
        return None
    files = doc.get("files")
    if not isinstance(files, dict) or not isinstance(doc.get("model"), str) or doc.get("verified") is not True:
        return None
    for name, size in files.items():
        if "/" in name or name.startswith(".") or not isinstance(size, int):
            return None
        try:
            if (entry_dir / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return doc


def disk_free_bytes(root: Path) -> int:
    """Bytes an unprivileged writer may still put on the filesystem holding `root`."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


class TierStore:
    """One tier's directory, budget and entries. Not thread-safe: used from the event loop."""

    def __init__(self, name: str, root: Path, budget: int, *, clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None,
                 on_evict: Callable[[str, Entry], None] = lambda tier, e: None,
                 disk_free: Callable[[Path], int] | None = None) -> None:
        self.name = name
        self.root = root
        self.budget = budget
        self._disk_free = disk_free or disk_free_bytes
        self.entries: dict[str, Entry] = {}
        self._clock = clock
        self._on_change = on_change
        self._on_evict = on_evict
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._on_change()

    async def reserve_when_free(self, key: str, model: str, size: int, timeout: float,
                                lease_wait: float = 0.0) -> Entry:
        """`reserve`, waiting up to `timeout` s while the room is held only by entries being read,
        and up to `lease_wait` s (at most `timeout`) while it is held by leased entries too. An
        instance's slot is free to the autoscaler once the instance is told to stop, and its lease
        ends when its process has exited, a moment later: a fill for the instance that takes the
        slot waits for that instead of failing its start."""
        start = time.monotonic()
        while True:
            try:
                return self.reserve(key, model, size)
            except TierFull as exc:
                if exc.transient:
                    budget = timeout
                elif exc.leased:
                    budget = min(timeout, lease_wait)
                else:
                    raise
                left = budget - (time.monotonic() - start)
                if left <= 0:
                    raise
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    # -- accounting ----------------------------------------------------------------------------

    @property
    def used(self) -> int:
        return sum(e.size for e in self.entries.values())

    @property
    def free(self) -> int:
        return max(0, self.budget - self.used)

    def limit(self) -> tuple[int, str]:
        """The bytes the entries may take, and what sets that: the budget, or less when the
        filesystem under the tier has less room (a disk shared with other data, or smaller than
        the budget says). The room is what the entries already hold on it (a filling entry its
        bytes written so far) plus the filesystem's free bytes: reserving within it never
        meets ENOSPC while nothing else writes there."""
        try:
            free = self._disk_free(self.root)
        except OSError:
            return self.budget, BUDGET
        held = sum(e.size if e.state is State.READY else min(e.filled, e.size) for e in self.entries.values())
        room = held + free
        if room >= self.budget:
            return self.budget, BUDGET
        return room, f"the room on its disk ({free} bytes free under {self.root})"

    def path(self, key: str) -> Path:
        return self.root / key

    def ready(self, key: str) -> Entry | None:
        e = self.entries.get(key)
        return e if e is not None and e.state is State.READY else None

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Rebuild the entries from disk after a start or crash; returns what was dropped."""
        self.root.mkdir(parents=True, exist_ok=True)
        dropped = []
        staging = self.root / STAGING
        if staging.exists():
            for p in staging.iterdir():
                dropped.append(f"{STAGING}/{p.name}")
            shutil.rmtree(staging, ignore_errors=True)
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("."):
                continue
            if not p.is_dir() or not is_key(p.name):
                _log.warning("not a cache entry, left alone", tier=self.name, path=str(p))
                continue
            doc = read_marker(p)
            if doc is None:
                shutil.rmtree(p, ignore_errors=True)
                dropped.append(p.name)
                continue
            files = {str(k): int(v) for k, v in doc["files"].items()}
            self.entries[p.name] = Entry(p.name, doc["model"], sum(files.values()), State.READY,
                                         (p / MARKER).stat().st_mtime, filled=sum(files.values()), files=files)
        for key in plan_eviction(self.entries.values(), self.budget, 0, self.name):
            self._remove(key, reason="over budget after restart")
        if dropped:
            _log.warning("dropped unverified or partial entries", tier=self.name, entries=",".join(dropped))
        self._notify()
        return dropped

    # -- lifecycle -----------------------------------------------------------------------------

    def reserve(self, key: str, model: str, size: int) -> Entry:
        """Make room for `size` bytes (evicting idle entries, LRU first) and add a FILLING entry."""
        if key in self.entries:
            raise InUse(f"{self.name} tier: {model} already has an entry ({self.entries[key].state.value})")
        limit, what = self.limit()
        for victim in plan_eviction(self.entries.values(), limit, size, self.name, what):
            self._remove(victim, reason="evicted for room")
        entry = Entry(key, model, size, State.FILLING, self._clock())
        self.entries[key] = entry
        self._notify()
        return entry

    def resize(self, key: str, size: int) -> None:
        """Change a FILLING entry's reservation (e.g. once a conversion's output size is known)."""
        entry = self.entries[key]
        others = [e for e in self.entries.values() if e.key != key]
        limit, what = self.limit()
        for victim in plan_eviction(others, limit, size, self.name, what):
            self._remove(victim, reason="evicted for room")
        entry.size = size
        self._notify()

    def staging_dir(self, key: str) -> Path:
        d = self.root / STAGING / f"{key}.{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def publish(self, key: str, directory: Path, files: dict[str, int]) -> Entry:
        """Mark a filled, verified entry complete: marker in `directory`, then rename it into place."""
        entry = self.entries[key]
        now = self._clock()
        atomic.write_json(directory / MARKER, {"version": MARKER_VERSION, "key": key, "model": entry.model,
                                               "files": files, "verified": True})
        os.utime(directory / MARKER, (now, now))  # the marker's mtime is the entry's last use
        final = self.path(key)
        if directory != final:
            os.rename(directory, final)
        atomic.fsync_dir(self.root)
        entry.files = dict(files)
        entry.size = sum(files.values())
        entry.filled = entry.size
        entry.state = State.READY
        entry.last_use = now
        self._notify()
        return entry

    def abort(self, key: str, directory: Path | None = None) -> None:
        """Drop a FILLING entry and its bytes (a failed or cancelled fill)."""
        self.entries.pop(key, None)
        for d in (self.path(key), directory):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self._notify()

    def evict(self, key: str) -> Entry:
        entry = self.entries.get(key)
        if entry is None:
            raise KeyError(key)
        if not entry.evictable:
            raise InUse(f"{self.name} tier: cannot evict {_describe(entry)}")
        self._remove(key, reason="requested")
        return entry

    def _remove(self, key: str, reason: str) -> None:
        entry = self.entries.pop(key)
        shutil.rmtree(self.path(key), ignore_errors=True)
        _log.info("evicted", tier=self.name, checkpoint=entry.model, bytes=entry.size, reason=reason)
        self._on_evict(self.name, entry)
        self._notify()

    # -- use -----------------------------------------------------------------------------------

    def touch(self, key: str) -> None:
        """Record a use (LRU order); persisted as the marker's mtime so it survives restarts."""
        entry = self.entries[key]
        entry.last_use = self._clock()
        if entry.state is State.READY:
            try:
                os.utime(self.path(key) / MARKER, (entry.last_use, entry.last_use))
            except OSError:
                pass
        self._notify()

    def add_lease(self, key: str, delta: int) -> None:
        self.entries[key].leases += delta
        self._notify()

    def add_reader(self, key: str, delta: int) -> None:
        self.entries[key].readers += delta
        self._notify()

    def progress(self, key: str, filled: int) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry.filled = filled


