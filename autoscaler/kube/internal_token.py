"""The internal token on Kubernetes (sllm_knative/api/auth.py): one random token per install, kept in
the Secret `sllm-knative-internal` (key `token`) in the autoscaler's namespace and copied into the
activator's (`knative-serving`), where the activator Deployment reads it into its environment, and
into each namespace with a pod of our class (`copy_token`, called by the Kubernetes backend before
it pins the pod), where the placement webhook points the function container's
`SLLM_INTERNAL_TOKEN` at it: the function pods' internal API then wants the token.

The autoscaler makes it at start: it reads the Secret in its own namespace, creates it with a
fresh token when it is missing (two replicas starting at once: one create wins, the other reads
the winner's), and makes the copy in each other namespace the same way. A copy that holds another
token is left alone and reported: the activator would refuse the autoscaler's calls, so the log
says which Secret to delete. A namespace that does not exist (no Knative install yet) is skipped.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence

from sllm_knative.kube.client import Kube, is_status
from sllm_knative.log import get_logger

_log = get_logger("autoscaler.kube")

SECRET = "sllm-knative-internal"
KEY = "token"


def _read(kube: Kube, namespace: str) -> str | None:
    """The token in `namespace`'s Secret, None when there is none."""
    try:
        secret = kube.core.read_namespaced_secret(SECRET, namespace, _request_timeout=15)
    except Exception as exc:
        if is_status(exc, 404):
            return None
        raise
    raw = (secret.data or {}).get(KEY)
    return base64.b64decode(raw).decode() if raw else None


def _create(kube: Kube, namespace: str, token: str) -> str:
    """Create the Secret holding `token`; the token that won when another replica was first."""
    body = {"metadata": {"name": SECRET, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "sllm-knative"}},
            "type": "Opaque", "data": {KEY: base64.b64encode(token.encode()).decode()}}
    try:
        kube.core.create_namespaced_secret(namespace, body, _request_timeout=15)
        _log.info("internal token created", secret=f"{namespace}/{SECRET}")
        return token
    except Exception as exc:
        if is_status(exc, 409):
            return _read(kube, namespace) or token
        raise


def copy_token(kube: Kube, namespace: str, token: str) -> bool:
    """The Secret in `namespace` holds `token`: read, or made when missing. False when it holds
    another token (logged: whoever reads that copy refuses this install's calls, or is refused)."""
    there = _read(kube, namespace) or _create(kube, namespace, token)
    if there != token:
        _log.error("the internal token's copy differs from the install's: delete it (the autoscaler makes it again)",
                   secret=f"{namespace}/{SECRET}")
        return False
    return True


def ensure_token(kube: Kube, home: str, copies: Sequence[str] = ()) -> str:
    """The install's internal token: from `home`'s Secret (made when missing), copied to `copies`."""
    token = _read(kube, home) or _create(kube, home, secrets.token_urlsafe(32))
    for namespace in copies:
        try:
            copy_token(kube, namespace, token)
        except Exception as exc:
            if is_status(exc, 404):  # the namespace is not there (yet)
                _log.warning("no namespace for the internal token's copy", secret=f"{namespace}/{SECRET}")
                continue
            raise
    return token
