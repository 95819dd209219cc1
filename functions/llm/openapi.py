"""The public API's OpenAPI 3.1 document (`GET /openapi.json`), written by hand as data.

It describes what `functions.llm.protocol` accepts, no more and no less where JSON Schema can
say it: each endpoint's parameter names (exactly protocol's `_COMPLETION` and `_CHAT`, a test
keeps them equal), their types, ranges and required fields, the OpenAI error body, and the
responses. Every optional parameter may be null (the server reads null as absent). The bounds
come from protocol's constants, and the per-instance ones from the served model: its name (the
only `model` accepted), its context length (no `max_tokens` reaches it: the prompt has at least
one token) and its vocabulary (token-id prompts).

Two rules between parameters are `if`/`then` clauses (`stream_options` needs `stream: true`,
chat's `top_logprobs` needs `logprobs: true`); those JSON Schema cannot express are in the
descriptions and answered with a 400: the prompt plus `max_tokens` must fit the context, and the
model must have a chat template for chat.
"""

from __future__ import annotations

import copy
from typing import Any

from functions.llm import protocol
from functions.llm.params import MAX_SEED, MAX_TEMPERATURE

VERSION = "1"
GENERATION_ID_PATTERN = protocol._GENERATION_ID.pattern


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """schema, or null (the server reads null as the parameter's absence)."""
    out = dict(schema)
    if not isinstance(out.get("type"), str):
        return {"anyOf": [schema, {"type": "null"}]}
    out["type"] = [out["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _ignored(description: str) -> dict[str, Any]:
    return {"description": f"Accepted with any value and ignored: {description}"}


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "description": "invalid_request_error, rate_limit_error, "
                         "authentication_error, service_unavailable or server_error"},
                "param": {"type": ["string", "null"], "description": "the parameter at fault, if one is"},
                "code": {"type": ["string", "null"]},
            },
        }},
    }


def _tokens(name: str, max_tokens: int | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": 1,
                              "description": f"the most tokens to generate per choice; `{name}` plus the prompt's "
                                             "tokens must fit the model's context length (else 400 "
                                             "context_length_exceeded). Absent: 16 for a completion, the rest of "
                                             "the context for a chat."}
    if max_tokens is not None:
        schema["maximum"] = max_tokens
    return _nullable(schema)


def _common(model: str, max_tokens: int | None) -> dict[str, Any]:
    """The parameters of both endpoints (protocol._COMMON)."""
    return {
        "model": {"type": "string", "enum": [model], "description": "the served model; any other name is a 404"},
        "max_tokens": _tokens("max_tokens", max_tokens),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE, "default": 1}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": protocol.MAX_N, "default": 1,
                        "description": "choices; choice i of a seeded request samples with seed + i"}),
        "stream": _nullable({"type": "boolean", "default": False}),
        "stream_options": _nullable({
            "type": "object", "additionalProperties": False,
            "description": "only with `stream: true` (else 400)",
            "properties": {"include_usage": _nullable({"type": "boolean"}),
                           "continuous_usage_stats": _ignored("vLLM's option; usage comes once, at the end")},
        }),
        "stop": _nullable({"anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": protocol.MAX_STOP},
        ], "description": "empty strings are ignored"}),
        "presence_penalty": _nullable({"type": "number", "minimum": 0, "maximum": 0,
                                       "description": "only 0 is supported"}),
        "frequency_penalty": _nullable({"type": "number", "minimum": 0, "maximum": 0,
                                        "description": "only 0 is supported"}),
        "seed": _nullable({"type": "integer", "minimum": -MAX_SEED - 1, "maximum": MAX_SEED,
                           "description": "a signed 64-bit integer; the same seed gives the same text"}),
        "user": _nullable({"type": "string"}),
        "logit_bias": _nullable({"type": "object", "maxProperties": 0, "description": "only {} is supported"}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "description": "-1 or 0: disabled"}),
        "ignore_eos": _nullable({"type": "boolean", "default": False}),
    }


def _needs_true(name: str, flag: str) -> dict[str, Any]:
    """`name` (when not null) needs `flag: true`."""
    return {"if": {"required": [name], "properties": {name: {"not": {"type": "null"}}}},
            "then": {"required": [flag], "properties": {flag: {"const": True}}}}


def _token_ids(vocab_size: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "integer", "minimum": 0}
    if vocab_size:
        item["maximum"] = vocab_size - 1
    return {"type": "array", "items": item, "minItems": 1}


