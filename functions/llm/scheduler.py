"""Which tokens of which sequences go into the next step: a pure decision.

Every sequence that needs exactly one more row (a decode step, or the last token of a
prefill) gets it, so ongoing generations advance every step whatever arrives. The rest of
the step's row budget goes to prefills in arrival order, in chunks, so a long prompt delays
the others by at most one budget's worth of rows per step. At least one row is always
scheduled when any sequence has work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Want:
    key: int
    pending: int  # rows this sequence could feed now


def plan_step(wants: Sequence[Want], budget: int) -> list[tuple[int, int]]:
    """[(key, rows)] for the next step; wants are in arrival order."""
    plan: list[tuple[int, int]] = []
    used = 0
    for w in wants:
        if w.pending == 1:
            plan.append((w.key, 1))
            used += 1
    for w in wants:
        if w.pending > 1:
            rows = min(w.pending, budget - used)
            if rows <= 0:
                if plan:
                    break
                rows = min(w.pending, max(budget, 1))
            plan.append((w.key, rows))
            used += rows
    return plan
