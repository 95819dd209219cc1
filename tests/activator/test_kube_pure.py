"""The activator's Kubernetes mode without a cluster: Knative's contract (probes, revision lookup,
the rewritten headers), what a revision's objects and EndpointSlices become, the stats Knative's
autoscaler gets (bookkeeping, and the bytes decoded with the vendored stat.proto compiled here, in
a descriptor pool of its own), and the websocket that carries them, against a real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from activator.kube import contract
from activator.kube.endpoints import (
    INTERNAL_PORT_ANNOTATION,
    RevisionInfo,
    endpoints_of,
    revision_info,
    slice_revision,
)
from activator.kube.kpa import ConcurrencyReporter, StatMessage, StatSink, wire
from sllm_knative.api.activator import Endpoint
from sllm_knative.api.keys import ServiceKey
from sllm_knative.config.autoscaler import KPA_CLASS, SLLM_CLASS

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "activator" / "kube" / "stat.proto"
KEY = ServiceKey("ns", "rev-00001")


# --- probes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "want"), [
    pytest.param([(b"k-network-probe", b"activator")], (200, [], b"activator"), id="activator"),
    pytest.param([(b"k-network-probe", b"queue")], (400, [], b'unexpected probe header value: "queue"\n'),
                 id="other-value-400"),
    pytest.param([(b"k-network-probe", b"probe"), (b"k-network-hash", b"abc")], (200, [(b"k-network-hash", b"abc")], b""),
                 id="network-probe-echoes-hash"),
    pytest.param([(b"k-network-probe", b"probe")],
                 (400, [], b'a probe request must contain a non-empty "K-Network-Hash" header\n'),
                 id="network-probe-without-hash"),
    pytest.param([(b"user-agent", b"kube-probe/1.37")], (200, [], b""), id="kubelet-user-agent"),
    pytest.param([(b"k-kubelet-probe", b"activator")], (200, [], b""), id="kubelet-header"),
    pytest.param([(b"k-network-probe", b"")], None, id="empty-is-no-probe"),
    pytest.param([(b"user-agent", b"curl/8")], None, id="plain-request"),
])
def test_probe_answer(headers: list[tuple[bytes, bytes]], want: Any) -> None:
    assert contract.probe_answer(headers) == want


# --- the revision and the forwarded headers ------------------------------------------------------


@pytest.mark.parametrize(("headers", "host", "want"), [
    pytest.param([(b"knative-serving-revision", b"r1"), (b"knative-serving-namespace", b"ns")], "x.example.com",
                 ServiceKey("ns", "r1"), id="headers"),
    pytest.param([], "r1.ns.svc.cluster.local", ServiceKey("ns", "r1"), id="cluster-local-host"),
    pytest.param([], "r1.ns.svc.cluster.local:8012", ServiceKey("ns", "r1"), id="cluster-local-host-port"),
    pytest.param([(b"knative-serving-revision", b"r1")], "r2.ns.svc.cluster.local", ServiceKey("ns", "r2"),
                 id="one-header-falls-back-to-host"),
    pytest.param([], "r1.ns.svc.other.domain", None, id="other-cluster-domain"),
    pytest.param([], "r1.ns.example.com", None, id="public-host"),
    pytest.param([], None, None, id="nothing"),
])
def test_revision_from(headers: list[tuple[bytes, bytes]], host: str | None, want: ServiceKey | None) -> None:
    assert contract.revision_from(headers, host) == want


@pytest.mark.parametrize(("forward", "host", "want"), [
    pytest.param([(b"knative-serving-revision", b"r1"), (b"knative-serving-namespace", b"ns"), (b"accept", b"*/*"),
                  (b"k-network-hash", b"h")], "svc.example.com",
                 [(b"accept", b"*/*"), (b"k-original-host", b"svc.example.com"), (b"k-proxy-request", b"activator")],
                 id="stripped-host-moved-proxy-marked"),
    pytest.param([(b"k-original-host", b"first.example.com")], "second.example.com",
                 [(b"k-original-host", b"first.example.com"), (b"k-proxy-request", b"activator")],
                 id="existing-original-host-wins"),
    pytest.param([(b"k-original-host", b"")], "h.example.com",
                 [(b"k-original-host", b"h.example.com"), (b"k-proxy-request", b"activator")],
                 id="empty-original-host-replaced"),
    pytest.param([(b"k-proxy-request", b"someone")], "h",
                 [(b"k-original-host", b"h"), (b"k-proxy-request", b"activator")], id="proxy-header-set-once"),
])
def test_rewrite(forward: list[tuple[bytes, bytes]], host: str, want: list[tuple[bytes, bytes]]) -> None:
    assert contract.rewrite(forward, host) == want


# --- a revision's objects ---------------------------------------------------------------------


def _obj(annotations: dict[str, str] | None = None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "rev-00001", "namespace": "ns", "annotations": annotations or {}}, "spec": spec or {}}


@pytest.mark.parametrize(("revision", "pa", "want"), [
    pytest.param(_obj(), None, RevisionInfo(KPA_CLASS), id="nothing-is-kpa"),
    pytest.param(_obj(), _obj({contract.CLASS_ANNOTATION: SLLM_CLASS}, {"protocolType": "http1", "containerConcurrency": 4}),
                 RevisionInfo(SLLM_CLASS, "http1", 4), id="pa-class"),
    pytest.param(_obj({contract.CLASS_ANNOTATION: SLLM_CLASS}), None, RevisionInfo(SLLM_CLASS), id="revision-before-pa"),
    pytest.param(_obj({contract.CLASS_ANNOTATION: SLLM_CLASS}), _obj({contract.CLASS_ANNOTATION: KPA_CLASS}),
                 RevisionInfo(KPA_CLASS), id="pa-wins"),
    pytest.param(_obj(spec={"containers": [{"ports": [{"name": "h2c", "containerPort": 9000}]}]}), None,
                 RevisionInfo(KPA_CLASS, "h2c"), id="h2c-from-container-port"),
    pytest.param(_obj(), _obj({INTERNAL_PORT_ANNOTATION: "8081"}), RevisionInfo(KPA_CLASS, internal_port=8081),
                 id="internal-port"),
    pytest.param(_obj(), _obj({INTERNAL_PORT_ANNOTATION: "http"}), RevisionInfo(KPA_CLASS), id="bad-internal-port"),
    pytest.param(_obj(spec={"containerConcurrency": "x"}), None, RevisionInfo(KPA_CLASS), id="bad-concurrency"),
    pytest.param(_obj(spec={"timeoutSeconds": 300}), None, RevisionInfo(KPA_CLASS, hold_timeout_s=300.0),
                 id="hold-for-the-revision-timeout"),
    pytest.param(_obj(spec={"timeoutSeconds": 300, "responseStartTimeoutSeconds": 45}), None,
                 RevisionInfo(KPA_CLASS, hold_timeout_s=45.0), id="response-start-timeout-wins"),
])
def test_revision_info(revision: dict[str, Any], pa: dict[str, Any] | None, want: RevisionInfo) -> None:
    assert revision_info(revision, pa) == want


def _slice(name: str, endpoints: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None,
           labels: dict[str, str] | None = None, address_type: str = "IPv4") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "labels": {
        contract.REVISION_LABEL: "rev-00001", contract.SERVICE_TYPE_LABEL: "Private",
        "kubernetes.io/service-name": "rev-00001-private"} if labels is None else labels},
        "addressType": address_type,
        "ports": ports if ports is not None else [{"name": "https", "port": 8112}, {"name": "http", "port": 8012}],
        "endpoints": endpoints}


def _ep(ip: str, pod: str, ready: bool | None = True, node: str = "n1") -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "nodeName": node, "targetRef": {"kind": "Pod", "name": pod}}
    if ready is not None:
        ep["conditions"] = {"ready": ready, "serving": ready, "terminating": not ready}
    return ep


def test_slice_revision() -> None:
    assert slice_revision(_slice("a", [])) == KEY
    assert slice_revision(_slice("a", [], labels={contract.REVISION_LABEL: "rev-00001",
                                                  contract.SERVICE_TYPE_LABEL: "Public"})) is None
    assert slice_revision(_slice("a", [], labels={"kubernetes.io/service-name": "web"})) is None


@pytest.mark.parametrize(("slices", "info", "want"), [
    pytest.param([_slice("a", [_ep("10.0.0.2", "p2"), _ep("10.0.0.1", "p1")])], RevisionInfo(),
                 [Endpoint(id="p1", url="http://10.0.0.1:8012", node="n1"),
                  Endpoint(id="p2", url="http://10.0.0.2:8012", node="n1")], id="ready-pods-by-name"),
    pytest.param([_slice("a", [_ep("10.0.0.1", "p1", ready=False), _ep("10.0.0.2", "p2", ready=None)])],
                 RevisionInfo(), [Endpoint(id="p2", url="http://10.0.0.2:8012", node="n1")],
                 id="not-ready-out-unknown-in"),
    pytest.param([_slice("a", [_ep("10.0.0.1", "p1")]), _slice("b", [_ep("10.0.0.1", "p1"), _ep("10.0.0.3", "p3")])],
                 RevisionInfo(), [Endpoint(id="p1", url="http://10.0.0.1:8012", node="n1"),
                                  Endpoint(id="p3", url="http://10.0.0.3:8012", node="n1")], id="pod-in-two-slices-once"),
    pytest.param([_slice("a", [_ep("10.0.0.1", "p1")], ports=[{"name": "http2", "port": 8013}])], RevisionInfo(),
                 [], id="no-http-port"),
    pytest.param([_slice("a", [_ep("10.0.0.1", "p1")], ports=[{"name": "http2", "port": 8013}])],
                 RevisionInfo(protocol="h2c"), [Endpoint(id="p1", url="http://10.0.0.1:8013", node="n1")], id="h2c"),
    pytest.param([_slice("a", [_ep("fd00::5", "p1")], address_type="IPv6")], RevisionInfo(internal_port=8081),
                 [Endpoint(id="p1", url="http://[fd00::5]:8012", node="n1", internal_url="http://[fd00::5]:8081")],
                 id="ipv6-and-internal-port"),
])
def test_endpoints_of(slices: list[dict[str, Any]], info: RevisionInfo, want: list[Endpoint]) -> None:
    assert endpoints_of(slices, info) == want


# --- stats for Knative's autoscaler ----------------------------------------------------------


def test_concurrency_reporter_pokes_then_reports_adjusted_and_forgets_idle_revisions() -> None:
    r = ConcurrencyReporter("activator-0")
    assert r.request_in(KEY, 0.0) == StatMessage(KEY, "activator-0", 1.0, 1.0)  # the poke: scale from zero now
    assert r.request_in(KEY, 0.5) is None  # one poke per entry
    r.request_out(KEY, 1.0)
    # 1 in flight for 0.5 s, 2 for 0.5 s, then 1 for 1 s: 1.25 average over 2 s; 2 requests; less the poke.
    assert r.report(2.0) == [StatMessage(KEY, "activator-0", pytest.approx(0.25), 1.0)]
    r.request_out(KEY, 2.0)
    assert r.report(3.0) == [StatMessage(KEY, "activator-0", 0.0, 0.0)]  # idle period: reported, then forgotten
    assert r.tracked() == set()
    assert r.request_in(KEY, 4.0) is not None  # pokes again


def test_idle_revision_held_by_a_request_is_kept() -> None:
    r = ConcurrencyReporter("a")
    r.request_in(KEY, 0.0)
    r.request_out(KEY, 0.0)
    r.request_in(KEY, 1.0)  # in at the very end of the period: average 0, but a request holds it
    assert r.report(1.0)[0].average_concurrent_requests == 0.0
    assert r.tracked() == {KEY}


@pytest.fixture(scope="module")
def knative_stat_classes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Knative's stat.proto compiled here, into a descriptor pool of its own (so nothing is shared
    with the activator's stat_pb2)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    out = tmp_path_factory.mktemp("proto") / "stat.desc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--descriptor_set_out={out}",
                    str(PROTO.relative_to(ROOT))], check=True)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("metrics.WireStatMessages"))
    cls.compiled = files.file[0]
    return cls


def test_committed_stubs_are_the_proto_compiled(knative_stat_classes: Any) -> None:
    from google.protobuf import descriptor_pb2

    from activator.kube import stat_pb2

    committed = descriptor_pb2.FileDescriptorProto.FromString(stat_pb2.DESCRIPTOR.serialized_pb)
    compiled = descriptor_pb2.FileDescriptorProto()
    compiled.CopyFrom(knative_stat_classes.compiled)
    for message in compiled.message_type:  # protoc leaves json_name out of the Python stubs
        for f in message.field:
            f.ClearField("json_name")
    assert committed == compiled, "activator/kube/stat_pb2.py is stale: run `make proto`"


def test_wire_is_knatives_wire_stat_messages(knative_stat_classes: Any) -> None:
    data = wire([StatMessage(KEY, "activator-0", 1.0, 1.0), StatMessage(ServiceKey("b", "r"), "activator-0", 0.5, 3.0)])
    decoded = knative_stat_classes.FromString(data)
    got = [(m.namespace, m.name, m.stat.pod_name, m.stat.average_concurrent_requests, m.stat.request_count,
            m.stat.average_proxied_concurrent_requests, m.stat.timestamp) for m in decoded.messages]
    assert got == [("ns", "rev-00001", "activator-0", 1.0, 1.0, 0.0, 0), ("b", "r", "activator-0", 0.5, 3.0, 0.0, 0)]


def test_stat_sink_sends_binary_frames_and_redials(knative_stat_classes: Any) -> None:
    from websockets.asyncio.server import serve

    async def scenario() -> None:
        frames: asyncio.Queue[Any] = asyncio.Queue()
        first: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def handler(ws: Any) -> None:
            if not first.done():
                first.set_result(ws)
            async for frame in ws:
                await frames.put(frame)

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sink = StatSink(f"ws://127.0.0.1:{port}")
        assert not await sink.send([StatMessage(KEY, "a", 1.0, 1.0)])  # not connected yet: dropped
        sink.start()
        try:
            await asyncio.wait_for(sink.connected.wait(), 10)
            assert await sink.send([StatMessage(KEY, "a", 1.0, 1.0)])
            frame = await asyncio.wait_for(frames.get(), 5)
            assert isinstance(frame, bytes)  # a binary message: the stat server drops anything else
            assert knative_stat_classes.FromString(frame).messages[0].name == "rev-00001"
            # The autoscaler restarts (close 1012, as its Shutdown sends): the sink dials again.
            await (await first).close(1012, "Restarting")
            await asyncio.wait_for(_until(lambda: not sink.connected.is_set()), 5)
            await asyncio.wait_for(sink.connected.wait(), 10)
            assert await sink.send([StatMessage(KEY, "a", 0.0, 0.0)])
            assert knative_stat_classes.FromString(await asyncio.wait_for(frames.get(), 5)).messages[0].stat.pod_name == "a"
            assert sink.dropped == 1 and sink.sent == 2
        finally:
            await sink.stop()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.01)


# --- start-up without a usable cluster ---------------------------------------------------------


@pytest.mark.parametrize(("kubeconfig", "says"), [
    pytest.param(None, "kubeconfig", id="no-kubeconfig-file"),
    pytest.param("dead", "cannot list the cluster", id="api-server-down"),
])
def test_kube_mode_without_a_cluster_exits_2(tmp_path: Path, kubeconfig: str | None, says: str) -> None:
    from sllm_knative.ports import free_port

    path = tmp_path / "kubeconfig"
    if kubeconfig == "dead":  # a server nothing listens on
        path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{free_port()}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    run = subprocess.run([sys.executable, "-m", "activator", "--kube", "--kubeconfig", str(path),
                          "--port", str(free_port()), "--h2c-port", str(free_port()), "--admin-port", str(free_port()),
                          "--kube-sync-timeout", "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2, run.stderr[-2000:]
    assert says in run.stderr, run.stderr[-2000:]
