"""The exported generation state (functions.llm.state): round trip and validation order."""

from __future__ import annotations

import copy

import pytest

from functions.llm.errors import BadRequest
from functions.llm.params import SamplingParams, TokenLogprob
from functions.llm.sampling import encode_generator, new_generator
from functions.llm.state import GenerationState, parse_state
from functions.llm.text import Detok


def _state() -> GenerationState:
    return GenerationState(
        id="cmpl-1", kind="completion", model="tiny", created=1, tokens=(5, 6, 7, 8), prompt_len=2,
        sampling=SamplingParams(temperature=0.5, seed=3, max_tokens=9, stop=("x",), logprobs=1),
        generator=encode_generator(new_generator(3)), stream=True, include_usage=True, echo=False, text_offset=4,
        logprobs=(TokenLogprob(7, -1.5, ((7, -1.5),)), TokenLogprob(8, -0.25, ((8, -0.25),))), finish_reason=None,
        numerics={"mode": "exact"}, detok=Detok("ab cd", 1, 2))


def test_round_trip():
    st = _state()
    doc = st.to_json()
    assert doc["position"] == 4 and doc["version"] == 1
    assert parse_state(copy.deepcopy(doc), vocab_size=512) == st


def test_detok_is_optional():
    doc = _state().to_json()
    del doc["detok"]
    assert parse_state(doc, vocab_size=512).detok is None


def _with(path: str, value):
    doc = _state().to_json()
    if value is _DELETE:
        del doc[path]
    else:
        doc[path] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize("doc,param", [
    pytest.param([], "state", id="not-object"),
    pytest.param(_with("version", 2), "state.version", id="version"),
    pytest.param(_with("version", _DELETE), "state.version", id="version-missing"),
    pytest.param(_with("id", ""), "state.id", id="empty-id"),
    pytest.param(_with("kind", "embedding"), "state.kind", id="kind"),
    pytest.param(_with("tokens", [1, -1]), "state.tokens", id="negative-token"),
    pytest.param(_with("tokens", [1, 512]), "state.tokens", id="token-past-vocab"),
    pytest.param(_with("tokens", [1, True]), "state.tokens", id="bool-token"),
    pytest.param(_with("prompt_len", 0), "state.prompt_len", id="prompt-len-0"),
    pytest.param(_with("prompt_len", 5), "state.prompt_len", id="prompt-len-too-long"),
    pytest.param(_with("position", 3), "state.position", id="position-mismatch"),
    pytest.param(_with("sampling", {"temperature": 1}), "state.sampling", id="sampling-incomplete"),
    *[pytest.param(_with("sampling", {**_state().sampling.to_json(), name: value}), "state.sampling",
                   id=f"sampling-{name}-{value}")
      for name, value in [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0), ("top_k", -1),
                          ("max_tokens", 0), ("seed", -5), ("logprobs", 1000)]],
    pytest.param(_with("generator", "not base64!"), "state.generator", id="generator-not-base64"),
    pytest.param(_with("generator", "AAAA"), "state.generator", id="generator-wrong-size"),
    pytest.param(_with("logprobs", [[7, -1.0, [[600, -2.0]]]]), "state.logprobs", id="logprobs-token-past-vocab"),
    pytest.param(_with("logprobs", [[1, 2]]), "state.logprobs", id="logprobs-shape"),
    pytest.param(_with("finish_reason", "detached"), "state.finish_reason", id="finish-reason"),
    pytest.param(_with("text_offset", -1), "state.text_offset", id="text-offset"),
    pytest.param(_with("stream", 1), "state.stream", id="stream-type"),
    pytest.param(_with("created", True), "state.created", id="created-bool"),
    pytest.param(_with("numerics", [1]), "state.numerics", id="numerics-type"),
    pytest.param(_with("detok", "ab"), "state.detok", id="detok-type"),
    pytest.param(_with("detok", {"prefix": 0, "read": 0}), "state.detok.text", id="detok-text-missing"),
    pytest.param(_with("detok", {"text": "ab", "prefix": 0, "read": 1.0}), "state.detok.read", id="detok-read-type"),
    pytest.param(_with("detok", {"text": "ab", "prefix": 2, "read": 1}), "state.detok", id="detok-prefix-past-read"),
    pytest.param(_with("detok", {"text": "ab", "prefix": 0, "read": 3}), "state.detok", id="detok-read-past-tokens"),
    pytest.param(_with("detok", {"text": "abc", "prefix": 0, "read": 2}), "state.text_offset",
                 id="text-offset-past-detok-text"),
])
def test_rejects(doc, param):
    with pytest.raises(BadRequest) as info:
        parse_state(doc, vocab_size=512)
    assert info.value.param == param
