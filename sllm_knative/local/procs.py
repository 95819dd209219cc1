"""Child processes that never outlive the process that started them.

Every child gets PR_SET_PDEATHSIG (SIGTERM when its parent dies, even by SIGKILL) and its
own process group, so `stop` can end it with everything it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to signal this process when its parent thread exits."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def spawn(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: str | None = None, death_signal: int = signal.SIGTERM,
          inherit: bool = True) -> subprocess.Popen[bytes]:
    """Start argv in its own process group, output to log_path; it gets `death_signal` when we die.

    Its environment is os.environ updated with `env`, or `env` alone when not `inherit`.

    SIGTERM lets a child shut down cleanly; a child whose clean shutdown can outlast its use (a
    throwaway API server draining its watches) is better given SIGKILL."""

    def child_setup() -> None:
        os.setpgrp()
        die_with_parent(death_signal)

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        environ = {**os.environ, **(env or {})} if inherit else dict(env or {})
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=environ, cwd=cwd, preexec_fn=child_setup)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(pid: int, grace_s: float = 5.0, group: bool = True) -> None:
    """SIGTERM the process (group), then SIGKILL what is left after the grace period."""
    send = (lambda s: os.killpg(pid, s)) if group else (lambda s: os.kill(pid, s))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
