"""Model references: which configured store a checkpoint comes from and where it lives on disk.

A store root is configured by the operator (`--store`): `file:///abs/dir`, `http(s)://host[:port]/prefix`,
`hf://` (the whole hub) or `hf://org`, `s3://bucket[/prefix]`. A model reference is either a full
URI under one of those roots (`hf://org/name@rev`, `s3://bucket/prefix/name`) or a bare name
(`org/name`), resolved against the first root. Everything here is pure: parse, validate, name.

Names are validated segment by segment (letters, digits, `._-`, starting with a letter or digit),
so `..`, absolute paths, empty segments, `%`-escapes, queries and fragments are all rejected;
the on-disk key is built from the validated name plus a hash of the canonical URI, so two
stores holding the same name never share a cache directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from loader_sidecar.errors import BadRequest

SCHEMES = ("file", "http", "https", "hf", "s3")
MAX_SEGMENTS = 4
DEFAULT_REVISION = "main"
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Store roots come from the operator: hidden directories are fine there, '.' and '..' are not.
_ROOT_SEGMENT = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._-]{1,255}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


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
        if self.store.scheme == "hf":
            return f"hf://{self.path}@{self.revision}"
        return f"{self.store.uri}/{self.name}"

    @property
    def key(self) -> str:
        """Directory name in the tiers: readable, unique per canonical URI, never a path."""
        base = self.path if self.store.scheme == "hf" else self.name
        readable = base.replace("/", "--") + (f"--{self.revision}" if self.revision else "")
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        return f"{readable[:120]}-{digest}"


def _segments(path: str, where: str, pattern: re.Pattern[str] = _SEGMENT) -> list[str]:
    if "%" in path or "\\" in path:
        raise BadRequest(f"{where}: escapes and backslashes are not allowed, got {path!r}")
    parts = path.split("/")
    for seg in parts:
        if not pattern.match(seg):
            raise BadRequest(f"{where}: segment {seg!r} of {path!r} is not a valid name "
                             "(letters, digits, '._-', starting with a letter or digit)")
    return parts


def parse_store(uri: str) -> StoreRoot:
    """Validate a configured store root; raises BadRequest naming the problem."""
    where = f"store {uri!r}"
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise BadRequest(f"{where}: scheme must be one of {', '.join(SCHEMES)}")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise BadRequest(f"{where}: queries, fragments and credentials in the URI are not allowed")
    path = parts.path.strip("/")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise BadRequest(f"{where}: file URIs name a local path (file:///abs/dir)")
        if not parts.path.startswith("/") or not path:
            raise BadRequest(f"{where}: needs an absolute directory, e.g. file:///models")
        _segments(path, where, _ROOT_SEGMENT)
        return StoreRoot("file", "", path)
    if scheme == "hf":
        org = "/".join(p for p in (parts.netloc, path) if p)
        if org:
            if len(_segments(org, where)) != 1:
                raise BadRequest(f"{where}: an hf store is hf:// or hf://org")
        return StoreRoot("hf", "", org)
    if scheme == "s3":
        if not _BUCKET.match(parts.netloc):
            raise BadRequest(f"{where}: {parts.netloc!r} is not a valid S3 bucket name")
    elif not parts.netloc or not _HOST.match(parts.netloc):
        raise BadRequest(f"{where}: needs a host, e.g. http://models.internal:8080/prefix")
    if path:
        _segments(path, where, _ROOT_SEGMENT)
    return StoreRoot(scheme, parts.netloc, path)


def _split_revision(name: str, where: str) -> tuple[str, str | None]:
    if "@" not in name:
        return name, None
    name, _, rev = name.rpartition("@")
    if not _REVISION.match(rev):
        raise BadRequest(f"{where}: revision {rev!r} is not valid (letters, digits, '._-')")
    return name, rev


def _relative(uri: str, root: StoreRoot) -> str | None:
    """The part of uri under root, or None when uri is not under it (segment boundary)."""
    base = "hf://" if root.scheme == "hf" and not root.prefix else root.uri + "/"
    if root.scheme == "file" and uri.startswith("file://localhost/"):
        uri = "file:///" + uri[len("file://localhost/"):]
    return uri[len(base):] if uri.startswith(base) else None


def resolve(model: str, stores: Sequence[StoreRoot]) -> ModelRef:
    """The ModelRef for a client's reference; only configured stores are ever named."""
    where = f"model {model!r}"
    if not model or len(model) > 1024:
        raise BadRequest(f"{where}: must be a non-empty reference of at most 1024 characters")
    if not stores:
        raise BadRequest(f"{where}: this loader has no stores configured (--store)")
    if "://" in model:
        matches = [(root, rel) for root in stores if (rel := _relative(model, root)) is not None]
        if not matches:
            raise BadRequest(f"{where}: not under a configured store ({', '.join(s.uri for s in stores)})")
        root, rel = max(matches, key=lambda m: len(m[0].uri))  # the most specific root
    else:
        root, rel = stores[0], model
    if "?" in rel or "#" in rel:
        raise BadRequest(f"{where}: queries and fragments are not allowed")
    rel = rel.rstrip("/")
    name, revision = _split_revision(rel, where) if root.scheme == "hf" else (rel, None)
    if not name:
        raise BadRequest(f"{where}: names no checkpoint under {root.uri}")
    segs = _segments(name, where)
    if len(segs) > MAX_SEGMENTS:
        raise BadRequest(f"{where}: at most {MAX_SEGMENTS} path segments")
    if root.scheme == "hf":
        total = len(segs) + (1 if root.prefix else 0)
        if total != 2:
            raise BadRequest(f"{where}: a Hugging Face model is org/name[@revision]")
        revision = revision or DEFAULT_REVISION
    return ModelRef(root, name, revision)
