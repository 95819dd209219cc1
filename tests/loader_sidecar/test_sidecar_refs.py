"""Store roots and model references: only configured stores, no path traversal, stable keys."""

from __future__ import annotations

import pytest

from loader_sidecar.refs import parse_store, resolve
from loader_sidecar.stores.hf import HfStore
from sllm_knative.loader.errors import BadRequest

STORES = [parse_store(s) for s in ("http://models.local:8080/ckpt", "hf://", "s3://bucket-a/prefix/x",
                                   "file:///mnt/models")]


@pytest.mark.parametrize("uri, canonical", [
    pytest.param("file:///mnt/models/", "file:///mnt/models", id="file-trailing-slash"),
    pytest.param("file://localhost/mnt/m", "file:///mnt/m", id="file-localhost"),
    pytest.param("file:///home/u/.cache/models", "file:///home/u/.cache/models", id="file-hidden-dir"),
    pytest.param("http://h:1/a/b", "http://h:1/a/b", id="http-prefix"),
    pytest.param("https://h", "https://h", id="https-no-prefix"),
    pytest.param("hf://", "hf://", id="hf-hub"),
    pytest.param("hf://org", "hf://org", id="hf-org"),
    pytest.param("s3://my-bucket/p", "s3://my-bucket/p", id="s3"),
])
def test_parse_store_accepts(uri, canonical):
    assert parse_store(uri).uri == canonical


@pytest.mark.parametrize("uri, message", [
    pytest.param("ftp://h/x", "scheme must be one of", id="scheme"),
    pytest.param("file://host/x", "local path", id="file-remote-host"),
    pytest.param("file:///", "absolute directory", id="file-root"),
    pytest.param("file:///a/../b", "not a valid name", id="file-dotdot"),
    pytest.param("file:///a/./b", "not a valid name", id="file-dot"),
    pytest.param("http:///x", "needs a host", id="http-no-host"),
    pytest.param("http://u:p@h/x", "credentials", id="http-credentials"),
    pytest.param("http://h/x?y=1", "queries", id="http-query"),
    pytest.param("hf://org/name", "hf:// or hf://org", id="hf-too-deep"),
    pytest.param("s3://UPPER/x", "bucket name", id="s3-bad-bucket"),
    pytest.param("hf://bad--org", "Hugging Face org", id="hf-bad-org"),
    pytest.param("http://h:70000/x", "needs a host", id="http-bad-port"),
    pytest.param("file:/x", "scheme://", id="no-slashes"),
    pytest.param("file:///a%2F/b", "escapes", id="percent-escape"),
])
def test_parse_store_rejects(uri, message):
    with pytest.raises(BadRequest, match=message):
        parse_store(uri)


@pytest.mark.parametrize("model, uri", [
    pytest.param("tiny", "http://models.local:8080/ckpt/tiny", id="bare-name-first-store"),
    pytest.param("org/tiny", "http://models.local:8080/ckpt/org/tiny", id="bare-two-segments"),
    pytest.param("http://models.local:8080/ckpt/org/m", "http://models.local:8080/ckpt/org/m", id="http-full"),
    pytest.param("hf://org/name", "hf://org/name@main", id="hf-default-revision"),
    pytest.param("hf://org/name@v1.0", "hf://org/name@v1.0", id="hf-revision"),
    pytest.param("s3://bucket-a/prefix/x/m", "s3://bucket-a/prefix/x/m", id="s3"),
    pytest.param("file:///mnt/models/a/b/", "file:///mnt/models/a/b", id="file-trailing-slash"),
    pytest.param("file://localhost/mnt/models/a", "file:///mnt/models/a", id="file-localhost"),
    # The grammar is the library's (sllm_knative.config.model_uri), so what `apply` accepts resolves:
    pytest.param("hf://gpt2", "hf://gpt2@main", id="hf-legacy-unprefixed"),
    pytest.param("hf://org/name@refs/pr/1", "hf://org/name@refs/pr/1", id="hf-revision-slash"),
    pytest.param(".hidden", "http://models.local:8080/ckpt/.hidden", id="bare-hidden"),
])
def test_resolve_accepts(model, uri):
    assert resolve(model, STORES).uri == uri


@pytest.mark.parametrize("model, message", [
    pytest.param("", "non-empty", id="empty"),
    pytest.param("../etc/passwd", "not a valid name", id="dotdot"),
    pytest.param("a/../../b", "not a valid name", id="dotdot-inside"),
    pytest.param("/abs", "not a valid name", id="absolute"),
    pytest.param("a//b", "not a valid name", id="empty-segment"),
    pytest.param("a%2F..", "escapes", id="percent-escape"),
    pytest.param("a\\b", "escapes", id="backslash"),
    pytest.param("/".join(["a"] * 32), "at most 32", id="too-deep"),  # 33 with the store's prefix
    pytest.param("http://evil.example/ckpt/m", "not under a configured store", id="other-host"),
    pytest.param("http://models.local:8080/ckptx/m", "not under a configured store", id="prefix-not-segment"),
    pytest.param("s3://bucket-a/prefix/m", "not under a configured store", id="s3-other-prefix"),
    pytest.param("hf://a/b/c", "hf://org/name", id="hf-three-segments"),
    pytest.param("hf://org/name@a..b", "revision", id="hf-revision-dotdot"),
    pytest.param("hf://org/name@/x", "revision", id="hf-revision-leading-slash"),
    pytest.param("s3://bucket-a/prefix/x/m@v1", "only for hf://", id="revision-not-hf"),
    pytest.param("file:///mnt/models", "names no checkpoint", id="the-store-itself"),
    pytest.param("https://models.local:8080", "must name a path", id="http-no-path"),
    pytest.param("hf://org/name@", "revision", id="hf-empty-revision"),
    pytest.param("file:///mnt/models/m?x", "query or fragment", id="query"),
    pytest.param("file:///etc/passwd", "not under a configured store", id="file-outside"),
])
def test_resolve_rejects(model, message):
    with pytest.raises(BadRequest, match=message):
        resolve(model, STORES)


def test_resolve_without_stores_is_an_error():
    with pytest.raises(BadRequest, match="no stores configured"):
        resolve("tiny", [])


def test_most_specific_store_wins():
    stores = [parse_store("http://h/a"), parse_store("http://h/a/b")]
    ref = resolve("http://h/a/b/m", stores)
    assert (ref.store.uri, ref.name) == ("http://h/a/b", "m")


def test_keys_are_plain_unique_and_stable():
    a = resolve("http://models.local:8080/ckpt/org/m", STORES)
    b = resolve("file:///mnt/models/org/m", STORES)
    assert a.key != b.key  # same name, other store: other directory
    assert a.key == resolve("org/m", STORES).key
    assert "/" not in a.key and a.key.startswith("org--m-")
    assert resolve("hf://org/name", STORES).key.startswith("org--name--main-")
    assert resolve("hf://org/name@refs/pr/1", STORES).key.startswith("org--name--refs--pr--1-")


def test_keys_are_never_hidden():
    assert resolve(".hidden", STORES).key.startswith("hidden-")


def test_hf_revision_is_one_escaped_segment_of_the_resolve_url():
    store = HfStore(STORES[1], endpoint="https://hub.example/", token=None, timeout_s=1, connections=1)
    ref = resolve("hf://org/name@refs/pr/1", STORES)
    assert store.url(ref, "config.json") == "https://hub.example/org/name/resolve/refs%2Fpr%2F1/config.json"
