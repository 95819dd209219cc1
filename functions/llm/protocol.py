"""OpenAI request bodies to validated requests: pure functions, errors name the parameter.

`parse_completion(body, model)` and `parse_chat(body, model)` check, in order: the body is an
object, no unknown parameter, the model name, then each parameter's type and range. They
raise `BadRequest` (400) or `NotFound` (404, unknown model). `resolve_max_tokens` applies the
context length once the prompt is tokenized.

Supported beyond the OpenAI parameters (as vLLM does): `top_k` and `ignore_eos`. `n` up to
`MAX_N` choices (choice i of a seeded request samples with seed + i).
Accepted only at their neutral value: `best_of` (1), `presence_penalty` and
`frequency_penalty` (0), `logit_bias` (empty), `suffix` (null), `tools` (empty).
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from typing import Any

from functions.llm.errors import BadRequest, ContextLengthExceeded, model_not_found
from functions.llm.params import MAX_LOGPROBS, MAX_SEED, MAX_TEMPERATURE, SamplingParams
from sllm_knative.api import instance as instance_api

MAX_STOP = 4
MAX_N = 16  # choices per request; each is a sequence with its own KV slot
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = MAX_LOGPROBS
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
           "presence_penalty", "frequency_penalty", "seed", "user", "logit_bias", "top_k", "ignore_eos"}
_COMPLETION = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                   "response_format", "parallel_tool_calls", "metadata", "store", "service_tier"}


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request (completion or chat)."""

    kind: str  # "completion" | "chat"
    model: str
    sampling: SamplingParams  # max_tokens is the requested value or 0 (= choose from the context)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    prompt_text: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] = ()
    n: int = 1  # choices


GENERATION_ID_HEADER = instance_api.GENERATION_ID_HEADER
_GENERATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{7,127}")


def new_id(kind: str) -> str:
    """A fresh generation name, OpenAI style."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def choice_id(name: str, index: int, choices: int) -> str:
    """The generation name of one choice: the request's own for a one-choice request (the name
    the activator migrates by), `<name>-<index>` for each choice of a request with n > 1."""
    return name if choices == 1 else f"{name}-{index}"


def generation_id(value: str | None) -> str | None:
    """The generation id a caller chose (header x-sllm-generation-id), or None for a fresh one.

    The activator names every generation it forwards, so that it can migrate a non-streaming
    one before the response, which would carry the id, exists."""
    if value is None:
        return None
    if not _GENERATION_ID.fullmatch(value):
        raise BadRequest(f"header {GENERATION_ID_HEADER} = {value[:40]!r}: must be 8 to 128 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit", param=GENERATION_ID_HEADER,
                         code="invalid_value")
    return value


def _type_error(name: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(f"{value!r} is not of type '{expected}' - '{name}'", param=name, code="invalid_type")


def _get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "boolean", value)
    return value


def _is_integer(value: Any) -> bool:
    """An integer in JSON's sense (as JSON Schema's `integer`): 3 or 3.0, not true."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _get_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_integer(value):
        raise _type_error(name, "integer", value)
    return int(value)


