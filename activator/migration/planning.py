"""Pure decisions of a migration: another waited round, the follow phase or the detach
(`next_action`); when the follow phase ends (`follow_done`); where a generation goes
(`pick_destination`). Tested as tables in tests/migration/test_planning.py."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from activator.balancer import RoutedInstance
from activator.migration.config import MigrationConfig


class MigrationPhase(enum.Enum):
    """What a migration does next (`next_action`): another waited round, follow, or detach."""

    PREFILL = "prefill"  # send the new tokens to the destination, wait for their prefill, look again
    FOLLOW = "follow"  # queue each source step's tokens on the destination until it keeps pace
    DETACH = "detach"  # stop the source now and resume on the destination


def next_action(rounds: int, gap: int, cfg: MigrationConfig) -> MigrationPhase:
    """After `rounds` waited prefill rounds the destination lacks `gap` tokens: another round,
    the follow phase, or detach? Detach once the gap is at most gap_threshold; follow once it is
    at most settle_gap or the rounds are spent (a larger gap, even one that did not shrink after
    a noisy round or a long first prefill, gets another waited round first)."""
    if gap <= cfg.gap_threshold:
        return MigrationPhase.DETACH
    if rounds >= cfg.max_rounds or gap <= cfg.settle_gap:
        return MigrationPhase.FOLLOW if cfg.max_follow > 0 else MigrationPhase.DETACH
    return MigrationPhase.PREFILL


FALLING_BEHIND = 4  # follow steps per window of the falling-behind test


def follow_done(lags: Sequence[int], cfg: MigrationConfig) -> bool:
    """In the follow phase, `lags[k]` is how many tokens the destination had been sent but not
    computed at step k: detach now? Once the lag is at most gap_threshold (it keeps pace: what is
    left is this step's tokens), once the steps are spent, or once the destination falls behind
    (the smallest lag of the last FALLING_BEHIND steps is more than one above the smallest of the
    FALLING_BEHIND before: it computes a token more slowly than the source makes one, and every
    further step adds to what the resume must compute)."""
    if lags[-1] <= cfg.gap_threshold or len(lags) >= cfg.max_follow:
        return True
    w = FALLING_BEHIND
    return len(lags) >= 2 * w and min(lags[-w:]) > min(lags[-2 * w:-w]) + 1


def pick_destination(instances: Sequence[RoutedInstance], source_id: str,
                     exclude: frozenset[str] = frozenset()) -> RoutedInstance | None:
    """The ready instance (not the source, with an internal API) with room, fewest outstanding
    requests first; with room nowhere, the least loaded (its parked prefill slot is the
    generation's reservation there: the resume is admitted at its concurrency limit)."""
    best: RoutedInstance | None = None
    for inst in instances:
        if inst.id == source_id or inst.id in exclude or not inst.internal_url:
            continue
        if best is None or (inst.has_room(), -inst.outstanding) > (best.has_room(), -best.outstanding):
            best = inst
    return best
