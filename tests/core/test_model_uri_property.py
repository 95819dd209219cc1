"""One checkpoint URI grammar: what `apply` accepts, the loader resolves; what it rejects, the
loader rejects with the same message.

The config side is sllm_knative.config.model_uri.parse_model_uri (the `sllm-knative.io/model`
annotation, NodeCache checkpoints); the loader side is loader_sidecar.refs (parse_uri, and resolve
against configured store roots). URIs are built from a mix of valid and invalid pieces: schemes,
separators, empty parts, '.', '..', spaces, '@revision' (with '/' in it), percent-escapes,
queries, user info, ports, very long names and very deep paths.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, find, given, settings
from hypothesis import strategies as st

from loader_sidecar.refs import StoreRoot, parse_store, parse_uri, resolve
from loader_sidecar.tiers import is_key
from sllm_knative.config.model_uri import DEFAULT_REVISION, ModelURI, ModelURIError, parse_model_uri, quote
from sllm_knative.loader.errors import BadRequest

GOOD_SEGMENTS = ["org", "name", "meta-llama", "Llama-3.2-1B", "opt_125m", "v1.0", "a", "x9", "0",
                 ".cache", "_x", "-x", "x.", "x_", "a" * 96, "b" * 255]
BAD_SEGMENTS = ["", ".", "..", "a b", " ", "a\tb", "a\nb", "a%2F", "%2e%2e", "a%", "a\\b", "a?b", "a#b",
                "a@b", "a:b", "~x", "a+b", "a--b", "a..b", "名前", "é", "a" * 97, "a" * 256, "a" * 1100]
SCHEMES = ["hf", "s3", "http", "https", "file"]
BAD_SCHEMES = ["HF", "Hf", "S3", "ftp", "gs", "", "s3a", "hf+x", " hf"]
HOSTS = ["models.local", "h", "127.0.0.1:9000", "[::1]:8080", "store.local:8443", "localhost",
         "h:0", "h:65535", "h:65536", "h:", "", "u@h", "u:p@h", "H_ost", "-h", "h..x", "a" * 64, "h:x"]
BUCKETS = ["models", "bucket-a", "my.bucket", "abc", "ab", "UPPER", "a..b", "-ab", "ab-", "a" * 63,
           "a" * 64, "", "b@x", "b:1"]
REVISIONS = ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567", "_x", "release/2024-01",
             "a" * 128]
BAD_REVISIONS = ["", "bad rev", "a..b", "refs//pr", "/x", "x/", "a@b", ".x", "-x", "x%2Fy", "a" * 129]


def mostly(good: st.SearchStrategy[str], bad: st.SearchStrategy[str], odds: int = 6) -> st.SearchStrategy[str]:
    """good about `odds` times as often as bad."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: good if ok else bad)


segment = mostly(st.sampled_from(GOOD_SEGMENTS),
                 st.one_of(st.sampled_from(BAD_SEGMENTS), st.text(alphabet="aZ09._-@%:?# ~\\/\té", max_size=8)),
                 odds=12)
path = st.one_of(
    st.lists(segment, max_size=5).map("/".join),
    *[st.lists(segment, min_size=2, max_size=5).map("/".join)] * 3,
    st.integers(30, 34).map(lambda n: "/".join(["s"] * n)),  # around the 32-segment limit
    st.sampled_from([254, 255, 256, 1000, 1030]).map(lambda n: "m/" + "n" * n),  # around 255 and 1024 characters
)
revision = mostly(st.sampled_from(["", ""] + ["@" + r for r in REVISIONS]),
                  st.one_of(st.sampled_from(BAD_REVISIONS), st.text(alphabet="aZ0._-/@ %", max_size=10)).map(
                      lambda r: "@" + r))
suffix = mostly(st.just(""), st.sampled_from(["/", "?x=1", "#f", "?", "//"]), odds=8)


@st.composite
def uris(draw: st.DrawFn) -> str:
    scheme = draw(mostly(st.sampled_from(SCHEMES), st.sampled_from(BAD_SCHEMES), odds=8))
    sep = draw(mostly(st.just("://"), st.sampled_from([":/", ":", ":///", "//"]), odds=12))
    # Mostly the body of the scheme's own shape, sometimes another scheme's.
    own = scheme.lower() if scheme.lower() in SCHEMES else "hf"
    shape = draw(mostly(st.just(own), st.sampled_from(SCHEMES), odds=8))
    p = draw(path)
    if shape == "hf":
        repo = mostly(st.lists(segment, min_size=1, max_size=3).map("/".join),
                      st.sampled_from([95, 96, 97, 1030]).map(lambda n: "org/" + "n" * n))  # around 96 and 1024
        body = draw(repo) + draw(revision)
    elif shape == "s3":
        body = draw(mostly(st.sampled_from(BUCKETS[:5]), st.sampled_from(BUCKETS[5:]))) + "/" + p
    elif shape in ("http", "https"):
        host = draw(mostly(st.sampled_from(HOSTS[:6]), st.sampled_from(HOSTS[6:])))
        body = host + draw(mostly(st.just("/"), st.just(""))) + p
    else:
        body = draw(mostly(st.just(""), st.sampled_from(["localhost", "host"]), odds=3)) + "/" + p
    if shape != "hf":
        body += draw(mostly(st.just(""), revision, odds=12))
    return scheme + sep + body + draw(suffix)


