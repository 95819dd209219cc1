"""The wire protocol of a node's zygote, the local cluster's pre-imported instance runtime.

The zygote is a process of the function side (`python -m functions.zygote SOCKET`,
functions/zygote.py): it imports torch, transformers, the loader client and the inference
function once, then forks an instance per request. This module is what both sides share, so
neither imports the other: one request per connection, a JSON line

    {"argv": ["--checkpoint", "...", "--loader", "unix:///...", ...], "log": "/path/inst.log",
     "env": {"SLLM_INSTANCE": "..."}}

answered by one JSON line, `{"pid": 1234}` or `{"error": "..."}`. `argv` is what
`python -m functions.llm` takes: the instance leases its checkpoint from the node's loader
itself (`--checkpoint`, `--loader`, `--lease-timing`); the zygote only forks.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any


@dataclasses.dataclass(frozen=True)
class SpawnRequest:
    argv: list[str]
    log: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode() + b"\n"

    @classmethod
    def decode(cls, line: str | bytes) -> SpawnRequest:
        """Parse one request line; ValueError naming what is wrong."""
        doc: Any = json.loads(line)
        if not isinstance(doc, dict):
            raise ValueError("request must be a JSON object")
        argv, log, env = doc.get("argv"), doc.get("log"), doc.get("env") or {}
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("request needs argv (a list of strings)")
        if not isinstance(log, str) or not log:
            raise ValueError("request needs log (a file path)")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env must map names to strings")
        unknown = set(doc) - {"argv", "log", "env"}
        if unknown:
            raise ValueError(f"unknown request fields: {', '.join(sorted(unknown))}")
        return cls(list(argv), log, dict(env))


def reply(pid: int | None = None, error: str | None = None) -> bytes:
    return json.dumps({"pid": pid} if error is None else {"error": error}).encode() + b"\n"


def spawn_via(path: str, argv: list[str], log: str, env: dict[str, str] | None = None,
              timeout: float = 10.0) -> int:
    """Ask the zygote listening at `path` for a new instance running `argv`; returns its pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(SpawnRequest(list(argv), log, dict(env or {})).encode())
        answer = json.loads(s.makefile("r").readline())
    if "error" in answer:
        raise RuntimeError(f"zygote {path}: {answer['error']}")
    return int(answer["pid"])