def _get_number(body: dict[str, Any], name: str, default: float, low: float, high: float,
                low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error(name, "number", value)
    if value > high or value < low or (low_open and value == low):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise BadRequest(f"{value} is out of range for '{name}': must be {bound} and at most {high}",
                         param=name, code="invalid_value")
    return float(value)


def _neutral(body: dict[str, Any], name: str, ok: Any) -> None:
    value = body.get(name)
    if value is None or (value == ok and isinstance(value, bool) == isinstance(ok, bool)):  # true is not 1
        return
    raise BadRequest(f"'{name}' = {value!r} is not supported by this server (only {ok!r})", param=name,
                     code="unsupported_value")


def _check_keys(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_body")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                         code="unknown_parameter")
    return body


def _check_model(body: dict[str, Any], served: str) -> str:
    model = body.get("model")
    if model is None:
        raise BadRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _type_error("model", "string", model)
    if model != served:
        raise model_not_found(model)
    return model


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error("stop", "string or array of strings", value)
    if len(value) > MAX_STOP:
        raise BadRequest(f"'stop' has {len(value)} sequences, at most {MAX_STOP} are allowed", param="stop",
                         code="invalid_value")
    return tuple(s for s in value if s)


def _common(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> tuple[dict[str, Any], bool, bool, int]:
    """Sampling fields shared by both endpoints, and (stream, include_usage, n)."""
    max_tokens = None
    for name in max_tokens_names:
        value = _get_int(body, name)
        if value is not None:
            if value < 1:
                raise BadRequest(f"'{name}' = {value}, must be at least 1", param=name, code="invalid_value")
            max_tokens = value
    top_k = _get_int(body, "top_k")
    if top_k is not None and top_k < -1:
        raise BadRequest(f"'top_k' = {top_k}, must be -1, 0 (disabled) or positive", param="top_k",
                         code="invalid_value")
    seed = _get_int(body, "seed")
    if seed is not None and not -MAX_SEED - 1 <= seed <= MAX_SEED:
        raise BadRequest(f"'seed' = {seed} is outside the signed 64-bit range", param="seed", code="invalid_value")
    n = _get_int(body, "n")
    if n is not None and not 1 <= n <= MAX_N:
        raise BadRequest(f"'n' = {n}, must be between 1 and {MAX_N}", param="n", code="invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get_number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise BadRequest(f"'{name}' is not supported by this server (only 0)", param=name,
                             code="unsupported_value")
    if body.get("logit_bias") not in (None, {}):
        _neutral(body, "logit_bias", {})
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _type_error("user", "string", body["user"])
    stream = _get_bool(body, "stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise BadRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options",
                             code="invalid_value")
        if not isinstance(options, dict):
            raise _type_error("stream_options", "object", options)
        extra = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise BadRequest(f"Unrecognized argument supplied: stream_options.{extra[0]}",
                             param=f"stream_options.{extra[0]}", code="unknown_parameter")
        include_usage = _get_bool(options, "include_usage", False)
    seed_value = None if seed is None else seed & MAX_SEED  # torch seeds are unsigned 64-bit
    fields = {
        "temperature": _get_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        "top_p": _get_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": 0 if top_k in (None, -1) else top_k,
        "seed": seed_value,
        "max_tokens": max_tokens or 0,
        "stop": _stop(body),
        "ignore_eos": _get_bool(body, "ignore_eos", False),
    }
    return fields, stream, include_usage, n or 1


def parse_completion(body: Any, served_model: str) -> Request:
    body = _check_keys(body, _COMPLETION)
    model = _check_model(body, served_model)
    fields, stream, include_usage, n = _common(body, ("max_tokens",))
    _neutral(body, "best_of", 1)
    _neutral(body, "suffix", "")
    logprobs = _get_int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise BadRequest(f"'logprobs' = {logprobs}, must be between 0 and {MAX_COMPLETION_LOGPROBS}",
                         param="logprobs", code="invalid_value")
    echo = _get_bool(body, "echo", False)
    prompt = body.get("prompt")
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' must not be empty", param="prompt", code="invalid_value")
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_integer(t) for t in prompt):
        ids = tuple(int(t) for t in prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise BadRequest("a batch of several prompts is not supported; send one prompt per request",
                         param="prompt", code="unsupported_value")
    elif prompt is None:
        raise BadRequest("you must provide a prompt parameter", param="prompt", code="missing_required_parameter")
    else:
        raise _type_error("prompt", "string or array of token ids", prompt)
    return Request(kind="completion", model=model, sampling=SamplingParams(**fields, logprobs=logprobs),
                   stream=stream, include_usage=include_usage, echo=echo, prompt_text=text, prompt_ids=ids, n=n)


def _message(i: int, m: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _type_error(where, "object", m)
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise BadRequest(f"{where}.role = {role!r}, must be one of {', '.join(CHAT_ROLES)}", param=f"{where}.role",
                         code="invalid_value")
    extra = sorted(set(m) - {"role", "content", "name", "tool_call_id"})
    if extra:
        raise BadRequest(f"Unrecognized argument supplied: {where}.{extra[0]}", param=f"{where}.{extra[0]}",
                         code="unknown_parameter")
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                                 param=f"{where}.content[{j}]", code="invalid_value")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise _type_error(f"{where}.content", "string or array of text parts", content)
    out = {"role": role, "content": content}
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def parse_chat(body: Any, served_model: str) -> Request:
    body = _check_keys(body, _CHAT)
    model = _check_model(body, served_model)
    fields, stream, include_usage, n = _common(body, ("max_tokens", "max_completion_tokens"))
    _neutral(body, "tools", [])
    if body.get("tool_choice") not in (None, "none"):
        _neutral(body, "tool_choice", "none")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        _neutral(body, "response_format", {"type": "text"})
    want_logprobs = _get_bool(body, "logprobs", False)
    top = _get_int(body, "top_logprobs")
    if top is not None:
        if not want_logprobs:
            raise BadRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs",
                             code="invalid_value")
        if not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
            raise BadRequest(f"'top_logprobs' = {top}, must be between 0 and {MAX_CHAT_TOP_LOGPROBS}",
                             param="top_logprobs", code="invalid_value")
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("you must provide a messages parameter", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _type_error("messages", "array", messages)
    if not messages:
        raise BadRequest("'messages' must contain at least one message", param="messages", code="invalid_value")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    logprobs = (top or 0) if want_logprobs else None
    return Request(kind="chat", model=model, sampling=SamplingParams(**fields, logprobs=logprobs), stream=stream,
                   include_usage=include_usage, messages=parsed, n=n)


def resolve_max_tokens(request: Request, prompt_len: int, max_len: int) -> int:
    """The completion budget, or ContextLengthExceeded if prompt + budget exceed the context."""
    asked = request.sampling.max_tokens
    if prompt_len >= max_len or (asked and prompt_len + asked > max_len):
        what = "messages" if request.kind == "chat" else "prompt"
        total = prompt_len + asked
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_len} tokens. However, you requested {total} tokens "
            f"({prompt_len} in the {what}, {asked} in the completion). Please reduce the length of the {what} "
            f"or completion.", param="messages" if request.kind == "chat" else "prompt")
    if asked:
        return asked
    return min(16, max_len - prompt_len) if request.kind == "completion" else max_len - prompt_len
