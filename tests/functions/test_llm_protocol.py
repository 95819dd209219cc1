"""Request validation (functions.llm.protocol): pure, table-driven."""

from __future__ import annotations

import pytest

from functions.llm import protocol
from functions.llm.errors import BadRequest, ContextLengthExceeded, NotFound
from functions.llm.params import SamplingParams

C = {"model": "m", "prompt": "hello"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body,expected", [
    pytest.param(C, dict(sampling=SamplingParams(max_tokens=0), prompt_text="hello"), id="defaults"),
    pytest.param({**C, "prompt": ["hello"]}, dict(prompt_text="hello"), id="batch-of-one"),
    pytest.param({**C, "prompt": [5, 6, 7]}, dict(prompt_ids=(5, 6, 7), prompt_text=None), id="token-ids"),
    pytest.param({**C, "prompt": [[5, 6]]}, dict(prompt_ids=(5, 6)), id="token-ids-batch-of-one"),
    pytest.param({**C, "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 9, "stop": "x",
                  "ignore_eos": True},
                 dict(sampling=SamplingParams(temperature=0.0, top_p=0.5, top_k=3, seed=9, max_tokens=7, stop=("x",),
                                              ignore_eos=True)), id="sampling"),
    pytest.param({**C, "top_k": -1, "max_tokens": 3.0}, dict(sampling=SamplingParams(top_k=0, max_tokens=3)),
                 id="top-k-off-integral-float"),
    pytest.param({**C, "seed": -1}, dict(sampling=SamplingParams(seed=(1 << 63) - 1, max_tokens=0)), id="negative-seed"),
    pytest.param({**C, "stream": True, "stream_options": {"include_usage": True}},
                 dict(stream=True, include_usage=True), id="stream-usage"),
    pytest.param({**C, "echo": True, "logprobs": 3}, dict(echo=True, sampling=SamplingParams(logprobs=3, max_tokens=0)),
                 id="echo-logprobs"),
    pytest.param({**C, "n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                  "user": "u", "suffix": None, "stop": None}, dict(), id="neutral-values"),
])
def test_completion_accepts(body, expected):
    req = protocol.parse_completion(body, "m")
    assert req.kind == "completion" and req.model == "m"
    for name, value in expected.items():
        assert getattr(req, name) == value, name


@pytest.mark.parametrize("body,error,param,code", [
    pytest.param("text", BadRequest, None, "invalid_body", id="not-object"),
    pytest.param({**C, "extra": 1}, BadRequest, "extra", "unknown_parameter", id="unknown-param"),
    pytest.param({"prompt": "x"}, BadRequest, "model", "missing_required_parameter", id="no-model"),
    pytest.param({**C, "model": 3}, BadRequest, "model", "invalid_type", id="model-type"),
    pytest.param({**C, "model": "other"}, NotFound, "model", "model_not_found", id="unknown-model"),
    pytest.param({"model": "m"}, BadRequest, "prompt", "missing_required_parameter", id="no-prompt"),
    pytest.param({**C, "prompt": ""}, BadRequest, "prompt", "invalid_value", id="empty-prompt"),
    pytest.param({**C, "prompt": ["a", "b"]}, BadRequest, "prompt", "unsupported_value", id="prompt-batch"),
    pytest.param({**C, "prompt": {"a": 1}}, BadRequest, "prompt", "invalid_type", id="prompt-type"),
    pytest.param({**C, "prompt": [1, True]}, BadRequest, "prompt", "invalid_type", id="prompt-bool-id"),
    pytest.param({**C, "max_tokens": 0}, BadRequest, "max_tokens", "invalid_value", id="max-tokens-0"),
    pytest.param({**C, "max_tokens": True}, BadRequest, "max_tokens", "invalid_type", id="max-tokens-bool"),
    pytest.param({**C, "max_tokens": 2.5}, BadRequest, "max_tokens", "invalid_type", id="max-tokens-float"),
    pytest.param({**C, "temperature": -0.1}, BadRequest, "temperature", "invalid_value", id="temperature-neg"),
    pytest.param({**C, "temperature": float("nan")}, BadRequest, "temperature", "invalid_type", id="temperature-nan"),
    pytest.param({**C, "top_p": 1.5}, BadRequest, "top_p", "invalid_value", id="top-p-high"),
    pytest.param({**C, "top_k": -2}, BadRequest, "top_k", "invalid_value", id="top-k"),
    pytest.param({**C, "seed": 1 << 70}, BadRequest, "seed", "invalid_value", id="seed-range"),
    pytest.param({**C, "stop": ["a"] * 5}, BadRequest, "stop", "invalid_value", id="too-many-stops"),
    pytest.param({**C, "stop": [1]}, BadRequest, "stop", "invalid_type", id="stop-type"),
    pytest.param({**C, "n": 17}, BadRequest, "n", "invalid_value", id="n-above-max"),
    pytest.param({**C, "n": 0}, BadRequest, "n", "invalid_value", id="n-zero"),
    pytest.param({**C, "best_of": 2}, BadRequest, "best_of", "unsupported_value", id="best-of"),
    pytest.param({**C, "presence_penalty": 1}, BadRequest, "presence_penalty", "unsupported_value", id="penalty"),
    pytest.param({**C, "presence_penalty": 5}, BadRequest, "presence_penalty", "invalid_value", id="penalty-range"),
    pytest.param({**C, "logit_bias": {"5": 1}}, BadRequest, "logit_bias", "unsupported_value", id="logit-bias"),
    pytest.param({**C, "logprobs": 6}, BadRequest, "logprobs", "invalid_value", id="logprobs-range"),
    pytest.param({**C, "echo": "yes"}, BadRequest, "echo", "invalid_type", id="echo-type"),
    pytest.param({**C, "stream_options": {"include_usage": True}}, BadRequest, "stream_options", "invalid_value",
                 id="stream-options-without-stream"),
    pytest.param({**C, "stream": True, "stream_options": {"x": 1}}, BadRequest, "stream_options.x",
                 "unknown_parameter", id="stream-options-unknown"),
    pytest.param({**C, "user": 5}, BadRequest, "user", "invalid_type", id="user-type"),
])
def test_completion_rejects(body, error, param, code):
    with pytest.raises(error) as info:
        protocol.parse_completion(body, "m")
    assert info.value.param == param and info.value.code == code
    assert type(info.value) is error


@pytest.mark.parametrize("body,messages,logprobs,max_tokens", [
    pytest.param(CHAT, ({"role": "user", "content": "hi"},), None, 0, id="minimal"),
    pytest.param({**CHAT, "messages": [{"role": "system", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]},
                                       {"role": "user", "content": "q", "name": "bob"}]},
                 ({"role": "system", "content": "ab"}, {"role": "user", "content": "q", "name": "bob"}), None, 0,
                 id="text-parts-and-name"),
    pytest.param({**CHAT, "logprobs": True, "top_logprobs": 4, "max_completion_tokens": 9},
                 ({"role": "user", "content": "hi"},), 4, 9, id="logprobs"),
    pytest.param({**CHAT, "logprobs": True, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}},
                 ({"role": "user", "content": "hi"},), 0, 0, id="neutral"),
])
def test_chat_accepts(body, messages, logprobs, max_tokens):
    req = protocol.parse_chat(body, "m")
    assert req.kind == "chat" and req.messages == messages
    assert req.sampling.logprobs == logprobs and req.sampling.max_tokens == max_tokens


