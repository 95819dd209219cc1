"""End to end on the real control plane: the real function behind our activator and autoscaler,
its checkpoint leased through its node's loader, driven by the official `openai` client.

Real: kube-apiserver, kube-controller-manager (ReplicaSets, EndpointSlices, garbage collection),
kube-scheduler, the node agent's three nodes and their pods, one loader per node publishing its
NodeCache, `python -m autoscaler --kube` with its placement webhook, `python -m activator --kube`,
and the function image (`sllm-knative/function` -> `python -m functions.llm`) serving the tiny
test model in the loading format, from nginx as the model store.

The steps: (1) a cold start streams through the activator, placed on the node whose NodeCache has
the checkpoint in DRAM (the Placed Event says why), its weights leased from that node's loader,
the PA's conditions as Knative expects; (2) keep-alive, then zero; (3) the checkpoint moves to
another node's DRAM and the next cold start follows it; (4) a scale-down with a seeded stream on
each of two pods migrates the victim's stream through the activator, and both texts equal
unmigrated runs; (5) a revision of Knative's KPA class is served through the same activator;
(6) two revisions of our class with a missing or bad checkpoint annotation get a PA condition and
an Event naming the field, and no pod; (7) a revision whose checkpoint the store does not have
fails its starts, and the autoscaler backs off between them with a Warning Event on the PA.

The store is nginx's rate-limited location (2 MiB/s per connection) and the model is a 5.8 MB
variant of the tiny one: a load from the store takes seconds while a load from a node's DRAM
takes milliseconds, and the fetch is large enough (over the loader's 1 MiB sample floor) for the
loaders to measure the store's rate and publish it in their NodeCaches. So the load-time model
knows the store is slow, and its choice is clear whatever the start overheads measure (the test
checks that the placement's reasons put the store load seconds behind). With a store as fast as
local files, or a checkpoint too small to measure the store by, the tiers differ by milliseconds
and the choice is noise.

The loaders run as processes with `--kube-node` (as in test_autoscaler_kube.py), each with its
socket and DRAM tier in its node's hostPath folders (`/var/run/sllm-knative`,
`/dev/shm/sllm-knative`), where the webhook's mounts put them for the node's function pods. Not
the DaemonSet of manifests/loader: its store is `hf://` (no network here), and a file store would
have to be mounted into its pods; test_loader_daemonset.py covers the DaemonSet itself.

Stand-ins for what cannot run here (docs/kubernetes.md): Knative's revision reconciler
(`knative.revision_objects`), its SKS status (`SksStatusWriter`) and the private Service
(`PrivateServices`), whose EndpointSlices the activator watches. The client sends to the
activator with the revision headers, as Knative's ingress would.

The loaders, stand-ins, webhook configuration, autoscaler and activator are
`testkit.kube.stack.Stack`, the same code bench/kube.py and test_preemption.py run on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from autoscaler.kube.podautoscaler import CLASS, condition
from sllm_knative.api import activator as admin_api
from sllm_knative.api import instance as instance_api
from sllm_knative.config.autoscaler import KPA_CLASS
from sllm_knative.kube.client import PODAUTOSCALERS, REVISIONS, SCALINGPOLICIES, Kube
from sllm_knative.models import TINY
from testkit.kube.cluster import KubeCluster
from testkit.kube.knative import create_revision
from testkit.kube.nodeagent import NodeAgent
from testkit.kube.stack import INTERNAL_PORT, Stack, read_token
from testkit.servers import Nginx
from tests.kube.conftest import agent_selector, start_agent, until
from tests.kube.test_activator_knative import _echo, _revision, _served

REV = "chat-00001"
KPA_REV = "echo-00001"
MISSING_REV = "missing-00001"
BAD_REVISIONS = {"nomodel-00001": {}, "badscheme-00001": {"sllm-knative.io/model": "ftp://models/tiny"}}


@pytest.fixture
def agent(kube: KubeCluster) -> Iterator[NodeAgent]:
    # A short root: the loader's socket lies in the node's hostPath folder under it, and a unix
    # socket's path is limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="sllm-e2e-", dir="/tmp"))
    a = start_agent(kube, root, nodes=3)
    try:
        yield a
    finally:
        a.stop(delete_nodes=True)
        shutil.rmtree(root, ignore_errors=True)


# The tiny test model, wider (5.8 MB: its store fetch is measured) and with room for long
# generations: a scale-down must find its streams still running, whatever the decision's latency.
# 2000 tokens take about 9 s here, idle (4000 took 20 s, run twice: the migrated streams and their
# unmigrated references); the scale-down migrated about 1 s after the streams began.
CONTEXT = 8192
LONG_TOKENS = 2000
SPEC = dataclasses.replace(TINY, hidden_size=256, intermediate_size=512, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file store holding `tiny` (SPEC) in the loading format."""
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    root = tmp_path_factory.mktemp("e2e-store")
    convert(build_model(root / "src" / "tiny", SPEC), root / "models" / "tiny")
    return root / "models"


