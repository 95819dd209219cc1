"""Pure helpers of the public request path: what the activator reads from a request's head,
which headers travel in each direction, the target as received, and reading the body.

Nothing here awaits anything but the body; the layers (activator/handlers/) call these.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable
from urllib.parse import quote

from starlette.types import Receive, Scope

from activator import errors
from sllm_knative.api import activator as admin_api
from sllm_knative.api import instance as instance_api

# Not forwarded in either direction: connection-level fields, and the framing and addressing that
# the activator sets itself (Host is the instance's, lengths are recomputed). `date`/`server`
# of the instance are dropped as nginx does; the activator's server adds its own.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
                        b"proxy-connection"})
# Paths of the internal APIs (an instance's migration API, the activator's admin API): never
# forwarded from the public port.
INTERNAL_PREFIXES = (instance_api.ROOT, admin_api.ROOT)
# The activator names each generation it forwards (the instance uses the name as the generation
# id), so a migration can find a non-streaming one before its response exists. Never taken
# from a client.
GENERATION_ID = instance_api.GENERATION_ID_HEADER.encode()
# Not passed on to the client: hop-by-hop headers, the instance's date and server, and its
# answer naming a movable generation (the activator's business; the id is the response's own).
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", GENERATION_ID}


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


@dataclasses.dataclass(frozen=True)
class RequestHead:
    """What the activator reads from a request's headers, and the ones it forwards."""

    host: str | None
    content_length: bytes | None
    chunked: bool
    probe: bool  # Knative's network probe (`K-Network-Probe`)
    probe_hash: bytes
    forward: list[tuple[bytes, bytes]]

    @property
    def has_body(self) -> bool:
        return self.chunked or (self.content_length is not None and self.content_length != b"0")


def split_headers(raw: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """One pass over the ASGI headers (names in lower case): routing fields out, hop-by-hop ones dropped."""
    host = length = None
    chunked = probe = False
    probe_hash = b""
    forward = []
    for name, value in raw:
        if name in HOP_BY_HOP:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            continue
        if name == b"k-network-probe":
            probe = bool(value)
        elif name == b"k-network-hash":
            probe_hash = value
        elif name == GENERATION_ID:
            continue
        forward.append((name, value))
    return RequestHead(host, length, chunked, probe, probe_hash, forward)


def is_internal(path: str) -> bool:
    """Whether a (percent-decoded) path names an internal API, dot segments and repeated
    slashes resolved as the instance's server might."""
    if "//" in path or "/." in path:
        path = posixpath.normpath("/" + path.lstrip("/"))
    return path.startswith(INTERNAL_PREFIXES)


def request_target(scope: Scope) -> bytes:
    """Path and query as the client sent them (not re-encoded)."""
    raw = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
    query = scope.get("query_string")
    return raw + b"?" + query if query else raw


def response_headers(upstream: list[tuple[bytes, bytes]], instance: str) -> list[tuple[bytes, bytes]]:
    """The instance's response headers for the client, duplicates (set-cookie) kept, plus which instance answered."""
    out = [(n, v) for n, v in upstream if n not in RESPONSE_DROP]
    out.append((b"x-sllm-instance", instance.encode("latin-1")))
    return out


async def read_body(receive: Receive, head: RequestHead, limit: int) -> bytes:
    """The whole request body (TooLarge past `limit`; ClientGone if the client leaves)."""
    declared = head.content_length
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.TooLarge(f"request body of {declared.decode()} bytes exceeds the {limit}-byte limit")
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.TooLarge(f"request body exceeds the {limit}-byte limit")
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)
