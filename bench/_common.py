"""Helpers shared by the benchmarks: machine facts, medians, cache eviction, output, and the
warm-path latency kit of bench/proxy.py and bench/kube.py (a raw-socket HTTP/1.1 keep-alive
client, nearest-rank percentiles, rotating rounds, a throughput run, nginx as a reverse proxy)."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sllm_knative import atomic
from sllm_knative.pagecache import evict, resident_fraction  # noqa: F401 - re-exported for benchmarks


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def exit_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C: the `finally` blocks that stop clusters and instances
    and unmount tmpfs run (bench/gpu/check.py stops a benchmark past its time with SIGTERM)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


_P = TypeVar("_P", bound="Periodic")


class Periodic(abc.ABC):
    """Calls `tick()` every `interval` seconds on a daemon thread while its `with` block runs (the
    samplers and the DRAM evictor of the benchmarks); a tick that raises is the subclass's to catch."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    @abc.abstractmethod
    def tick(self) -> None:
        """One sample (or eviction pass); called on the thread."""

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def __enter__(self: _P) -> _P:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def median_runs(fn: Callable[[], float], runs: int) -> dict[str, Any]:
    """Run fn `runs + 1` times: the first is reported apart, the median over the rest (runs = 0:
    the first run is the result, for runs too long to repeat)."""
    first = fn()
    rest = [fn() for _ in range(runs)]
    return {"first_s": first, "seconds": statistics.median(rest) if rest else first, "runs_s": rest}


def write_json(out: Path, name: str, doc: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / f"{name}.json"
    atomic.write_json(p, doc, durable=False, indent=2)
    return p


def ensure_model(out_dir: Path, spec: Any, init_device: str = "cpu") -> bool:
    """Build the random model `spec` into out_dir unless the one there was built from the same
    spec by the current recipe (`sllm_knative.models.RECIPE`); True when it (re)built it, so
    the caller converts again. The stamp lives beside the directory, not in it. init_device:
    where the random values are drawn (build_model); "cpu" keeps the stamps of earlier builds."""
    from sllm_knative.models import RECIPE, build_model

    stamp = out_dir.with_name(out_dir.name + ".recipe.json")
    want = {"recipe": RECIPE, "spec": dataclasses.asdict(spec)}
    if init_device != "cpu":
        want["init_device"] = init_device
    try:
        if (out_dir / "config.json").exists() and json.loads(stamp.read_text()) == want:
            return False
    except (OSError, ValueError):
        pass
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"building a random {spec.nbytes() / 2**30:.2f} GiB Llama-like model in {out_dir}", flush=True)
    build_model(out_dir, spec, init_device=init_device)
    stamp.write_text(json.dumps(want))
    return True


