"""The test node agent against the real control plane: Deployments, Services and EndpointSlices,
node death through the node lifecycle controller, graceful deletion, probes, volumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from sllm_knative.local.procs import alive
from testkit.kube.cluster import NODE_MONITOR_GRACE_PERIOD, KubeCluster
from testkit.kube.network import netns_exists
from testkit.kube.nodeagent import NodeAgent
from tests.kube.conftest import Clients, agent_selector, until

ROOT = Path(__file__).resolve().parents[2]

# A tiny server: GET / answers the pod name; /ready is 503 until <mounts>/flags/ready exists;
# it writes its pid to <mounts>/run/pid when /run is mounted.
SERVER = r"""
import http.server, os, sys
ip, port = sys.argv[1], int(sys.argv[2])
name, root = os.environ["POD_NAME"], os.environ.get("SLLM_MOUNT_ROOT", "")
if os.path.isdir(root + "/run"):
    open(root + "/run/pid", "w").write(str(os.getpid()))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200
        if self.path == "/ready" and not os.path.exists(root + "/flags/ready"):
            code = 503
        body = name.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print(f"serving {name} on {ip}:{port} pid={os.getpid()}", flush=True)
http.server.ThreadingHTTPServer((ip, port), H).serve_forever()
"""

ENV = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
       {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]


def server_container(**extra: Any) -> dict:
    return {"name": "web", "image": "python:3.11", "command": ["python", "-c", SERVER, "$(POD_IP)", "8080"],
            "env": ENV, "ports": [{"containerPort": 8080, "name": "http"}], **extra}


def pod_spec(agent: NodeAgent, containers: list[dict], **extra: Any) -> dict:
    return {"nodeSelector": agent_selector(agent), "terminationGracePeriodSeconds": 2,
            "containers": containers, **extra}


def deployment(name: str, replicas: int, spec: dict) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


def service(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}}


def cond(pod: Any, kind: str) -> str | None:
    return next((c.status for c in (pod.status.conditions or []) if c.type == kind), None)


def ready_pods(k: Clients, ns: str, app: str, n: int) -> list[Any] | None:
    pods = k.core.list_namespaced_pod(ns, label_selector=f"app={app}").items
    ok = [p for p in pods if p.status.phase == "Running" and cond(p, "Ready") == "True" and p.status.pod_ip]
    return ok if len(ok) == n and len(pods) == n else None


def endpoint_ips(k: Clients, ns: str, svc: str) -> dict[str, bool]:
    """Every address the Service's EndpointSlices list, and whether it is ready."""
    out = {}
    for s in k.discovery.list_namespaced_endpoint_slice(ns, label_selector=f"kubernetes.io/service-name={svc}").items:
        for ep in s.endpoints or []:
            for ip in ep.addresses:
                out[ip] = bool(ep.conditions and ep.conditions.ready)
    return out


def ready_ips(k: Clients, ns: str, svc: str) -> set[str]:
    return {ip for ip, ready in endpoint_ips(k, ns, svc).items() if ready}


def get(ip: str, port: int = 8080, path: str = "/") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def running_pod(k: Clients, ns: str, name: str) -> Any:
    return until(lambda: (p := k.core.read_namespaced_pod(name, ns)).status.phase == "Running"
                 and p.status.container_statuses and p.status.container_statuses[0].state.running and p,
                 30, f"pod {name} running")


