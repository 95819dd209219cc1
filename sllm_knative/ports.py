"""Loopback ports for processes this project starts (local cluster, tests, benchmarks).

`free_port` draws from a range the kernel never hands out on its own: below Linux's ephemeral range
(`net.ipv4.ip_local_port_range`, 32768-60999 by default), from which both `bind(port 0)` and every
outgoing connection's source port come. A port taken from the ephemeral range can be taken again
as some connection's source port before the process it was meant for binds it (seen in CI: an
activator exited with EADDRINUSE). `SLLM_PORT_RANGE=LO-HI` names another range; the test suite
gives each pytest-xdist worker its own slice of the default one, so two workers never draw the
same port.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import socket
import threading
from pathlib import Path

ENV = "SLLM_PORT_RANGE"
EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_EPHEMERAL = (32768, 60999)  # the kernel's default, when the file cannot be read
LOWEST = 10000  # below this are the well-known and registered ports people run services on
MIN_WIDTH = 1024  # a narrower gap below the ephemeral range is left alone: the OS picks instead

# The ports this process handed out lately. A port is free until its caller binds it, and the
# caller has not bound it yet when it asks for the next one.
_RECENT: collections.deque[int] = collections.deque(maxlen=4096)
_LOCK = threading.Lock()
_RANDOM = random.Random(os.urandom(16))  # processes that share a range draw different sequences


def parse_range(text: str, source: str = ENV) -> tuple[int, int]:
    """`LO-HI` (inclusive) as two ports, or a ValueError that names `source` and the text."""
    lo_s, sep, hi_s = text.strip().partition("-")
    try:
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        lo = hi = -1
    if not sep or not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{source}={text!r}: expected LO-HI, two ports with 1 <= LO <= HI <= 65535")
    return lo, hi


@functools.cache
def ephemeral_range(path: Path = EPHEMERAL_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range, or Linux's default where it cannot be read (read once
    per path: `free_port` asks on every call)."""
    try:
        return parse_range("-".join(path.read_text().split()), str(path))
    except (OSError, ValueError):
        return LINUX_EPHEMERAL


def default_range(ephemeral: tuple[int, int]) -> tuple[int, int] | None:
    """The ports below the ephemeral range from LOWEST up, or None where that gap is too narrow
    (then the OS picks, as with port 0)."""
    lo, hi = LOWEST, ephemeral[0] - 1
    return (lo, hi) if hi - lo + 1 >= MIN_WIDTH else None


def port_range(env: dict[str, str] | None = None,
               ephemeral: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The range `free_port` draws from: `SLLM_PORT_RANGE` when set, else `default_range`."""
    text = (os.environ if env is None else env).get(ENV, "")
    if text:
        return parse_range(text)
    return default_range(ephemeral_range() if ephemeral is None else ephemeral)


def split_range(span: tuple[int, int], index: int, count: int) -> tuple[int, int]:
    """The `index`-th of `count` equal, disjoint slices of `span` (the last takes the remainder)."""
    if not 0 <= index < count:
        raise ValueError(f"slice {index} of {count}: expected 0 <= index < count")
    lo, hi = span
    width = (hi - lo + 1) // count
    if width < 1:
        raise ValueError(f"ports {lo}-{hi} cannot be split {count} ways")
    start = lo + index * width
    return start, (hi if index == count - 1 else start + width - 1)


def _os_port(host: str) -> int:
    """The port the OS gives `bind(port 0)` (from its ephemeral range)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` now, drawn from `port_range()`, and that this process has not
    handed out among its last 4096. Another process can still bind it first; drawing outside the
    ephemeral range leaves only processes that pick ports as this one does."""
    span = port_range()
    with _LOCK:
        for _ in range(256):
            port = _os_port(host) if span is None else _RANDOM.randint(*span)
            if port not in _RECENT and (span is None or _bindable(host, port)):
                _RECENT.append(port)
                return port
        where = "from the OS" if span is None else f"in {span[0]}-{span[1]}"
        raise OSError(f"no free port on {host} {where} that was not handed out lately (256 tries)")
