"""Schemathesis against the public API, from the document the function serves (GET /openapi.json):
a real function process on the tiny model, then the activator in front of it.

Cases are generated per operation, valid ones (positive) and, for the two generation endpoints,
invalid ones (negative: wrong types, out of range, missing or unknown fields, bad headers), and
sent one at a time. Every answer must be a 2xx that matches the document, or a 4xx with the
OpenAI error body; never a 5xx, a 429 (one request at a time: a 429 would be a leaked concurrency
slot), a hang past REQUEST_TIMEOUT, a stream that ends in an error event or without [DONE], nor a
process that stops answering /health/live afterwards.

Generation is bounded so that the cases take about two minutes: the fuzzed instance has a context of
MAX_MODEL_LEN tokens (its document then bounds max_tokens by it, honestly, and a chat without
max_tokens generates the rest of it), and this test's copy of the document narrows max_tokens to
NARROW_MAX_TOKENS, n to NARROW_N and chats to NARROW_MESSAGES short messages (negative cases still
send larger ones).

SLLM_FUZZ_CASES (default 2000) and SLLM_FUZZ_ACTIVATOR_CASES (default 500) set the counts;
SLLM_FUZZ_RANDOM=1 draws new cases instead of the fixed (derandomized) ones.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import requests  # schemathesis's transport
import schemathesis  # a dev dependency (pyproject.toml)
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks

from sllm_knative.api import activator as admin_api
from sllm_knative.ports import free_port
from testkit.proc import Proc
from tests.functions.conftest import Server

FUZZ_CASES = int(os.environ.get("SLLM_FUZZ_CASES", "2000"))
ACTIVATOR_CASES = int(os.environ.get("SLLM_FUZZ_ACTIVATOR_CASES", "500"))
DERANDOMIZE = os.environ.get("SLLM_FUZZ_RANDOM") != "1"
REQUEST_TIMEOUT = 20.0
MAX_MODEL_LEN = 40
NARROW_MAX_TOKENS = 4
NARROW_N = 2
NARROW_MESSAGES = 2  # and NARROW_TEXT characters each: most valid chats then fit the context
NARROW_TEXT = 12
MAX_STREAM_EVENTS = 100_000
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")

pytestmark = pytest.mark.timeout(900)


@dataclasses.dataclass
class Tally:
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (path, mode, status)
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (path, mode, code, param)
    streams: int = 0
    seconds: float = 0.0
    spent: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (path, mode): seconds
    waited: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # of which for answers

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def count(self, path: str, mode: str | None = None, status: int | None = None) -> int:
        return sum(n for (p, m, s), n in self.statuses.items()
                   if p == path and mode in (None, m) and (status is None or s // 100 == status // 100))

    def summary(self) -> str:
        lines = [f"{self.total} cases in {self.seconds:.1f} s ({self.streams} streamed)"]
        lines += [f"  {p} {m} {s}: {n}" for (p, m, s), n in sorted(self.statuses.items())]
        lines += [f"  {p} {m}: {t:.1f} s, {self.waited[(p, m)]:.1f} s of it waiting for answers"
                  for (p, m), t in sorted(self.spent.items())]
        lines += [f"  {p} {m} {c} {param}: {n}" for (p, m, c, param), n in self.codes.most_common(25)]
        return "\n".join(lines)


def narrowed(doc: dict[str, Any]) -> dict[str, Any]:
    """The served document with generation bounded (see the module docstring)."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatRequest"):
        props = schemas[name]["properties"]
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                assert props[key]["maximum"] == MAX_MODEL_LEN - 1  # the served bound, narrowed here
                props[key]["maximum"] = NARROW_MAX_TOKENS
        props["n"]["maximum"] = NARROW_N
    messages = schemas["ChatRequest"]["properties"]["messages"]
    messages["maxItems"] = NARROW_MESSAGES
    content = messages["items"]["properties"]["content"]["anyOf"]
    content[0]["maxLength"] = NARROW_TEXT
    content[1]["maxItems"] = 2
    content[1]["items"]["properties"]["text"]["maxLength"] = NARROW_TEXT // 2
    return doc


def _check_stream(text: str) -> None:
    """A streamed 200: JSON chunks, no error event, and the [DONE] end."""
    frames = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert frames and frames[-1] == "[DONE]", text[-500:]
    for frame in frames[:-1]:
        chunk = json.loads(frame)
        assert "error" not in chunk, chunk
        assert chunk["object"] in ("text_completion", "chat.completion.chunk"), chunk


