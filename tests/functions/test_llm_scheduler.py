"""Step planning (functions.llm.scheduler.plan_step): pure, table-driven."""

from __future__ import annotations

import pytest

from functions.llm.scheduler import Want, plan_step


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
