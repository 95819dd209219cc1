"""One container of a pod as a local process: start, exit, restart with back-off, signals.

A container runs in its own process group with PR_SET_PDEATHSIG(SIGKILL), inside its node's
network namespace, with a clean environment (`base_env`), logging to `<pod dir>/<name>.log`
(appended across restarts). Its state is what kubelet reports: waiting (with a reason),
running or terminated, the last termination, the restart count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm_knative.local.procs import die_with_parent
from testkit.kube.nodeagent.policy import (
    Backoff,
    ProbeState,
    ProbeTiming,
    exit_code_of,
    initial_probe_state,
    should_restart,
)
from testkit.kube.nodeagent.spec import Json
from testkit.kube.nodeagent.status import ContainerView, rfc3339


def container_preexec(enter: Callable[[], None]) -> Callable[[], None]:
    """Between fork and exec: own process group, SIGKILL when the agent's thread dies (a container
    that traps SIGTERM must not outlive us), then the node's network namespace."""
    def run() -> None:
        os.setpgrp()
        die_with_parent(signal.SIGKILL)
        enter()
    return run


def base_env(*, root: Path, hostname: str, api_host: str, api_port: str,
             extra: Mapping[str, str]) -> dict[str, str]:
    """What every container starts with, like a fresh image, before its envFrom and env."""
    home = root / "root"
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8",
            "HOME": str(home), "HOSTNAME": hostname,
            "KUBERNETES_SERVICE_HOST": api_host, "KUBERNETES_SERVICE_PORT": api_port,
            "KUBERNETES_SERVICE_PORT_HTTPS": api_port, "SLLM_MOUNT_ROOT": str(root), **extra}


@dataclass
class ProbeRun:
    kind: str
    spec: Json
    timing: ProbeTiming
    state: ProbeState
    last_at: float | None = None
    message: str = ""


class Container:
    """One container of a pod: its process, state, restarts and probes."""

    def __init__(self, spec: Json, init: bool, *, pod_uid: str, pod_ref: str, restart_policy: str,
                 backoff: Backoff, log: Any) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.image: str = spec.get("image", "")
        self.init = init
        self.sidecar = init and spec.get("restartPolicy") == "Always"
        self.pod_uid, self.pod_ref, self.restart_policy, self.backoff = pod_uid, pod_ref, restart_policy, backoff
        self.log = log.bind(container=self.name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: Json = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Json = {}
        self.restart_count = 0
        self.instances = 0
        self.backoff_level = 0
        self.next_start = 0.0
        self.will_run = True  # not yet started, or exited and will restart
        self.done = False  # an init container that succeeded
        self.failed = False  # an init container that failed and will not run again
        self.started_at = 0.0
        self.started_wall = 0.0
        self.kill_deadline: float | None = None
        self.kill_reason = ""
        self.env: dict[str, str] = {}
        self.cwd = ""
        self.probes: dict[str, ProbeRun] = {}
        self.ready = False
        self.startup_ok = False

    def reset_probes(self) -> None:
        self.probes = {}
        for kind in ("startup", "liveness", "readiness"):
            p = self.spec.get(f"{kind}Probe")
            if p and not (self.init and not self.sidecar):
                self.probes[kind] = ProbeRun(kind, p, ProbeTiming.of(p), initial_probe_state(kind))
        self.startup_ok = "startup" not in self.probes
        self.ready = False

    @property
    def running(self) -> bool:
        return self.proc is not None

    @property
    def container_id(self) -> str:
        return f"nodeagent://{self.pod_uid[:8]}-{self.name}-{self.instances}"

    def view(self) -> ContainerView:
        return ContainerView(self.name, self.image, self.state, self.last_state, self.restart_count,
                             self.ready, self.running and self.startup_ok,
                             self.container_id if self.instances else "", self.sidecar)

    def wait(self, reason: str, message: str = "") -> None:
        self.state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}

    # -- the process ----------------------------------------------------------------------------
    def launch(self, argv: Sequence[str], log_path: Path, enter: Callable[[], None], now: float,
               deleting: bool) -> None:
        """Start the process (env and cwd set); a start that fails counts as an exit (StartError)."""
        if self.instances:
            self.restart_count += 1
        self.instances += 1
        self.started_at, self.started_wall = now, time.time()
        self.kill_deadline, self.kill_reason = None, ""
        self.reset_probes()
        try:
            with open(log_path, "ab") as out:
                self.proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                             preexec_fn=container_preexec(enter))
        except OSError as e:
            self.log.warning("container failed to start", argv0=argv[0], error=str(e))
            self.exited(128, now, deleting, reason="StartError", message=str(e))
            return
        self.state = {"running": {"startedAt": rfc3339(self.started_wall)}}
        self.log.info("container started", pid=self.proc.pid, restarts=self.restart_count,
                      argv=" ".join(argv)[:200])

    def exited(self, code: int, now: float, deleting: bool, reason: str = "", message: str = "") -> None:
        """Record the end of a run and decide on a restart (restartPolicy, back-off)."""
        ending = not self.will_run  # the pod or the agent is stopping: no restart
        term: Json = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                      "startedAt": rfc3339(self.started_wall), "finishedAt": rfc3339(),
                      "containerID": self.container_id}
        if message:
            term["message"] = message
        self.proc = None
        self.ready = False
        self.kill_deadline = None
        self.backoff_level = self.backoff.level_after(self.backoff_level, now - self.started_at)
        again = True if self.sidecar else should_restart(self.restart_policy, code, init=self.init)
        if self.init and not self.sidecar and code == 0:
            self.done = True
        self.will_run = again and not ending and not deleting
        if self.will_run:
            delay = self.backoff.delay(self.backoff_level)
            self.next_start = now + delay
            self.last_state = {"terminated": term}
            if delay > 0:
                self.wait("CrashLoopBackOff",
                          f"back-off {delay:g}s restarting failed container={self.name} pod={self.pod_ref}")
            else:
                self.wait("ContainerCreating")
        else:
            self.state = {"terminated": term}
            if self.init and not self.sidecar and code != 0:
                self.failed = True
        self.log.info("container exited", exit_code=code, reason=term["reason"], restart=self.will_run,
                      kill_reason=self.kill_reason or None)

    def poll(self, now: float, deleting: bool) -> None:
        """Notice an exit; SIGKILL once a termination's grace period is over."""
        if self.proc is None:
            return
        rc = self.proc.poll()
        if rc is not None:
            self.exited(exit_code_of(rc), now, deleting)
        elif self.kill_deadline is not None and now >= self.kill_deadline:
            self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def terminate(self, grace_s: float, reason: str = "") -> None:
        """SIGTERM now, SIGKILL at the deadline (driven by the pod worker's loop through `poll`)."""
        if self.proc is None or self.kill_deadline is not None:
            return
        self.kill_reason = reason
        self.signal(signal.SIGTERM)
        self.kill_deadline = time.monotonic() + grace_s

    def reap_killed(self) -> None:
        """After SIGKILL: wait for the process and record it terminated, never to run again."""
        if self.proc is None:
            return
        rc = -signal.SIGKILL
        with contextlib.suppress(Exception):
            rc = self.proc.wait(timeout=5)
        self.proc, self.ready, self.will_run = None, False, False
        self.state = {"terminated": {"exitCode": exit_code_of(rc), "reason": "Error",
                                     "startedAt": rfc3339(self.started_wall), "finishedAt": rfc3339(),
                                     "containerID": self.container_id}}
