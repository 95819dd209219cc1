"""Startup, liveness and readiness probes: httpGet, tcpSocket, exec and grpc.

HTTP, TCP and gRPC probes run from the agent, across the bridge to the pod's address, as
kubelet's run from the host; exec probes run in the node's network namespace with the
container's environment and working folder. A failed startup or liveness probe terminates the
container (its restart follows restartPolicy); readiness sets the container's `ready`.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from testkit.kube.nodeagent.containers import Container, ProbeRun, container_preexec
from testkit.kube.nodeagent.env import expand
from testkit.kube.nodeagent.policy import MIN_GRACE_S, probe_due, probe_step
from testkit.kube.nodeagent.spec import Json, map_python


def http_probe(host: str, port: int, path: str, scheme: str, headers: Sequence[Json], timeout: float) -> tuple[bool, str]:
    conn: http.client.HTTPConnection
    if scheme.upper() == "HTTPS":
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # kubelet does not verify either
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = {"User-Agent": "kube-probe/nodeagent", "Accept": "*/*"}
        hdrs.update({h["name"]: h["value"] for h in headers})
        conn.request("GET", path or "/", headers=hdrs)
        r = conn.getresponse()
        r.read(10240)
        ok = 200 <= r.status < 400
        return ok, f"HTTP probe failed with statuscode: {r.status}" if not ok else ""
    except OSError as e:
        return False, f'Get "{scheme.lower()}://{host}:{port}{path}": {e}'
    finally:
        conn.close()


def tcp_probe(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"dial tcp {host}:{port}: {e}"


def grpc_probe(host: str, port: int, service: str, timeout: float) -> tuple[bool, str]:
    """grpc.health.v1.Health/Check by hand (request: field 1 = service; SERVING = 1)."""
    import grpc

    svc = service.encode()
    req = (b"\x0a" + bytes([len(svc)]) + svc) if svc else b""
    with grpc.insecure_channel(f"{host}:{port}") as ch:
        try:
            resp = ch.unary_unary("/grpc.health.v1.Health/Check")(req, timeout=timeout)
        except grpc.RpcError as e:
            return False, f"grpc health check: {e.code()}"
    return resp == b"\x08\x01", "" if resp == b"\x08\x01" else f"service unhealthy (responded with {resp!r})"


def exec_probe(argv: Sequence[str], env: Mapping[str, str], cwd: str, timeout: float,
               preexec: Callable[[], None]) -> tuple[bool, str]:
    try:
        r = subprocess.run(list(argv), env=dict(env), cwd=cwd, capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {timeout}s"
    except OSError as e:
        return False, str(e)
    out = (r.stdout + r.stderr).decode(errors="replace")[-500:]
    return r.returncode == 0, "" if r.returncode == 0 else f"exit {r.returncode}: {out}"


def run_probe(c: Container, run: ProbeRun, pod_ip: str, enter: Callable[[], None]) -> tuple[bool, str]:
    """One probe of container `c` of the pod at `pod_ip`: (ok, message when not)."""
    p, timeout = run.spec, run.timing.timeout_s

    def port_of(v: Any) -> int:
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            return int(v)
        for cp in c.spec.get("ports") or ():
            if cp.get("name") == v:
                return int(cp["containerPort"])
        raise ValueError(f"no container port named {v!r}")

    try:
        if "httpGet" in p:
            h = p["httpGet"]
            return http_probe(h.get("host") or pod_ip, port_of(h["port"]), h.get("path", "/"),
                              h.get("scheme", "HTTP"), h.get("httpHeaders") or (), timeout)
        if "tcpSocket" in p:
            t = p["tcpSocket"]
            return tcp_probe(t.get("host") or pod_ip, port_of(t["port"]), timeout)
        if "exec" in p:
            argv = [expand(a, c.env) for a in p["exec"].get("command") or ()]
            if not argv:
                return False, "exec probe without a command"
            argv[0] = map_python(argv[0])
            return exec_probe(argv, c.env, c.cwd, timeout, container_preexec(enter))
        if "grpc" in p:
            g = p["grpc"]
            return grpc_probe(pod_ip, int(g["port"]), g.get("service") or "", timeout)
    except Exception as e:
        return False, f"probe error: {e}"
    return False, f"probe kind {sorted(p)} is not supported"


def probe_containers(containers: Sequence[Container], now: float, *, pod_ip: str, pod_grace_s: float,
                     enter: Callable[[], None]) -> None:
    """Run the probes that are due on the running containers; act on the results.

    Until the startup probe succeeds only it runs; then liveness and readiness. A container
    without probes is ready as soon as it runs (a regular init container never is)."""
    for c in containers:
        if not c.running or c.kill_deadline is not None:
            continue
        if not c.probes:
            c.ready = not c.init or c.sidecar
            continue
        kinds = ["startup"] if not c.startup_ok else ["liveness", "readiness"]
        for kind in kinds:
            run = c.probes.get(kind)
            if run is None or not probe_due(now, c.started_at, run.last_at, run.timing):
                continue
            run.last_at = now
            ok, msg = run_probe(c, run, pod_ip, enter)
            before = run.state.result
            run.state = probe_step(run.state, ok, run.timing.success_threshold, run.timing.failure_threshold)
            if not ok:
                run.message = msg
            if run.state.result != before:
                c.log.info(f"{kind} probe {'succeeded' if run.state.result else 'failed'}",
                           message=None if ok else msg)
            if kind == "startup" and run.state.result:
                c.startup_ok = True
            if run.state.result is False and kind in ("startup", "liveness"):
                grace = float(run.spec.get("terminationGracePeriodSeconds") or pod_grace_s)
                c.terminate(max(MIN_GRACE_S, grace) if grace > 0 else MIN_GRACE_S, reason=f"failed {kind} probe")
                break
        if c.kill_deadline is None:
            r = c.probes.get("readiness")
            c.ready = c.startup_ok and (r is None or r.state.result is True)
