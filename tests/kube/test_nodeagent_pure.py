"""The node agent's pure parts, table by table (no cluster needed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm_knative.log import get_logger
from testkit.kube.network import ClusterNetwork, NodeNetwork, netns_exists
from testkit.kube.nodeagent import (
    IMAGES,
    ConfigError,
    ContainerView,
    ImageConfig,
    ImageError,
    NodeSpec,
    ProbeState,
    ProbeTiming,
    Watcher,
    build_env,
    container_argv,
    exit_code_of,
    expand,
    image_repository,
    initial_probe_state,
    lookup_image,
    map_python,
    merge_conditions,
    node_status,
    parse_node_arg,
    pod_conditions,
    pod_phase,
    probe_due,
    probe_step,
    restart_delay,
    should_restart,
)

PY = sys.executable

# --- $(VAR) expansion: the cases of Kubernetes' own expansion_test.go -------------------------

VARS = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": "", "BIG_MONEY": "$$$"}


@pytest.mark.parametrize(("text", "want"), [
    ("$(VAR_A)", "A"),
    ("___$(VAR_B)___", "___B___"),
    ("$(VAR_A)-$(VAR_A)", "A-A"),
    ("$(VAR_A)-1", "A-1"),
    ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"),
    ("$(VAR_REF)", "$(VAR_A)"),  # one pass: a value is not expanded again
    ("$(VAR_EMPTY)", ""),
    ("$(UNDEFINED)", "$(UNDEFINED)"),
    ("$$(VAR_A)", "$(VAR_A)"),  # escaped
    ("$$$(VAR_A)", "$A"),
    ("$$ and $$", "$ and $"),
    ("$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"),
    ("$$$$$$$(BIG_MONEY)", "$$$$$$"),
    ("$VAR_A", "$VAR_A"),  # no parentheses: not a reference
    ("$?_boo_$!", "$?_boo_$!"),
    ("foo \\$(VAR_A) bar", "foo \\A bar"),  # backslash is not an escape
    ("$(foo$$var)", "$(foo$$var)"),
    ("$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"),
    ("$(VAR_B)_______$(A", "B_______$(A"),  # an unclosed reference stays
    ("$(", "$("),
    ("$", "$"),
    ("$()", "$()"),
    ("", ""),
])
def test_expand(text: str, want: str) -> None:
    assert expand(text, VARS) == want


def test_expand_takes_the_first_mapping_that_has_the_name() -> None:
    assert expand("$(X)-$(Y)", {"X": "own"}, {"X": "service", "Y": "svc"}) == "own-svc"


# --- images and argv ----------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "repo"), [
    ("python:3.11", "python"),
    ("python", "python"),
    ("docker.io/library/python:3.11-slim", "python"),
    ("sllm-knative/activator:dev", "sllm-knative/activator"),
    ("ghcr.io/acme/sllm-knative/loader:v1@sha256:abcd", "acme/sllm-knative/loader"),
    ("localhost:5000/sllm-knative/function", "sllm-knative/function"),
    ("registry:5000/x/y:1", "x/y"),
])
def test_image_repository(image: str, repo: str) -> None:
    assert image_repository(image) == repo


@pytest.mark.parametrize(("image", "entrypoint"), [
    ("sllm-knative/activator:latest", ("python", "-m", "activator")),
    ("sllm-knative/autoscaler", ("python", "-m", "autoscaler")),
    ("ghcr.io/acme/sllm-knative/loader:1.0", ("python", "-m", "loader_sidecar")),
    ("sllm-knative/function:abc", ("python", "-m", "functions.llm")),
    ("python:3.12", ()),
])
def test_lookup_image(image: str, entrypoint: tuple[str, ...]) -> None:
    assert lookup_image(image).entrypoint == entrypoint


@pytest.mark.parametrize("image", ["nginx:1.25", "sllm-knative/unknown", "mypython:3", "busybox"])
def test_unknown_images_are_an_image_pull_error(image: str) -> None:
    with pytest.raises(ImageError, match="not in the node agent's image table"):
        lookup_image(image)


@pytest.mark.parametrize(("argv0", "want"), [
    ("python", PY), ("python3", PY), ("python3.11", PY), ("/usr/local/bin/python3", PY),
    ("sh", "sh"), ("python-config", "python-config"), ("/bin/pythonx", "/bin/pythonx"),
])
def test_map_python(argv0: str, want: str) -> None:
    assert map_python(argv0) == want


ACTIVATOR = IMAGES["sllm-knative/activator"]
PYIMG = IMAGES["python"]
ENV = {"POD_IP": "198.18.0.7", "PORT": "8080"}


@pytest.mark.parametrize(("image", "command", "args", "want"), [
    (ACTIVATOR, None, None, [PY, "-m", "activator"]),  # entrypoint + cmd
    (ACTIVATOR, None, ["--port", "$(PORT)"], [PY, "-m", "activator", "--port", "8080"]),  # args replace CMD
    (ACTIVATOR, ["python3", "-c", "pass"], None, [PY, "-c", "pass"]),  # command replaces the entrypoint
    (PYIMG, None, None, [PY]),  # CMD python3
    (PYIMG, ["python", "-m", "http.server", "--bind", "$(POD_IP)", "$(PORT)"], None,
     [PY, "-m", "http.server", "--bind", "198.18.0.7", "8080"]),
    (PYIMG, ["python"], ["-c", "print('$(POD_IP)')"], [PY, "-c", "print('198.18.0.7')"]),
    (PYIMG, ["sh", "-c", "echo $$HOME $(UNSET)"], None, ["sh", "-c", "echo $HOME $(UNSET)"]),
    (ImageConfig(("/bin/true",), ("x",)), None, ["y"], ["/bin/true", "y"]),
])
def test_container_argv(image: ImageConfig, command: list[str] | None, args: list[str] | None,
                        want: list[str]) -> None:
    assert container_argv(image, command, args, ENV) == want


def test_container_argv_without_any_command_fails() -> None:
    with pytest.raises(ImageError, match="no command"):
        container_argv(ImageConfig(), None, None, {})


# --- environment -------------------------------------------------------------------------------

POD = {"metadata": {"name": "p1", "namespace": "ns1", "uid": "u-1", "labels": {"app": "web"},
                    "annotations": {"a": "b"}},
       "spec": {"nodeName": "n1", "serviceAccountName": "sa1"}}
STORE = {("configmap", "cm"): {"k1": "v1", "k2": "v2"}, ("secret", "s"): {"password": "hunter2"}}


def lookup(kind: str, name: str) -> dict[str, str] | None:
    return STORE.get((kind, name))


def env_of(container: dict) -> dict[str, str]:
    return build_env(container, POD, pod_ip="198.18.0.9", host_ip="198.18.0.1", base={"PATH": "/bin"},
                     lookup=lookup, node_allocatable={"cpu": "4", "memory": "16Gi"})


@pytest.mark.parametrize(("env", "want"), [
    ([{"name": "A", "value": "x"}, {"name": "B", "value": "$(A)-y"}], {"A": "x", "B": "x-y"}),
    ([{"name": "B", "value": "$(A)-y"}, {"name": "A", "value": "x"}], {"A": "x", "B": "$(A)-y"}),  # order matters
    ([{"name": "P", "value": "$(PATH):/x"}], {"P": "/bin:/x"}),
    ([{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}], {"IP": "198.18.0.9"}),
    ([{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
      {"name": "M", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
      {"name": "S", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
      {"name": "H", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
      {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}],
     {"N": "n1", "M": "p1", "S": "ns1", "H": "198.18.0.1", "L": "web"}),
    ([{"name": "C", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k2"}}},
      {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}}],
     {"C": "v2", "S": "hunter2"}),
    ([{"name": "O", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}}}], {}),
    ([{"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
      {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}}],
     {"CPU": "4", "MEM": "0"}),
])
def test_build_env(env: list[dict], want: dict[str, str]) -> None:
    assert env_of({"name": "c", "env": env}) == {"PATH": "/bin", **want}


def test_env_from_with_prefix_then_env_overrides() -> None:
    got = env_of({"name": "c", "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
                  "env": [{"name": "CM_k1", "value": "own"}]})
    assert got == {"PATH": "/bin", "CM_k1": "own", "CM_k2": "v2"}


def test_resource_limits_round_up() -> None:
    got = env_of({"name": "c", "resources": {"limits": {"cpu": "1500m", "memory": "1536Mi"}},
                  "env": [{"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                          {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory",
                                                                             "divisor": "1Gi"}}}]})
    assert (got["CPU"], got["MEM"]) == ("2", "2")


@pytest.mark.parametrize(("env", "match"), [
    ([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}], 'configmap "nope" not found'),
    ([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k9"}}}], 'key "k9" in configmap "cm"'),
    ([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}], 'secret "nope" not found'),
    ([{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}], "unsupported fieldRef"),
])
def test_missing_references_are_config_errors(env: list[dict], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        env_of({"name": "c", "env": env})


# --- probes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "success_t", "failure_t", "outcomes", "results"), [
    # readiness starts failed and turns on after successThreshold successes in a row
    ("readiness", 1, 3, [True], [True]),
    ("readiness", 2, 3, [True, True], [False, True]),
    ("readiness", 2, 3, [True, False, True, True], [False, False, False, True]),
    # ... and off after failureThreshold failures in a row
    ("readiness", 1, 3, [True, False, False, False], [True, True, True, False]),
    ("readiness", 1, 3, [True, False, False, True, False, False], [True, True, True, True, True, True]),
    # liveness starts succeeded
    ("liveness", 1, 2, [False], [True]),
    ("liveness", 1, 2, [False, False], [True, False]),
    ("liveness", 1, 1, [False], [False]),
    # startup starts unknown
    ("startup", 1, 3, [False, False], [None, None]),
    ("startup", 1, 3, [False, True], [None, True]),
    ("startup", 1, 2, [False, False], [None, False]),
])
def test_probe_thresholds(kind: str, success_t: int, failure_t: int, outcomes: list[bool],
                          results: list[bool | None]) -> None:
    state = initial_probe_state(kind)
    got = []
    for ok in outcomes:
        state = probe_step(state, ok, success_t, failure_t)
        got.append(state.result)
    assert got == results


def test_probe_state_counts_runs() -> None:
    s = probe_step(probe_step(ProbeState(False), False, 1, 3), False, 1, 3)
    assert (s.last, s.run) == (False, 2)


@pytest.mark.parametrize(("now", "started", "last", "timing", "due"), [
    (0.5, 0.0, None, ProbeTiming(initial_delay_s=1.0), False),
    (1.0, 0.0, None, ProbeTiming(initial_delay_s=1.0), True),
    (1.5, 0.0, 1.0, ProbeTiming(initial_delay_s=1.0, period_s=1.0), False),
    (2.0, 0.0, 1.0, ProbeTiming(initial_delay_s=1.0, period_s=1.0), True),
    (5.0, 0.0, None, ProbeTiming(), True),
])
def test_probe_due(now: float, started: float, last: float | None, timing: ProbeTiming, due: bool) -> None:
    assert probe_due(now, started, last, timing) is due


def test_probe_timing_defaults_are_kubernetes_defaults() -> None:
    t = ProbeTiming.of({"httpGet": {"port": 80}})
    assert (t.initial_delay_s, t.period_s, t.timeout_s, t.success_threshold, t.failure_threshold) == (0, 10, 1, 1, 3)


# --- restarts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "code", "init", "restart"), [
    ("Always", 0, False, True), ("Always", 1, False, True),
    ("OnFailure", 0, False, False), ("OnFailure", 137, False, True),
    ("Never", 0, False, False), ("Never", 1, False, False),
    ("Always", 0, True, False), ("Always", 2, True, True),  # init containers rerun only after failing
    ("OnFailure", 2, True, True), ("Never", 2, True, False),
])
def test_should_restart(policy: str, code: int, init: bool, restart: bool) -> None:
    assert should_restart(policy, code, init) is restart


@pytest.mark.parametrize(("level", "delay"), [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (50, 10.0)])
def test_restart_delay_doubles_up_to_the_cap(level: int, delay: float) -> None:
    assert restart_delay(level, base_s=1.0, cap_s=10.0) == delay


@pytest.mark.parametrize(("rc", "code"), [(0, 0), (3, 3), (-9, 137), (-15, 143)])
def test_exit_code_of(rc: int, code: int) -> None:
    assert exit_code_of(rc) == code


# --- status ------------------------------------------------------------------------------------


def cv(name: str = "c", state: str = "running", code: int = 0, last: int | None = None, ready: bool = False,
       started: bool = False, sidecar: bool = False) -> ContainerView:
    states: dict[str, dict] = {"running": {"running": {}}, "waiting": {"waiting": {"reason": "ContainerCreating"}},
                               "terminated": {"terminated": {"exitCode": code}}}
    st = states[state]
    return ContainerView(name, "python:3.11", st, {"terminated": {"exitCode": last}} if last is not None else {},
                         ready=ready, started=started, sidecar=sidecar)


@pytest.mark.parametrize(("policy", "inits", "ctrs", "initialized", "terminal", "phase"), [
    ("Always", [], [cv(state="waiting")], True, False, "Pending"),
    ("Always", [], [cv()], True, False, "Running"),
    ("Always", [], [cv(), cv("d", state="waiting")], True, False, "Pending"),
    ("Always", [], [cv(state="waiting", last=1)], True, False, "Running"),  # crash loop: still Running
    ("Always", [], [cv(state="terminated", code=0)], True, True, "Succeeded"),  # deleted, all exited 0
    ("Always", [], [cv(state="terminated", code=143)], True, True, "Failed"),
    ("OnFailure", [], [cv(state="terminated", code=0)], True, False, "Succeeded"),
    ("OnFailure", [], [cv(state="waiting", last=1)], True, False, "Running"),
    ("Never", [], [cv(state="terminated", code=0), cv("d", state="terminated", code=0)], True, False, "Succeeded"),
    ("Never", [], [cv(state="terminated", code=0), cv("d", state="terminated", code=2)], True, False, "Failed"),
    ("Never", [], [cv(state="terminated", code=0), cv("d")], True, False, "Running"),
    ("Always", [cv("i")], [cv(state="waiting")], False, False, "Pending"),  # init running
    ("Always", [cv("i", state="terminated")], [cv()], True, False, "Running"),
    ("Never", [cv("i", state="terminated", code=1)], [cv(state="waiting")], False, False, "Failed"),
    ("OnFailure", [cv("i", state="waiting", last=1)], [cv(state="waiting")], False, False, "Pending"),
    ("Always", [cv("s", sidecar=True)], [cv(state="waiting")], False, False, "Pending"),  # sidecar not started
    ("Always", [cv("s", sidecar=True, started=True)], [cv()], True, False, "Running"),
])
def test_pod_phase(policy: str, inits: list[ContainerView], ctrs: list[ContainerView], initialized: bool,
                   terminal: bool, phase: str) -> None:
    assert pod_phase(policy, inits, ctrs, initialized=initialized, terminal=terminal) == phase


def conds(**kw: object) -> dict[str, str]:
    args: dict = {"sandbox_ready": True, "init_done": True, "pending_init": [], "containers": [cv(ready=True)],
                  "terminal": False, **kw}
    return {c["type"]: c["status"] for c in pod_conditions(**args)}


@pytest.mark.parametrize(("kw", "want"), [
    ({}, {"PodReadyToStartContainers": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True"}),
    ({"containers": [cv(ready=True), cv("d")]},
     {"PodReadyToStartContainers": "True", "Initialized": "True", "ContainersReady": "False", "Ready": "False"}),
    ({"sandbox_ready": False, "init_done": False, "pending_init": ["i"], "containers": [cv(state="waiting")]},
     {"PodReadyToStartContainers": "False", "Initialized": "False", "ContainersReady": "False", "Ready": "False"}),
    ({"terminal": True},
     {"PodReadyToStartContainers": "True", "Initialized": "True", "ContainersReady": "False", "Ready": "False"}),
    ({"readiness_gates": ["example.com/gate"]},
     {"PodReadyToStartContainers": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "False"}),
    ({"readiness_gates": ["example.com/gate"], "existing": [{"type": "example.com/gate", "status": "True"}]},
     {"PodReadyToStartContainers": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True"}),
])
def test_pod_conditions(kw: dict, want: dict[str, str]) -> None:
    assert conds(**kw) == want


def test_not_ready_conditions_name_the_containers() -> None:
    out = pod_conditions(sandbox_ready=True, init_done=True, pending_init=[], terminal=False,
                         containers=[cv("a", ready=True), cv("b"), cv("c")])
    ready = next(c for c in out if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == ("ContainersNotReady", "containers with unready status: [b c]")


def test_merge_conditions_keeps_foreign_conditions_and_unchanged_transition_times() -> None:
    existing = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "T0"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "T1"},
                {"type": "Initialized", "status": "True", "lastTransitionTime": "T2"}]
    ours = [{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "True"}]
    got = {c["type"]: c for c in merge_conditions(existing, ours, "NOW", observed_generation=3)}
    assert got["PodScheduled"] == existing[0]
    assert got["Ready"]["lastTransitionTime"] == "NOW"  # changed
    assert got["Initialized"]["lastTransitionTime"] == "T2"  # unchanged
    assert got["ContainersReady"]["lastTransitionTime"] == "NOW"  # new
    assert got["Ready"]["observedGeneration"] == 3


# --- nodes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("n1", NodeSpec("n1")),
    ("gpu-a:cpu=8,memory=64Gi,gpu=2", NodeSpec("gpu-a", cpu="8", memory="64Gi", gpus=2)),
    ("n2:label=zone=a,label=tier=ssd,pods=20", NodeSpec("n2", pods=20, labels={"zone": "a", "tier": "ssd"})),
])
def test_parse_node_arg(text: str, want: NodeSpec) -> None:
    assert parse_node_arg(text) == want


@pytest.mark.parametrize("text", [":cpu=1", "n:cpu", "n:disk=1", "n:label=novalue", "n:gpu=x"])
def test_parse_node_arg_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_node_arg(text)


def test_node_status_is_ready_with_the_resources_and_keeps_transition_times() -> None:
    spec = NodeSpec("n1", cpu="8", memory="32Gi", gpus=2)
    st = node_status(spec, "198.18.0.1", "NOW", existing=[{"type": "Ready", "status": "True",
                                                          "lastTransitionTime": "EARLIER"}])
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["lastHeartbeatTime"], ready["lastTransitionTime"]) == ("True", "NOW", "EARLIER")
    assert st["allocatable"] == {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi",
                                 "nvidia.com/gpu": "2"}
    assert {"type": "InternalIP", "address": "198.18.0.1"} in st["addresses"]
    assert "nvidia.com/gpu" not in node_status(NodeSpec("n2"), "198.18.0.2", "NOW")["capacity"]


# --- the pod network (local I/O, no cluster) ---------------------------------------------------


@pytest.fixture
def cluster_network() -> Iterator[ClusterNetwork]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        msg = "the pod network needs root and iproute2 (`ip`)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    net = ClusterNetwork.create()
    try:
        yield net
    finally:
        net.destroy()


def listen_in(node: NodeNetwork, ip: str) -> socket.socket:
    """A listening socket on `ip` inside the node's namespace (made by a thread that enters it)."""
    made: list[socket.socket] = []

    def run() -> None:
        node.enter()  # this thread only: the namespace goes with it
        s = socket.socket()
        s.bind((ip, 0))
        s.listen()
        made.append(s)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return made[0]


