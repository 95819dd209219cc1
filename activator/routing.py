"""Which service a request is for: pure functions of the Host header, path and body.

Knative style: `Host: <service>.<namespace>.<domain>` (or `<service>.<namespace>`, or
`<service>.<namespace>.svc.cluster.local`). For the OpenAI paths, the JSON body's `model`
names the service when the Host does not (`<service>` or `<namespace>/<service>`).
`GET /v1/models` without a Host that names a service lists every service routed here, each
under the `model` name that routes to it (`model_id`).
"""

from __future__ import annotations

import json

from sllm_knative.api.keys import ServiceKey

__all__ = ["MODELS_PATH", "OPENAI_PATHS", "ServiceKey", "model_card", "model_id", "model_list",
           "names_service", "requested_model", "service_from_host", "service_from_model"]

OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MODELS_PATH = "/v1/models"


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


def names_service(host: str | None) -> bool:
    """Whether a Host has a service's shape (`<service>.<namespace>...`), as opposed to an address
    (an IP, `localhost`): an unknown one is then a service that does not exist here."""
    if not host or host.startswith("["):
        return False
    labels = host.rsplit(":", 1)[0].split(".")
    return len(labels) >= 2 and not all(label.isdigit() for label in labels)


def requested_model(body: bytes) -> str:
    """The `model` of an OpenAI request body; ValueError saying what is wrong with the body."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"the request body must be a JSON object, not {type(doc).__name__}")
    model = doc.get("model")
    if model is None:
        raise ValueError("the request body names no 'model' (the service to route to)")
    if not isinstance(model, str):
        raise ValueError(f"'model' must be a string, not {type(model).__name__}")
    return model


def model_id(key: ServiceKey, default_namespace: str = "default") -> str:
    """The `model` name that routes to a service: its name in the default namespace, else namespace/name."""
    return key.name if key.namespace == default_namespace else f"{key.namespace}/{key.name}"


def model_card(key: ServiceKey, created: int, default_namespace: str = "default") -> dict[str, object]:
    return {"id": model_id(key, default_namespace), "object": "model", "created": created, "owned_by": "sllm-knative"}


def model_list(services: dict[ServiceKey, int], default_namespace: str = "default") -> dict[str, object]:
    """OpenAI's model list for the services routed here (key -> when the activator learned of it)."""
    return {"object": "list", "data": [model_card(k, services[k], default_namespace)
                                       for k in sorted(services, key=lambda k: (k.namespace, k.name))]}


def service_from_model(model: str | None, known: frozenset[ServiceKey] | set[ServiceKey],
                       default_namespace: str = "default") -> ServiceKey | None:
    if not model:
        return None
    ns, _, name = model.rpartition("/")
    key = ServiceKey(ns or default_namespace, name)
    return key if key in known else None
