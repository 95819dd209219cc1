"""The exported-state parser fuzzed: any document either parses into a state that a resume can
adopt (the sequence, its generator and its detokenizer build without error) or raises
BadRequest naming a field. A state comes from another instance over the internal API; a bad
one must be refused with a 400, never reach the engine thread (where an exception stops it)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from functions.llm.errors import BadRequest
from functions.llm.params import SamplingParams, TokenLogprob
from functions.llm.sampling import encode_generator, new_generator
from functions.llm.sequence import Sequence
from functions.llm.state import GenerationState, parse_state
from functions.llm.text import Detok

VOCAB = 512

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _valid() -> dict:
    return GenerationState(
        id="cmpl-1", kind="completion", model="tiny", created=1, tokens=(5, 6, 7, 8, 9), prompt_len=2,
        sampling=SamplingParams(temperature=0.5, top_k=4, seed=3, max_tokens=9, stop=("x",), logprobs=1),
        generator=encode_generator(new_generator(3)), stream=True, include_usage=True, echo=True, text_offset=1,
        logprobs=(TokenLogprob(7, -1.5, ((7, -1.5),)),), finish_reason=None, numerics={"mode": "exact"},
        detok=Detok("abcd", 1, 2)).to_json()


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(_valid()) if p]


@st.composite
def mutated(draw) -> object:
    doc = _valid()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            if draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    return json.loads(json.dumps(doc))  # what arrives over HTTP (NaN and Infinity included)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model))


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(doc=mutated())
def test_mutated_states_parse_or_are_refused(tok, doc) -> None:
    try:
        state = parse_state(doc, vocab_size=VOCAB)
    except BadRequest as exc:
        assert exc.param and exc.param.startswith("state"), exc
        return
    seq = Sequence.from_state(state, tok, sink=lambda out: None)  # what engine.resume does with it
    assert seq.tokens == list(state.tokens) and seq.text.sent == state.text_offset
