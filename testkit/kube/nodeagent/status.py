"""The status objects kubelet writes, pure: container statuses, the pod's phase and conditions,
the node's status and labels."""

from __future__ import annotations

import os
import platform
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from testkit.kube.nodeagent.spec import Json, NodeSpec


@dataclass(frozen=True)
class ContainerView:
    """What the status of one container is built from."""

    name: str
    image: str
    state: Json  # {"waiting": {...}} | {"running": {...}} | {"terminated": {...}}
    last_state: Json = field(default_factory=dict)
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    container_id: str = ""
    sidecar: bool = False  # an init container with restartPolicy Always


def container_status(v: ContainerView) -> Json:
    s: Json = {"name": v.name, "image": v.image, "imageID": v.image if v.container_id else "",
               "ready": v.ready, "started": v.started, "restartCount": v.restart_count,
               "state": v.state, "lastState": v.last_state}
    if v.container_id:
        s["containerID"] = v.container_id
    return s


def pod_phase(restart_policy: str, init_containers: Sequence[ContainerView],
              containers: Sequence[ContainerView], *, initialized: bool, terminal: bool = False) -> str:
    """Kubelet's getPhase (pkg/kubelet/kubelet_pods.go). `terminal`: the pod is being deleted and
    none of its containers runs any more."""
    pending_regular = pending_sidecar = failed_init = 0
    for c in init_containers:
        if c.sidecar:
            pending_sidecar += not c.started
            continue
        if "running" in c.state:
            pending_regular += 1
        elif "terminated" in c.state:
            failed_init += c.state["terminated"].get("exitCode", 0) != 0
        elif c.last_state.get("terminated"):
            failed_init += c.last_state["terminated"].get("exitCode", 0) != 0
        else:
            pending_regular += 1
    running = waiting = stopped = succeeded = 0
    for c in containers:
        if "running" in c.state:
            running += 1
        elif "terminated" in c.state:
            stopped += 1
            succeeded += c.state["terminated"].get("exitCode", 0) == 0
        elif c.last_state.get("terminated"):
            stopped += 1
        else:
            waiting += 1
    if failed_init and restart_policy == "Never":
        return "Failed"
    if pending_regular or (pending_sidecar and not initialized) or waiting:
        return "Pending"
    if running:
        return "Running"
    if stopped:
        if terminal or restart_policy == "Never":
            return "Succeeded" if stopped == succeeded else "Failed"
        if restart_policy == "OnFailure" and stopped == succeeded:
            return "Succeeded"
        return "Running"
    return "Pending"


def pod_conditions(*, sandbox_ready: bool, init_done: bool, pending_init: Sequence[str],
                   containers: Sequence[ContainerView], terminal: bool,
                   readiness_gates: Sequence[str] = (), existing: Sequence[Json] = ()) -> list[Json]:
    """The conditions kubelet owns, without timestamps (merge_conditions adds them)."""
    def cond(t: str, ok: bool, reason: str = "", message: str = "") -> Json:
        c: Json = {"type": t, "status": "True" if ok else "False"}
        if not ok and reason:
            c["reason"] = reason
        if not ok and message:
            c["message"] = message
        return c

    unready = [c.name for c in containers if not c.ready]
    out = [cond("PodReadyToStartContainers", sandbox_ready)]
    if terminal:
        out.append(cond("Initialized", True))
        out.append(cond("ContainersReady", False, "PodCompleted"))
        out.append(cond("Ready", False, "PodCompleted"))
        return out
    out.append(cond("Initialized", init_done, "ContainersNotInitialized",
                    f"containers with incomplete status: [{' '.join(pending_init)}]"))
    containers_ready = init_done and not unready and bool(containers)
    msg = f"containers with unready status: [{' '.join(unready)}]"
    out.append(cond("ContainersReady", containers_ready, "ContainersNotReady", msg))
    gates = {c.get("type"): c.get("status") for c in existing}
    missing_gates = [g for g in readiness_gates if gates.get(g) != "True"]
    if containers_ready and missing_gates:
        out.append(cond("Ready", False, "ReadinessGatesNotReady",
                        f"corresponding condition of pod readiness gate \"{missing_gates[0]}\" does not exist."))
    else:
        out.append(cond("Ready", containers_ready, "ContainersNotReady", msg))
    return out


def merge_conditions(existing: Sequence[Json], ours: Sequence[Json], now: str,
                     observed_generation: int | None = None) -> list[Json]:
    """Our conditions replace those of the same type; others (PodScheduled, gates) stay.
    lastTransitionTime moves only when a condition's status changes."""
    old = {c.get("type"): c for c in existing}
    mine = {c["type"] for c in ours}
    out = [dict(c) for c in existing if c.get("type") not in mine]
    for c in ours:
        prev = old.get(c["type"])
        merged = {**c, "lastProbeTime": None,
                  "lastTransitionTime": prev.get("lastTransitionTime") if prev and prev.get("status") == c["status"]
                  and prev.get("lastTransitionTime") else now}
        if observed_generation is not None:
            merged["observedGeneration"] = observed_generation
        out.append(merged)
    return out


def rfc3339(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def micro_time(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def node_status(spec: NodeSpec, ip: str, now: str, existing: Sequence[Json] = (),
                kubelet_version: str = "v0.0.0", ready: bool = True) -> Json:
    """The node's status as kubelet posts it (heartbeat = now); Ready, or not with `ready=False`."""
    res = {"cpu": spec.cpu, "memory": spec.memory, "pods": str(spec.pods), "ephemeral-storage": "100Gi"}
    if spec.gpus:
        res["nvidia.com/gpu"] = str(spec.gpus)
    old = {c.get("type"): c for c in existing}
    conds = []
    for t, status, reason, msg in (
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status") if ready else
            ("Ready", "False", "KubeletNotReady", "the node agent was told to take this node down")):
        prev = old.get(t)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status else now
        conds.append({"type": t, "status": status, "reason": reason, "message": msg,
                      "lastHeartbeatTime": now, "lastTransitionTime": since})
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {
        "capacity": res, "allocatable": dict(res), "conditions": conds,
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": spec.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": uuid.uuid5(uuid.NAMESPACE_DNS, spec.name).hex,
                     "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, spec.name)),
                     "bootID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{spec.name}/{os.getpid()}")),
                     "kernelVersion": platform.release(), "osImage": "sllm-knative test node agent",
                     "containerRuntimeVersion": "nodeagent://0.1", "kubeletVersion": kubelet_version,
                     "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": arch},
    }


def node_labels(spec: NodeSpec) -> dict[str, str]:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {"kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch,
            "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": arch, **spec.labels}
