"""The one Kubernetes client every component uses: the official `kubernetes` package.

`connect()` builds an `ApiClient` from an explicit kubeconfig, `$KUBECONFIG`, or the pod's
service account (in-cluster), and fails with a message that says which of those it tried.
`Kube` bundles the API groups we call on one client. `Resource` names a custom resource
(group, version, plural) once, for `CustomObjectsApi` calls and for RBAC.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sllm_knative.config.crds import GROUP as SLLM_GROUP
from sllm_knative.config.crds import VERSION as SLLM_VERSION


class KubeConfigError(RuntimeError):
    """No way to reach a cluster was configured."""


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PODAUTOSCALERS = Resource("autoscaling.internal.knative.dev", "v1alpha1", "podautoscalers", "PodAutoscaler")
SERVERLESSSERVICES = Resource("networking.internal.knative.dev", "v1alpha1", "serverlessservices",
                              "ServerlessService")
REVISIONS = Resource("serving.knative.dev", "v1", "revisions", "Revision")
NODECACHES = Resource(SLLM_GROUP, SLLM_VERSION, "nodecaches", "NodeCache", namespaced=False)
SCALINGPOLICIES = Resource(SLLM_GROUP, SLLM_VERSION, "scalingpolicies", "ScalingPolicy")


def connect(kubeconfig: str | os.PathLike[str] | None = None) -> Any:
    """An `ApiClient`: from `kubeconfig`, else `$KUBECONFIG`, else the pod's service account."""
    from kubernetes import config

    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG", "")
    if path:
        if not os.path.exists(path):
            raise KubeConfigError(f"kubeconfig {path} does not exist")
        return config.new_client_from_config(config_file=path)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        # The service account's token and CA, under $SLLM_MOUNT_ROOT where a container has no
        # mount namespace (the test node agent; sllm_knative.mounts), at their usual path otherwise.
        from sllm_knative.mounts import mount_root, service_account_client

        return service_account_client(mount_root())
    raise KubeConfigError("no cluster to talk to: pass --kubeconfig, set KUBECONFIG, or run in a pod "
                          "(KUBERNETES_SERVICE_HOST is not set)")


class Kube:
    """The API groups the components call, on one `ApiClient`. The custom-resource helpers pass
    keyword arguments through to the client (for example `_request_timeout`)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    @cached_property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @cached_property
    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api)

    @cached_property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    @cached_property
    def coordination(self) -> Any:
        from kubernetes import client

        return client.CoordinationV1Api(self.api)

    @cached_property
    def admission(self) -> Any:
        from kubernetes import client

        return client.AdmissionregistrationV1Api(self.api)

    @cached_property
    def discovery(self) -> Any:
        from kubernetes import client

        return client.DiscoveryV1Api(self.api)

    # -- custom resources, named once ------------------------------------------------------

    def get(self, res: Resource, name: str, namespace: str = "", **kw: Any) -> dict[str, Any]:
        if res.namespaced:
            return self.custom.get_namespaced_custom_object(res.group, res.version, namespace, res.plural, name, **kw)
        return self.custom.get_cluster_custom_object(res.group, res.version, res.plural, name, **kw)

    def list(self, res: Resource, namespace: str = "", **kw: Any) -> dict[str, Any]:
        if res.namespaced and namespace:
            return self.custom.list_namespaced_custom_object(res.group, res.version, namespace, res.plural, **kw)
        return self.custom.list_cluster_custom_object(res.group, res.version, res.plural, **kw)

    def create(self, res: Resource, body: dict[str, Any], namespace: str = "", **kw: Any) -> dict[str, Any]:
        if res.namespaced:
            return self.custom.create_namespaced_custom_object(res.group, res.version, namespace, res.plural, body, **kw)
        return self.custom.create_cluster_custom_object(res.group, res.version, res.plural, body, **kw)

    def replace(self, res: Resource, name: str, body: dict[str, Any], namespace: str = "", **kw: Any) -> dict[str, Any]:
        if res.namespaced:
            return self.custom.replace_namespaced_custom_object(res.group, res.version, namespace, res.plural,
                                                                name, body, **kw)
        return self.custom.replace_cluster_custom_object(res.group, res.version, res.plural, name, body, **kw)

    def replace_status(self, res: Resource, name: str, body: dict[str, Any], namespace: str = "", **kw: Any) -> dict[str, Any]:
        """Write `status` through the status subresource (optimistic: `body` carries resourceVersion)."""
        if res.namespaced:
            return self.custom.replace_namespaced_custom_object_status(res.group, res.version, namespace,
                                                                       res.plural, name, body, **kw)
        return self.custom.replace_cluster_custom_object_status(res.group, res.version, res.plural, name, body, **kw)

    def delete(self, res: Resource, name: str, namespace: str = "", **kw: Any) -> Any:
        if res.namespaced:
            return self.custom.delete_namespaced_custom_object(res.group, res.version, namespace, res.plural, name, **kw)
        return self.custom.delete_cluster_custom_object(res.group, res.version, res.plural, name, **kw)


def is_status(exc: BaseException, *codes: int) -> bool:
    """True when `exc` is an API error with one of these HTTP status codes."""
    from kubernetes.client.rest import ApiException

    return isinstance(exc, ApiException) and exc.status in codes


def error_message(exc: BaseException) -> str:
    """The API server's message for an API error (its `Status.message`), else str(exc)."""
    import json

    body = getattr(exc, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message") or body)
        except (ValueError, AttributeError):
            return str(body)
    return str(exc)
