"""Paths inside a container, where the container has no mount namespace: `$SLLM_MOUNT_ROOT`.

In a real container a volume is at its mountPath (the loader's tiers at /var/lib/sllm-knative/ssd,
the service account's token at /var/run/secrets/kubernetes.io/serviceaccount/token). The test
node agent (testkit/kube/nodeagent) runs containers as plain processes: it starts each one with
SLLM_MOUNT_ROOT naming a folder that holds a symlink at each mountPath, so the volume mounted at
`/x` is at `$SLLM_MOUNT_ROOT/x`. A component given paths inside its container (flags from a
manifest, the service account's files) joins them to that root. On a real cluster the variable
is unset, and nothing here changes a path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV = "SLLM_MOUNT_ROOT"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def mount_root(env: Mapping[str, str] | None = None) -> str:
    """`$SLLM_MOUNT_ROOT`, or "" (a real container, or no container at all)."""
    return (os.environ if env is None else env).get(ENV, "")


def container_path(path: str | os.PathLike[str], root: str) -> Path:
    """Where the absolute container path `path` is: under `root` when there is one. A relative
    path (relative to the working directory, which the node agent already puts under the root)
    and any path without a root are returned as they are."""
    p = Path(path)
    return Path(root + str(p)) if root and p.is_absolute() else p


def service_account_client(root: str) -> Any:
    """An official `kubernetes` ApiClient from the pod's service account, as
    `kubernetes.config.load_incluster_config` builds it (the token re-read as it rotates), with its
    token and CA certificate under `root`. Raises KubeConfigError outside a pod."""
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    from sllm_knative.kube.client import KubeConfigError

    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise KubeConfigError("no cluster to talk to: KUBERNETES_SERVICE_HOST is not set (not in a pod)")
    sa = container_path(SERVICE_ACCOUNT_DIR, root)
    cfg = client.Configuration()
    InClusterConfigLoader(token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt"),
                          try_refresh_token=True).load_and_set(cfg)
    return client.ApiClient(cfg)


def unix_target(target: str, root: str) -> str:
    """A gRPC target with its unix socket's container path under `root`, through the real path of
    the socket's folder (the node agent's mount folders are deep, and a socket's path is limited
    to 107 bytes); any other target, or no root, is returned as it is."""
    if not root or not target.startswith("unix:///"):
        return target
    sock = container_path(target[len("unix://"):], root)
    return f"unix://{sock.parent.resolve() / sock.name}"
