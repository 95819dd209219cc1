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
from collections.abc import Callable
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


class Repeats:
    """Which lines of a condition that lasts (a service waiting for capacity, a start backing
    off) to log: the first, each one whose text changed, and otherwise one every `every_s`
    seconds; `check` says how many identical lines were left out before the one it lets through."""

    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, tuple[str, float, int]] = {}  # key -> (text, logged at, left out since)

    def check(self, key: str, text: str) -> int | None:
        """None: leave this line out. Otherwise log it, with the count of lines left out since
        the last one logged for `key`."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and last[0] == text and now - last[1] < self.every_s:
            self._last[key] = (last[0], last[1], last[2] + 1)
            return None
        self._last[key] = (text, now, 0)
        return last[2] if last is not None else 0

    def clear(self, key: str) -> None:
        """The condition ended: its next line is logged at once."""
        self._last.pop(key, None)
