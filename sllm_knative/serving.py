"""Run uvicorn servers so that the caller's shutdown code runs on SIGTERM.

uvicorn's `Server.serve()` installs its own SIGTERM/SIGINT handlers and, once it has shut down,
restores the previous handlers and raises the signal again. With the default handler that kills
the process inside `serve()`, so a `finally:` after it never runs: the autoscaler kept its leader
Lease for the full lease duration after its pod was deleted, instead of handing it over at once.

`Server` leaves signals alone; `stop_on_signals` installs one handler on the running loop for
every server of the process (a process may serve a public and an internal port) that stops them
all; `serve_until_signalled` does that and serves them, and returns once they have stopped, so the
caller's cleanup runs and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator, Sequence

import uvicorn


class Server(uvicorn.Server):
    """A uvicorn server that installs no signal handlers (see `serve_until_signalled`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def stop_all(servers: Sequence[uvicorn.Server]) -> None:
    for server in servers:
        server.should_exit = True


def stop_on_signals(servers: Sequence[uvicorn.Server], *, on_sigterm: Callable[[], None] | None = None) -> None:
    """On the running loop: SIGINT, and SIGTERM unless `on_sigterm` replaces it, stop every server.

    The function server's `on_sigterm` drains its generations first and calls `stop_all` itself.
    The handlers stay until the loop closes: a second signal during the caller's cleanup asks for
    the stop again instead of killing the process half-way through it.
    """
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_sigterm or (lambda: stop_all(servers)))
    loop.add_signal_handler(signal.SIGINT, lambda: stop_all(servers))


async def serve_until_signalled(servers: Sequence[tuple[uvicorn.Server, list[socket.socket] | None]], *,
                                on_sigterm: Callable[[], None] | None = None) -> None:
    """Serve every (server, sockets or None) pair until SIGTERM or SIGINT, then return."""
    stop_on_signals([server for server, _ in servers], on_sigterm=on_sigterm)
    await asyncio.gather(*(server.serve(sockets=sockets) for server, sockets in servers))