def down_keeping_logs(state: Path, logs: Path) -> None:
    """Stop the local cluster kept in `state`, copy its logs under `logs` (for the report), and
    remove `state`."""
    from sllm_knative.local.cluster import down

    down(state)
    for f in (state / "logs").rglob("*.log") if (state / "logs").exists() else []:
        dst = logs / f.relative_to(state / "logs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            dst.write_bytes(f.read_bytes())
    shutil.rmtree(state, ignore_errors=True)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure to `path` through a temporary name (never a half-written PNG)."""
    import matplotlib.pyplot as plt

    with atomic.open_atomic(path, "wb", durable=False) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


# -- the warm-path latency kit (bench/proxy.py, bench/kube.py) --------------------------------------

Addr = int | tuple[str, int]  # a port on 127.0.0.1, or (host, port)
WARMUP = 200  # warm-up rounds before the counted ones


def _addr(a: Addr) -> tuple[str, int]:
    return ("127.0.0.1", a) if isinstance(a, int) else a


class Conn:
    """One HTTP/1.1 keep-alive connection on a raw socket; `roundtrip()` sends the (prebuilt)
    request and reads the whole response (Content-Length or chunked)."""

    def __init__(self, addr: Addr, request: bytes) -> None:
        self.host, self.port = _addr(addr)
        self.request = request
        self.sock = socket.create_connection((self.host, self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"{self.host}:{self.port} closed the connection")
        self.buf += data

    def _until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            self._fill()
        out = bytes(self.buf[:i])
        del self.buf[:i + len(sep)]
        return out

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def roundtrip(self) -> tuple[int, bytes]:
        self.sock.sendall(self.request)
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        if "content-length" in fields:
            return status, self._exact(int(fields["content-length"]))
        if fields.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int(self._until(b"\r\n").split(b";")[0], 16):
                parts.append(self._exact(size))
                self._exact(2)
            self._until(b"\r\n")  # end of the (empty) trailer section
            return status, b"".join(parts)
        raise ValueError(f"response from {self.host}:{self.port} has neither a length nor chunked encoding: {head}")

    def timed(self) -> float:
        t0 = time.perf_counter()
        status, _ = self.roundtrip()
        dt = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"HTTP {status} from {self.host}:{self.port}")
        return dt


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def rotations(paths: tuple[str, ...], rounds: int) -> list[tuple[str, ...]]:
    """The order of the paths in each round: rotated by one every round."""
    n = len(paths)
    return [tuple(paths[(r + i) % n] for i in range(n)) for r in range(rounds)]


def latencies(targets: Mapping[str, Addr], request: bytes, rounds: int, warmup: int = WARMUP
              ) -> dict[str, list[float]]:
    """Seconds per request on each path: one keep-alive connection per path, `warmup` rounds
    dropped, then `rounds` rounds of one request per path in an order rotated every round."""
    conns = {p: Conn(a, request) for p, a in targets.items()}
    try:
        for _ in range(warmup):
            for c in conns.values():
                c.timed()
        out: dict[str, list[float]] = {p: [] for p in targets}
        for order in rotations(tuple(targets), rounds):
            for p in order:
                out[p].append(conns[p].timed())
        return out
    finally:
        for c in conns.values():
            c.close()


def throughput(addr: Addr, request: bytes, concurrency: int, seconds: float) -> float:
    """Requests/s of `concurrency` threads, each on its own keep-alive connection, for `seconds`."""
    counts = [0] * concurrency
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)
    stop = time.perf_counter() + seconds + 3600  # replaced once every thread is connected

    def worker(i: int) -> None:
        try:
            conn = Conn(addr, request)
        except OSError as exc:
            errors.append(exc)
            start.abort()
            return
        try:
            start.wait()
            while time.perf_counter() < stop:
                status, _ = conn.roundtrip()
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
                counts[i] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop = t0 + seconds
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"throughput to {_addr(addr)}: {errors[0]!r}")
    return sum(counts) / elapsed


_NGINX_HTTP = """\
  access_log off;
  keepalive_requests 1000000;
  upstream function {{
    server {upstream};
    keepalive 16;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://function;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_buffering off;
    }}
  }}
"""
NGINX_CONFIG = ("master + 1 worker, upstream keepalive 16, proxy_http_version 1.1, proxy_buffering off, "
                "access_log off")


def _group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d.name))
    return out


class NginxProxy:
    """nginx (master + one worker) in its own process group on a free loopback port, proxying
    to one upstream (`NGINX_CONFIG`); `stop()` is graceful and checks that nothing is left."""

    def __init__(self, upstream: Addr, logs: Path) -> None:
        from sllm_knative.ports import free_port
        from testkit.servers import nginx_conf, nginx_path

        binary = nginx_path()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx-light)")
        self.port = free_port()
        self.work = Path(tempfile.mkdtemp(prefix="bench-proxy-nginx-"))
        self.conf = self.work / "nginx.conf"
        host, port = _addr(upstream)
        self.conf.write_text(nginx_conf(self.work, _NGINX_HTTP.format(port=self.port, upstream=f"{host}:{port}"),
                                        master=True))
        self.logs = logs
        self.argv = [binary, "-p", str(self.work), "-c", str(self.conf), "-e", str(self.work / "error.log")]
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped_clean: bool | None = None

    def version(self) -> str:
        return subprocess.run([self.argv[0], "-v"], capture_output=True, text=True).stderr.strip()

    def start(self) -> NginxProxy:
        from testkit.proc import Proc

        nginx = Proc("nginx").start(self.argv, self.logs / "nginx.log", append=True)  # own process group
        self.proc = nginx.proc
        nginx.wait_http(f"http://127.0.0.1:{self.port}/health/live", timeout=30, interval=0.05)
        return self

    def stop(self) -> None:
        """SIGQUIT to the master (graceful: workers finish, then exit); verify the group is empty."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _group_members(pgid)
        self.stopped_clean = self.proc.poll() is not None and not left
        if left or self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with contextlib.suppress(OSError):
            (self.logs / "nginx-error.log").write_bytes((self.work / "error.log").read_bytes())
        shutil.rmtree(self.work, ignore_errors=True)
        self.proc = None
