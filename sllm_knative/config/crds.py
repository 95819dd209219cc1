"""The CustomResourceDefinitions of group `serving.sllm-knative.io`, as data.

This module is the single source of the ScalingPolicy and NodeCache schemas: the parsers
validate against them, and `manifests/crds/*.yaml` are rendered from them:

    python -m sllm_knative.config crds manifests/crds

(a test fails when the files and this module disagree). Every field has a description, so
`kubectl explain scalingpolicy.spec.keepAlive` answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sllm_knative import atomic
from sllm_knative.config.schema import PATTERN_DNS1035, PATTERN_DURATION

GROUP = "serving.sllm-knative.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

_DURATION = PATTERN_DURATION
_DNS1035 = PATTERN_DNS1035
_TIER_NAMES = ["device", "dram", "ssd", "remote"]


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _i(description: str, minimum: int | None = None, fmt: str = "int64") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer", "format": fmt, "description": description}
    if minimum is not None:
        out["minimum"] = minimum
    return out


def _obj(description: str, properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "description": description, "properties": properties}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def _root(description: str, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return _obj(description, {
        "apiVersion": _s("APIVersion defines the versioned schema of this representation of an object."),
        "kind": _s("Kind is a string value representing the REST resource this object represents."),
        "metadata": {"type": "object"},
        "spec": spec,
        "status": status,
    }, required=["spec"])


_LABEL_SELECTOR = _obj(
    "A label query over the Knative Services of the policy's namespace (the Service's metadata.labels). "
    "The requirements are ANDed; an empty selector matches every Service of the namespace.",
    {
        "matchLabels": {
            "type": "object",
            "description": "Labels a Service must carry, each with exactly this value.",
            "additionalProperties": {"type": "string"},
        },
        "matchExpressions": {
            "type": "array",
            "description": "Label requirements, ANDed.",
            "items": _obj("A label requirement.", {
                "key": _s("The label key."),
                "operator": _s("How the key relates to the values.", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
                "values": {
                    "type": "array",
                    "description": "Values for In and NotIn (non-empty); must be empty for Exists and DoesNotExist.",
                    "items": {"type": "string"},
                },
            }, required=["key", "operator"]),
        },
    },
)

SCALING_POLICY_SCHEMA = _root(
    "ScalingPolicy adds ServerlessLLM scaling behaviour to Knative Services of its namespace: keep-alive, "
    "scale bounds, target concurrency, priority and live migration. Where a field is set it overrides the "
    "Service's autoscaling.knative.dev annotation of the same meaning.",
    _obj("The policy and the Services it applies to.", {
        "target": _obj(
            "The Services the policy applies to: exactly one of serviceName or selector. A policy naming a "
            "Service wins over policies that select it by labels.",
            {"serviceName": _s("The name of one Knative Service in the policy's namespace.",
                               pattern=_DNS1035, maxLength=63),
             "selector": _LABEL_SELECTOR},
            oneOf=[{"required": ["serviceName"]}, {"required": ["selector"]}],
        ),
        "keepAlive": _s("How long an idle instance stays after the last request before the Service scales to "
                        "zero, as a duration (\"30s\", \"5m\"). Replaces Knative's stable-window and "
                        "scale-to-zero grace timing for the last instance. Unset: Knative's rules apply.",
                        pattern=_DURATION),
        "minScale": _i("The fewest instances (overrides autoscaling.knative.dev/min-scale).", 0, "int32"),
        "maxScale": _i("The most instances, 0 for no limit (overrides autoscaling.knative.dev/max-scale).",
                       0, "int32"),
        "targetConcurrency": {
            "type": "number", "minimum": 0.01,
            "description": "Concurrent requests per instance the autoscaler aims at before target utilisation "
                           "applies (overrides autoscaling.knative.dev/target).",
        },
        "priority": _i("Higher values win capacity: placement may stop or migrate instances of Services "
                       "with a priority no higher than the one it starts. Default 0.", None, "int32"),
        "migration": {"type": "boolean",
                      "description": "Whether in-flight generations of these Services may be live-migrated to "
                                     "free a slot or on scale-down. Default true."},
        "minResidency": _s("How long a new instance of these Services is protected once ready: placement does "
                           "not stop or migrate it for another Service meanwhile, so two Services cannot keep "
                           "evicting each other's fresh instances (fair share still may). A duration; "
                           "default 10s.", pattern=_DURATION),
        "fairShareAfter": _s("How long a request of these Services may wait for capacity before a Service "
                             "holding more than one instance gives one up for it (its generations migrate to "
                             "a sibling). A duration, well under the activator's timeout; default 15s.",
                             pattern=_DURATION),
    }, required=["target"]),
    _obj("Observed state, written by the autoscaler.", {
        "observedGeneration": _i("The generation of the spec last acted on.", 0),
        "services": {"type": "array", "description": "Names of the Services the policy currently applies to "
                                                     "(those for which it is the effective policy).",
                     "items": {"type": "string"}},
        "conditions": {"type": "array", "description": "Ready: True when the autoscaler applies the spec "
                                                       "(reason Applied), False when it cannot (InvalidSpec, "
                                                       "the message naming the field).",
                       "items": _obj("A condition, as Knative writes them.", {
                           "type": _s("The condition's type (Ready)."),
                           "status": _s("True, False or Unknown.", enum=["True", "False", "Unknown"]),
                           "reason": _s("One word, CamelCase."),
                           "message": _s("For people."),
                           "lastTransitionTime": _s("When the status last changed (RFC 3339).", format="date-time"),
                       }, required=["type", "status"])},
    }),
)

_TIER = _s("A cache tier: device (resident in device memory), dram (host memory, tmpfs), ssd (local disk) "
           "or remote (the model store).", enum=_TIER_NAMES)

#: Per-checkpoint state on a node, in KServe's LocalModelNode vocabulary (ModelDownloadPending, ...
#: without the prefix). The loader's mapping is in docs/configuration.md (NodeCache).
CHECKPOINT_STATES = ["Pending", "Downloading", "Downloaded", "DownloadError"]

NODE_CACHE_SCHEMA = _root(
    "NodeCache is the checkpoint inventory of one node, published by its loader: the cache tiers with their "
    "capacity and measured bandwidth, the checkpoints each tier holds and the loads queued. Placement reads "
    "it to estimate where a model starts fastest.",
    _obj("The node this inventory describes, and the checkpoints the autoscaler asks its loader to warm.", {
        "nodeName": _s("The Kubernetes Node (or local node) name.", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                       maxLength=253),
        "warm": {
            "type": "array", "maxItems": 16,
            "description": "Checkpoints to move towards the loader's DRAM tier now, written by the autoscaler when it "
                           "places an instance on this node (before the pod exists). The loader starts each request "
                           "once; requests older than ten minutes are ignored.",
            "items": _obj("One warm request.", {
                "model": _s("The checkpoint URI, as in the sllm-knative.io/model annotation.", minLength=1,
                            maxLength=2048),
                "tier": _s("The tier to fill.", enum=["dram", "ssd"]),
                "requestedAt": _s("When the autoscaler asked (RFC 3339).", format="date-time"),
            }, required=["model", "requestedAt"]),
        },
    }, required=["nodeName"]),
    _obj("The inventory, written by the node's loader (the only writer: a status written by anyone else is "
         "rewritten from the loader's own state).", {
        "observedTime": _s("When the loader took this inventory (RFC 3339). The loader rewrites the status at "
                           "least every resync period, so an old time means the loader is not running.",
                           format="date-time"),
        "inventoryVersion": _i("The loader's inventory version this status was taken from: it grows with every "
                               "change on the node and starts again from 1 when the loader restarts.", 0),
        "tiers": {
            "type": "array",
            "description": "One entry per tier the node has, each listed once. The remote entry gives the "
                           "node's bandwidth from the model store and has no capacity.",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "items": _obj("A cache tier of the node.", {
                "name": _TIER,
                "capacityBytes": _i("Bytes the tier may hold (absent for remote).", 0),
                "usedBytes": _i("Bytes the tier holds now.", 0),
                "bandwidthBytesPerSecond": {
                    "type": "number", "minimum": 0, "exclusiveMinimum": True,
                    "description": "Measured rate of loading from this tier into the device, bytes per second "
                                   "(profiled at start, updated from observed loads). Absent until measured: "
                                   "the remote tier's is the fastest store measured so far.",
                },
            }, required=["name"]),
        },
        "stores": {
            "type": "array",
            "description": "The model stores the loader may fetch from, each with its own measured rate.",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["uri"],
            "items": _obj("A model store root.", {
                "uri": _s("The store root (file://, http(s)://, hf://, s3://)."),
                "bandwidthBytesPerSecond": {
                    "type": "number", "minimum": 0, "exclusiveMinimum": True,
                    "description": "Measured rate of fetching from this store, bytes per second (absent until "
                                   "the first fetch from it).",
                },
            }, required=["uri"]),
        },
        "checkpoints": {
            "type": "array",
            "description": "The checkpoints on the node or on their way to it, each listed once.",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["model"],
            "items": _obj("A checkpoint and where the node holds it.", {
                "model": _s("The checkpoint URI (the sllm-knative.io/model annotation)."),
                "state": _s("Downloaded: a complete, verified copy is in at least one tier. Downloading: bytes "
                            "are arriving, no complete copy yet. Pending: asked for, no bytes yet (reading its "
                            "index, waiting for room). DownloadError: the last attempt failed and no copy is "
                            "left (see message). Absent means Downloaded.", enum=CHECKPOINT_STATES),
                "sizeBytes": _i("Total size of the checkpoint's files (absent while not known).", 1),
                "tiers": {"type": "array", "description": "The tiers holding a complete copy (empty unless "
                                                          "Downloaded).",
                          "items": _TIER},
                "filling": {"type": "array", "description": "The tiers where a copy is being filled now.",
                            "items": _TIER},
                "message": _s("Why the last attempt failed (DownloadError)."),
                "lastUsedTime": _s("When an instance last loaded it (RFC 3339).", format="date-time"),
            }, required=["model", "tiers"]),
        },
        "loadQueue": {
            "type": "array",
            "description": "Loads queued on the node's loader, in order; the first is running.",
            "items": _obj("A queued load.", {
                "model": _s("The checkpoint URI being loaded."),
                "tier": _TIER,
                "remainingBytes": _i("Bytes still to load.", 0),
            }, required=["model", "tier", "remainingBytes"]),
        },
        "summary": _obj("Derived from checkpoints, for `kubectl get nodecaches` (a printer column cannot "
                        "filter a list).", {
            "dram": _s("The checkpoints with a complete copy in DRAM, comma-separated (at most 8, then "
                       "\"+N more\")."),
            "ssd": _s("The checkpoints with a complete copy on the SSD, likewise."),
            "loading": _i("How many checkpoints are Pending or Downloading.", 0, "int32"),
            "failed": _i("How many checkpoints are in DownloadError.", 0, "int32"),
        }),
    }),
)

def _crd(kind: str, plural: str, short: list[str], scope: str, schema: dict[str, Any],
         columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "sllm-knative", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["sllm-knative"],
            },
            "scope": scope,
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns + [
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


SCALING_POLICY_CRD = _crd("ScalingPolicy", "scalingpolicies", ["slp"], "Namespaced", SCALING_POLICY_SCHEMA, [
    {"name": "Service", "type": "string", "jsonPath": ".spec.target.serviceName"},
    {"name": "KeepAlive", "type": "string", "jsonPath": ".spec.keepAlive"},
    {"name": "Min", "type": "integer", "jsonPath": ".spec.minScale"},
    {"name": "Max", "type": "integer", "jsonPath": ".spec.maxScale"},
    {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"},
    {"name": "Services", "type": "string", "jsonPath": ".status.services"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
])

NODE_CACHE_CRD = _crd("NodeCache", "nodecaches", ["ncache"], "Cluster", NODE_CACHE_SCHEMA, [
    {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
    {"name": "DRAM", "type": "string", "jsonPath": ".status.summary.dram"},
    {"name": "SSD", "type": "string", "jsonPath": ".status.summary.ssd"},
    {"name": "Loading", "type": "integer", "jsonPath": ".status.summary.loading"},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.summary.failed", "priority": 1},
    {"name": "Observed", "type": "date", "jsonPath": ".status.observedTime"},
])

#: file name in manifests/crds -> CRD
CRDS: dict[str, dict[str, Any]] = {
    "scalingpolicy.yaml": SCALING_POLICY_CRD,
    "nodecache.yaml": NODE_CACHE_CRD,
}

_HEADER = "# Generated by `python -m sllm_knative.config crds manifests/crds` from sllm_knative/config/crds.py.\n"


def render(crd: dict[str, Any]) -> str:
    """The CRD as the YAML file committed under manifests/crds."""
    return _HEADER + yaml.safe_dump(crd, sort_keys=False, width=100, allow_unicode=True)


def write(directory: Path) -> list[Path]:
    """Render every CRD into `directory` (atomically: temporary file, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, crd in CRDS.items():
        target = directory / name
        atomic.write_text(target, render(crd))
        written.append(target)
    return written
