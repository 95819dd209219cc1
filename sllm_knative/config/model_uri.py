"""The checkpoint URI grammar: the one parser of the `sllm-knative.io/model` annotation, of
NodeCache checkpoints and of the loader sidecar's model references (loader_sidecar/refs.py
calls it, so a URI that passes `apply` is exactly a URI the loader can resolve).

    hf://org/name[@revision]     a Hugging Face repository; hf://name for the Hub's legacy
                                 unprefixed ids (gpt2, bert-base-uncased), which it redirects
    s3://bucket/key              an S3 (or S3-compatible) prefix holding the checkpoint
    https://host[:port]/path     an HTTP store serving the checkpoint files under path
    http://host[:port]/path
    file:///dir/name             a directory on the node (file://localhost/dir/name is the same)

The rules, each checked here and nowhere else:

- at most 1024 characters of printable ASCII: no whitespace, no control characters, no
  `%`-escapes, no backslashes, no query (`?`) or fragment (`#`), no user info (`user@host`);
- the scheme is one of the five above, in lower case;
- org and name of a Hugging Face repository (the Hub's own rules): 1-96 letters, digits and
  `._-`, starting with a letter or digit, ending with a letter, digit or `_`, no `--` or `..`;
- a revision (hf only): a branch, tag or commit: parts of letters, digits and `._-` separated by
  single `/` (`refs/pr/1`), each starting with a letter, digit or `_`, no `..`, at most 128
  characters; without one the loader reads DEFAULT_REVISION;
- an S3 bucket: 3-63 characters of `a-z0-9.-`, starting and ending with a letter or digit, no `..`;
- a host: a DNS name, IPv4 address or bracketed IPv6 address, with an optional port 1-65535;
- a path (S3 key, HTTP path, file path): 1 to 32 segments of 1-255 letters, digits and `._-`,
  never empty, `.` or `..`; one trailing `/` is ignored. S3 and HTTP(S) URIs need at least one
  segment, file URIs two (the loader never serves `/` itself as a store, so a checkpoint is
  always a directory inside a store directory);
- `@revision` belongs to hf:// only.

Every error is a ModelURIError (a ValueError) whose message says what is wrong, which part,
and quotes the URI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SCHEMES = ("hf", "s3", "https", "http", "file")
DEFAULT_REVISION = "main"
MAX_URI_CHARS = 1024
MAX_PATH_SEGMENTS = 32
MAX_REVISION_CHARS = 128

_LIST = ", ".join(s + "://" for s in SCHEMES)
_HF_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_SEGMENT = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]{1,255}")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?P<name>{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{{1,5}}))?")

_HF_RULE = ("1-96 letters, digits and '._-', starting with a letter or digit, ending with a letter, "
            "digit or '_', without '--' or '..'")
_SEGMENT_RULE = "1-255 letters, digits and '._-'; not empty, '.' or '..'"


class ModelURIError(ValueError):
    """A checkpoint URI that breaks the grammar: `uri` is the input, str() the whole message."""

    def __init__(self, uri: object, message: str) -> None:
        super().__init__(message)
        self.uri = uri


@dataclass(frozen=True)
class ModelURI:
    """A validated checkpoint location. `authority` is the hf org/name (or name), the S3 bucket or
    the HTTP host[:port] ("" for file); `path` is "/seg/.../seg" without a trailing slash ("" for
    hf); `revision` is the hf revision after '@', None when not given (and for other schemes)."""

    uri: str
    scheme: str
    authority: str
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.uri

    @property
    def parts(self) -> tuple[str, ...]:
        """The name segments: (org, name) or (name,) for hf, the path's segments otherwise."""
        return tuple(self.authority.split("/")) if self.scheme == "hf" else tuple(self.path[1:].split("/"))

    @property
    def canonical(self) -> str:
        """One spelling per checkpoint: hf with its revision (DEFAULT_REVISION when not given),
        file without `localhost`, no trailing slash. The loader names checkpoints this way."""
        if self.scheme == "hf":
            return f"hf://{self.authority}@{self.revision or DEFAULT_REVISION}"
        return f"{self.scheme}://{self.authority}{self.path}"


def quote(text: str, limit: int = 120) -> str:
    """A URI (or part) as error messages show it: double-quoted, escaped, cut after `limit` chars."""
    if len(text) > limit:
        return json.dumps(text[:limit], ensure_ascii=False)[:-1] + f'..." ({len(text)} characters)'
    return json.dumps(text, ensure_ascii=False)


def is_hf_part(text: str) -> bool:
    """An org or a name of a Hugging Face repository."""
    return bool(_HF_PART.fullmatch(text)) and "--" not in text and ".." not in text


def is_revision(text: str) -> bool:
    return len(text) <= MAX_REVISION_CHARS and bool(_REVISION.fullmatch(text)) and ".." not in text


def is_path_segment(text: str) -> bool:
    return bool(_SEGMENT.fullmatch(text))


