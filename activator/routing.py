"""Which service a request is for: pure functions of the Host header, path and body.

Knative style: `Host: <service>.<namespace>.<domain>` (or `<service>.<namespace>`, or
`<service>.<namespace>.svc.cluster.local`). For the OpenAI paths, the JSON body's `model`
names the service when the Host does not (`<service>` or `<namespace>/<service>`).
"""

from __future__ import annotations

import json

from sllm_knative.api.keys import ServiceKey

__all__ = ["OPENAI_PATHS", "ServiceKey", "model_from_body", "service_from_host", "service_from_model"]

OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def service_from_host(host: str | None, known: frozenset[ServiceKey] | set[ServiceKey]) -> ServiceKey | None:
    """The service a Knative-style Host names, if it is one we serve."""
    if not host:
        return None
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    labels = name.lower().split(".")
    if len(labels) < 2:
        return None
    key = ServiceKey(labels[1], labels[0])
    return key if key in known else None


def model_from_body(body: bytes) -> str | None:
    """The `model` field of an OpenAI request body (None when absent or not JSON)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) else None


def service_from_model(model: str | None, known: frozenset[ServiceKey] | set[ServiceKey],
                       default_namespace: str = "default") -> ServiceKey | None:
    if not model:
        return None
    ns, _, name = model.rpartition("/")
    key = ServiceKey(ns or default_namespace, name)
    return key if key in known else None
