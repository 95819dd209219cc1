"""ScalingPolicy and NodeCache parsing, policy selection, multi-document YAML files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from sllm_knative.config import (
    ConfigError,
    LabelRequirement,
    LabelSelector,
    ScalingPolicy,
    load_manifest,
    matching_policies,
    node_cache_document,
    parse_manifest,
    parse_node_cache,
    parse_scaling_policy,
    parse_service,
    policy_for,
)
from sllm_knative.config.crds import NODE_CACHE_CRD
from sllm_knative.config.nodecache import (
    CachedCheckpoint,
    CheckpointState,
    NodeCache,
    StoreStatus,
    TierStatus,
    summarize,
)
from sllm_knative.placement import Instance, QueuedLoad, Tier

POLICY: dict[str, Any] = {
    "apiVersion": "serving.sllm-knative.io/v1alpha1",
    "kind": "ScalingPolicy",
    "metadata": {"name": "keep", "namespace": "ml"},
    "spec": {"target": {"serviceName": "llama"}, "keepAlive": "90s", "minScale": 0, "maxScale": 3,
             "targetConcurrency": 2.5, "priority": 10, "migration": False, "minResidency": "20s",
             "fairShareAfter": "1m"},
}


def policy_with(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(POLICY)
    for k, v in spec.items():
        if v is None:
            doc["spec"].pop(k, None)
        else:
            doc["spec"][k] = v
    return doc


def test_parses_a_policy() -> None:
    p = parse_scaling_policy(POLICY)
    assert p == ScalingPolicy(name="keep", namespace="ml", service_name="llama", keep_alive=90.0, min_scale=0,
                              max_scale=3, target_concurrency=2.5, priority=10, migration=False, min_residency=20.0,
                              fair_share_after=60.0)
    minimal = parse_scaling_policy(policy_with(keepAlive=None, minScale=None, maxScale=None, targetConcurrency=None,
                                               priority=None, migration=None, minResidency=None, fairShareAfter=None))
    assert (minimal.keep_alive, minimal.priority, minimal.migration) == (None, 0, True)
    assert (minimal.min_residency, minimal.fair_share_after) == (None, None)


@pytest.mark.parametrize("spec,expected", [
    pytest.param({"keepAlive": "5x"}, 'spec.keepAlive: must be a duration such as "30s", "5m" or "1h30m", got "5x"',
                 id="keepalive-form"),
    pytest.param({"keepAlive": 30}, "spec.keepAlive: must be a string, got 30 (an integer)", id="keepalive-int"),
    pytest.param({"minResidency": "soon"}, 'spec.minResidency: must be a duration such as "30s"', id="residency-form"),
    pytest.param({"fairShareAfter": 15}, "spec.fairShareAfter: must be a string, got 15 (an integer)",
                 id="fair-share-int"),
    pytest.param({"minScale": 4}, "spec.minScale: must be <= maxScale (3), got 4", id="min-over-max"),
    pytest.param({"maxScale": -1}, "spec.maxScale: must be >= 0, got -1", id="negative-max"),
    pytest.param({"targetConcurrency": 0}, "spec.targetConcurrency: must be >= 0.01, got 0", id="target-zero"),
    pytest.param({"priority": "high"}, 'spec.priority: must be an integer, got "high" (a string)', id="priority"),
    pytest.param({"migration": "on"}, 'spec.migration: must be a boolean, got "on" (a string)', id="migration"),
    pytest.param({"keepalive": "30s"}, "spec.keepalive: unknown field", id="typo"),
    pytest.param({"target": {}}, "spec.target: set exactly one of serviceName, selector (set: none)", id="no-target"),
    pytest.param({"target": {"serviceName": "a", "selector": {}}},
                 "spec.target: set exactly one of serviceName, selector (set: serviceName, selector)", id="both-targets"),
    pytest.param({"target": {"serviceName": "Llama"}}, "spec.target.serviceName: must be a DNS-1035 label",
                 id="service-name"),
    pytest.param({"target": {"selector": {"matchExpressions": [{"key": "team", "operator": "In"}]}}},
                 "spec.target.selector.matchExpressions[0].values: must be non-empty for operator In", id="in-no-values"),
    pytest.param({"target": {"selector": {"matchExpressions": [{"key": "t", "operator": "Exists", "values": ["x"]}]}}},
                 "spec.target.selector.matchExpressions[0].values: must be empty for operator Exists",
                 id="exists-with-values"),
    pytest.param({"target": {"selector": {"matchExpressions": [{"key": "t", "operator": "Like", "values": ["x"]}]}}},
                 'spec.target.selector.matchExpressions[0].operator: must be one of "In", "NotIn", "Exists", '
                 '"DoesNotExist", got "Like"', id="operator"),
    pytest.param({"target": {"selector": {"matchLabels": {"bad key!": "x"}}}},
                 'spec.target.selector.matchLabels["bad key!"]: must be a label key', id="label-key"),
])
def test_policy_rejects(spec: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scaling_policy(policy_with(**spec))
    assert any(str(e).startswith(expected) for e in info.value.errors), [str(e) for e in info.value.errors]


def test_policy_requires_spec() -> None:
    doc = copy.deepcopy(POLICY)
    del doc["spec"]
    with pytest.raises(ConfigError, match="spec: required field is missing"):
        parse_scaling_policy(doc)


@pytest.mark.parametrize("selector,labels,matches", [
    pytest.param(LabelSelector(), {}, True, id="empty-matches-all"),
    pytest.param(LabelSelector({"team": "nlp"}), {"team": "nlp", "x": "y"}, True, id="labels"),
    pytest.param(LabelSelector({"team": "nlp"}), {"team": "cv"}, False, id="labels-differ"),
    pytest.param(LabelSelector(match_expressions=(LabelRequirement("tier", "In", ("a", "b")),)), {"tier": "b"}, True,
                 id="in"),
    pytest.param(LabelSelector(match_expressions=(LabelRequirement("tier", "NotIn", ("a",)),)), {}, True,
                 id="notin-absent"),
    pytest.param(LabelSelector(match_expressions=(LabelRequirement("tier", "Exists"),)), {"x": "1"}, False,
                 id="exists"),
    pytest.param(LabelSelector(match_expressions=(LabelRequirement("tier", "DoesNotExist"),)), {"x": "1"}, True,
                 id="does-not-exist"),
    pytest.param(LabelSelector({"team": "nlp"}, (LabelRequirement("tier", "In", ("batch",)),)), {"team": "nlp"}, False,
                 id="all-must-hold"),
])
def test_label_selector(selector: LabelSelector, labels: dict[str, str], matches: bool) -> None:
    assert selector.matches(labels) is matches


def _service(name: str, namespace: str = "ml", labels: dict[str, str] | None = None) -> Any:
    return parse_service({
        "apiVersion": "serving.knative.dev/v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"template": {"spec": {"containers": [{"image": "x"}]}}},
    })


def test_policy_selection_by_name_beats_selector_and_namespace_matters() -> None:
    by_label = ScalingPolicy("a-team", "ml", selector=LabelSelector({"team": "nlp"}))
    by_name = ScalingPolicy("z-llama", "ml", service_name="llama")
    other_ns = ScalingPolicy("b", "prod", service_name="llama")
    svc = _service("llama", labels={"team": "nlp"})
    assert matching_policies(svc, [by_label, other_ns, by_name]) == (by_name, by_label)
    assert policy_for(svc, [by_label, other_ns]) == by_label
    assert policy_for(_service("llama", "prod"), [by_label, by_name]) is None
    assert policy_for(_service("other", labels={"team": "cv"}), [by_label, by_name]) is None
    # On Kubernetes a service is a Revision: a policy naming the Knative Service applies to it.
    revision = _service("llama-00002", labels={"serving.knative.dev/service": "llama"})
    assert policy_for(revision, [by_label, by_name]) == by_name
    assert policy_for(_service("llama-00002", labels={"serving.knative.dev/service": "other"}), [by_name]) is None


NODE_CACHE: dict[str, Any] = {
    "apiVersion": "serving.sllm-knative.io/v1alpha1",
    "kind": "NodeCache",
    "metadata": {"name": "node-a"},
    "spec": {"nodeName": "node-a"},
    "status": {
        "observedTime": "2026-01-01T00:00:00Z",
        "tiers": [
            {"name": "dram", "capacityBytes": 100, "usedBytes": 40, "bandwidthBytesPerSecond": 8e9},
            {"name": "ssd", "capacityBytes": 1000, "usedBytes": 40, "bandwidthBytesPerSecond": 2e9},
            {"name": "remote", "bandwidthBytesPerSecond": 5e8},
        ],
        "checkpoints": [{"model": "hf://org/a", "sizeBytes": 40, "tiers": ["ssd", "dram"]}],
        "loadQueue": [{"model": "hf://org/b", "tier": "remote", "remainingBytes": 30}],
    },
}


def test_node_cache_round_trip_and_inventory() -> None:
    cache = parse_node_cache(NODE_CACHE)
    assert parse_node_cache(node_cache_document(cache)) == cache
    inst = Instance("a-1", "hf://org/c", 10)
    inv = cache.inventory(free_slots=1, instances=[inst], instance_overhead_s=0.2)
    assert inv.name == "node-a" and inv.tier_of("hf://org/a") == Tier.DRAM and inv.tier_of("hf://org/x") == Tier.REMOTE
    assert inv.bandwidth[Tier.SSD] == 2e9 and inv.load_queue == (QueuedLoad("hf://org/b", 30, Tier.REMOTE),)
    assert inv.instances == (inst,) and inv.instance_overhead_s == 0.2


def _cache_with(**status: Any) -> dict[str, Any]:
    doc = copy.deepcopy(NODE_CACHE)
    doc["status"].update(status)
    return doc


@pytest.mark.parametrize("doc,expected", [
    pytest.param(_cache_with(tiers=[{"name": "dram", "bandwidthBytesPerSecond": 1e9}]),
                 "status.tiers: must include the remote tier", id="no-remote"),
    pytest.param(_cache_with(tiers=[{"name": "remote", "bandwidthBytesPerSecond": 0}]),
                 "status.tiers[0].bandwidthBytesPerSecond: must be > 0, got 0", id="zero-bandwidth"),
    pytest.param(_cache_with(tiers=[{"name": "nvme", "bandwidthBytesPerSecond": 1}]),
                 'status.tiers[0].name: must be one of "device", "dram", "ssd", "remote", got "nvme"', id="tier-name"),
    pytest.param(_cache_with(tiers=[{"name": "remote", "bandwidthBytesPerSecond": 1},
                                    {"name": "remote", "bandwidthBytesPerSecond": 2}]),
                 "status.tiers[1].name: tier remote is listed twice", id="tier-twice"),
    pytest.param(_cache_with(tiers=[{"name": "remote", "bandwidthBytesPerSecond": 1},
                                    {"name": "ssd", "capacityBytes": 1, "usedBytes": 2, "bandwidthBytesPerSecond": 1}]),
                 "status.tiers[1].usedBytes: must be <= capacityBytes (1), got 2", id="overfull"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "sizeBytes": 1, "tiers": ["device"]}]),
                 "status.checkpoints[0].tiers[0]: tier device is not among status.tiers", id="unknown-tier"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "sizeBytes": 1, "tiers": ["remote"]}]),
                 "status.checkpoints[0].tiers[0]: remote is not a node tier", id="remote-checkpoint"),
    pytest.param(_cache_with(checkpoints=[{"model": "org/a", "sizeBytes": 1, "tiers": ["ssd"]}]),
                 "status.checkpoints[0].model: unsupported scheme", id="checkpoint-uri"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "sizeBytes": 0, "tiers": ["ssd"]}]),
                 "status.checkpoints[0].sizeBytes: must be >= 1, got 0", id="empty-checkpoint"),
    pytest.param(_cache_with(loadQueue=[{"model": "hf://org/b", "tier": "remote"}]),
                 "status.loadQueue[0].remainingBytes: required field is missing", id="queue-missing-bytes"),
    pytest.param({**NODE_CACHE, "metadata": {"name": "node-b"}}, 'metadata.name: must equal spec.nodeName ("node-a")',
                 id="name-mismatch"),
    pytest.param({**NODE_CACHE, "metadata": {"name": "node-a", "namespace": "x"}},
                 "metadata.namespace: NodeCache is cluster-scoped", id="namespaced"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "state": "Fetched", "tiers": []}]),
                 'status.checkpoints[0].state: must be one of "Pending", "Downloading", "Downloaded", "DownloadError"',
                 id="state-vocabulary"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "sizeBytes": 1, "tiers": []}]),
                 "status.checkpoints[0].tiers: a Downloaded checkpoint lists the tiers", id="downloaded-nowhere"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "state": "Downloading", "tiers": ["ssd"]}]),
                 "status.checkpoints[0].tiers: must be empty when state is Downloading", id="downloading-but-complete"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "tiers": ["ssd"], "message": "boom"}]),
                 "status.checkpoints[0].message: only a DownloadError checkpoint has a message",
                 id="message-without-error"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "state": "Downloading", "tiers": [],
                                           "filling": ["dram", "dram"]}]),
                 "status.checkpoints[0].filling[1]: tier dram is listed twice", id="filling-twice"),
    pytest.param(_cache_with(checkpoints=[{"model": "hf://org/a", "state": "Pending", "tiers": [],
                                           "filling": ["remote"]}]),
                 "status.checkpoints[0].filling[0]: remote is not a node tier", id="filling-remote"),
    pytest.param(_cache_with(stores=[{"uri": "hf://"}, {"uri": "hf://", "bandwidthBytesPerSecond": 1}]),
                 'status.stores[1].uri: store "hf://" is listed twice', id="store-twice"),
    pytest.param(_cache_with(summary={"dram": "hf://org/b", "loading": 0, "failed": 0}),
                 'status.summary.dram: must be "hf://org/a" (derived from status.checkpoints), got "hf://org/b"',
                 id="summary-disagrees"),
    pytest.param(_cache_with(summary={"dram": "hf://org/a", "ssd": "hf://org/a", "loading": 2, "failed": 0}),
                 "status.summary.loading: must be 0", id="summary-loading-disagrees"),
    pytest.param(_cache_with(inventoryVersion=-1), "status.inventoryVersion: must be >= 0", id="negative-version"),
])
def test_node_cache_rejects(doc: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_node_cache(doc)
    assert any(str(e).startswith(expected) for e in info.value.errors), [str(e) for e in info.value.errors]


FULL = NodeCache(
    node="node-a",
    tiers=(TierStatus(Tier.DRAM, 8e9, 100, 40), TierStatus(Tier.SSD, None, 1000, 60), TierStatus(Tier.REMOTE)),
    checkpoints=(
        CachedCheckpoint("hf://org/a", 40, (Tier.DRAM, Tier.SSD), "2026-01-01T00:00:00Z"),
        CachedCheckpoint("hf://org/b", 20, (), state=CheckpointState.DOWNLOADING, filling=(Tier.SSD,)),
        CachedCheckpoint("hf://org/c", None, (), state=CheckpointState.PENDING),
        CachedCheckpoint("hf://org/d", None, (), state=CheckpointState.DOWNLOAD_ERROR,
                         message="NotFound: hf://org/d: not in the store"),
    ),
    load_queue=(QueuedLoad("hf://org/b", 12, Tier.REMOTE),),
    observed_time="2026-01-01T00:00:01Z",
    stores=(StoreStatus("hf://", 5e8), StoreStatus("s3://models")),
    inventory_version=7,
)


@pytest.mark.parametrize("cache", [
    pytest.param(FULL, id="every-state"),
    pytest.param(NodeCache("node-a"), id="nothing-published"),
    pytest.param(NodeCache("node-a", tiers=(TierStatus(Tier.REMOTE),)), id="nothing-measured"),
    pytest.param(NodeCache("node-a", (TierStatus(Tier.SSD, 1.0, 10, 0), TierStatus(Tier.REMOTE, 2.0)),
                           tuple(CachedCheckpoint(f"hf://org/m{i:02}", 1, (Tier.SSD,)) for i in range(10))),
                 id="a-long-summary"),
])
def test_node_cache_document_round_trips(cache: NodeCache) -> None:
    doc = node_cache_document(cache)
    assert parse_node_cache(doc) == cache
    assert node_cache_document(parse_node_cache(doc)) == doc
    assert None not in [v for c in doc["status"]["checkpoints"] for v in c.values()]


def test_node_cache_summary_is_what_the_printer_columns_show() -> None:
    doc = node_cache_document(FULL)
    assert doc["status"]["summary"] == {"dram": "hf://org/a", "ssd": "hf://org/a", "loading": 2, "failed": 1}
    many = summarize([CachedCheckpoint(f"hf://org/m{i:02}", 1, (Tier.SSD,)) for i in range(10)])
    assert many.ssd == ", ".join(f"hf://org/m{i:02}" for i in range(8)) + ", +2 more" and many.dram == ""
    columns = {c["name"]: c["jsonPath"] for c in NODE_CACHE_CRD["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["DRAM"] == ".status.summary.dram" and columns["SSD"] == ".status.summary.ssd"
    assert columns["Loading"] == ".status.summary.loading"


def test_node_cache_inventory_takes_only_complete_copies_and_measured_rates() -> None:
    with pytest.raises(ValueError, match=r"node node-a: no bandwidth for tier\(s\) remote$"):
        FULL.inventory(free_slots=1)
    inv = FULL.inventory(free_slots=1, fallback={Tier.REMOTE: 1e8, Tier.SSD: 1e9, Tier.DRAM: 1.0})
    assert dict(inv.checkpoints) == {"hf://org/a": Tier.DRAM}
    assert inv.bandwidth[Tier.DRAM] == 8e9 and inv.bandwidth[Tier.SSD] == 1e9  # measured beats the fallback
    assert dict(inv.remote_bandwidth) == {"hf://": 5e8}
    with pytest.raises(ValueError, match="no complete copy"):
        _ = FULL.checkpoints[1].fastest


def test_node_cache_without_status_has_no_inventory_yet() -> None:
    doc = {k: v for k, v in NODE_CACHE.items() if k != "status"}
    cache = parse_node_cache(doc)
    with pytest.raises(ValueError, match="no inventory published yet"):
        cache.inventory(free_slots=1)


SERVICE_YAML = """\
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: llama
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/initial-scale: "0"
    spec:
      containers:
        - image: x
