"""Where a node's loader sidecar listens, as its clients and the sidecar itself agree on it."""

from __future__ import annotations

import os
import re
import socket


def default_node() -> str:
    """This host's name as a node name (letters, digits and `._-`, at most 63)."""
    name = socket.gethostname().split(".")[0] or "node"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:63]


def default_listen(node: str) -> str:
    """The sidecar's default gRPC address on a node: a Unix socket under /tmp."""
    return f"unix:///tmp/sllm-knative/{node}/loader.sock"


def default_target() -> str:
    """The loader a client talks to by default: $SLLM_LOADER, else this node's default socket."""
    return os.environ.get("SLLM_LOADER") or default_listen(os.environ.get("SLLM_NODE") or default_node())
