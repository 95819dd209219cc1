"""The engine in-process (no HTTP): control calls at step boundaries, expiry, detach edge cases."""

from __future__ import annotations

import queue
import time

import pytest
import torch
from transformers import AutoTokenizer

from functions.llm.engine import Engine
from functions.llm.errors import Conflict, NotFound, TooManyRequests
from functions.llm.params import Output, SamplingParams
from functions.llm.runner import ModelRunner
from functions.llm.sequence import Sequence
from sllm_knative.loading import load_model
from sllm_knative.log import get_logger


@pytest.fixture(scope="module")
def engine(tiny_model):
    threads = torch.get_num_threads()
    runner = ModelRunner(load_model(tiny_model), slots=4, max_len=128)
    eng = Engine(runner, AutoTokenizer.from_pretrained(str(tiny_model)), eos_ids={1}, step_tokens=32,
                 parked_slots=2, log=get_logger("test-engine"), parked_ttl_s=0.3)
    eng.start()
    yield eng
    eng.stop()
    torch.set_num_threads(threads)


def _submit(engine: Engine, max_tokens: int, **params) -> tuple[Sequence, queue.Queue[Output]]:
    outputs: queue.Queue[Output] = queue.Queue()
    seq = Sequence.from_request(kind="completion", model="tiny", prompt=[5, 6, 7, 8],
                                params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params),
                                tokenizer=engine.tokenizer, stream=True, include_usage=False, echo_text=None,
                                sink=outputs.put)
    engine.submit(seq)
    return seq, outputs


def _drain(outputs: queue.Queue[Output]) -> Output:
    while True:
        out = outputs.get(timeout=30)
        if out.final:
            return out


def test_parked_prefill_expires(engine):
    assert engine.call(lambda: engine.prefill("g-exp", 0, [5, 6, 7])).result(10) == 2
    assert any(g["id"] == "g-exp" for g in engine.call(engine.generations).result(10))
    time.sleep(0.5)
    with pytest.raises(NotFound):
        engine.call(lambda: engine.drop_parked("g-exp")).result(10)
    assert engine.parked == 0


def test_parked_slots_are_limited(engine):
    for i in range(2):
        engine.call(lambda i=i: engine.prefill(f"g{i}", 0, [5, 6])).result(10)
    with pytest.raises(TooManyRequests):
        engine.call(lambda: engine.prefill("g-third", 0, [5, 6])).result(10)
    for i in range(2):
        engine.call(lambda i=i: engine.drop_parked(f"g{i}")).result(10)


def test_detach_past_position_is_refused_and_beyond_the_end_finishes(engine):
    seq, outputs = _submit(engine, max_tokens=6, temperature=0.0)
    final = _drain(outputs)
    assert final.finish_reason == "length"
    with pytest.raises(NotFound):  # finished generations are gone
        engine.call(lambda: engine.detach(seq.id, None)).result(10)
    seq, outputs = _submit(engine, max_tokens=100, temperature=0.0)
    outputs.get(timeout=30)
    pos = engine.call(lambda: engine.export(seq.id)).result(10).position
    with pytest.raises(Conflict) as info:
        engine.call(lambda: engine.detach(seq.id, 4)).result(10)
    assert info.value.code == "position_passed"
    state = engine.call(lambda: engine.detach(seq.id, 200)).result(30)
    assert state.finish_reason == "length" and state.position == 4 + 100 and pos < state.position
    assert _drain(outputs).finish_reason == "length"


def test_cancel_frees_the_slot(engine):
    seqs = [_submit(engine, max_tokens=100)[0] for _ in range(3)]
    deadline = time.monotonic() + 10
    while engine.batch_size < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for s in seqs:
        engine.cancel(s)
    while engine.batch_size:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.call(engine.generations).result(10) == []
