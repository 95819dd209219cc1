"""One child process for tests and benchmarks: started with its output in a log file, waited for
on an HTTP readiness path, stopped with SIGTERM then SIGKILL.

    p = Proc("activator").start([sys.executable, "-m", "activator", ...], logs / "activator.log")
    p.wait_http(f"{admin}/metrics")          # fails with the log's tail if p exits or times out
    ...
    code = p.stop(grace=10)                  # SIGTERM, wait, SIGKILL; the exit code

Built on sllm_knative.local.procs.spawn: the child has its own process group (stop signals the
whole group) and PR_SET_PDEATHSIG, so it dies with the thread that started it (start children
from a thread that outlives them, as pytest fixtures and benchmarks do).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from sllm_knative.local import procs

REPO = Path(__file__).resolve().parents[1]
TAIL = 3000


class Proc:
    """A child process with a log file; `proc` is its Popen (for terminate, wait, send_signal)."""

    def __init__(self, name: str = "process") -> None:
        self.name = name
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- start ----------------------------------------------------------------------------------

    def start(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | str | None = REPO, unset: Sequence[str] = (), append: bool = False,
              death_signal: int = signal.SIGTERM) -> Proc:
        """Start argv (output to `log`, truncated unless `append`) with os.environ plus `env` less
        `unset`, PYTHONUNBUFFERED=1 so a Python child's log is current, in `cwd` (the repo root)."""
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            log.write_bytes(b"")
        self.log_path = log
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for key in unset:
            environ.pop(key, None)
        self._proc = procs.spawn(argv, log, environ, cwd=None if cwd is None else str(cwd),
                                 death_signal=death_signal, inherit=False)
        return self

    # -- state ----------------------------------------------------------------------------------

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def tail(self, chars: int = TAIL) -> str:
        return self.log()[-chars:]

    # -- waiting --------------------------------------------------------------------------------

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
        """Poll `ready()` until it is true; fail with the log's tail if the process exits first or
        `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before {what}:\n{self.tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not {what} after {timeout}s (log {self.log_path}):\n{self.tail()}")
            time.sleep(interval)

    def wait_http(self, url: str, timeout: float = 90.0, statuses: Container[int] | None = (200,),
                  interval: float = 0.1) -> httpx.Response:
        """GET `url` until it answers with one of `statuses` (None: any answer); the answer."""
        answer: list[httpx.Response] = []

        def ready() -> bool:
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(url, timeout=2)
                if statuses is None or r.status_code in statuses:
                    answer.append(r)
                    return True
            return False

        self.wait_until(ready, timeout, f"ready at {url}", interval)
        return answer[0]

    def wait(self, timeout: float | None = None) -> int:
        """The exit code once the process exits; AssertionError with the log if it is still running."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} is still running after {timeout}s:\n{self.tail()}") from None

    # -- stopping -------------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # its group: what it started goes with it
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)  # in case it left its group

    def stop(self, grace: float = 20.0) -> int:
        """SIGTERM (to its process group), wait up to `grace` seconds, then SIGKILL; the exit code."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait()
        else:  # exited: leave nothing of its group behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        return self._proc.returncode

    def kill(self) -> int:
        """SIGKILL now (kill -9, no SIGTERM first); the exit code."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
        return self._proc.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

