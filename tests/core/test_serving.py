"""sllm_knative.serving in a real process: SIGTERM and SIGINT stop every server of the process,
the code after `serve_until_signalled` runs (uvicorn alone re-raises the signal and kills the
process before it), and the process exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from sllm_knative.ports import free_port

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    import uvicorn
    from sllm_knative.serving import Server, serve_until_signalled

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main(ports):
        servers = [(Server(uvicorn.Config(app, host="127.0.0.1", port=p, log_level="warning", lifespan="off")), None)
                   for p in ports]
        try:
            await serve_until_signalled(servers)
        finally:
            print("cleanup ran", flush=True)

    asyncio.run(main([int(p) for p in sys.argv[1:]]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_server_and_the_cleanup_runs(sig: signal.Signals) -> None:
    ports = [free_port(), free_port()]
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, ports)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # both servers answer
            try:
                if all(httpx.get(f"http://127.0.0.1:{p}/", timeout=1).text == "ok" for p in ports):
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the servers never answered"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, proc.returncode
    assert "cleanup ran" in out
    for p in ports:  # both stopped
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{p}/", timeout=1)
