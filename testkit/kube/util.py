"""Small helpers for whatever drives the test control plane (tests and benchmarks alike)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

WEBHOOK_MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "autoscaler" / "webhook.yaml"


def until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `cond` until it returns something truthy (an exception counts as not yet); its value.
    Raises AssertionError naming `what` and the last error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # the condition may race the API server; report the last error
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f" (last error: {last!r} {getattr(last, 'body', '') or ''})" if last else ""))


def webhook_config(url: str, pods_namespace: str, install_namespace: str) -> dict[str, Any]:
    """manifests/autoscaler/webhook.yaml's MutatingWebhookConfiguration, called at `url` (the test
    cluster has no Service networking), narrowed to `pods_namespace` (labelled `sllm-test`), so the
    rest of the cluster (other tests on this control plane) is left alone."""
    doc = next(d for d in yaml.safe_load_all(WEBHOOK_MANIFEST.read_text())
               if d and d["kind"] == "MutatingWebhookConfiguration")
    for wh in doc["webhooks"]:
        wh["clientConfig"] = {"url": url, "caBundle": ""}
        for expr in wh["namespaceSelector"]["matchExpressions"]:
            if expr["key"] == "kubernetes.io/metadata.name":
                expr["values"] = ["kube-system", install_namespace]
        wh["namespaceSelector"]["matchExpressions"].append(
            {"key": "sllm-test", "operator": "In", "values": [pods_namespace]})
    return dict(doc)
