"""A test node agent: Kubernetes pods as local processes, for a real kube-apiserver.

There is no container runtime on the test machines, so this agent stands in for kubelet plus
containerd on N nodes at once. It talks to the API server only through the official
`kubernetes` client, the way kubelet does:

- **Nodes.** It registers each node (capacity and allocatable CPU, memory, pods and
  `nvidia.com/gpu`; labels; an InternalIP), keeps the node's `coordination.k8s.io` Lease in
  `kube-node-lease` renewed and posts the Ready condition's heartbeat, so the real node
  lifecycle controller keeps it Ready. `kill_node(name)` ends all of that node's processes with
  SIGKILL and stops its heartbeats, lease renewals and pod status writes: the controller
  manager then marks it NotReady after its `--node-monitor-grace-period`, marks its pods not
  Ready, and the EndpointSlice controller stops listing them as ready.
- **Pods.** One list+watch per node (field selector `spec.nodeName`, re-list on 410 Gone) feeds
  one worker thread per pod. The worker gives the pod an IP address, sets up its volumes, runs
  every init container and container as a process (own process group, PR_SET_PDEATHSIG), runs
  the startup, liveness and readiness probes (httpGet, tcpSocket, exec, grpc), restarts
  containers per `restartPolicy` with a short capped back-off, and writes the pod's status
  (phase, podIP(s), hostIP(s), startTime, container states, conditions PodReadyToStartContainers,
  Initialized, ContainersReady and Ready) through the `pods/status` subresource. Deleting a pod
  (deletionTimestamp set) sends SIGTERM, waits the grace period (at least 2 s, as kubelet), sends
  SIGKILL, writes the final status and only then deletes the object (grace 0, UID precondition).
  Logs: `<root>/pods/<ns>_<name>_<uid>/<container>.log`, appended across restarts.

**Pod addresses.** The API server refuses loopback addresses (127.0.0.0/8) in Endpoints and
EndpointSlices, so pods need real ones: the agent always runs on the cluster's pod network
(`network=`, a `testkit.kube.network.ClusterNetwork`; the fixtures pass `kube.network`, the CLI
attaches to the one the cluster wrote to `network.json`). Each node is a network namespace on
the cluster's bridge, its InternalIP the namespace's address (10.X.i.1); each pod gets a /32
there (10.X.i.k), and its processes (and exec probes) enter the node's namespace before exec.
HTTP, TCP and gRPC probes run from the agent, across the bridge, as kubelet's do from the host.
`kill_node` also takes the node's link down; `stop` removes the nodes' namespaces.

Every pod has its own address but a node's pods share its namespace: bind the pod IP (as the
tests' servers do through `$(POD_IP)`), not 0.0.0.0, or two pods of a node collide on a port.

**Images.** There are no images: `IMAGES` maps an image repository (any registry, any tag) to
what the image would run, with Docker's ENTRYPOINT/CMD semantics (`command` replaces the
entrypoint, `args` the CMD). The project's images run its modules with this interpreter
(`sllm-knative/activator` -> `python -m activator`, ...); `python:*` behaves like the official
image (no entrypoint, CMD `python3`), so use `command: ["python", ...]`. An argv[0] of `python`,
`python3` or `python3.X` is this interpreter (`sys.executable`). Any other image: the container
waits with reason ErrImagePull and a message naming the table. `command`/`args` get Kubernetes'
`$(VAR)` expansion from the container's environment (`$$` escapes).

**Environment.** A container starts with a clean environment, like a fresh image: PATH, LANG,
HOME, HOSTNAME (the pod name), `KUBERNETES_SERVICE_HOST`/`_PORT` (the API server's real
address: there is no kube-proxy, so Service cluster IPs are not reachable), SLLM_MOUNT_ROOT (see
below), the agent's `extra_env`, then `envFrom` and `env` in order (values with `$(VAR)`
expansion; valueFrom fieldRef `metadata.name|namespace|uid|labels['k']|annotations['k']`,
`spec.nodeName|serviceAccountName`, `status.podIP(s)|hostIP(s)`; resourceFieldRef;
configMapKeyRef and secretKeyRef, with `optional`).

**Volumes and mounts.** Without mount namespaces a process cannot see a volume at its
mountPath, so every container gets its own root folder, `$SLLM_MOUNT_ROOT`
(`<root>/pods/<pod>/rootfs/<container>`), holding a symlink at each mountPath (plus subPath)
to the volume's folder: a container finds a mount at `$SLLM_MOUNT_ROOT<mountPath>` and starts
in `$SLLM_MOUNT_ROOT<workingDir>` (default `$SLLM_MOUNT_ROOT`), so relative paths such as
`var/run/secrets/kubernetes.io/serviceaccount/token` resolve too. Code that must find its
mounts reads SLLM_MOUNT_ROOT (empty on a real cluster). Volume kinds: `emptyDir` (a per-pod
folder; `medium: Memory` under /dev/shm), `hostPath` (`<root>/nodes/<node>/hostpath<path>`, a
per-node folder, so two pods on one node share it and pods on different nodes do not),
`configMap`, `secret`, `downwardAPI`, and `projected` (serviceAccountToken from the TokenRequest
API bound to the pod, configMap, secret, downwardAPI: the `kube-api-access-*` volume the
ServiceAccount admission plugin adds is real). configMap, secret and projected contents are
refreshed every `volume_resync_s`, tokens at 80 % of their lifetime. Not enforced: readOnly,
resource limits, security contexts, ports (informational). Not run: lifecycle hooks.

In-process: `with NodeAgent(kubeconfig, root, [NodeSpec("n1", gpus=1)], network=net) as agent: ...`.
By hand, against `python -m testkit.kube.cluster up`:
`python -m testkit.kube.nodeagent --kubeconfig K --root R --node n1:cpu=4,memory=16Gi,gpu=1,label=k=v`.

**Modules.** `spec` (NodeSpec, `--node` parsing, the image table), pure kubelet logic in `env`
(`$(VAR)` expansion, argv, environment), `policy` (probe thresholds and timing, restarts and
back-off) and `status` (container and pod status, phase, conditions, node status); I/O in
`api` (the client), `watch` (list+watch), `volumes`, `containers` (processes), `probes`,
`pods` (the per-pod worker), `nodes` (registration, heartbeats, leases, kill) and `agent`
(NodeAgent); `__main__` is the command line.
"""

