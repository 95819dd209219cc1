"""The engine's pure decisions: step planning (scheduler.plan_step) and stop reasons (sequence.stop_reason)."""

from __future__ import annotations

import pytest

from functions.llm.scheduler import Want, plan_step
from functions.llm.sequence import stop_reason


@pytest.mark.parametrize("wants,budget,plan", [
    pytest.param([], 8, [], id="idle"),
    pytest.param([(0, 1), (1, 1), (2, 1)], 8, [(0, 1), (1, 1), (2, 1)], id="decodes"),
    pytest.param([(0, 1), (1, 1), (2, 1)], 2, [(0, 1), (1, 1), (2, 1)], id="decodes-never-starve"),
    pytest.param([(0, 30), (1, 1)], 8, [(1, 1), (0, 7)], id="decode-first-then-prefill-chunk"),
    pytest.param([(0, 3), (1, 4), (2, 1)], 8, [(2, 1), (0, 3), (1, 4)], id="prefills-fit"),
    pytest.param([(0, 5), (1, 9)], 8, [(0, 5), (1, 3)], id="second-prefill-chunked"),
    pytest.param([(0, 100)], 8, [(0, 8)], id="long-prompt-chunked"),
    pytest.param([(0, 1), (1, 1), (2, 50)], 2, [(0, 1), (1, 1)], id="no-budget-left-for-prefill"),
    pytest.param([(0, 50)], 0, [(0, 1)], id="always-progress"),
])
def test_plan_step(wants, budget, plan):
    assert plan_step([Want(k, p) for k, p in wants], budget) == plan


@pytest.mark.parametrize("is_eos,text_stopped,generated,max_tokens,length,max_len,reason", [
    pytest.param(False, False, 3, 10, 13, 100, None, id="goes-on"),
    pytest.param(True, False, 3, 10, 13, 100, "stop", id="eos"),
    pytest.param(False, True, 3, 10, 13, 100, "stop", id="stop-string"),
    pytest.param(False, False, 10, 10, 20, 100, "length", id="max-tokens"),
    pytest.param(False, False, 5, 10, 100, 100, "length", id="context-full"),
    pytest.param(True, False, 10, 10, 100, 100, "stop", id="eos-wins-over-length"),
])
def test_stop_reason(is_eos, text_stopped, generated, max_tokens, length, max_len, reason):
    assert stop_reason(is_eos=is_eos, text_stopped=text_stopped, generated=generated, max_tokens=max_tokens,
                       length=length, max_len=max_len) == reason