@pytest.mark.parametrize("attached", [False, True], ids=["own", "attached"])
def test_pod_addresses_are_distinct_bindable_and_reachable(cluster_network: ClusterNetwork, tmp_path: Path,
                                                           attached: bool) -> None:
    # A second agent on the same network: in this process, or attached through network.json as
    # the by-hand node agent is. Either way its nodes never take an index the first one uses.
    cluster_network.save(tmp_path / "network.json")
    other = ClusterNetwork.load(tmp_path / "network.json") if attached else cluster_network
    a = cluster_network.add_node()
    b = other.add_node()
    try:
        assert a.ip != b.ip and a.netns != b.netns
        assert all(ip.startswith(f"10.{cluster_network.second_octet}.") for ip in (a.ip, b.ip))
        ips = [a.add_pod_ip() for _ in range(2)] + [b.add_pod_ip()]
        assert len(set(ips)) == 3 and not any(ip.startswith("127.") for ip in ips)  # EndpointSlices refuse loopback
        srv = listen_in(b, ips[2])
        with srv, socket.create_connection(srv.getsockname(), timeout=2):  # host -> pod, across the bridge
            conn, _ = srv.accept()
            conn.close()
        a.release_pod_ip(ips[0])
        assert a.add_pod_ip() not in ips  # a released address is not handed out at once
    finally:
        other.remove_node(b)
        cluster_network.remove_node(a)
    assert not netns_exists(a.netns) and not netns_exists(b.netns)
    assert a.netns not in cluster_network.nodes and b.netns not in other.nodes
    if attached:
        other.destroy()  # an attached handle leaves the bridge alone
        assert Path(f"/sys/class/net/{cluster_network.bridge}").exists()