from __future__ import annotations

from testkit.kube.nodeagent.agent import NodeAgent
from testkit.kube.nodeagent.api import Api
from testkit.kube.nodeagent.containers import Container, ProbeRun, container_preexec
from testkit.kube.nodeagent.env import (
    ConfigError,
    Lookup,
    build_env,
    container_argv,
    expand,
    field_ref,
    resource_ref,
)
from testkit.kube.nodeagent.nodes import NodeRunner
from testkit.kube.nodeagent.pods import PodWorker, pod_key
from testkit.kube.nodeagent.policy import (
    MIN_GRACE_S,
    Backoff,
    ProbeState,
    ProbeTiming,
    exit_code_of,
    initial_probe_state,
    probe_due,
    probe_step,
    restart_delay,
    should_restart,
)
from testkit.kube.nodeagent.probes import exec_probe, grpc_probe, http_probe, tcp_probe
from testkit.kube.nodeagent.spec import (
    IMAGES,
    ImageConfig,
    ImageError,
    Json,
    NodeSpec,
    image_repository,
    lookup_image,
    map_python,
    parse_node_arg,
)
from testkit.kube.nodeagent.status import (
    ContainerView,
    container_status,
    merge_conditions,
    micro_time,
    node_labels,
    node_status,
    pod_conditions,
    pod_phase,
    rfc3339,
)
from testkit.kube.nodeagent.volumes import PodVolumes, VolumeError
from testkit.kube.nodeagent.watch import Watcher

__all__ = [
    "IMAGES", "MIN_GRACE_S", "Api", "Backoff", "ConfigError", "Container", "ContainerView", "ImageConfig",
    "ImageError", "Json", "Lookup", "NodeAgent", "NodeRunner", "NodeSpec", "PodVolumes", "PodWorker", "ProbeRun",
    "ProbeState", "ProbeTiming", "VolumeError", "Watcher", "build_env", "container_argv", "container_preexec",
    "container_status", "exec_probe", "exit_code_of", "expand", "field_ref", "grpc_probe", "http_probe",
    "image_repository", "initial_probe_state", "lookup_image", "map_python", "merge_conditions", "micro_time",
    "node_labels", "node_status", "parse_node_arg", "pod_conditions", "pod_key", "pod_phase", "probe_due",
    "probe_step", "resource_ref", "restart_delay", "rfc3339", "should_restart", "tcp_probe",
]
