"""One logging setup for every component: structured `key=value` lines.

Each line carries the component and, where known, the service, instance, node and checkpoint it
concerns, each field with one meaning everywhere:

    service=     the service key, `namespace/name`
    instance=    an instance (pod) id
    node=        a node name
    checkpoint=  a checkpoint URI (`sllm-knative.io/model`, what the loader fetches and leases)

    2026-11-24T10:00:00.123Z INFO loader_sidecar msg=fetched checkpoint=hf://org/tiny node=n1 bytes=1048576

Use `get_logger(component)` and pass context as keyword arguments:
`log.info("fetched", checkpoint=uri, node=n, bytes=b)`. A line about a service's checkpoint
names both (`service=default/tiny checkpoint=hf://org/tiny`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

_CONFIGURED = False


def _quote(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' ="\n'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{t}.{int(record.msecs):03d}Z", record.levelname, record.name, f"msg={_quote(record.getMessage())}"]
        fields = getattr(record, "fields", None) or {}
        parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str | None = None) -> None:
    """Configure the root logger once per process (level from SLLM_LOG_LEVEL, default INFO)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("SLLM_LOG_LEVEL", "INFO")).upper())
    # Libraries that log every request at INFO (httpx) would put a line and a formatting
    # cost on every proxied request: keep them to warnings.
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _CONFIGURED = True


class Logger:
    """A thin wrapper that turns keyword arguments into structured fields."""

    def __init__(self, name: str, **context: Any) -> None:
        self._log = logging.getLogger(name)
        self._context = context

    def bind(self, **context: Any) -> Logger:
        """A logger that adds these fields (service=, instance=, node=, checkpoint=) to every line."""
        return Logger(self._log.name, **{**self._context, **context})

    def _emit(self, level: int, msg: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, msg, exc_info=exc_info, extra={"fields": {**self._context, **fields}})

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, False, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(logging.INFO, msg, False, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, False, fields)

    def error(self, msg: str, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, exc_info, fields)


def get_logger(component: str, **context: Any) -> Logger:
    return Logger(component, **context)