# --- the watch loop, with a fake list function (no cluster) ---------------------------------------


class FakeResponse:
    def __init__(self, payload: object = None, lines: list[dict] | None = None) -> None:
        self.data = json.dumps(payload).encode() if payload is not None else b""
        self._lines = lines or []

    def stream(self, amt: object = None, decode_content: bool = False) -> Iterator[bytes]:
        for ev in self._lines:  # split across chunks on purpose
            raw = json.dumps(ev).encode() + b"\n"
            yield raw[:5]
            yield raw[5:]

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


def pod(name: str, rv: str) -> dict:
    return {"metadata": {"name": name, "uid": name, "resourceVersion": rv}}


def test_watcher_lists_watches_from_the_list_version_and_relists_after_410() -> None:
    calls: list[dict] = []
    script = [
        FakeResponse({"metadata": {"resourceVersion": "10"}, "items": [pod("a", "9")]}),
        FakeResponse(lines=[{"type": "ADDED", "object": pod("b", "11")},
                            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}]),
        FakeResponse(lines=[{"type": "MODIFIED", "object": pod("b", "13")},
                            {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}]),
        FakeResponse({"metadata": {"resourceVersion": "20"}, "items": [pod("b", "19")]}),
    ]
    done = threading.Event()

    def list_fn(**kw: object) -> FakeResponse:
        calls.append(kw)
        if not script:
            done.set()
            raise OSError("end of script")
        return script.pop(0)

    synced: list[list[str]] = []
    events: list[tuple[str, str]] = []
    w = Watcher(list_fn, on_sync=lambda items: synced.append([p["metadata"]["name"] for p in items]),
                on_event=lambda kind, obj: events.append((kind, obj["metadata"]["name"])),
                log=get_logger("test"), timeout_s=5, field_selector="spec.nodeName=n1")
    w.start()
    assert done.wait(5)
    w.stop()
    assert synced == [["a"], ["b"]]
    assert events == [("ADDED", "b"), ("MODIFIED", "b")]  # bookmarks are not events
    assert [c.get("watch") for c in calls[:4]] == [None, True, True, None]
    assert calls[1]["resource_version"] == "10"  # watch from the list
    assert calls[2]["resource_version"] == "12"  # resume after the bookmark
    assert calls[4]["resource_version"] == "20"  # after the 410: a fresh list
    assert all(c["field_selector"] == "spec.nodeName=n1" for c in calls)
    assert w.relists == 2