def fuzz(base_url: str, doc: dict[str, Any], total: int, paths: set[str] | None = None) -> Tally:
    """Run at least `total` cases of doc's operations (those in `paths`, if given) against base_url."""
    schema = schemathesis.openapi.from_dict(doc, config=schemathesis.Config.from_dict({
        "max-stream-events": MAX_STREAM_EVENTS}))  # read every stream whole (its default is 20 events)
    error_schema = doc["components"]["schemas"]["Error"]
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if paths is None or op.path in paths]
    tally = Tally()
    session = requests.Session()
    started = time.monotonic()

    def run(op: Any, mode: GenerationMode, examples: int) -> None:
        @given(case=op.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck))
        def one(case: Any) -> None:
            try:
                response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT)
            except requests.Timeout:
                raise AssertionError(f"no answer in {REQUEST_TIMEOUT} s: {case.as_curl_command()}") from None
            status = response.status_code
            tally.statuses[(op.path, mode.value, status)] += 1
            tally.waited[(op.path, mode.value)] += response.elapsed
            where = f"{status} for {case.as_curl_command()}\n{response.text[:1000]}"
            assert status < 500, where
            assert status != 429, where  # one request at a time: a leaked concurrency slot
            if status >= 400:
                body = response.json()
                jsonschema.validate(body, error_schema)
                tally.codes[(op.path, mode.value, body["error"]["code"], body["error"]["param"])] += 1
            elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                assert not response.stream_cut_short, f"the stream did not end in {REQUEST_TIMEOUT} s: {where}"
                _check_stream(response.text)
                tally.streams += 1
            case.validate_response(response, checks=[st_checks.status_code_conformance,
                                                     st_checks.content_type_conformance,
                                                     st_checks.response_schema_conformance])

        begun = time.monotonic()
        one()
        tally.spent[(op.path, mode.value)] += time.monotonic() - begun

    generation = [op for op in ops if op.path in GENERATION_PATHS]
    for op in ops:  # the other operations: a share of the cases (most have exactly one)
        if op not in generation:
            run(op, GenerationMode.POSITIVE, max(1, total // 20))
    runs = [(op, mode) for op in generation for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    for i, (op, mode) in enumerate(runs):  # the rest, evenly
        run(op, mode, max(1, -(-(total - tally.total) // (len(runs) - i))))
    tally.seconds = time.monotonic() - started
    return tally


def assert_covered(tally: Tally) -> None:
    """The run reached what it is for: both modes on both generation endpoints, successes and refusals."""
    least = max(10, tally.total // 20)
    for path in GENERATION_PATHS:
        assert tally.count(path, "positive", 200) >= least, tally.summary()
        assert tally.count(path, "negative", 400) >= least, tally.summary()
    assert tally.streams >= least, tally.summary()


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, tmp_path_factory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("fuzz-logs")
    server = Server(tiny_model, logs / "function.log", "--max-model-len", str(MAX_MODEL_LEN))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _assert_alive(proc: Proc, url: str) -> None:
    assert proc.alive(), proc.tail()
    r = httpx.get(url, timeout=5)
    assert r.status_code == 200, r.text


def test_function_api_fuzzed(fuzz_server):
    doc = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=5).json()
    tally = fuzz(fuzz_server.url, narrowed(doc), FUZZ_CASES)
    print(tally.summary())
    assert tally.total >= FUZZ_CASES, tally.summary()
    assert_covered(tally)
    _assert_alive(fuzz_server, f"{fuzz_server.url}/health/live")
    r = httpx.post(f"{fuzz_server.url}/v1/completions", timeout=20,
                   json={"model": "tiny", "prompt": "still there", "max_tokens": 2, "n": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text  # every slot came back
    assert "Traceback" not in fuzz_server.log()


class Activator(Proc):
    """`python -m activator` on free loopback ports (as tests/migration/conftest.py starts it)."""

    def __init__(self, log: Path) -> None:
        super().__init__("activator")
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.start([sys.executable, "-m", "activator", "--port", str(self.port), "--admin-port",
                    str(self.admin_port)], log)

    def serve(self, server: Server, name: str = "tiny") -> None:
        self.wait_http(f"{self.admin}{admin_api.METRICS}", timeout=30)
        endpoint = {"id": "fuzz", "url": server.url, "internal_url": server.internal_url}
        r = httpx.put(f"{self.admin}{admin_api.SERVICES}/default/{name}", timeout=5,
                      json={"container_concurrency": 0, "instances": [endpoint]})
        r.raise_for_status()


def test_activator_api_fuzzed(fuzz_server, tmp_path):
    """The same document's generation and model-list operations, through the activator."""
    act = Activator(tmp_path / "activator.log")
    try:
        act.serve(fuzz_server)
        doc = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=5).json()
        tally = fuzz(act.url, narrowed(doc), ACTIVATOR_CASES,
                     paths={*GENERATION_PATHS, "/v1/models", "/v1/models/{model}"})
        print(tally.summary())
        assert tally.total >= ACTIVATOR_CASES, tally.summary()
        assert_covered(tally)
        _assert_alive(act, f"{act.url}/v1/models")
        _assert_alive(fuzz_server, f"{fuzz_server.url}/health/live")
        assert "Traceback" not in act.log()
    finally:
        act.stop()