def is_s3_bucket(text: str) -> bool:
    return bool(_S3_BUCKET.fullmatch(text)) and ".." not in text


def is_host(text: str) -> bool:
    """host[:port]: a DNS name, IPv4 or [IPv6] address, port 1-65535."""
    m = _HOST.fullmatch(text)
    if m is None:
        return False
    return len(m["name"]) <= 253 and (m["port"] is None or 0 < int(m["port"]) < 65536)


def parse_model_uri(text: object) -> ModelURI:
    """Validate and split a checkpoint URI; raises ModelURIError saying what is wrong and where."""
    if not isinstance(text, str) or not text:
        shown = quote(text) if isinstance(text, str) else repr(text)
        raise ModelURIError(text, f"must be a checkpoint URI ({_LIST}), got {shown}")
    uri = quote(text)
    if len(text) > MAX_URI_CHARS:
        raise ModelURIError(text, f"must be at most {MAX_URI_CHARS} characters, got {uri}")
    if any(not 33 <= ord(c) <= 126 for c in text):
        raise ModelURIError(text, f"must be printable ASCII, without whitespace or control characters, got {uri}")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        hint = " (schemes are lower case)" if sep and scheme.lower() in SCHEMES else ""
        raise ModelURIError(text, f"unsupported scheme in {uri}: use one of {_LIST}{hint}")
    if "%" in text or "\\" in text:
        raise ModelURIError(text, f"must not contain '%' escapes or backslashes, got {uri}")
    if "?" in text or "#" in text:
        raise ModelURIError(text, f"must not have a query or fragment ('?', '#'), got {uri}")
    if scheme == "hf":
        return _hf(text, rest, uri)
    authority, _, path = rest.partition("/")
    if scheme == "s3":
        if not is_s3_bucket(authority):
            raise ModelURIError(text, "S3 bucket must be 3-63 characters of a-z, 0-9, '.', '-', starting and "
                                      f"ending with a letter or digit, got {quote(authority)} in {uri}")
        if not path.strip("/"):
            raise ModelURIError(text, f"must name a prefix inside the bucket (s3://bucket/prefix), got {uri}")
    elif scheme in ("http", "https"):
        if not is_host(authority):
            raise ModelURIError(text, "must name a host (a DNS name, IPv4 or [IPv6] address, optional port "
                                      f"1-65535, no user info), got {quote(authority)} in {uri}")
        if not path.strip("/"):
            raise ModelURIError(text, f"must name a path on the host ({scheme}://host/path), got {uri}")
    else:  # file
        if authority not in ("", "localhost"):
            raise ModelURIError(text, "file:// URIs name a local absolute path (file:///dir/name), "
                                      f"got host {quote(authority)} in {uri}")
        if not path.strip("/"):
            raise ModelURIError(text, f"must name an absolute directory (file:///dir/name), got {uri}")
        authority = ""
    segments = _path(text, path, uri)
    if scheme == "file" and len(segments) < 2:
        raise ModelURIError(text, "must name a checkpoint directory inside a store directory "
                                  f"(file:///dir/name; '/' is never a store), got {uri}")
    return ModelURI(text, scheme, authority, "/" + "/".join(segments))


def _path(text: str, path: str, uri: str) -> list[str]:
    segments = (path[:-1] if path.endswith("/") else path).split("/")
    for seg in segments:
        if "@" in seg:
            raise ModelURIError(text, f"'@revision' is only for hf:// URIs; path segment {quote(seg)} "
                                      f"is not a valid name ({_SEGMENT_RULE}), in {uri}")
        if not is_path_segment(seg):
            raise ModelURIError(text, f"path segment {quote(seg)} is not a valid name ({_SEGMENT_RULE}), in {uri}")
    if len(segments) > MAX_PATH_SEGMENTS:
        raise ModelURIError(text, f"path has {len(segments)} segments, at most {MAX_PATH_SEGMENTS}, in {uri}")
    return segments


def _hf(text: str, rest: str, uri: str) -> ModelURI:
    repo, at, revision = rest.partition("@")
    if at and not is_revision(revision):
        raise ModelURIError(text, "revision after '@' must be a branch, tag or commit (parts of letters, "
                                  "digits and '._-' separated by '/', each starting with a letter, digit "
                                  f"or '_', no '..', at most {MAX_REVISION_CHARS} characters), "
                                  f"got {quote(revision)} in {uri}")
    parts = repo.split("/")
    if not 1 <= len(parts) <= 2:
        raise ModelURIError(text, f"must be hf://org/name or hf://name, got {len(parts)} parts in {uri}")
    for kind, part in zip(("org", "name") if len(parts) == 2 else ("name",), parts, strict=True):
        if not is_hf_part(part):
            raise ModelURIError(text, f"Hugging Face repository {kind} {quote(part)} is not valid: must be "
                                      f"hf://org/name or hf://name, each {_HF_RULE}; in {uri}")
    return ModelURI(text, "hf", repo, "", revision if at else None)