def roots(uri: ModelURI) -> list[str]:
    """Every store root a loader may be configured with that covers uri (hf://, the bucket, the
    host, a directory), from the widest to the narrowest that still leaves a name."""
    parts = list(uri.parts)
    if uri.scheme == "hf":
        return ["hf://"] + ([f"hf://{parts[0]}"] if len(parts) == 2 else [])
    if uri.scheme == "file":
        return ["file:///" + "/".join(parts[:k]) for k in range(1, len(parts))]
    return [f"{uri.scheme}://{uri.authority}" + "".join("/" + s for s in parts[:k]) for k in range(len(parts))]


DECOYS = [parse_store(s) for s in ("http://decoy.local/ckpt", "s3://decoy-bucket/p", "file:///decoy/dir")]


def components(uri: ModelURI) -> tuple[str, str, str, str | None]:
    return (uri.scheme, uri.authority, uri.path,
            (uri.revision or DEFAULT_REVISION) if uri.scheme == "hf" else None)


def assert_resolves(text: str, expected: ModelURI) -> None:
    assert parse_uri(text) == expected  # the loader's parser: the same components
    candidates = roots(expected)
    assert candidates, f"no store can hold {text!r}"
    for root_uri in candidates:
        root = parse_store(root_uri)  # every root the property needs is a valid --store
        for stores in ([root], [*DECOYS, root], [parse_store("hf://"), *DECOYS, root]):
            ref = resolve(text, stores)
            assert ref.store == root
            assert ref.uri == expected.canonical
            assert components(parse_model_uri(ref.uri)) == components(expected)
            assert is_key(ref.key), ref.key
        # The bare name under that root is the same checkpoint.
        bare = ref.name + (f"@{ref.revision}" if ref.revision else "")
        assert resolve(bare, [root]).uri == ref.uri


def assert_rejected_alike(text: str, message: str) -> None:
    assert quote(text) in message  # says which URI
    if "://" not in text:
        return  # a bare name to the loader, not a URI: see test_bare_names_resolve_to_valid_uris
    for call in (lambda: parse_uri(text), lambda: resolve(text, [parse_store("hf://"), *DECOYS]),
                 lambda: resolve(text, [])):
        with pytest.raises(BadRequest) as info:
            call()
        assert str(info.value) == message


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uris())
def test_config_and_loader_agree(text: str) -> None:
    try:
        expected = parse_model_uri(text)
    except ModelURIError as exc:
        event(f"rejected: {str(exc).split(' ')[0:3]}")
        assert_rejected_alike(text, str(exc))
        return
    event(f"accepted: {expected.scheme}")
    assert_resolves(text, expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_strategy_reaches_accepted_uris(scheme: str) -> None:
    """Guards the property above against a generator that only ever makes rejects."""

    def accepted(text: str) -> bool:
        try:
            return parse_model_uri(text).scheme == scheme
        except ModelURIError:
            return False

    find(uris(), accepted, settings=settings(max_examples=5000, database=None))


ROOTS = ["hf://", "hf://org", "s3://models/ckpt", "https://models.local:8080/ckpt", "http://h", "file:///mnt/models",
         "file:///home/u/.cache/models"]
bare = st.one_of(path, st.builds(lambda p, r: p + r, path, revision), st.text(max_size=12))


@settings(max_examples=800, deadline=None)
@given(bare, st.sampled_from(ROOTS))
def test_bare_names_resolve_to_valid_uris(name: str, root_uri: str) -> None:
    """A bare name (the loader's shorthand, no scheme) is joined to the first store and goes through
    the same grammar: whatever resolves is a checkpoint URI `apply` accepts, under that store."""
    root = parse_store(root_uri)
    try:
        ref = resolve(name, [root])
    except BadRequest as exc:
        # The message names the reference it refuses, quoted and cut as the URI grammar quotes
        # (a name of any length would otherwise make a gRPC status too large to send).
        assert quote(name) in str(exc)
        return
    assert "://" not in name
    parsed = parse_model_uri(ref.uri)
    assert parsed.canonical == ref.uri and ref.store == root and is_key(ref.key)
    assert resolve(ref.uri, [root]) == ref


def test_every_store_root_names_a_valid_uri_prefix() -> None:
    for root_uri in ROOTS:
        root: StoreRoot = parse_store(root_uri)
        sep = "" if root.uri == "hf://" else "/"
        parse_model_uri(root.uri + sep + ("org/name" if root.scheme == "hf" and not root.prefix else "name"))
