"""The simulator's skip of known scaler decisions (`Service.quiet_until`, sim/adapters.py) is a
speed-up only: with it and without it, every policy's run computes the same, bit for bit."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sim import adapters
from sim.runner import Scenario, build


def _outputs(sim: Any) -> tuple[Any, ...]:
    stats = dataclasses.replace(sim.stats, quiet_skips=0)
    services = [(s.name, s.state, s.window, s.desired) for s in sim.services.values()]
    return (repr(sim.ttfts()), repr(sim.latencies()), sim.trace, stats, services)


@pytest.mark.parametrize("policy", ["sllm", "serverlessllm", "no-migration", "locality-blind", "preemption-based"])
@pytest.mark.parametrize(("models", "rate"), [
    (24, 3.0),  # many services at one instance, idle or calm: the skip's case
    (10, 10.0),  # busier services whose load goes above the target and back: the skip must stop then
])
def test_skipping_known_decisions_changes_nothing(policy: str, models: int, rate: float,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = Scenario(policy=policy, nodes=6, models=models, rate=rate, duration_s=300.0, keep_alive_s=30.0)
    skipping = build(scenario).run()
    monkeypatch.setattr(adapters, "SKIP_QUIET", False)
    deciding = build(scenario).run()
    assert skipping.stats.quiet_skips > 0 and deciding.stats.quiet_skips == 0
    assert _outputs(skipping) == _outputs(deciding)
