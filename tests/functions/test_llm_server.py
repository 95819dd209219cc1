"""The inference function as a client sees it: a real server process, the official openai client, raw HTTP."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.functions.conftest import MAX_BODY_BYTES, MAX_CONCURRENCY, MAX_MODEL_LEN, Server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    ready = httpx.get(f"{server.url}/health/ready").json()
    assert ready["status"] == "ready"
    assert {"total_s", "imports_s", "load_s", "warmup_s"} <= set(ready["startup"])
    assert httpx.get(f"{server.url}/health/live").status_code == 200


def test_completion_seeded_is_reproducible_and_stream_matches(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.usage.prompt_tokens > 0 and first.usage.total_tokens == first.usage.prompt_tokens + \
        first.usage.completion_tokens
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    other = client.completions.create(**{**kw, "seed": 99, "max_tokens": 40, "extra_body": {"ignore_eos": True}})
    again = client.completions.create(**{**kw, "seed": 1234, "max_tokens": 40, "extra_body": {"ignore_eos": True}})
    assert other.choices[0].text != again.choices[0].text  # the seed matters


def test_chat_greedy_stream_and_whole(client):
    kw = dict(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "What is the capital of France?"}],
              max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(**kw, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert client.chat.completions.create(**kw).choices[0].message.content == whole.choices[0].message.content


def test_logprobs_echo_and_stop(client):
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=4, temperature=0, echo=True,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Hello world")
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    base = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 6
    stop = base[3:6]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == base[:base.index(stop)]
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0,
                                         stop=[stop], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def _post(server: Server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=30, **kw)


GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path,body,status,code,param", [
    pytest.param("/v1/completions", b"{not json", 400, "invalid_json", None, id="malformed-json"),
    pytest.param("/v1/completions", [1, 2], 400, "invalid_body", None, id="body-not-object"),
    pytest.param("/v1/completions", {**GOOD, "max_tokens": "10"}, 400, "invalid_type", "max_tokens", id="max-tokens-str"),
    pytest.param("/v1/completions", {**GOOD, "max_tokens": -5}, 400, "invalid_value", "max_tokens", id="max-tokens-neg"),
    pytest.param("/v1/completions", {**GOOD, "max_tokens": 10 ** 9}, 400, "context_length_exceeded", "prompt",
                 id="max-tokens-huge"),
    pytest.param("/v1/completions", {**GOOD, "temperature": 3.5}, 400, "invalid_value", "temperature",
                 id="temperature-high"),
    pytest.param("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "invalid_type", "temperature",
                 id="temperature-str"),
    pytest.param("/v1/completions", {**GOOD, "top_p": 0}, 400, "invalid_value", "top_p", id="top-p-zero"),
    pytest.param("/v1/completions", {**GOOD, "stream": "yes"}, 400, "invalid_type", "stream", id="stream-str"),
    pytest.param("/v1/completions", {**GOOD, "n": 17}, 400, "invalid_value", "n", id="n-17"),
    pytest.param("/v1/completions", {**GOOD, "frobnicate": 1}, 400, "unknown_parameter", "frobnicate", id="unknown"),
    pytest.param("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model_not_found", "model", id="unknown-model"),
    pytest.param("/v1/completions", {**GOOD, "prompt": [3 + i % 500 for i in range(MAX_MODEL_LEN + 5)]}, 400,
                 "context_length_exceeded", "prompt", id="prompt-over-context"),
    pytest.param("/v1/completions", {**GOOD, "prompt": "x" * (MAX_BODY_BYTES + 10)}, 413, "request_too_large", None,
                 id="body-too-large"),
    pytest.param("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "invalid_type", "messages",
                 id="messages-str"),
    pytest.param("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
                 "invalid_value", "messages[0].role", id="bad-role"),
    pytest.param("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs",
                 id="top-logprobs-without-logprobs"),
    pytest.param("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model_not_found", "model", id="chat-model"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, code, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param and err["message"]
    assert _post(server, "/v1/completions", GOOD).status_code == 200  # still serving


def test_unknown_route_and_method(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=9)
    assert info.value.body["param"] == "temperature"


class _Stream:
    """A long streaming request in a thread; close() disconnects it."""

    def __init__(self, server: Server, max_tokens: int = 200) -> None:
        self.started = threading.Event()
        self.done = False
        self.chunks = 0
        self.id: str | None = None
        self._stop = threading.Event()
        body = {"model": "tiny", "prompt": "Serverless inference", "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0}
        self._thread = threading.Thread(target=self._run, args=(server, body), daemon=True)
        self._thread.start()
        assert self.started.wait(30)

    def _run(self, server: Server, body: dict) -> None:
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.id = self.id or json.loads(line[6:])["id"]
                    self.chunks += 1
                    self.started.set()
                if line == "data: [DONE]":
                    self.done = True
                if self._stop.is_set():
                    break
        self.started.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_disconnect_frees_the_sequence(server):
    streams = [_Stream(server, max_tokens=MAX_MODEL_LEN - 10) for _ in range(2)]
    try:
        _wait_for(lambda: server.metric("sllm_function_batch_size") == 2)
        streams[0].close()
        _wait_for(lambda: server.metric("sllm_function_batch_size") == 1)
        listed = httpx.get(f"{server.internal_url}/internal/v1/generations").json()["data"]
        assert [g["id"] for g in listed] == [streams[1].id]
    finally:
        for s in streams:
            s.close()
    _wait_for(lambda: server.metric("sllm_function_batch_size") == 0)
    _wait_for(lambda: server.metric("sllm_function_requests_in_flight") == 0)


def test_concurrency_limit_gives_429_and_recovers(server):
    streams = [_Stream(server, max_tokens=MAX_MODEL_LEN - 10) for _ in range(MAX_CONCURRENCY)]
    try:
        r = _post(server, "/v1/completions", GOOD)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
    finally:
        for s in streams:
            s.close()
    _wait_for(lambda: server.metric("sllm_function_requests_in_flight") == 0)
    assert _post(server, "/v1/completions", GOOD).status_code == 200


def test_requests_do_not_wait_for_each_other(server, client):
    """A short request finishes while a long one is still generating (continuous batching)."""
    long = _Stream(server, max_tokens=MAX_MODEL_LEN - 10)
    try:
        r = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
        assert not long.done  # the long one is still generating
    finally:
        long.close()


def test_unloadable_model_ends_the_process(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    bad = Server(empty, tmp_path / "bad.log")
    try:
        assert bad.proc.wait(120) == 3
    finally:
        bad.stop()
    log = (tmp_path / "bad.log").read_text()
    assert "model load failed" in log and "neither a sllm-knative checkpoint nor a Hugging Face" in log
