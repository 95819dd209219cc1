"""Per-request sampling and generator state (functions.llm.sampling)."""

from __future__ import annotations

import pytest
import torch

from functions.llm.params import SamplingParams
from functions.llm.sampling import choose, decode_generator, encode_generator, new_generator, token_logprob


def _logits(seed: int = 0, n: int = 64) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_draws_nothing():
    gen = new_generator(5)
    before = gen.get_state().clone()
    logits = _logits()
    assert choose(logits, SamplingParams(temperature=0.0), gen) == int(logits.argmax())
    assert torch.equal(gen.get_state(), before)


def test_seed_determines_the_draws():
    p = SamplingParams(temperature=1.0)
    a = [choose(_logits(i), p, g) for g in [new_generator(7)] for i in range(50)]
    b = [choose(_logits(i), p, g) for g in [new_generator(7)] for i in range(50)]
    c = [choose(_logits(i), p, g) for g in [new_generator(8)] for i in range(50)]
    assert a == b and a != c


def test_generator_state_round_trip_continues_the_same_draws():
    p = SamplingParams(temperature=0.9, top_p=0.8)
    gen = new_generator(11)
    for i in range(10):
        choose(_logits(i), p, gen)
    copy = decode_generator(encode_generator(gen))
    assert [choose(_logits(i), p, gen) for i in range(10, 30)] == [choose(_logits(i), p, copy) for i in range(10, 30)]


@pytest.mark.parametrize("encoded,match", [
    pytest.param("not base64!", "base64", id="not-base64"),
    pytest.param("AAAA", "bytes", id="wrong-size"),
])
def test_decode_generator_rejects(encoded, match):
    with pytest.raises(ValueError, match=match):
        decode_generator(encoded)


@pytest.mark.parametrize("params,allowed", [
    pytest.param(SamplingParams(top_k=3), 3, id="top-k"),
    pytest.param(SamplingParams(top_p=1e-9), 1, id="top-p-tiny-keeps-one"),
    pytest.param(SamplingParams(top_k=5, top_p=1e-9), 1, id="both"),
])
def test_truncation_limits_the_support(params, allowed):
    logits = _logits(3)
    top = set(torch.topk(logits, allowed).indices.tolist())
    gen = new_generator(0)
    assert {choose(logits, params, gen) for _ in range(200)} <= top


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = new_generator(1)
    seen = {choose(logits, SamplingParams(top_p=0.75), gen) for _ in range(400)}
    assert seen == {0, 1}


def test_token_logprob():
    logits = _logits(4, 16)
    lp = token_logprob(logits, 3, 2)
    ref = torch.log_softmax(logits, -1)
    assert lp.token == 3 and lp.logprob == float(ref[3])
    assert [t for t, _ in lp.top] == torch.topk(ref, 2).indices.tolist()