@pytest.fixture
def web(store: Path) -> Iterator[Nginx]:
    with Nginx(store, slow_rate="2m") as nginx:
        yield nginx


# The Revision's conditions (Knative's revision reconciler reads them from our PA; the tests'
# stand-in does that part, testkit.kube.knative.RevisionStatusWriter): serving, and at zero.
SERVING = {"Active": "True/", "ContainerHealthy": "True/", "Ready": "True/", "ResourcesAvailable": "True/"}
AT_ZERO = {**SERVING, "Active": "False/NoTraffic"}


def revision_is(stack: Any, want: dict[str, str], what: str) -> None:
    """Until the Revision's conditions are `want` (30 s); the failure shows what they were."""
    try:
        until(lambda: stack.revision_conditions(REV) == want, 30, f"the Revision {what}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {stack.revision_conditions(REV)}") from None


def to_zero_then_cold_start_on_n0(stack: Any, pa_status: Callable[[], dict[str, Any]], loaders: tuple[Any, Any],
                                  nodes: tuple[str, str], model: str, client: openai.OpenAI, text: str,
                                  failure: Any) -> Any:
    """Steps 2 and 3 of the end-to-end tests. Idle past the keep-alive, the revision goes to zero
    (its pod gone, n1's lease released, the PA inactive). The checkpoint then moves from n1 to n0's
    DRAM, and a request through `client` cold-starts it: greedy, the same `text`, from a pod placed
    on n0 that leases from n0's loader. Returns that pod."""
    lo0, lo1 = loaders
    n0, n1 = nodes
    until(lambda: stack.replicas(REV) == 0, 120, "replicas 0 after the keep-alive")
    until(lambda: not stack.pods(REV), 90, "the pod to go")
    until(lambda: not lo1.leases(), 30, "the lease released on n1")
    assert (condition(pa_status(), "Active") or {}).get("status") == "False", pa_status()
    # What a Knative user sees on the Revision at zero: inactive, and still Ready.
    revision_is(stack, AT_ZERO, "inactive and Ready")

    with lo1.client() as c:
        c.evict(model)
    with lo0.client() as c:
        c.prefetch(model, tier="dram", wait=True)
    until(lambda: stack.in_dram(n0, model) and not stack.in_dram(n1, model), 30, "the NodeCaches to show the move")
    until(lambda: stack.autoscaler_sees_dram(n0, model) and not stack.autoscaler_sees_dram(n1, model), 30,
          "the autoscaler's informers to show the move")
    try:
        again = stream_chat(client)
    except Exception as exc:
        raise AssertionError(failure(f"the cold start from zero failed: {exc!r}")) from exc
    assert again == text  # greedy: the same text from the same weights
    pod = until(lambda: stack.ready_pod(REV), 30, "the second cold start's pod ready")
    assert pod.spec.node_name == n0, failure(f"placed on {pod.spec.node_name}, not {n0}")
    assert lo0.leases() == [(model, pod.metadata.name)]
    revision_is(stack, SERVING, "active again")
    return pod