def test_deployment_scaled_through_its_scale_subresource_serves_from_both_pods(
        k: Clients, node_agent: NodeAgent, namespace: str) -> None:
    ns = namespace
    spec = pod_spec(node_agent, [server_container(
        readinessProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 1})])
    k.core.create_namespaced_service(ns, service("web"))
    k.apps.create_namespaced_deployment(ns, deployment("web", 0, spec))
    time.sleep(1.0)
    assert k.core.list_namespaced_pod(ns).items == []  # 0 replicas: nothing yet

    # The way Knative's PodAutoscaler scales: a JSON patch of /spec/replicas on the scale subresource.
    k.apps.patch_namespaced_deployment_scale("web", ns, [{"op": "replace", "path": "/spec/replicas", "value": 2}],
                                             _content_type="application/json-patch+json")
    pods = until(lambda: ready_pods(k, ns, "web", 2), 45, "2 Running, Ready pods")
    ips = {p.status.pod_ip for p in pods}
    assert len(ips) == 2 and not any(ip.startswith("127.") for ip in ips), ips
    for p in pods:
        assert p.spec.node_name in node_agent.nodes
        assert p.status.host_ip == node_agent.node_ip(p.spec.node_name)
        assert p.status.start_time is not None
        st = p.status.container_statuses[0]
        assert (st.ready, st.started, st.restart_count, st.state.running is not None) == (True, True, 0, True)
        assert {c.type for c in p.status.conditions} >= {"PodScheduled", "Initialized", "ContainersReady", "Ready"}

    # The real EndpointSlice controller publishes exactly the two pod IPs, ready.
    until(lambda: ready_ips(k, ns, "web") == ips, 30, f"EndpointSlices listing {ips} as ready")

    # Each pod's process answers on its own address with its own name.
    for p in pods:
        assert get(p.status.pod_ip) == (200, p.metadata.name)
        assert f"serving {p.metadata.name} on {p.status.pod_ip}:8080" in node_agent.pod_log(ns, p.metadata.name, "web")


def test_a_killed_node_goes_not_ready_and_its_pod_leaves_the_endpoints(
        k: Clients, make_agent: Any, namespace: str) -> None:
    ns, agent = namespace, make_agent(2)
    spec = pod_spec(agent, [server_container(readinessProbe={"httpGet": {"port": 8080, "path": "/"},
                                                             "periodSeconds": 1})],
                    affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}})
    k.core.create_namespaced_service(ns, service("web"))
    k.apps.create_namespaced_deployment(ns, deployment("web", 2, spec))
    pods = until(lambda: ready_pods(k, ns, "web", 2), 45, "one Ready pod on each node")
    assert {p.spec.node_name for p in pods} == set(agent.nodes)
    until(lambda: len(ready_ips(k, ns, "web")) == 2, 30, "both pods ready in the EndpointSlices")
    victim, survivor = pods
    node = victim.spec.node_name
    lease_before = k.coord.read_namespaced_lease(node, "kube-node-lease").spec.renew_time

    t0 = time.monotonic()
    agent.kill_node(node)
    with pytest.raises(OSError):  # its process is gone at once
        get(victim.status.pod_ip)

    def node_ready() -> Any:
        return next(c for c in k.core.read_node(node).status.conditions if c.type == "Ready")

    # Nothing renews the lease or posts status any more: the node lifecycle controller, after its
    # grace period, sets Ready Unknown, marks the node's pods not Ready, and the EndpointSlice
    # controller stops counting the pod as ready.
    ready = until(lambda: (c := node_ready()).status == "Unknown" and c, 40, f"node {node} NotReady")
    assert ready.reason == "NodeStatusUnknown", ready
    # The controller's grace period did it, not the agent (the last renewal may predate the kill).
    assert time.monotonic() - t0 > float(NODE_MONITOR_GRACE_PERIOD.removesuffix("s")) - agent.lease_renew_s
    until(lambda: cond(k.core.read_namespaced_pod(victim.metadata.name, ns), "Ready") == "False", 20,
          "the dead node's pod marked not Ready")
    until(lambda: ready_ips(k, ns, "web") == {survivor.status.pod_ip}, 20,
          "EndpointSlices with only the surviving pod ready")
    assert k.coord.read_namespaced_lease(node, "kube-node-lease").spec.renew_time == lease_before
    assert cond(k.core.read_namespaced_pod(survivor.metadata.name, ns), "Ready") == "True"
    assert get(survivor.status.pod_ip) == (200, survivor.metadata.name)


