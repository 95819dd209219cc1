"""Error translation tables: HTTP statuses, S3 codes, gRPC statuses (both directions), devices."""

from __future__ import annotations

import grpc
import pytest

from loader_sidecar.leases import parse_device
from loader_sidecar.server import status_for
from loader_sidecar.stores.http import status_error
from loader_sidecar.stores.s3 import client_error
from sllm_knative.loader import errors
from sllm_knative.loader.client import _FROM_STATUS


@pytest.mark.parametrize("status, cls", [
    pytest.param(404, errors.NotFound, id="404"),
    pytest.param(410, errors.NotFound, id="410"),
    pytest.param(401, errors.AccessDenied, id="401"),
    pytest.param(403, errors.AccessDenied, id="403"),
    pytest.param(416, errors.CorruptData, id="416"),
    pytest.param(500, errors.StoreUnavailable, id="500"),
    pytest.param(503, errors.StoreUnavailable, id="503"),
    pytest.param(429, errors.StoreUnavailable, id="429"),
    pytest.param(302, errors.StoreUnavailable, id="unexpected"),
])
def test_http_status(status, cls):
    err = status_error(status, "http://h/m/f")
    assert type(err) is cls and f"HTTP {status}" in str(err) and "http://h/m/f" in str(err)


@pytest.mark.parametrize("code, cls", [
    pytest.param("NoSuchKey", errors.NotFound, id="no-such-key"),
    pytest.param("404", errors.NotFound, id="404"),
    pytest.param("NoSuchBucket", errors.NotFound, id="no-such-bucket"),
    pytest.param("AccessDenied", errors.AccessDenied, id="denied"),
    pytest.param("SignatureDoesNotMatch", errors.AccessDenied, id="signature"),
    pytest.param("SlowDown", errors.StoreUnavailable, id="throttled"),
    pytest.param("InternalError", errors.StoreUnavailable, id="internal"),
])
def test_s3_code(code, cls):
    assert type(client_error(code, "s3://b/k")) is cls


@pytest.mark.parametrize("exc, code", [
    pytest.param(errors.BadRequest("x"), grpc.StatusCode.INVALID_ARGUMENT, id="bad-request"),
    pytest.param(errors.NotFound("x"), grpc.StatusCode.NOT_FOUND, id="not-found"),
    pytest.param(errors.AccessDenied("x"), grpc.StatusCode.PERMISSION_DENIED, id="denied"),
    pytest.param(errors.Stalled("x"), grpc.StatusCode.DEADLINE_EXCEEDED, id="stalled-before-unavailable"),
    pytest.param(errors.StoreUnavailable("x"), grpc.StatusCode.UNAVAILABLE, id="unavailable"),
    pytest.param(errors.CorruptData("x"), grpc.StatusCode.DATA_LOSS, id="corrupt"),
    pytest.param(errors.TierFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, id="full"),
    pytest.param(errors.InUse("x"), grpc.StatusCode.FAILED_PRECONDITION, id="in-use"),
    pytest.param(errors.DiskError("x"), grpc.StatusCode.INTERNAL, id="disk"),
    pytest.param(errors.UnknownLease("x"), grpc.StatusCode.NOT_FOUND, id="unknown-lease"),
    pytest.param(KeyError("k"), grpc.StatusCode.INTERNAL, id="bug"),
])
def test_status_for(exc, code):
    got, message = status_for(exc)
    assert got is code and message


@pytest.mark.parametrize("cls", [errors.BadRequest, errors.NotFound, errors.AccessDenied, errors.Stalled,
                                 errors.StoreUnavailable, errors.CorruptData, errors.TierFull, errors.InUse])
def test_client_gets_the_servers_error_class_back(cls):
    code, _ = status_for(cls("x"))
    assert _FROM_STATUS[code] is cls


@pytest.mark.parametrize("text, gpus, device", [
    pytest.param("", 0, "cpu", id="default-cpu"),
    pytest.param("cpu", 0, "cpu", id="cpu"),
    pytest.param("cuda", 1, "cuda:0", id="cuda-means-0"),
    pytest.param("cuda:1", 2, "cuda:1", id="cuda-1"),
])
def test_parse_device(text, gpus, device):
    assert parse_device(text, gpus) == device


@pytest.mark.parametrize("text, gpus, message", [
    pytest.param("cuda:0", 0, "has 0 GPU", id="no-gpu"),
    pytest.param("cuda:2", 2, "has 2 GPU", id="index-too-high"),
    pytest.param("tpu", 0, "expected 'cpu' or 'cuda:N'", id="unknown"),
    pytest.param("cpu:1", 0, "no index other than 0", id="cpu-index"),
])
def test_parse_device_rejects(text, gpus, message):
    with pytest.raises(errors.BadRequest, match=message):
        parse_device(text, gpus)
