"""The checkpoint URI of the `sllm-knative.io/model` annotation.

    hf://org/name[@revision]     a Hugging Face repository (or hf://name for unprefixed ones)
    s3://bucket/prefix           an S3 (or S3-compatible) prefix holding the checkpoint
    https://host[:port]/path     an HTTP store serving the checkpoint files under path
    http://host[:port]/path
    file:///absolute/path        a directory on the node (local mode, tests)

No query strings or fragments: the loader appends file names to the URI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from sllm_knative.config.errors import show

SCHEMES = ("hf", "s3", "https", "http", "file")

_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:\d{1,5})?$")


@dataclass(frozen=True)
class ModelURI:
    """A validated checkpoint location. `authority` is the HF org/name, the S3 bucket or the
    HTTP host; `path` is the rest ("" for hf://)."""

    uri: str
    scheme: str
    authority: str
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.uri


def parse_model_uri(text: object) -> ModelURI:
    """Validate and split a checkpoint URI; raises ValueError saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"must be a checkpoint URI ({', '.join(s + '://' for s in SCHEMES)}), got {show(text)}")
    if any(c.isspace() for c in text):
        raise ValueError(f"must not contain whitespace, got {show(text)}")
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"unsupported scheme in {show(text)}: use one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    parts = urlsplit(text)
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"must not have a query or fragment, got {show(text)}")
    if scheme == "hf":
        return _hf(text)
    if scheme == "s3":
        bucket, key = parts.netloc, parts.path.strip("/")
        if not _S3_BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(f"S3 bucket must be 3-63 characters of a-z, 0-9, '.', '-', got {show(bucket)}")
        if not key:
            raise ValueError(f"must name a prefix inside the bucket (s3://bucket/prefix), got {show(text)}")
        return ModelURI(text, scheme, bucket, "/" + key)
    if scheme in ("http", "https"):
        if not parts.netloc or not _HOST.match(parts.netloc) or "@" in parts.netloc:
            raise ValueError(f"must name a host (and optional port), got {show(parts.netloc)} in {show(text)}")
        if parts.port is not None and not 0 < parts.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {parts.port}")
        return ModelURI(text, scheme, parts.netloc, parts.path or "/")
    # file://
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URIs name a local absolute path (file:///dir), got host {show(parts.netloc)}")
    if not parts.path.startswith("/") or parts.path == "/":
        raise ValueError(f"must name an absolute directory (file:///dir), got {show(text)}")
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        raise ValueError(f"must not contain '.' or '..' segments, got {show(text)}")
    return ModelURI(text, scheme, "", parts.path)


def _hf(text: str) -> ModelURI:
    body = text[len("hf://"):]
    repo, at, revision = body.partition("@")
    if at and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", revision):
        raise ValueError(f"revision after '@' must be a branch, tag or commit, got {show(revision)}")
    segments = repo.split("/")
    if not 1 <= len(segments) <= 2 or not all(_HF_PART.match(s) for s in segments):
        raise ValueError(f"must be hf://org/name or hf://name (letters, digits, '.', '_', '-'), got {show(text)}")
    if any(".." in s or s.endswith(".") for s in segments):
        raise ValueError(f"repository names cannot contain '..' or end with '.', got {show(text)}")
    return ModelURI(text, "hf", repo, "", revision or None)
