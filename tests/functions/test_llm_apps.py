"""The two apps in-process (no sockets): readiness before the model is loaded, the internal token."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from functions.llm import app as public_app
from functions.llm import internal as internal_app
from functions.llm.config import ServeConfig
from functions.llm.service import ModelHost
from sllm_knative.log import get_logger

TOKEN = "s3cret-token"


@pytest.fixture()
def loading_service(tmp_path) -> ModelHost:
    """A service whose model has not been loaded (the state between process start and ready)."""
    cfg = ServeConfig(model_dir=tmp_path, model_name="tiny", internal_token=TOKEN)
    return ModelHost(cfg, time.time(), get_logger("test"))


def test_public_app_before_ready(loading_service):
    client = TestClient(public_app.build(loading_service))
    assert client.get("/health/live").status_code == 200
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": -1})
    assert r.status_code == 400  # validation does not need the model
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert b"sllm_function_ready 0.0" in client.get("/metrics").content


@pytest.mark.parametrize("headers,status", [
    pytest.param({}, 401, id="no-token"),
    pytest.param({"authorization": "Bearer wrong"}, 401, id="wrong-token"),
    pytest.param({"authorization": TOKEN}, 401, id="not-bearer"),
    pytest.param({"authorization": f"Bearer {TOKEN}"}, 503, id="token-ok-model-loading"),
])
def test_internal_token(loading_service, headers, status):
    client = TestClient(internal_app.build(loading_service))
    r = client.get("/internal/v1/generations", headers=headers)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/health/ready").status_code == 503  # probes need no token