def completion_request(model: str, max_tokens: int | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    text = {"type": "string", "minLength": 1}
    props = _common(model, max_tokens) | {
        "prompt": {"anyOf": [text, _token_ids(vocab_size), {
            "type": "array", "minItems": 1, "maxItems": 1, "items": {"anyOf": [text, _token_ids(vocab_size)]},
            "description": "a batch of one prompt (a batch of several is not supported)"}]},
        "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": protocol.MAX_COMPLETION_LOGPROBS}),
        "echo": _nullable({"type": "boolean", "default": False}),
        "best_of": _nullable({"type": "integer", "minimum": 1, "maximum": 1, "description": "only 1"}),
        "suffix": _nullable({"type": "string", "maxLength": 0, "description": "only the empty string"}),
    }
    return {"type": "object", "required": ["model", "prompt"], "additionalProperties": False, "properties": props,
            "allOf": [_needs_true("stream_options", "stream")]}


def _message() -> dict[str, Any]:
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    return {
        "type": "object", "required": ["role", "content"], "additionalProperties": False,
        "properties": {
            "role": {"type": "string", "enum": list(protocol.CHAT_ROLES)},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}],
                        "description": "a string, or text parts joined in order"},
            "name": {"description": "passed to the chat template when a string, else ignored"},
            "tool_call_id": _ignored("no tools are supported"),
        },
    }


def chat_request(model: str, max_tokens: int | None = None) -> dict[str, Any]:
    props = _common(model, max_tokens) | {
        "messages": {"type": "array", "minItems": 1, "items": _message()},
        "max_completion_tokens": _tokens("max_completion_tokens", max_tokens),
        "logprobs": _nullable({"type": "boolean", "default": False}),
        "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": protocol.MAX_CHAT_TOP_LOGPROBS,
                                   "description": "only with `logprobs: true` (else 400)"}),
        "tools": _nullable({"type": "array", "maxItems": 0, "description": "only []: no tools are supported"}),
        "tool_choice": _nullable({"type": "string", "enum": ["none"]}),
        "response_format": _nullable({"type": "object", "required": ["type"], "additionalProperties": False,
                                      "properties": {"type": {"type": "string", "enum": ["text"]}},
                                      "description": "only {\"type\": \"text\"}"}),
        "parallel_tool_calls": _ignored("no tools are supported"),
        "metadata": _ignored("nothing is stored"),
        "store": _ignored("nothing is stored"),
        "service_tier": _ignored("there is one tier"),
    }
    return {"type": "object", "required": ["model", "messages"], "additionalProperties": False, "properties": props,
            "allOf": [_needs_true("stream_options", "stream"), _needs_true("top_logprobs", "logprobs")]}


_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_FINISH = {"enum": ["stop", "length", None]}


def _base_response(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {"id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
                           "model": {"type": "string"}, "choices": {"type": "array", "minItems": 1, "items": choice},
                           "usage": _USAGE}}


def _completion_response() -> dict[str, Any]:
    logprobs = {"type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
                "properties": {"tokens": {"type": "array", "items": {"type": "string"}},
                               "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
                               "top_logprobs": {"type": "array", "items": {
                                   "type": ["object", "null"], "additionalProperties": {"type": "number"}}},
                               "text_offset": {"type": "array", "items": {"type": "integer"}}}}
    choice = {"type": "object", "required": ["text", "index", "logprobs", "finish_reason"],
              "properties": {"text": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
                             "logprobs": {"anyOf": [logprobs, {"type": "null"}]}, "finish_reason": _FINISH}}
    return _base_response("text_completion", choice)


def _chat_response() -> dict[str, Any]:
    token = {"type": "object", "required": ["token", "logprob", "bytes"],
             "properties": {"token": {"type": "string"}, "logprob": {"type": "number"},
                            "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}}}
    logprobs = {"type": "object", "required": ["content"],
                "properties": {"content": {"type": "array", "items": {
                    "allOf": [token], "properties": {"top_logprobs": {"type": "array", "items": token}}}},
                    "refusal": {"type": "null"}}}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"const": "assistant"}, "content": {"type": "string"},
                              "refusal": {"type": "null"}}}
    choice = {"type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
              "properties": {"index": {"type": "integer", "minimum": 0}, "message": message,
                             "logprobs": {"anyOf": [logprobs, {"type": "null"}]}, "finish_reason": _FINISH}}
    return _base_response("chat.completion", choice)


def _chunk(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
    """One streamed chunk: choices with the new text, or (the last, with include_usage) none and the usage."""
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {"id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
                           "model": {"type": "string"}, "choices": {"type": "array", "items": choice},
                           "usage": {"anyOf": [_USAGE, {"type": "null"}]}}}