@pytest.mark.parametrize("body,param,code", [
    pytest.param({"model": "m"}, "messages", "missing_required_parameter", id="no-messages"),
    pytest.param({**CHAT, "messages": []}, "messages", "invalid_value", id="empty"),
    pytest.param({**CHAT, "messages": [3]}, "messages[0]", "invalid_type", id="message-type"),
    pytest.param({**CHAT, "messages": [{"role": "user"}]}, "messages[0].content", "invalid_type", id="no-content"),
    pytest.param({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                 "messages[0].content[0]", "invalid_value", id="image-part"),
    pytest.param({**CHAT, "messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra",
                 "unknown_parameter", id="message-extra"),
    pytest.param({**CHAT, "top_logprobs": 2}, "top_logprobs", "invalid_value", id="top-without-logprobs"),
    pytest.param({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value", id="top-range"),
    pytest.param({**CHAT, "echo": True}, "echo", "unknown_parameter", id="echo-is-completions-only"),
    pytest.param({**CHAT, "tools": [{"type": "function"}]}, "tools", "unsupported_value", id="tools"),
    pytest.param({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "unsupported_value",
                 id="json-mode"),
])
def test_chat_rejects(body, param, code):
    with pytest.raises(BadRequest) as info:
        protocol.parse_chat(body, "m")
    assert info.value.param == param and info.value.code == code


@pytest.mark.parametrize("kind,asked,prompt_len,max_len,expected", [
    pytest.param("completion", 0, 10, 100, 16, id="completion-default-16"),
    pytest.param("completion", 0, 90, 100, 10, id="completion-default-capped"),
    pytest.param("chat", 0, 10, 100, 90, id="chat-default-rest"),
    pytest.param("chat", 20, 10, 100, 20, id="asked"),
    pytest.param("chat", 90, 10, 100, 90, id="exactly-full"),
    pytest.param("chat", 91, 10, 100, None, id="one-over"),
    pytest.param("completion", 0, 100, 100, None, id="prompt-fills-context"),
])
def test_resolve_max_tokens(kind, asked, prompt_len, max_len, expected):
    req = protocol.Request(kind=kind, model="m", sampling=SamplingParams(max_tokens=asked))
    if expected is None:
        with pytest.raises(ContextLengthExceeded) as info:
            protocol.resolve_max_tokens(req, prompt_len, max_len)
        assert f"maximum context length is {max_len}" in info.value.message
    else:
        assert protocol.resolve_max_tokens(req, prompt_len, max_len) == expected
