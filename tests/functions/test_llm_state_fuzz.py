"""The exported-state parser fuzzed: any document either parses into a state that a resume can
adopt (the sequence, its generator and its detokenizer build without error) or raises
BadRequest naming a field. A state comes from another instance over the internal API; a bad
one must be refused with a 400, never reach the engine thread (where an exception stops it)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from transformers import AutoTokenizer

from functions.llm.errors import BadRequest
from functions.llm.params import SamplingParams, TokenLogprob
from functions.llm.sampling import encode_generator, new_generator
from functions.llm.sequence import Sequence
from functions.llm.state import GenerationState, parse_state
from functions.llm.text import Detok
from tests.json_mutation import json_values, mutated

VOCAB = 512

def _valid() -> dict:
    return GenerationState(
        id="cmpl-1", kind="completion", model="tiny", created=1, tokens=(5, 6, 7, 8, 9), prompt_len=2,
        sampling=SamplingParams(temperature=0.5, top_k=4, seed=3, max_tokens=9, stop=("x",), logprobs=1),
        generator=encode_generator(new_generator(3)), stream=True, include_usage=True, echo=True, text_offset=1,
        logprobs=(TokenLogprob(7, -1.5, ((7, -1.5),)),), finish_reason=None, numerics={"mode": "exact"},
        detok=Detok("abcd", 1, 2)).to_json()


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model))


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(doc=mutated(_valid, json_values(nan=True)).map(lambda d: json.loads(json.dumps(d))))  # what arrives over HTTP
def test_mutated_states_parse_or_are_refused(tok, doc) -> None:
    try:
        state = parse_state(doc, vocab_size=VOCAB)
    except BadRequest as exc:
        assert exc.param and exc.param.startswith("state"), exc
        return
    seq = Sequence.from_state(state, tok, sink=lambda out: None)  # what engine.resume does with it
    assert seq.tokens == list(state.tokens) and seq.text.sent == state.text_offset
