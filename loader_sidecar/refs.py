"""Model references: which configured store a checkpoint comes from and where it lives on disk.

A store root is configured by the operator (`--store`): `file:///abs/dir`, `http(s)://host[:port]/prefix`,
`hf://` (the whole hub) or `hf://org`, `s3://bucket[/prefix]`. A model reference is either a
checkpoint URI under one of those roots (`hf://org/name@rev`, `s3://bucket/prefix/name`) or a bare
name (`org/name`), resolved against the first root. Everything here is pure: parse, validate, name.

The URI grammar is the library's (sllm_knative.config.model_uri), the same parser `apply` runs on
the `sllm-knative.io/model` annotation: a URI it rejects is rejected here with the very same
message, and one it accepts resolves here once a store covers it. A bare name is joined to the
first root and the result goes through that grammar too, so every ModelRef.uri is a valid
checkpoint URI. What is the loader's own: the store roots, which store a URI lies under, the
default revision and the on-disk key, built from the validated name plus a hash of the canonical
URI, so two stores holding the same name never share a cache directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from urllib.parse import urlsplit

from sllm_knative.config.model_uri import (
    DEFAULT_REVISION,
    SCHEMES,
    ModelURI,
    ModelURIError,
    is_hf_part,
    is_host,
    is_path_segment,
    is_s3_bucket,
    parse_model_uri,
    quote,
)
from sllm_knative.loader.errors import BadRequest

__all__ = ["DEFAULT_REVISION", "SCHEMES", "ModelRef", "StoreRoot", "parse_store", "parse_uri", "resolve"]


@dataclasses.dataclass(frozen=True)
class StoreRoot:
    """A configured store: `scheme://host/prefix` with a validated prefix (no trailing slash)."""

    scheme: str
    host: str  # http(s): host[:port]; s3: bucket; file/hf: ""
    prefix: str  # segments joined by "/", may be "" (file: the absolute path without its leading "/")

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return f"file:///{self.prefix}"
        if self.scheme == "hf":
            return f"hf://{self.prefix}"
        return f"{self.scheme}://{self.host}" + (f"/{self.prefix}" if self.prefix else "")


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """One checkpoint: its store root, its name under that root and (hf) its revision."""

    store: StoreRoot
    name: str
    revision: str | None = None

    @property
    def path(self) -> str:
        """The checkpoint's path within the store host: prefix + name."""
        return f"{self.store.prefix}/{self.name}" if self.store.prefix else self.name

    @property
    def uri(self) -> str:
        """The canonical checkpoint URI (ModelURI.canonical of any spelling of this checkpoint)."""
        if self.store.scheme == "hf":
            return f"hf://{self.path}@{self.revision}"
        return f"{self.store.uri}/{self.name}"

    @property
    def key(self) -> str:
        """Directory name in the tiers: readable, unique per canonical URI, never a path, never
        hidden (it starts with a letter or digit)."""
        base = self.path if self.store.scheme == "hf" else self.name
        readable = base + (f"--{self.revision}" if self.revision else "")
        readable = readable.replace("/", "--").lstrip("._-") or "model"
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        return f"{readable[:120]}-{digest}"


def _root_segments(path: str, where: str) -> None:
    for seg in path.split("/"):
        if not is_path_segment(seg):
            raise BadRequest(f"{where}: segment {seg!r} of {path!r} is not a valid name "
                             "(1-255 letters, digits and '._-'; not empty, '.' or '..')")


def parse_store(uri: str) -> StoreRoot:
    """Validate a configured store root; raises BadRequest naming the problem."""
    where = f"store {uri!r}"
    if any(not 33 <= ord(c) <= 126 for c in uri) or "%" in uri or "\\" in uri:
        raise BadRequest(f"{where}: whitespace, control characters, escapes and backslashes are not allowed")
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme not in SCHEMES or not uri.startswith(f"{scheme}://"):
        raise BadRequest(f"{where}: scheme must be one of {', '.join(SCHEMES)} (written scheme://...)")
    if parts.query or parts.fragment or "?" in uri or "#" in uri or "@" in uri:
        raise BadRequest(f"{where}: queries, fragments, credentials and revisions in the URI are not allowed")
    path = parts.path.strip("/")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BadRequest(f"{where}: file URIs name a local path (file:///abs/dir)")
        if not parts.path.startswith("/") or not path:
            raise BadRequest(f"{where}: needs an absolute directory, e.g. file:///models")
        _root_segments(path, where)
        return StoreRoot("file", "", path)
    if scheme == "hf":
        org = "/".join(p for p in (parts.netloc, path) if p)
        if "/" in org:
            raise BadRequest(f"{where}: an hf store is hf:// or hf://org")
        if org and not is_hf_part(org):
            raise BadRequest(f"{where}: {org!r} is not a valid Hugging Face org")
        return StoreRoot("hf", "", org)
    if scheme == "s3":
        if not is_s3_bucket(parts.netloc):
            raise BadRequest(f"{where}: {parts.netloc!r} is not a valid S3 bucket name")
    elif not is_host(parts.netloc):
        raise BadRequest(f"{where}: needs a host, e.g. http://models.internal:8080/prefix")
    if path:
        _root_segments(path, where)
    return StoreRoot(scheme, parts.netloc, path)


def parse_uri(text: str) -> ModelURI:
    """The library's checkpoint URI parser, its errors as BadRequest with the same message."""
    try:
        return parse_model_uri(text)
    except ModelURIError as exc:
        raise BadRequest(str(exc)) from exc


def _under(uri: ModelURI, root: StoreRoot) -> str | None:
    """The name of uri under root ("" for the root itself), or None when it is not under it."""
    if uri.scheme != root.scheme or (uri.scheme in ("s3", "http", "https") and uri.authority != root.host):
        return None
    prefix = root.prefix.split("/") if root.prefix else []
    parts = list(uri.parts)
    if parts[:len(prefix)] != prefix:
        return None
    return "/".join(parts[len(prefix):])


def _join(root: StoreRoot, name: str) -> str:
    return f"hf://{name}" if root.scheme == "hf" and not root.prefix else f"{root.uri}/{name}"


def resolve(model: str, stores: Sequence[StoreRoot]) -> ModelRef:
    """The ModelRef for a client's reference; only configured stores are ever named."""
    where = f"model {quote(model)}"  # cut: a gRPC status message over 8 KiB never reaches the client
    if "://" in model:
        uri = parse_uri(model)  # the grammar first: the same message `apply` gives
        if not stores:
            raise BadRequest(f"{where}: this loader has no stores configured (--store)")
        matches = [(root, name) for root in stores if (name := _under(uri, root)) is not None]
        if not matches:
            raise BadRequest(f"{where}: not under a configured store ({', '.join(s.uri for s in stores)})")
        root, name = max(matches, key=lambda m: len(m[0].prefix))  # the most specific root
        if not name:
            raise BadRequest(f"{where}: names no checkpoint under {root.uri}")
    else:
        if not model:
            raise BadRequest(f"{where}: must be a non-empty name or checkpoint URI")
        if not stores:
            raise BadRequest(f"{where}: this loader has no stores configured (--store)")
        root = stores[0]
        try:
            uri = parse_model_uri(_join(root, model))
        except ModelURIError as exc:
            raise BadRequest(f"{where} in store {root.uri}: {exc}") from exc
        name = _under(uri, root) or ""
        if not name:  # a bare name always lies under its root; defensive
            raise BadRequest(f"{where}: names no checkpoint under {root.uri}")
    revision = (uri.revision or DEFAULT_REVISION) if uri.scheme == "hf" else None
    return ModelRef(root, name, revision)
