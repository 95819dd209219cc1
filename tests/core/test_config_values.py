"""Scalar parsers: Go durations, Kubernetes quantities, annotation numbers, model URIs."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sllm_knative.config.errors import format_path
from sllm_knative.config.model_uri import parse_model_uri
from sllm_knative.config.values import (
    format_duration,
    parse_bool,
    parse_duration,
    parse_float,
    parse_int,
    parse_quantity,
)


@pytest.mark.parametrize("text,seconds", [
    pytest.param("60s", 60.0, id="seconds"),
    pytest.param("1m30s", 90.0, id="minutes-seconds"),
    pytest.param("1h", 3600.0, id="hour"),
    pytest.param("500ms", 0.5, id="milliseconds"),
    pytest.param("1.5h", 5400.0, id="fractional"),
    pytest.param("0", 0.0, id="bare-zero"),
    pytest.param("0s", 0.0, id="zero-seconds"),
    pytest.param("-2s", -2.0, id="negative"),
    pytest.param("250us", 0.00025, id="microseconds"),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    pytest.param("60", id="no-unit"),
    pytest.param("1d", id="days-not-go"),
    pytest.param("s", id="unit-only"),
    pytest.param("", id="empty"),
    pytest.param("1m 30s", id="space"),
])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds,text", [
    pytest.param(0, "0s", id="zero"),
    pytest.param(60, "1m", id="minute"),
    pytest.param(90, "1m30s", id="minute-half"),
    pytest.param(3725, "1h2m5s", id="all-units"),
    pytest.param(0.5, "500ms", id="sub-second"),
])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value,expected", [
    pytest.param("500m", Decimal("0.5"), id="milli-cpu"),
    pytest.param("2", Decimal(2), id="plain"),
    pytest.param(2, Decimal(2), id="yaml-int"),
    pytest.param("16Gi", Decimal(16 * 2**30), id="gibibytes"),
    pytest.param("1G", Decimal(10**9), id="gigabytes"),
    pytest.param("1e3", Decimal(1000), id="exponent"),
    pytest.param("1.5Ki", Decimal(1536), id="fractional-binary"),
])
def test_parse_quantity(value: str | int, expected: Decimal) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize("value", ["16GB", "1.2.3", "Gi", "", True])
def test_parse_quantity_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(value)  # type: ignore[arg-type]


def test_numbers_and_bools_say_what_they_expect() -> None:
    assert parse_int("3", minimum=0) == 3
    with pytest.raises(ValueError, match=r'must be an integer >= 0, got "x"'):
        parse_int("x", minimum=0)
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 5\], got \"9\""):
        parse_int("9", minimum=1, maximum=5)
    assert parse_float("2.5", minimum=0.01) == 2.5
    with pytest.raises(ValueError, match=r"must be a number >= 0.01"):
        parse_float("nan", minimum=0.01)
    assert parse_bool("TRUE") is True and parse_bool("false") is False
    with pytest.raises(ValueError, match='must be "true" or "false"'):
        parse_bool("yes")


@pytest.mark.parametrize("path,text", [
    pytest.param(("spec", "containers", 0, "image"), "spec.containers[0].image", id="index"),
    pytest.param(("metadata", "annotations", "autoscaling.knative.dev/min-scale"),
                 'metadata.annotations["autoscaling.knative.dev/min-scale"]', id="qualified-key"),
    pytest.param(("data", "stable-window"), "data.stable-window", id="dashed-key"),
    pytest.param((), "<root>", id="root"),
])
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text


@pytest.mark.parametrize("uri,scheme,authority,path,revision", [
    pytest.param("hf://meta-llama/Llama-3.2-1B", "hf", "meta-llama/Llama-3.2-1B", "", None, id="hf"),
    pytest.param("hf://gpt2", "hf", "gpt2", "", None, id="hf-unprefixed"),
    pytest.param("hf://org/name@v1.0", "hf", "org/name", "", "v1.0", id="hf-revision"),
    pytest.param("s3://models/opt/125m", "s3", "models", "/opt/125m", None, id="s3"),
    pytest.param("https://store.local:8443/ckpt/opt", "https", "store.local:8443", "/ckpt/opt", None, id="https"),
    pytest.param("http://127.0.0.1:9000/m", "http", "127.0.0.1:9000", "/m", None, id="http-ip"),
    pytest.param("file:///var/lib/models/tiny", "file", "", "/var/lib/models/tiny", None, id="file"),
    pytest.param("file://localhost/var/models/", "file", "", "/var/models", None, id="file-localhost-slash"),
    pytest.param("hf://org/name@refs/pr/1", "hf", "org/name", "", "refs/pr/1", id="hf-revision-slash"),
    pytest.param("hf://org/name@" + "0" * 40, "hf", "org/name", "", "0" * 40, id="hf-commit"),
    pytest.param("s3://models/opt/125m/", "s3", "models", "/opt/125m", None, id="s3-trailing-slash"),
    pytest.param("https://[::1]:8080/m", "https", "[::1]:8080", "/m", None, id="https-ipv6"),
])
def test_model_uri_accepts(uri: str, scheme: str, authority: str, path: str, revision: str | None) -> None:
    m = parse_model_uri(uri)
    assert (m.scheme, m.authority, m.path, m.revision, str(m)) == (scheme, authority, path, revision, uri)


@pytest.mark.parametrize("uri,message", [
    pytest.param("ftp://x/y", "unsupported scheme", id="scheme"),
    pytest.param("meta-llama/Llama", "unsupported scheme", id="no-scheme"),
    pytest.param("hf://a/b/c", "hf://org/name", id="hf-three-parts"),
    pytest.param("hf://org/../x", "hf://org/name", id="hf-dotdot"),
    pytest.param("s3://Bad_Bucket/x", "S3 bucket", id="s3-bucket"),
    pytest.param("s3://bucket", "prefix inside the bucket", id="s3-no-key"),
    pytest.param("https:///path", "must name a host", id="http-no-host"),
    pytest.param("https://user@host/p", "must name a host", id="http-userinfo"),
    pytest.param("https://host/p?x=1", "query or fragment", id="query"),
    pytest.param("file://host/dir", "local absolute path", id="file-host"),
    pytest.param("file:///a/../b", "'..'", id="file-dotdot"),
    pytest.param("file:///", "absolute directory", id="file-root"),
    pytest.param("hf://org/ name", "whitespace", id="whitespace"),
    pytest.param("", "checkpoint URI", id="empty"),
    pytest.param("HF://org/name", "lower case", id="scheme-case"),
    pytest.param("hf://org--x/name", "repository org", id="hf-double-dash"),
    pytest.param("hf://org/name.", "repository name", id="hf-trailing-dot"),
    pytest.param("hf://org/name@a..b", "revision", id="hf-revision-dotdot"),
    pytest.param("hf://org/name@refs//pr", "revision", id="hf-revision-empty-part"),
    pytest.param("hf://org/name@" + "a" * 129, "revision", id="hf-revision-too-long"),
    pytest.param("s3://bucket/x@v1", "only for hf://", id="revision-not-hf"),
    pytest.param("s3://bucket/a//b", "path segment", id="empty-segment"),
    pytest.param("https://host", "must name a path", id="http-no-path"),
    pytest.param("https://host:0/p", "must name a host", id="http-port-zero"),
    pytest.param("file:///models", "inside a store directory", id="file-one-segment"),
    pytest.param("hf://org/na%6De", "'%' escapes", id="percent"),
    pytest.param("hf://org/" + "a" * 1100, "at most 1024 characters", id="too-long"),
    pytest.param("s3://bucket/" + "/".join("a" * 33), "at most 32", id="too-deep"),
])
def test_model_uri_rejects(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model_uri(uri)