def test_a_node_taken_down_with_mark_not_ready_reports_itself_and_its_pods_at_once(
        k: Clients, make_agent: Any, namespace: str) -> None:
    ns, agent = namespace, make_agent(1)
    k.core.create_namespaced_service(ns, service("solo"))
    k.core.create_namespaced_pod(ns, {"metadata": {"name": "solo", "labels": {"app": "solo"}},
                                      "spec": pod_spec(agent, [server_container()])})
    pod = until(lambda: ready_pods(k, ns, "solo", 1), 30, "the pod Ready")[0]
    until(lambda: ready_ips(k, ns, "solo") == {pod.status.pod_ip}, 20, "the pod ready in the EndpointSlice")
    t0 = time.monotonic()
    agent.kill_node(pod.spec.node_name, mark_not_ready=True)
    ready = next(c for c in k.core.read_node(pod.spec.node_name).status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "KubeletNotReady")
    pod = k.core.read_namespaced_pod("solo", ns)
    st = pod.status.container_statuses[0]
    assert cond(pod, "Ready") == "False" and not st.ready and st.state.terminated.exit_code == 137
    until(lambda: ready_ips(k, ns, "solo") == set(), 20, "the pod out of the ready endpoints")
    assert time.monotonic() - t0 < float(NODE_MONITOR_GRACE_PERIOD.removesuffix("s"))


LINGER = r"""
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM, lingering", flush=True))
print(f"pid={os.getpid()}", flush=True)
while True:
    time.sleep(0.1)
"""


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period_and_removes_the_pod_last(
        k: Clients, node_agent: NodeAgent, namespace: str) -> None:
    ns, grace = namespace, 4
    k.core.create_namespaced_pod(ns, {"metadata": {"name": "linger"}, "spec": pod_spec(
        node_agent, [{"name": "main", "image": "python:3.11", "command": ["python", "-c", LINGER]}],
        terminationGracePeriodSeconds=grace)})
    running_pod(k, ns, "linger")
    log = until(lambda: (s := node_agent.pod_log(ns, "linger", "main")) and "pid=" in s and s, 20, "the pid line")
    pid = int(log.split("pid=")[1].split()[0])

    events: list[tuple[str, Any]] = []
    from kubernetes import watch

    w = watch.Watch()
    rv = k.core.list_namespaced_pod(ns).metadata.resource_version

    def follow() -> None:
        for ev in w.stream(k.core.list_namespaced_pod, ns, field_selector="metadata.name=linger",
                           resource_version=rv, timeout_seconds=30):
            events.append((ev["type"], ev["object"]))
            if ev["type"] == "DELETED":
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    t0 = time.monotonic()
    k.core.delete_namespaced_pod("linger", ns)  # the pod's own grace period
    until(lambda: "got SIGTERM" in node_agent.pod_log(ns, "linger", "main"), 5, "SIGTERM delivered")
    assert alive(pid)
    time.sleep(grace - 1.5)
    assert alive(pid), "killed before the grace period ended"
    assert k.core.read_namespaced_pod("linger", ns).metadata.deletion_timestamp is not None

    def gone() -> bool:
        try:
            k.core.read_namespaced_pod("linger", ns)
            return False
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return True
            raise

    until(gone, 15, "the pod object deleted", interval=0.02)
    assert not alive(pid), "the pod object was deleted while its process still ran"
    assert time.monotonic() - t0 >= grace - 0.5
    t.join(10)
    kinds = [e[0] for e in events]
    assert kinds[-1] == "DELETED", kinds
    final = [o for kind, o in events if kind == "MODIFIED" and o.status.container_statuses
             and o.status.container_statuses[0].state.terminated]
    assert final, "no status with the container terminated was written before the deletion"
    term = final[-1].status.container_statuses[0].state.terminated
    assert term.exit_code == 137, term  # it trapped SIGTERM, so SIGKILL ended it
    assert final[-1].status.phase == "Failed"


