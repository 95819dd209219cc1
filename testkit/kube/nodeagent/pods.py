"""The per-pod worker: one thread per pod, a loop that drives the pod through its life.

Each tick: set up the sandbox (an address on the node's network, the volumes; again every
`volume_resync_s`), start init containers in order (a sidecar, restartPolicy Always, only has
to have started), then the containers, restart those that exited per restartPolicy with
back-off, run the probes, and write the status through `pods/status` when it changed.
Deletion (deletionTimestamp set) is kubelet's: SIGTERM, the grace period (at least 2 s),
SIGKILL, a final status, then the object's deletion with grace 0 and a UID precondition.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from testkit.kube.nodeagent.api import Api
from testkit.kube.nodeagent.containers import Container, base_env
from testkit.kube.nodeagent.env import ConfigError, build_env, container_argv
from testkit.kube.nodeagent.policy import MIN_GRACE_S, Backoff
from testkit.kube.nodeagent.probes import probe_containers
from testkit.kube.nodeagent.spec import ImageError, Json, lookup_image
from testkit.kube.nodeagent.status import (
    container_status,
    merge_conditions,
    pod_conditions,
    pod_phase,
    rfc3339,
)
from testkit.kube.nodeagent.volumes import PodVolumes, VolumeError

if TYPE_CHECKING:
    from testkit.kube.nodeagent.nodes import NodeRunner


def pod_key(pod: Json) -> str:
    m = pod["metadata"]
    return f"{m['namespace']}_{m['name']}_{m['uid']}"


class PodWorker:
    """Runs one pod: sandbox (address, volumes), containers, probes, status, deletion."""

    TICK_S = 0.1
    MIN_GRACE_S = MIN_GRACE_S

    def __init__(self, node: NodeRunner, pod: Json) -> None:
        self.node, self.agent = node, node.agent
        self.api: Api = node.agent.api
        self.pod = pod
        meta = pod["metadata"]
        self.uid, self.ns, self.name = meta["uid"], meta["namespace"], meta["name"]
        self.log = node.log.bind(pod=f"{self.ns}/{self.name}")
        self.dir = self.agent.root / "pods" / pod_key(pod)
        self.vols = PodVolumes(self.api, self.dir, self.agent.shm_root / self.uid, node.hostpath_root, node.ip,
                               node.allocatable)
        self._mu = threading.Lock()
        self._wake = threading.Event()
        self.gone = False  # the object is gone from the API
        self.killed = False  # kill_node: SIGKILL, no more writes
        self.stopping = False  # agent stop: end processes, no more writes
        self.report_kill = False
        self.finished = threading.Event()
        self.ip = ""
        self.sandbox_ready = False
        self.sandbox_error = ""
        self._next_sandbox = 0.0
        self.frozen = False  # terminal before this agent saw it
        self.start_time = ""
        self.inits = [self._container(c, True) for c in pod["spec"].get("initContainers") or ()]
        self.ctrs = [self._container(c, False) for c in pod["spec"].get("containers") or ()]
        if self.inits:
            for c in self.ctrs:
                c.wait("PodInitializing")
        self._last_status: Json | None = None
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    def _container(self, spec: Json, init: bool) -> Container:
        a = self.agent
        return Container(spec, init, pod_uid=self.uid, pod_ref=f"{self.name}_{self.ns}({self.uid})",
                         restart_policy=self.pod["spec"].get("restartPolicy", "Always"), log=self.log,
                         backoff=Backoff(a.backoff_base_s, a.backoff_cap_s, a.backoff_reset_s))

    # -- called by the node's watch and the agent ------------------------------------------------
    def update(self, pod: Json) -> None:
        with self._mu:
            self.pod = pod
        self._wake.set()

    def removed(self) -> None:
        self.gone = True
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def kill(self, report: bool = False) -> None:
        """SIGKILL the containers; with `report`, write their end (not ready) once more first."""
        self.report_kill = report
        self.killed = True
        self._wake.set()

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------
    @property
    def spec(self) -> Json:
        with self._mu:
            return self.pod["spec"]

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def _all(self) -> list[Container]:
        return self.inits + self.ctrs

    def _run(self) -> None:
        try:
            status = self.pod.get("status") or {}
            self.frozen = status.get("phase") in ("Succeeded", "Failed")
            self.start_time = status.get("startTime") or rfc3339()
            while True:
                if self.killed:
                    self._kill_all()
                    if self.report_kill:
                        self._write_status(final=True)
                    return
                if self.stopping:
                    self._end_processes(grace_s=1.0)
                    return
                if self.gone:
                    self._end_processes(grace_s=min(MIN_GRACE_S, self._grace()))
                    return
                if self.deleting:
                    self._terminate_and_delete()
                    return
                if self.frozen:  # only its deletion is left
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                now = time.monotonic()
                if now >= self._next_sandbox:
                    self._sandbox()
                if self.sandbox_ready:
                    self._step_containers(now)
                    probe_containers(self._all(), time.monotonic(), pod_ip=self.ip, enter=self.node.net.enter,
                                     pod_grace_s=self.spec.get("terminationGracePeriodSeconds", 30))
                self._write_status()
                self._wake.wait(self.TICK_S)
                self._wake.clear()
        except Exception:
            self.log.error("pod worker failed; ending its processes", exc_info=True)
            self._kill_all()
        finally:
            if self.ip:
                self.node.net.release_pod_ip(self.ip)
            self.vols.cleanup()
            self.finished.set()

    def _grace(self) -> float:
        g = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = self.spec.get("terminationGracePeriodSeconds", 30)
        return float(g)

    # -- sandbox and containers -------------------------------------------------------------------
    def _sandbox(self) -> None:
        try:
            if not self.ip:
                self.ip = self.node.net.add_pod_ip()
            self.dir.mkdir(parents=True, exist_ok=True)
            self.vols.setup(self.pod, self.ip, [c.spec for c in self.ctrs + self.inits])
            self._next_sandbox = time.monotonic() + self.agent.volume_resync_s
            if not self.sandbox_ready:
                self.log.info("sandbox ready", ip=self.ip, volumes=len(self.vols.volumes))
            self.sandbox_ready, self.sandbox_error = True, ""
        except VolumeError as e:
            if str(e) != self.sandbox_error:
                self.log.warning("volume not ready", error=str(e))
            self.sandbox_error = str(e)
            self._next_sandbox = time.monotonic() + 1.0
            for c in self._all():
                if c.proc is None and c.instances == 0:
                    c.wait("ContainerCreating", str(e))

    def _start(self, c: Container) -> None:
        """Resolve the container's image, environment and mounts, then launch it."""
        now = time.monotonic()
        try:
            image = lookup_image(c.image, self.agent.images)
            host, port = self.api.server_host_port()
            base = base_env(root=self.dir / "rootfs" / c.name, hostname=self.spec.get("hostname") or self.name,
                            api_host=host, api_port=port, extra=self.agent.extra_env)
            c.env = build_env(c.spec, self.pod, pod_ip=self.ip, host_ip=self.node.ip, base=base,
                              lookup=self.api.lookup(self.ns), node_allocatable=self.node.allocatable)
            root = self.vols.mount_root(c.spec, c.env)
            argv = container_argv(image, c.spec.get("command"), c.spec.get("args"), c.env)
        except ImageError as e:
            if c.state.get("waiting", {}).get("reason") != "ErrImagePull":
                c.log.warning("image not runnable", image=c.image, error=str(e))
            c.wait("ErrImagePull", str(e))
            c.next_start = now + 5.0
            return
        except ConfigError as e:
            if c.state.get("waiting", {}).get("message") != str(e):
                c.log.warning("container config error", error=str(e))
            c.wait("CreateContainerConfigError", str(e))
            c.next_start = now + 1.0
            return
        wd = c.spec.get("workingDir") or "/"
        c.cwd = str(root / wd.lstrip("/")) if wd != "/" else str(root)
        Path(c.cwd).mkdir(parents=True, exist_ok=True)
        c.launch(argv, self.dir / f"{c.name}.log", self.node.net.enter, now, self.deleting)

    def _init_done(self) -> tuple[bool, list[str]]:
        pending = [c.name for c in self.inits if not (c.done or (c.sidecar and c.running and c.startup_ok))]
        return not pending, pending

    def _step_containers(self, now: float) -> None:
        for c in self._all():
            c.poll(now, self.deleting)
        if any(c.failed for c in self.inits):
            return
        for c in self.inits:  # in order; a regular one must succeed, a sidecar must have started
            if c.done:
                continue
            if c.running:
                if c.sidecar and c.startup_ok:
                    continue
                return
            if c.will_run and now >= c.next_start:
                self._start(c)
            return
        for c in self.inits:  # restart sidecars that exited
            if c.sidecar and not c.running and c.will_run and now >= c.next_start:
                self._start(c)
        for c in self.ctrs:
            if not c.running and c.will_run and now >= c.next_start:
                self._start(c)

    # -- status ---------------------------------------------------------------------------------
    def _build_status(self) -> Json:
        init_done, pending = self._init_done()
        views = [c.view() for c in self.ctrs]
        init_views = [c.view() for c in self.inits]
        terminal = self.deleting and not any(c.running for c in self._all())
        phase = pod_phase(self.spec.get("restartPolicy", "Always"), init_views, views, initialized=init_done,
                          terminal=terminal)
        terminal = phase in ("Succeeded", "Failed")
        init_done = init_done or terminal
        gates = [g["conditionType"] for g in self.spec.get("readinessGates") or ()]
        conds = pod_conditions(sandbox_ready=self.sandbox_ready, init_done=init_done,
                               pending_init=pending, containers=views, terminal=terminal,
                               readiness_gates=gates, existing=(self.pod.get("status") or {}).get("conditions") or ())
        st: Json = {"phase": phase, "conditions": conds, "hostIP": self.node.ip, "hostIPs": [{"ip": self.node.ip}],
                    "startTime": self.start_time,
                    "containerStatuses": [container_status(v) for v in views]}
        if self.inits:
            st["initContainerStatuses"] = [container_status(v) for v in init_views]
        if self.ip and self.sandbox_ready:
            st["podIP"], st["podIPs"] = self.ip, [{"ip": self.ip}]
        return st

    def _write_status(self, final: bool = False) -> None:
        if (self.killed and not final) or self.stopping or self.frozen:
            return
        st = self._build_status()
        if st == self._last_status:
            return
        for _ in range(5):
            with self._mu:
                pod = self.pod
            existing = (pod.get("status") or {}).get("conditions") or []
            gen = pod["metadata"].get("generation")
            body = {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
                    "status": {**st, "conditions": merge_conditions(existing, st["conditions"], rfc3339(), gen),
                               **({"observedGeneration": gen} if gen is not None else {})}}
            try:
                resp = self.api.core.patch_namespaced_pod_status(self.name, self.ns, body, _content_type=Api.MERGE,
                                                                 _preload_content=False, _request_timeout=10)
                new = Api.data(resp)
                with self._mu:
                    self.pod = new
                if (self._last_status or {}).get("phase") != st["phase"]:
                    self.log.info("pod phase", phase=st["phase"], ip=st.get("podIP"))
                self._last_status = st
                return
            except Exception as e:
                code = Api.status_of(e)
                if code == 409:  # a newer pod object: read it, then try again
                    with contextlib.suppress(Exception):
                        fresh = Api.data(self.api.core.read_namespaced_pod(self.name, self.ns, _preload_content=False,
                                                                           _request_timeout=10))
                        if fresh["metadata"]["uid"] != self.uid:
                            self.gone = True
                            return
                        with self._mu:
                            self.pod = fresh
                    continue
                if code == 404:
                    self.gone = True
                    return
                self.log.warning("status write failed", error=repr(e)[:300])
                return

    # -- ending ---------------------------------------------------------------------------------
    def _kill_all(self) -> None:
        for c in self._all():
            c.signal(signal.SIGKILL)
        for c in self._all():
            c.reap_killed()

    def _end_processes(self, grace_s: float) -> None:
        for c in self._all():
            c.will_run = False
            c.kill_deadline = None
            c.terminate(grace_s, reason="pod stopping")
        while any(c.running for c in self._all()):
            if self.killed:
                self._kill_all()
                return
            now = time.monotonic()
            for c in self._all():
                c.poll(now, self.deleting)
            time.sleep(0.05)

    def _terminate_and_delete(self) -> None:
        """Kubelet's graceful deletion: SIGTERM, grace, SIGKILL, final status, delete (grace 0, UID)."""
        grace = max(MIN_GRACE_S, self._grace())
        running = [c.name for c in self._all() if c.running]
        self.log.info("pod deleted: stopping containers", grace_s=grace, running=",".join(running) or None)
        for c in self._all():
            c.will_run = False
            if c.running or self.frozen:
                continue
            if c.last_state.get("terminated"):  # waiting to restart: its last run is its end
                c.state, c.last_state = c.last_state, {}
            elif "terminated" not in c.state:  # never ran
                c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                          "message": "The container could not be located when the pod was deleted.  "
                                                     "The container used to be Running"}}
        for c in self._all():
            c.terminate(grace, reason="pod deleted")
        while any(c.running for c in self._all()):
            if self.killed or self.stopping:
                self._kill_all()
                return
            now = time.monotonic()
            for c in self._all():
                c.poll(now, self.deleting)
            self._write_status()
            time.sleep(0.05)
        if self.gone:
            return
        if not self.frozen:
            self._write_status()
        from kubernetes.client.rest import ApiException

        try:
            # With a body the API server reads the options from it alone (not the query).
            self.api.core.delete_namespaced_pod(self.name, self.ns, body={"gracePeriodSeconds": 0,
                                                                          "preconditions": {"uid": self.uid}},
                                                _request_timeout=10)
            self.log.info("pod object deleted")
        except ApiException as e:
            if e.status not in (404, 409):
                self.log.warning("pod delete failed", error=str(e)[:300])
