"""Two uvicorn servers (public, internal) on one event loop, with one shutdown path.

SIGTERM or SIGINT (Knative sends SIGTERM when it scales a revision down) stops both servers
gracefully: they stop accepting, in-flight responses finish (up to `GRACE_S`), then the engine
stops and fails whatever is left with 503.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from functions.llm import app as public_app
from functions.llm import drain
from functions.llm import internal as internal_app
from functions.llm.service import ModelHost
from sllm_knative.serving import Server, stop_all, stop_on_signals

GRACE_S = 30


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit TCP_NODELAY: without it a response written as headers, then
    # body, waits for the client's delayed ACK (40 ms on Linux) on every kept-alive connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(service: ModelHost) -> None:
    cfg = service.cfg
    listeners = [(public_app.build(service), _bind(cfg.host, cfg.port)),
                 (internal_app.build(service), _bind(cfg.internal_host, cfg.internal_port))]
    servers = []
    for app, sock in listeners:
        # httptools (llhttp) rather than h11: GET /v1/models 0.16 -> 0.10 ms p50 (docs/benchmarks.md, Proxy)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", http="httptools",
                                timeout_graceful_shutdown=GRACE_S, timeout_keep_alive=75)
        servers.append((Server(config), [sock]))
    ports = [socks[0].getsockname()[1] for _, socks in servers]
    service.log.info("listening", port=ports[0], internal_port=ports[1])

    draining: list[asyncio.Task[None]] = []

    def on_sigterm() -> None:  # preemption: migrate generations away first (functions/llm/drain.py)
        if not draining:
            draining.append(asyncio.get_running_loop().create_task(drain.drain(service.log)))
            draining[0].add_done_callback(lambda _: stop_all([server for server, _ in servers]))

    # The handlers first: a load that fails sends SIGTERM once `serving` is set (service.py).
    stop_on_signals([server for server, _ in servers], on_sigterm=on_sigterm)
    service.serving.set()
    try:
        await asyncio.gather(*(server.serve(sockets=socks) for server, socks in servers))
    finally:
        await asyncio.to_thread(service.shutdown)
