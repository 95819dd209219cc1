"""Loopback ports for processes this project starts (local cluster, tests, benchmarks)."""

from __future__ import annotations

import collections
import socket
import threading

# The ports this process handed out lately. The OS may give the same port to two binds in a row once
# the first socket is closed (seen in CI: an instance's `--port` and `--internal-port` came out
# equal), and the caller has not bound it yet when it asks for the next one.
_RECENT: collections.deque[int] = collections.deque(maxlen=4096)
_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` now and that this process has not handed out among its last 4096
    (the OS picks it; a race with another process's binder is still possible)."""
    with _LOCK:
        for _ in range(64):
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _RECENT:
                _RECENT.append(port)
                return port
        raise OSError(f"no free port on {host} that was not handed out lately (64 tries)")