def test_readiness_probe_keeps_a_pod_out_of_the_endpoints_until_it_passes(
        k: Clients, node_agent: NodeAgent, namespace: str) -> None:
    ns = namespace
    flags = f"/flags-{ns}"
    k.core.create_namespaced_service(ns, service("probe"))
    k.core.create_namespaced_pod(ns, {"metadata": {"name": "probe", "labels": {"app": "probe"}}, "spec": pod_spec(
        node_agent, [server_container(
            readinessProbe={"httpGet": {"port": 8080, "path": "/ready"}, "periodSeconds": 1, "failureThreshold": 1},
            volumeMounts=[{"name": "flags", "mountPath": "/flags"}])],
        volumes=[{"name": "flags", "hostPath": {"path": flags, "type": "DirectoryOrCreate"}}])})
    pod = running_pod(k, ns, "probe")
    ip = pod.status.pod_ip
    # Listed by the EndpointSlice controller, but not ready, for several probe periods.
    until(lambda: ip in endpoint_ips(k, ns, "probe"), 30, "the pod listed in the EndpointSlice")
    until(lambda: get(ip, path="/ready")[0] == 503, 20, "the server answering 503 on /ready")
    for _ in range(30):
        assert endpoint_ips(k, ns, "probe") == {ip: False}
        assert cond(k.core.read_namespaced_pod("probe", ns), "Ready") == "False"
        time.sleep(0.1)

    flag = node_agent.hostpath(pod.spec.node_name, flags) / "ready"
    flag.touch()
    until(lambda: ready_ips(k, ns, "probe") == {ip}, 20, "the pod ready in the EndpointSlice")
    assert cond(k.core.read_namespaced_pod("probe", ns), "Ready") == "True"
    flag.unlink()
    until(lambda: ready_ips(k, ns, "probe") == set(), 20, "the pod out of the ready endpoints again")
    assert k.core.read_namespaced_pod("probe", ns).status.container_statuses[0].restart_count == 0


def test_liveness_probe_failure_restarts_the_container(k: Clients, node_agent: NodeAgent, namespace: str) -> None:
    ns = namespace
    flags = f"/flags-{ns}"
    # The exec probe fails once <mounts>/flags/sick-<pid of the running server> exists.
    check = ("import os, sys; r = os.environ['SLLM_MOUNT_ROOT']; pid = open(r + '/run/pid').read(); "
             "sys.exit(1 if os.path.exists(r + '/flags/sick-' + pid) else 0)")
    k.core.create_namespaced_pod(ns, {"metadata": {"name": "live"}, "spec": pod_spec(
        node_agent, [server_container(
            livenessProbe={"exec": {"command": ["python", "-c", check]}, "periodSeconds": 1, "failureThreshold": 2,
                           "timeoutSeconds": 10},
            volumeMounts=[{"name": "flags", "mountPath": "/flags"}, {"name": "run", "mountPath": "/run"}])],
        volumes=[{"name": "flags", "hostPath": {"path": flags}}, {"name": "run", "emptyDir": {}}])})
    pod = running_pod(k, ns, "live")
    pid_file = node_agent.pod_dir(ns, "live") / "rootfs/web/run/pid"
    pid = until(lambda: pid_file.exists() and pid_file.read_text(), 20, "the server's pid file")
    time.sleep(3)  # healthy: several probes pass
    st = k.core.read_namespaced_pod("live", ns).status.container_statuses[0]
    assert (st.restart_count, st.state.running is not None) == (0, True)

    (node_agent.hostpath(pod.spec.node_name, flags) / f"sick-{pid}").touch()
    st = until(lambda: (s := k.core.read_namespaced_pod("live", ns).status.container_statuses[0]).restart_count >= 1
               and s.state.running and s, 30, "a restart after the liveness probe failed")
    assert st.last_state.terminated is not None and st.last_state.terminated.exit_code in (137, 143)
    assert not alive(int(pid))
    new_pid = until(lambda: pid_file.exists() and pid_file.read_text() != pid and pid_file.read_text(), 20,
                    "the restarted server's pid")
    time.sleep(3)  # the new process is healthy: no further restart
    st = k.core.read_namespaced_pod("live", ns).status.container_statuses[0]
    assert (st.restart_count, st.state.running is not None) == (1, True)
    assert alive(int(new_pid))
    assert node_agent.pod_log(ns, "live", "web").count("serving live") == 2


