"""The internal-API token, defined once for every end.

An instance started with `SLLM_INTERNAL_TOKEN` refuses every internal call (health probes
excepted) that lacks `Authorization: Bearer <token>`; the activator and the autoscaler read the
same variable and send the header on every call; `sllm up` draws one token per cluster and puts
it in every process's environment (docs/migration.md, "Authentication").
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

TOKEN_ENV = "SLLM_INTERNAL_TOKEN"  # the environment variable (never a flag: it would show in ps)
HEADER = "authorization"
SCHEME = "Bearer"


def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The token (None when unset or empty: no token required or sent)."""
    return (os.environ if env is None else env).get(TOKEN_ENV) or None


def header_value(token: str) -> str:
    return f"{SCHEME} {token}"


def auth_headers(token: str | None) -> dict[str, str]:
    """The headers of a call to an internal API (none without a token)."""
    return {HEADER: header_value(token)} if token else {}


def token_ok(given: bytes | str | None, token: str | None) -> bool:
    """Whether a request's Authorization value grants access (always, when no token is set);
    compared in constant time."""
    if not token:
        return True
    if given is None:
        return False
    raw = given.encode("latin-1") if isinstance(given, str) else given
    return hmac.compare_digest(raw, header_value(token).encode())