def _stream_event(kind: str) -> dict[str, Any]:
    """One server-sent event of a streamed generation (as Open API 3.1 describes a stream: per event)."""
    if kind == "chat":
        delta = {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}
        choice = {"type": "object", "required": ["index", "delta", "finish_reason"],
                  "properties": {"index": {"type": "integer", "minimum": 0}, "delta": delta, "finish_reason": _FINISH}}
        chunk = _chunk("chat.completion.chunk", choice)
    else:
        choice = {"type": "object", "required": ["text", "index", "finish_reason"],
                  "properties": {"text": {"type": "string"}, "index": {"type": "integer", "minimum": 0},
                                 "finish_reason": _FINISH}}
        chunk = _chunk("text_completion", choice)
    detached = {"type": "object", "required": ["id", "position", "state"],
                "properties": {"id": {"type": "string"}, "position": {"type": "integer"}, "state": {"type": "object"}}}
    return {
        "type": "object", "required": ["data"],
        "properties": {
            "event": {"type": "string", "description": "absent, or sllm.detached: the generation was detached for "
                                                       "migration, its state follows (the activator resumes it)"},
            "data": {"anyOf": [
                {"const": "[DONE]", "description": "the end of every stream"},
                {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
                    chunk, {"$ref": "#/components/schemas/Error"}, detached]},
                 "description": "a chunk; an error object if the generation failed after the first chunk"},
            ]},
        },
    }


def _model_card() -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "owned_by"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                           "owned_by": {"type": "string"}, "max_model_len": {"type": ["integer", "null"]}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _generation(summary: str, request: str, response: str, event: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [{
            "name": protocol.GENERATION_ID_HEADER, "in": "header", "required": False,
            "description": "the generation's name, chosen by the caller (the activator names each generation it "
                           "forwards, to migrate it); absent: a fresh one",
            "schema": {"type": "string", "pattern": f"^{GENERATION_ID_PATTERN}$"},
        }],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {
            "200": {"description": "the whole response, or with `stream: true` server-sent events: chunks, "
                                   "then `data: [DONE]` (a failure after the first chunk is an error event)",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}},
                                "text/event-stream": {"schema": {"$ref": f"#/components/schemas/{event}"}}}},
            "400": _error("invalid body or parameter (`param` names it), or prompt over the context length"),
            "404": _error("unknown model"),
            "409": _error("the generation was detached for migration (the activator resumes it elsewhere)"),
            "413": _error("the body is over the server's limit"),
            "429": _error("the concurrency limit is reached"),
            "503": _error("the model is still loading, the engine failed, or the instance is shutting down"),
        },
    }


def document(model: str, max_model_len: int | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """The OpenAPI document of a function serving `model` (its context length and vocabulary
    once loaded: None leaves those bounds out)."""
    max_tokens = max_model_len - 1 if max_model_len else None
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "sllm-knative inference function", "version": VERSION,
                 "description": "The OpenAI-compatible API of one model. Every error is "
                                "{\"error\": {\"message\", \"type\", \"param\", \"code\"}}."},
        "paths": {
            "/v1/completions": {"post": _generation("Create a completion", "CompletionRequest",
                                                    "CompletionResponse", "CompletionEvent")},
            "/v1/chat/completions": {"post": _generation("Create a chat completion", "ChatRequest",
                                                         "ChatResponse", "ChatEvent")},
            "/v1/models": {"get": {"summary": "List the served model", "responses": {"200": _json(
                "the served model", {"type": "object", "required": ["object", "data"],
                                     "properties": {"object": {"const": "list"},
                                                    "data": {"type": "array", "minItems": 1, "maxItems": 1,
                                                             "items": {"$ref": "#/components/schemas/Model"}}}})}}},
            "/v1/models/{model}": {"get": {
                "summary": "The served model",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json("the served model", {"$ref": "#/components/schemas/Model"}),
                              "404": _error("not the served model")}}},
            "/health/live": {"get": {"summary": "Liveness", "responses": {
                "200": _json("the process and its engine are healthy", {"$ref": "#/components/schemas/Status"}),
                "500": _json("the engine failed: restart the instance", {"$ref": "#/components/schemas/Status"}),
            }}},
            "/health/ready": {"get": {"summary": "Readiness and the startup report", "responses": {
                "200": _json("weights loaded and warmed up", {"$ref": "#/components/schemas/Report"}),
                "503": _json("loading, failed or stopping", {"$ref": "#/components/schemas/Report"}),
            }}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "the Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": _json("OpenAPI 3.1", {"type": "object", "required": ["openapi", "paths"]})}}},
        },
        "components": {"schemas": {
            "Error": _error_schema(),
            "CompletionRequest": completion_request(model, max_tokens, vocab_size),
            "ChatRequest": chat_request(model, max_tokens),
            "CompletionResponse": _completion_response(),
            "ChatResponse": _chat_response(),
            "CompletionEvent": _stream_event("completion"),
            "ChatEvent": _stream_event("chat"),
            "Model": _model_card(),
            "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
            "Report": {"type": "object", "required": ["status", "model"],
                       "properties": {"status": {"enum": ["loading", "ready", "failed", "stopping"]},
                                      "model": {"type": "string"}}},
        }},
    }
    return copy.deepcopy(doc)
