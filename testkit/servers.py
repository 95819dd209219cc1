"""Real servers for tests and benchmarks of the sidecar: nginx and a fault-injecting TCP proxy.

    with Nginx(root, slow_rate="256k") as web:          # http://127.0.0.1:PORT/models/...
        with CutProxy(web.port, after=100_000, faulty=2) as proxy:
            ...                                          # 2 partition responses die after 100 kB

Nginx serves `root` at `/`, `root` again at `/slow/` with `limit_rate`, `/err500/` always 500,
and the Hugging Face resolve layout `/hf/{org}/{name}/resolve/{rev}/{file}` from
`root/hf/{org}/{name}/{rev}/{file}` (with a bearer token check when `hf_token` is set).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from sllm_knative.ports import free_port
from testkit.proc import Proc


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.02)


def nginx_path() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).exists()), None)


def nginx_conf(work: Path | str, http: str, *, connections: int = 1024, master: bool = False) -> str:
    """An nginx.conf for a throwaway foreground nginx whose files all live in `work`: one worker,
    its pid, logs and temporary paths there; `http` is the inside of the http block (servers,
    upstreams, log settings), already formatted."""
    return f"""daemon off;
master_process {"on" if master else "off"};
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
{http}}}
"""


_STORE = """\
  access_log {work}/access.log;
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location /slow/ {{ alias {root}/; limit_rate {slow_rate}; }}
    location /err500/ {{ return 500; }}
    location ~ ^/hf/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$ {{
      {auth}
      alias {root}/hf/$1/$2/$3/$4;
    }}
  }}
"""


class Nginx:
    """nginx from the distribution, on a free loopback port, serving `root` (see module doc)."""

    def __init__(self, root: Path, *, slow_rate: str = "256k", hf_token: str | None = None) -> None:
        binary = nginx_path()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx-light)")
        self.binary = binary
        self.root = Path(root).resolve()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix="sllm-nginx-"))
        auth = f'if ($http_authorization != "Bearer {hf_token}") {{ return 401; }}' if hf_token else ""
        self.conf = self.work / "nginx.conf"
        self.conf.write_text(nginx_conf(self.work, _STORE.format(work=self.work, port=self.port, root=self.root,
                                                                  slow_rate=slow_rate, auth=auth)))
        self.proc = Proc("nginx")

    def start(self) -> Nginx:
        self.proc.start([self.binary, "-e", str(self.work / "error.log"), "-p", str(self.work), "-c", str(self.conf)],
                        self.work / "nginx.out", cwd=None)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"nginx did not start: {(self.work / 'error.log').read_text()}") from None
        return self

    def requests(self, needle: str = "") -> list[str]:
        """Access-log lines (one per request) containing `needle`."""
        log = self.work / "access.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line for line in lines if needle in line]

    def stop(self) -> None:
        self.proc.stop(grace=5)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class _Conn:
    def __init__(self) -> None:
        self.armed = False
        self.sent = 0


class CutProxy:
    """A TCP proxy to 127.0.0.1:upstream that breaks `faulty` responses, then passes everything.

    A connection is armed when a request containing `match` goes through it (and breaks are
    left); it then breaks after `after` more response bytes. mode "cut": close the connection;
    "stall": stop sending and keep the connection open (a hung server).
    """

    def __init__(self, upstream: int, *, after: int, faulty: int = 1, mode: str = "cut",
                 match: bytes = b"partition-") -> None:
        if mode not in ("cut", "stall"):
            raise ValueError(f"mode {mode!r}: 'cut' or 'stall'")
        self.upstream = upstream
        self.after = after
        self.left = faulty
        self.mode = mode
        self.match = match
        self.connections = 0
        self.broken = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="cut-proxy")

    def __enter__(self) -> CutProxy:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            conn = _Conn()
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream, conn), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, conn), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, conn: _Conn) -> None:
        try:
            while data := src.recv(65536):
                if self.match in data and not conn.armed:
                    with self._lock:
                        if self.left > 0:
                            self.left -= 1
                            conn.armed, conn.sent = True, 0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _responses(self, src: socket.socket, dst: socket.socket, conn: _Conn) -> None:
        try:
            while data := src.recv(65536):
                if conn.armed and conn.sent + len(data) >= self.after:
                    dst.sendall(data[: self.after - conn.sent])
                    with self._lock:
                        self.broken += 1
                    if self.mode == "stall":
                        self._stop.wait()
                    break
                if conn.armed:
                    conn.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