"""

CONFIGMAP_YAML = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: config-autoscaler
  namespace: knative-serving
data:
  allow-zero-initial-scale: "true"
  stable-window: 30s
"""


def test_manifest_applies_its_config_autoscaler_to_its_services() -> None:
    # initial-scale 0 is only valid because the ConfigMap in the same file allows it.
    m = parse_manifest(SERVICE_YAML + "---\n" + CONFIGMAP_YAML, source="app.yaml")
    assert m.autoscaler is not None and m.autoscaler.stable_window == 30.0
    assert m.services[0].autoscaling.initial_scale == 0
    with pytest.raises(ConfigError, match=r"app.yaml: .*initial-scale"):
        parse_manifest(SERVICE_YAML, source="app.yaml")


@pytest.mark.parametrize("text,expected", [
    pytest.param("a: [1, 2", "app.yaml: <root>: invalid YAML: line 1, column 9", id="syntax"),
    pytest.param("kind: Service\nkind: Service\n", 'invalid YAML: line 2, column 1: duplicate key "kind"',
                 id="duplicate-key"),
    pytest.param("apiVersion: apps/v1\nkind: Deployment\n", 'app.yaml: kind: unsupported object "apps/v1" "Deployment"',
                 id="unsupported-kind"),
    pytest.param(SERVICE_YAML.replace('"0"', '"1"') + "---\n" + SERVICE_YAML.replace('"0"', '"1"'),
                 "defined more than once: Service default/llama", id="duplicate-object"),
    pytest.param("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config-autoscaler}\ndata: {stable-window: 1s}\n",
                 "app.yaml: data.stable-window: must be in [6s, 3600s]", id="bad-configmap"),
])
def test_manifest_rejects(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_manifest(text, source="app.yaml")
    assert expected in str(info.value)


def test_manifest_reports_every_document(tmp_path: Path) -> None:
    bad_policy = "apiVersion: serving.sllm-knative.io/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p}\nspec: {}\n"
    a = tmp_path / "a.yaml"
    a.write_text(SERVICE_YAML.replace('"0"', '"x"') + "---\n" + bad_policy)
    b = tmp_path / "b.yaml"
    b.write_text("apiVersion: v1\nkind: Secret\n")
    with pytest.raises(ConfigError) as info:
        load_manifest(a, b)
    text = str(info.value)
    assert f"{a}#1: spec.template.metadata.annotations" in text
    assert f"{a}#2: spec.target: required field is missing" in text
    assert f"{b}: kind: unsupported object" in text