def scale_down_migrates(stack: Any, client: openai.OpenAI, failure: Any, seeds: tuple[int, ...] = (7, 8)) -> None:
    """A scale-down with a seeded stream on each of two pods (`minScale` 2, then 0): one pod's
    generation migrates to the other through the activator `client` talks to, then its pod goes.
    Each client sees exactly the text of an unmigrated run of its seed."""
    stack.patch_policy("chat-keepalive", {"minScale": 2})
    until(lambda: len(stack.ready_pods(REV)) == 2, 120, "two ready pods")
    until(lambda: len(stack.rotation(REV)) == 2, 30, "both pods in the rotation")
    migrated_before = stack.migrated()
    # The decision must see the streams (the activator reports once a second): with an idle
    # history and a 3 s keep-alive, a decision on older numbers would release both pods.
    got, threads = stream_on_each_pod(stack, client, REV, seeds)
    stack.patch_policy("chat-keepalive", {"minScale": 0})
    for t in threads:
        t.join(120)
    assert stack.migrated() == migrated_before + 1, failure("no migration through the activator")
    until(lambda: len(stack.pods(REV)) == 1, 60, "the victim's pod gone")
    with ThreadPoolExecutor(len(seeds)) as pool:  # the same seeds on the one pod left, unmigrated
        want = dict(zip(seeds, pool.map(lambda s: stream_completion(client, s), seeds), strict=True))
    assert got == want, failure("a migrated stream's text differs from the unmigrated run")


def stream_on_each_pod(stack: Any, client: openai.OpenAI, revision: str,
                       seeds: tuple[int, ...]) -> tuple[dict[int, str], list[threading.Thread]]:
    """A seeded stream per seed through `client`, one on each of the revision's two pods, each
    running (past its first chunks) and seen by the autoscaler; (the texts, filled as they end;
    the threads)."""
    got: dict[int, str] = {}
    started = {seed: threading.Event() for seed in seeds}
    threads = [threading.Thread(target=lambda s=seed: got.__setitem__(s, stream_completion(client, s, started[s])))
               for seed in seeds]
    for t in threads:
        t.start()
    for seed in seeds:
        assert started[seed].wait(60), f"stream {seed} did not start"
    assert sorted(stack.rotation(revision).values()) == [1, 1], stack.rotation(revision)  # one per pod
    until(lambda: stack.in_flight(revision) == len(seeds), 10, "the autoscaler to see every stream")
    return got, threads


def stream_completion(client: openai.OpenAI, seed: int, started: threading.Event | None = None,
                      max_tokens: int = LONG_TOKENS) -> str:
    """A long seeded (sampled) completion, streamed; `started` is set after its first chunks."""
    text, chunks = "", 0
    for chunk in client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=max_tokens,
                                           temperature=1.0, top_p=0.95, seed=seed, stream=True,
                                           extra_body={"ignore_eos": True}):
        text += chunk.choices[0].text if chunk.choices else ""
        chunks += 1
        if started is not None and chunks == 8:
            started.set()
    return text


def _seconds_behind(stack: Stack, instance: str) -> dict[str, float]:
    """How far behind the chosen node each other node's estimate was, in the placement's reasons."""
    placement = stack.placement(REV, instance) or {}
    return {m[1]: float(m[2]) for r in placement.get("reasons", [])
            if (m := re.match(r"not (\S+): [\d.]+s, ([\d.]+)s slower", r))}


