"""The OpenAPI document (functions/llm/openapi.py) against the parser it describes (protocol.py).

The parameter sets must be protocol's own, and for every parameter and a spread of probe values
(boundaries, wrong types, null) the document's JSON Schema and the parser must agree on whether a
body is accepted, so that neither can drift from the other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis  # a dev dependency (pyproject.toml)
from starlette.testclient import TestClient

from functions.llm import app as public_app
from functions.llm import openapi, protocol
from functions.llm.config import ServeConfig
from functions.llm.errors import ApiError, BadRequest, ContextLengthExceeded, model_not_found
from functions.llm.service import ModelHost
from sllm_knative.log import get_logger

MODEL = "tiny"
MAX_LEN = 1024
VOCAB = 1000
DOC = openapi.document(MODEL, MAX_LEN, VOCAB)
SCHEMAS = DOC["components"]["schemas"]

BASES: dict[str, dict[str, Any]] = {
    "completion": {"model": MODEL, "prompt": "hello"},
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
}
REQUEST = {"completion": "CompletionRequest", "chat": "ChatRequest"}
KEYS = {"completion": protocol._COMPLETION, "chat": protocol._CHAT}
BIG = 2 ** 63

PROBES: list[Any] = [
    None, True, False, 0, 1, 2, -1, -2, 0.0, -0.0, 0.5, 1.5, 2.0, 2.5, -2.5, 4, 5, 6, 15, 16, 17, 20, 21,
    MAX_LEN - 1, MAX_LEN, VOCAB - 1, VOCAB, BIG - 1, BIG, -BIG, -BIG - 1, "", "x", "none", "auto", "text",
    [], [""], ["a"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"], [1, 2], [0], [VOCAB - 1], [VOCAB], [-1],
    [True], [1.5], [2.0], [[1, 2.0]], [[1, 2]], [[]], ["a", "b"], [["a"]], [{"type": "text", "text": "x"}], {}, {"a": 1},
    {"type": "text"}, {"type": "json_object"}, {"include_usage": True}, {"include_usage": 1},
    {"include_usage": None}, {"continuous_usage_stats": True}, {"other": True},
]

MESSAGE_PROBES: list[Any] = [
    None, "hi", 1, {}, {"role": "user"}, {"role": "user", "content": "x"}, {"role": "bot", "content": "x"},
    {"role": "tool", "content": "x", "tool_call_id": 7}, {"role": "user", "content": "x", "name": 3},
    {"role": "user", "content": "x", "extra": 1}, {"role": "user", "content": None},
    {"role": "user", "content": []}, {"role": "user", "content": [{"type": "text", "text": "a"}]},
    {"role": "user", "content": [{"type": "image_url", "text": "a"}]}, {"role": "user", "content": [{"type": "text"}]},
    {"role": "user", "content": ["a"]}, {"role": None, "content": "x"}, {"role": "system", "content": 5},
]



HOST = ModelHost(ServeConfig(model_dir=Path("."), model_name=MODEL), time.time(), get_logger("test"))
HOST.vocab_size = VOCAB  # the token-id check of a loaded model (prompt_ids), without loading one


def _accepted(kind: str, body: dict[str, Any]) -> bool:
    """Whether the server takes the body: it parses, its token ids are in the vocabulary, and its
    max_tokens fits the context after the shortest prompt (one token)."""
    parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion
    try:
        req = parse(body, MODEL)
        if req.prompt_ids is not None:
            HOST.prompt_ids(req)
        protocol.resolve_max_tokens(req, 1, MAX_LEN)
    except ApiError as exc:
        assert exc.status in (400, 404), exc
        return False
    return True


def _valid(kind: str, body: dict[str, Any]) -> bool:
    return jsonschema.Draft202012Validator(SCHEMAS[REQUEST[kind]]).is_valid(body)


def _context(name: str, value: Any, kind: str) -> dict[str, Any]:
    """The parameter another one needs (the rules between parameters, `test_cross_field_rules`),
    so that the probe tests the value itself."""
    if name == "stream_options":
        return {"stream": True}
    if name == "top_logprobs" and kind == "chat":
        return {"logprobs": True}
    return {}


def test_parameters_are_protocols():
    for kind, keys in KEYS.items():
        schema = SCHEMAS[REQUEST[kind]]
        assert set(schema["properties"]) == keys, kind
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) == {"model", "prompt" if kind == "completion" else "messages"}
        # each required parameter is refused when absent, each optional one is not
        for name in keys:
            body = {k: v for k, v in BASES[kind].items() if k != name}
            assert _accepted(kind, body) is (name not in schema["required"]), (kind, name)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_bounds_agree_with_protocol(kind):
    checked = 0
    for name in sorted(KEYS[kind]):
        for value in PROBES:
            body = {**BASES[kind], **_context(name, value, kind), name: value}
            if name == "model" and not isinstance(value, str) and value is not None:
                continue
            valid, accepted = _valid(kind, body), _accepted(kind, body)
            assert valid == accepted, f"{kind}: {name}={value!r}: document {'accepts' if valid else 'refuses'}, " \
                                      f"server {'accepts' if accepted else 'refuses'}"
            checked += 1
    assert checked > 500


def test_messages_agree_with_protocol():
    for message in MESSAGE_PROBES:
        body = {**BASES["chat"], "messages": [message]}
        assert _valid("chat", body) == _accepted("chat", body), message
    assert not _valid("chat", {**BASES["chat"], "messages": []})
    assert not _accepted("chat", {**BASES["chat"], "messages": []})


def test_cross_field_rules():
    """The rules between parameters (if/then in the document): both refuse, the server naming the param."""
    refused = [
        ("completion", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("completion", {"stream": None, "stream_options": {}}, "stream_options"),
        ("chat", {"stream": False, "stream_options": {}}, "stream_options"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ]
    for kind, extra, param in refused:
        body = {**BASES[kind], **extra}
        assert not _valid(kind, body), body
        with pytest.raises(ApiError) as err:
            (protocol.parse_chat if kind == "chat" else protocol.parse_completion)(body, MODEL)
        assert err.value.status == 400 and err.value.param == param
        assert "(else 400)" in SCHEMAS[REQUEST[kind]]["properties"][param]["description"]
    taken = [
        ("completion", {"stream": True, "stream_options": {"include_usage": True}}),
        ("completion", {"stream": False, "stream_options": None}),
        ("chat", {"stream_options": None, "top_logprobs": None}),
        ("chat", {"logprobs": True, "top_logprobs": 3}),
    ]
    for kind, extra in taken:
        body = {**BASES[kind], **extra}
        assert _valid(kind, body) and _accepted(kind, body), body


def test_model_is_the_served_one():
    for kind in KEYS:
        assert SCHEMAS[REQUEST[kind]]["properties"]["model"]["enum"] == [MODEL]
        assert not _valid(kind, {**BASES[kind], "model": "other"})
        assert not _accepted(kind, {**BASES[kind], "model": "other"})


def test_max_tokens_bound_is_the_context():
    """No max_tokens of MAX_LEN or more can succeed (the prompt has a token), so the document says so."""
    for kind, names in (("completion", ["max_tokens"]), ("chat", ["max_tokens", "max_completion_tokens"])):
        for name in names:
            assert _valid(kind, {**BASES[kind], name: MAX_LEN - 1})
            assert not _valid(kind, {**BASES[kind], name: MAX_LEN})
            req = protocol.parse_completion({**BASES["completion"], "prompt": [5], "max_tokens": MAX_LEN - 1}, MODEL)
            assert protocol.resolve_max_tokens(req, 1, MAX_LEN) == MAX_LEN - 1
            req = protocol.parse_completion({**BASES["completion"], "prompt": [5], "max_tokens": MAX_LEN}, MODEL)
            with pytest.raises(ApiError, match="maximum context length"):
                protocol.resolve_max_tokens(req, 1, MAX_LEN)
    unbounded = openapi.document(MODEL)["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "maximum" not in unbounded["max_tokens"] and unbounded["prompt"]["anyOf"][1]["items"] == {
        "type": "integer", "minimum": 0}


def test_error_schema_is_the_servers():
    errors = [BadRequest("x", param="n", code="invalid_value"), model_not_found("m"),
              ContextLengthExceeded("too long", param="prompt")]
    for exc in errors:
        jsonschema.validate(exc.body(), SCHEMAS["Error"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": {"message": "x"}}, SCHEMAS["Error"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"detail": "Not Found"}, SCHEMAS["Error"])


def test_schemathesis_loads_every_operation():
    schema = schemathesis.openapi.from_dict(DOC)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} == {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /v1/models/{model}",
        "GET /health/live", "GET /health/ready", "GET /metrics", "GET /openapi.json"}


def test_served_document(tmp_path):
    """GET /openapi.json of an app whose model is still loading: no context or vocabulary bounds yet."""
    service = ModelHost(ServeConfig(model_dir=tmp_path, model_name="m1"), time.time(), get_logger("test"))
    assert service.max_len == 0 and service.vocab_size == 0
    client = TestClient(public_app.build(service))
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc == json.loads(json.dumps(openapi.document("m1")))
    assert doc["components"]["schemas"]["ChatRequest"]["properties"]["model"]["enum"] == ["m1"]
    documented = {path for path in doc["paths"]}
    routed = {getattr(r, "path", "").replace("{model:path}", "{model}") for r in client.app.routes}
    assert documented == routed
