"""Atomic files: a reader sees the old content or the new, never a half-written file.

Write to a temporary name in the same directory, fsync it, rename it over the target, then fsync
the directory so the rename itself survives a crash. Every component that publishes a file
another process may read (indexes, markers, state files, rendered manifests, results) uses these.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: Path) -> None:
    """Persist the directory entry changes (creates, renames) made in `directory`."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden temporary name beside `path` (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def open_atomic(path: Path, mode: str = "w", durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file to write `path`; on a clean exit it replaces `path`, else it is removed.

    durable=False skips the fsyncs, for files that only need to be whole, not to survive a crash
    (benchmark results, a supervisor's state)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_text(path: Path, text: str, durable: bool = True) -> None:
    with open_atomic(path, "w", durable) as f:
        f.write(text)


def write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    with open_atomic(path, "wb", durable) as f:
        f.write(data)


def write_json(path: Path, doc: Any, durable: bool = True, **dumps: Any) -> None:
    with open_atomic(path, "w", durable) as f:
        json.dump(doc, f, **dumps)