def stream_chat(client: openai.OpenAI, model: str = "tiny") -> str:
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello from Knative"}], max_tokens=8, temperature=0,
        stream=True))
    assert chunks and chunks[0].choices[0].delta.role == "assistant", chunks[:1]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop"), chunks[-1]
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def test_cold_starts_through_the_activator_lease_through_the_nodes_loader(
        kube: KubeCluster, api: Any, namespace: str, agent: NodeAgent, store: Path, web: Nginx,
        tmp_path: Path) -> None:
    k = Kube(api)
    n0, n1, n2 = (s.name for s in agent.specs)  # n2 never holds the checkpoint
    model = f"{web.url}/slow/tiny"
    install = f"{namespace}-sys"
    stack = Stack(kube, agent, namespace, install, f"{web.url}/slow", tmp_path, identity="a")
    k.core.create_namespace({"metadata": {"name": install}})
    try:
        stack.start_loaders()
        lo0, lo1, lo2 = (stack.loaders[n] for n in (n0, n1, n2))
        stack.prefetch(n1, model)
        stack.start()
        until(lambda: stack.autoscaler_sees_dram(n1, model), 30, f"the autoscaler to see {n1}'s DRAM copy")
        # A revision of Knative's own class (KPA) beside ours, made now so its pod starts meanwhile:
        # the same activator serves it at the end (step 5).
        _revision(k, namespace, agent, KPA_REV, KPA_CLASS, replicas=1)
        # Two revisions of our class the autoscaler cannot serve: no model annotation, and a
        # checkpoint URI of an unknown scheme (step 6).
        for name, extra in BAD_REVISIONS.items():
            bad = {"autoscaling.knative.dev/class": CLASS, **extra}
            create_revision(k, name, namespace, bad, [{"name": "user-container", "image": "sllm-knative/function:latest"}],
                            {"nodeSelector": agent_selector(agent)}, replicas=0)

        # The Service's ScalingPolicy (a short keep-alive), then its Revision as Knative makes it.
        stack.scaling_policy("chat-keepalive", "chat", keepAlive="3s")
        args = ["--max-model-len", str(CONTEXT)]
        stack.function_revision(REV, "chat", model, args=args)
        until(lambda: stack.in_flight(REV) >= 0, 30, "the autoscaler to know the revision")
        client = stack.client(REV)

        def pa_status() -> dict[str, Any]:
            return k.get(PODAUTOSCALERS, REV, namespace).get("status") or {}

        def failure(what: str) -> str:
            return f"{what}\nPA status: {pa_status()}\n{stack.pod_logs()}"

        # 1. The first cold start: the activator holds the stream until the placed pod is ready.
        until(lambda: stack.pods(REV), 60, "the revision's first pod")
        try:
            text = stream_chat(client)
        except Exception as exc:
            raise AssertionError(failure(f"the first cold start failed: {exc!r}")) from exc
        assert text, "an empty completion"
        pod = until(lambda: stack.ready_pod(REV), 30, "the serving pod ready")
        assert pod.spec.node_name == n1, failure(f"placed on {pod.spec.node_name}, not {n1}")
        placed = stack.events(pod.metadata.name, "Placed")
        assert placed and n1 in placed[0].message and "dram" in placed[0].message, placed
        # Chosen by seconds, not by noise: each other node's estimate (a store load at its measured
        # rate) is behind by more than a second.
        behind = _seconds_behind(stack, pod.metadata.name)
        assert len(behind) == 2 and min(behind.values()) > 1.0, failure(f"the alternatives were behind by {behind}")

        # Its weights came through its node's loader: the lease is n1's, none on n0's, and the
        # function's own log names the loader socket in n1's hostPath folder.
        assert lo1.leases() == [(model, pod.metadata.name)]
        assert lo0.leases() == lo2.leases() == []
        log = agent.pod_log(namespace, pod.metadata.name, "user-container")
        assert "lease complete" in log and str(lo1.socket.parent.resolve()) in log, log[-3000:]

        # Its internal API (migration) wants the install's token: the webhook pointed its
        # SLLM_INTERNAL_TOKEN at the Secret the autoscaler copied into this namespace before it
        # pinned the pod. Without the token: 401; with it: the generation list.
        [c] = [c for c in pod.spec.containers if c.name == "user-container"]
        [ref] = [e.value_from.secret_key_ref for e in c.env if e.name == "SLLM_INTERNAL_TOKEN"]
        assert (ref.name, ref.key) == ("sllm-knative-internal", "token"), ref
        assert read_token(k, namespace) == stack.token
        internal = f"http://{pod.status.pod_ip}:{INTERNAL_PORT}{instance_api.GENERATIONS}"
        assert httpx.get(internal, timeout=5).status_code == 401
        assert httpx.get(internal, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        assert httpx.get(internal, headers=stack.admin_headers(), timeout=5).status_code == 200
        # The activator's admin API wants it too.
        assert httpx.get(f"{stack.act_admin}{admin_api.STATS}", timeout=5).status_code == 401

        until(lambda: (condition(pa_status(), "ScaleTargetInitialized") or {}).get("status") == "True", 60,
              "ScaleTargetInitialized True")
        until(lambda: (condition(pa_status(), "Ready") or {}).get("status") == "True", 60, "the PA Ready")
        assert (condition(pa_status(), "Active") or {}).get("status") == "True", pa_status()
        revision_is(stack, SERVING, "Ready and Active")
        # Warm: served again at once, by the same pod.
        assert stream_chat(client) == text

        # 2. Idle past the keep-alive: scaled to zero (the activator reports no concurrency).
        # 3. The checkpoint moves to n0's DRAM; the next cold start (demand from the held
        # request) lands there, and leases from n0's loader.
        to_zero_then_cold_start_on_n0(stack, pa_status, (lo0, lo1), (n0, n1), model, client, text, failure)
        until(lambda: (condition(pa_status(), "Active") or {}).get("status") == "True", 30, "Active again")

        # 4. A scale-down with seeded streams in flight: two pods (minScale 2), a stream on each,
        # then minScale back to 0. One pod is the victim: withheld from the activator's rotation,
        # its generation migrated to the other pod, then its pod deleted. Each client sees exactly
        # the text of an unmigrated run of its seed.
        scale_down_migrates(stack, client, failure)
        scaled = [e for e in k.core.list_namespaced_event(namespace).items if e.reason == "Placed"]
        assert scaled, "the placements were recorded as Events"

        # 5. The KPA revision, which our autoscaler leaves to Knative's, is served through our activator.
        doc = _echo(until(lambda: _served(stack.act_url, namespace, KPA_REV), 60, "the KPA revision served"))
        assert doc["h"]["k-proxy-request"] == ["activator"] and doc["path"] == "/x", doc
        assert "-deployment-" in doc["pod"]

        # 6. The revisions the autoscaler cannot serve: the PA says why (the field), a Warning Event
        # says it too, no pod was made, and the autoscaler still leads (no crash loop).
        for name, field in (("nomodel-00001", "sllm-knative.io/model"), ("badscheme-00001", "sllm-knative.io/model")):
            st = k.get(PODAUTOSCALERS, name, namespace).get("status") or {}
            active = condition(st, "Active") or {}
            assert (active.get("status"), active.get("reason")) == ("False", "InvalidConfiguration"), st
            assert field in active.get("message", ""), active
            evs = stack.events(name)
            assert any(e.reason == "InvalidConfiguration" and e.type == "Warning" for e in evs), evs
            assert not stack.pods(name, include_deleting=True)
        assert httpx.get(f"{stack.as_url}/healthz", timeout=5).status_code == 200

        # The ScalingPolicy's status, written by the autoscaler: the Service it applies to, Ready.
        policy = until(lambda: (st := k.get(SCALINGPOLICIES, "chat-keepalive", namespace).get("status")) and
                       st.get("observedGeneration") == k.get(SCALINGPOLICIES, "chat-keepalive", namespace)[
                           "metadata"]["generation"] and st, 30, "the ScalingPolicy's status, current")
        assert policy["services"] == ["chat"], policy
        assert (policy["conditions"][0]["type"], policy["conditions"][0]["status"]) == ("Ready", "True"), policy

        # 7. A checkpoint the store does not have: each start fails (the lease cannot be filled,
        # the function exits, the container crash-loops), and the autoscaler backs off between
        # starts instead of making pods in a loop; the PA carries a Warning Event saying why.
        missing = f"{web.url}/slow/missing"
        stack.function_revision(MISSING_REV, "missing", missing, args=args, replicas=0)
        until(lambda: stack.in_flight(MISSING_REV) >= 0, 30, "the autoscaler to know it")
        held = stack.client(MISSING_REV, timeout=90)

        def ask() -> None:
            with contextlib.suppress(Exception):  # it fails (503) or times out: the point is the demand
                stream_chat(held)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()  # held by the activator: the demand that makes the autoscaler try

        def failed() -> dict[str, Any] | None:
            svc = stack.service(MISSING_REV)
            return svc if svc is not None and svc["failed_starts"] >= 2 else None

        svc = until(failed, 120, "two failed starts of the revision whose checkpoint is missing")
        assert "missing" in k.get(REVISIONS, MISSING_REV, namespace)["metadata"]["annotations"]["sllm-knative.io/model"]
        assert len(svc["placements"]) <= svc["failed_starts"] + 1, svc  # a backoff, not a loop
        evs = until(lambda: stack.events(MISSING_REV, "InstanceFailed"), 30, "the PA's InstanceFailed Warning")
        assert evs[0].type == "Warning" and "failed start" in evs[0].message, evs[0]
    finally:
        stack.stop()
        k.core.delete_namespace(install)