WHOAMI = r"""
import json, os, ssl, urllib.request
root = os.environ["SLLM_MOUNT_ROOT"] + "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(root + "/token").read()
ctx = ssl.create_default_context(cafile=root + "/ca.crt")
url = "https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
req = urllib.request.Request(url, method="POST", data=json.dumps({"apiVersion": "authentication.k8s.io/v1",
    "kind": "SelfSubjectReview"}).encode(), headers={"Authorization": "Bearer " + token,
    "Content-Type": "application/json"})
user = json.load(urllib.request.urlopen(req, context=ctx))["status"]["userInfo"]["username"]
m = os.environ["SLLM_MOUNT_ROOT"]
print("user=" + user, "ns=" + open(root + "/namespace").read(), "greeting=" + open(m + "/etc/conf/greeting").read(),
      "secret=" + os.environ["PASSWORD"], "mode=" + os.environ["MODE"], "file=" + open(m + "/etc/creds/pw").read(),
      "init=" + open(m + "/cache/from-init").read(), "cache=" + os.path.realpath(m + "/cache"), flush=True)
"""

INIT = "import os; open(os.environ['SLLM_MOUNT_ROOT'] + '/cache/from-init', 'w').write(os.environ['HOSTNAME'])"


def test_volumes_env_and_a_real_service_account_token(k: Clients, node_agent: NodeAgent, namespace: str) -> None:
    ns = namespace
    k.core.create_namespaced_config_map(ns, {"metadata": {"name": "conf"}, "data": {"greeting": "hello", "mode": "x"}})
    k.core.create_namespaced_secret(ns, {"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}})
    k.core.create_namespaced_pod(ns, {"metadata": {"name": "whoami"}, "spec": pod_spec(
        node_agent, [{"name": "main", "image": "python:3.11", "command": ["python", "-c", WHOAMI],
                      "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                              {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "mode"}}}],
                      "volumeMounts": [{"name": "conf", "mountPath": "/etc/conf"},
                                       {"name": "creds", "mountPath": "/etc/creds"},
                                       {"name": "cache", "mountPath": "/cache"}]}],
        initContainers=[{"name": "init", "image": "python:3.11", "command": ["python", "-c", INIT],
                         "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}],
        restartPolicy="Never", volumes=[
            {"name": "conf", "configMap": {"name": "conf"}},
            {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "password", "path": "pw"}]}},
            {"name": "cache", "emptyDir": {"medium": "Memory"}}])})
    pod = until(lambda: (p := k.core.read_namespaced_pod("whoami", ns)).status.phase in ("Succeeded", "Failed") and p,
                30, "the pod to finish")
    log = node_agent.pod_log(ns, "whoami", "main")
    assert pod.status.phase == "Succeeded", log
    assert (f"user=system:serviceaccount:{ns}:default ns={ns} greeting=hello secret=hunter2 mode=x "
            f"file=hunter2 init=whoami cache=/dev/shm/") in log
    init = pod.status.init_container_statuses[0]
    assert (init.state.terminated.exit_code, cond(pod, "Initialized")) == (0, "True")
    assert cond(pod, "Ready") == "False"
    assert pod.status.container_statuses[0].state.terminated.reason == "Completed"

    # The token is a TokenRequest token bound to this pod (the API server says so).
    token_files = list((node_agent.pod_dir(ns, "whoami") / "volumes").glob("kube-api-access-*/token"))
    assert token_files, "no kube-api-access volume with a token"
    review = k.auth.create_token_review({"spec": {"token": token_files[0].read_text()}})
    assert review.status.authenticated, review.status
    assert review.status.user.extra["authentication.kubernetes.io/pod-name"] == ["whoami"]


def test_a_crashing_container_restarts_with_back_off(k: Clients, node_agent: NodeAgent, namespace: str) -> None:
    ns = namespace
    k.core.create_namespaced_pod(ns, {"metadata": {"name": "crash"}, "spec": pod_spec(
        node_agent, [{"name": "main", "image": "python:3.11",
                      "command": ["python", "-c", "print('up', flush=True); raise SystemExit(3)"]}])})
    seen: set[str] = set()

    def restarted_twice() -> Any:
        st = k.core.read_namespaced_pod("crash", ns).status.container_statuses[0]
        if st.state.waiting:
            seen.add(st.state.waiting.reason)
        return st.restart_count >= 2 and st

    st = until(restarted_twice, 30, "two restarts", interval=0.05)
    assert "CrashLoopBackOff" in seen, seen
    assert st.last_state.terminated.exit_code == 3 and st.last_state.terminated.reason == "Error"
    assert k.core.read_namespaced_pod("crash", ns).status.phase == "Running"  # restartPolicy Always
    # restartCount 2 is written as the third run starts: its output may be a moment behind.
    until(lambda: node_agent.pod_log(ns, "crash", "main").count("up") >= 3, 10, "the third run's output")


def test_an_image_not_in_the_table_waits_with_err_image_pull(
        k: Clients, node_agent: NodeAgent, namespace: str) -> None:
    ns = namespace
    k.core.create_namespaced_pod(ns, {"metadata": {"name": "nginx"}, "spec": pod_spec(
        node_agent, [{"name": "main", "image": "nginx:1.27"}])})
    st = until(lambda: (p := k.core.read_namespaced_pod("nginx", ns)).status.container_statuses
               and p.status.container_statuses[0].state.waiting
               and p.status.container_statuses[0].state.waiting.reason == "ErrImagePull"
               and p.status.container_statuses[0], 30, "ErrImagePull")
    assert "image table" in st.state.waiting.message
    assert k.core.read_namespaced_pod("nginx", ns).status.phase == "Pending"
    k.core.delete_namespaced_pod("nginx", ns)
    until(lambda: not [p for p in k.core.list_namespaced_pod(ns).items if p.metadata.name == "nginx"], 15,
          "a pod that never ran deleted")


def test_stop_leaves_no_process_behind(k: Clients, make_agent: Any, namespace: str) -> None:
    agent = make_agent(1)
    k.core.create_namespaced_pod(namespace, {"metadata": {"name": "stay"}, "spec": pod_spec(
        agent, [{"name": "main", "image": "python:3.11", "command": ["python", "-c", LINGER]}])})
    running_pod(k, namespace, "stay")
    pids = until(agent.pids, 10, "the container's pid")
    assert all(alive(p) for p in pids)
    # Its first line: the process is past start-up (the SIGTERM handler set), with a log to keep.
    until(lambda: "pid=" in agent.pod_log(namespace, "stay", "main"), 20, "the container's first line")
    agent.stop()
    assert not any(alive(p) for p in pids)
    assert agent.pids() == [] and agent.pod_log(namespace, "stay", "main")  # the logs stay


def test_the_command_line_agent_joins_the_cluster_network(k: Clients, kube: KubeCluster, node_agent: NodeAgent,
                                                          tmp_path: Path) -> None:
    """`python -m testkit.kube.nodeagent` attaches to the cluster's network through network.json next to
    the kubeconfig, from another process, next to this process's agents, without taking their addresses."""
    assert kube.network is not None
    name = f"cli-{uuid.uuid4().hex[:6]}"
    with open(tmp_path / "agent.log", "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "testkit.kube.nodeagent", "--kubeconfig", str(kube.kubeconfig),
                              "--root", str(tmp_path / "root"), "--node", f"{name}:cpu=2", "--delete-nodes"],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        node = until(lambda: (n := k.core.read_node(name)) and cond(n, "Ready") == "True" and n, 30,
                     f"node {name} Ready")
        ip = next(a.address for a in node.status.addresses if a.type == "InternalIP")
        assert ip.startswith(f"10.{kube.network.second_octet}.")
        assert ip not in {node_agent.node_ip(n) for n in node_agent.nodes}
        assert any(netns_exists(f"sllm{p.pid}n{i}") for i in range(1, 255))
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert rc == 0, (tmp_path / "agent.log").read_text()[-3000:]
    assert not any(netns_exists(f"sllm{p.pid}n{i}") for i in range(1, 255))  # it removed its namespace
    until(lambda: name not in {n.metadata.name for n in k.core.list_node().items}, 10, "the Node deleted")
