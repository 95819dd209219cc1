"""The YAML a model owner writes for one LLM: a Knative Service plus a keep-alive ScalingPolicy.

One template for the demo, the end-to-end tests and the benchmarks; the result is parsed and
validated like any applied file (sllm_knative.config), so it must stay a valid Knative Service.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

# Knative lets a revision start at zero instances (cold on its first request) only when the
# cluster allows it; its default initial scale is 1.
ALLOW_ZERO_INITIAL_SCALE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: config-autoscaler
  namespace: knative-serving
data:
  allow-zero-initial-scale: "true"
"""


def service_manifest(name: str, model: str, *, namespace: str = "default", keep_alive: str = "5s",
                     window: str = "6s", max_scale: int = 2, container_concurrency: int = 4,
                     initial_scale: int | None = None, args: tuple[str, ...] = (),
                     policy: Mapping[str, object] | None = None, timeout_seconds: int | None = None) -> str:
    """Knative Service `name` serving checkpoint `model`, with a ScalingPolicy keep-alive (and
    the further ScalingPolicy spec fields in `policy`: priority, minResidency, ...).
    `timeout_seconds`: the revision's timeoutSeconds (also how long the activator holds a request)."""
    annotations = {
        "autoscaling.knative.dev/class": "llm.autoscaling.sllm-knative.io",
        "autoscaling.knative.dev/window": window,
        "autoscaling.knative.dev/max-scale": str(max_scale),
        "sllm-knative.io/model": model,
    }
    if initial_scale is not None:
        annotations["autoscaling.knative.dev/initial-scale"] = str(initial_scale)
    ann = "\n".join(f"        {k}: {json.dumps(v)}" for k, v in annotations.items())
    container = "        - image: sllm-knative/llm-function"
    if args:
        container += f"\n          args: {json.dumps(list(args))}"
    timeout = f"\n      timeoutSeconds: {timeout_seconds}" if timeout_seconds is not None else ""
    return f"""\
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
spec:
  template:
    metadata:
      annotations:
{ann}
    spec:
      containerConcurrency: {container_concurrency}{timeout}
      containers:
{container}
---
apiVersion: serving.sllm-knative.io/v1alpha1
kind: ScalingPolicy
metadata:
  name: {name}-keepalive
  namespace: {namespace}
spec:
  target:
    serviceName: {name}
  keepAlive: {keep_alive}
""" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in (policy or {}).items())
