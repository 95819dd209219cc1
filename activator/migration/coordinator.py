"""The coordinator: one generation's rounds, follow phase and detach (`migrate_generation`), and
all of an instance's generations in parallel (`migrate_instance`).

    round 1   export the source's state; prefill all its tokens on the destination while the
              source keeps streaming
    round k   export again; prefill only the tokens generated since
    follow    once the gap is under settle_gap (or after max_rounds): export at every source step
              and queue its new tokens on the destination without waiting, until the destination
              has computed all but gap_threshold of them (or falls behind, or max_follow steps)
    detach    then, or at once when a round leaves a gap <= gap_threshold: the source stops at its
              next step boundary; the relay (splice.py) resumes its final state on the destination

Abort rules: the source finishes first -> nothing to do (the parked prefill is dropped); the
destination fails before the detach -> the generation stays on the source; the source dies
mid-migration -> the relay resumes the last exported state on the destination.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence

from activator.balancer import RoutedInstance
from activator.migration.client import DestinationFailed, InstanceClient, SourceFailed, SourceFinished
from activator.migration.planning import MigrationPhase, follow_done, next_action
from activator.migration.tracked import Handoff, Tracked
from sllm_knative.api.activator import GenerationMigration
from sllm_knative.api.migration import MigrationOutcome
from sllm_knative.log import get_logger

_log = get_logger("activator.migration")


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    id: str
    outcome: MigrationOutcome
    tokens: int  # position at the detach (prompt + generated)
    rounds: int
    seconds: float
    destination: str | None
    gaps: tuple[int, ...] = ()  # tokens not yet sent after each waited round
    lags: tuple[int, ...] = ()  # tokens sent but not computed at each follow step

    @property
    def follow(self) -> int:
        return len(self.lags)

    def to_message(self) -> GenerationMigration:
        return GenerationMigration(id=self.id, outcome=self.outcome, tokens=self.tokens, rounds=self.rounds,
                                   seconds=self.seconds, destination=self.destination, gaps=list(self.gaps),
                                   lags=list(self.lags), follow=self.follow)


async def _last_prefill(client: InstanceClient, dest: RoutedInstance, gen_id: str, start: int, tokens: list[int]) -> None:
    """The final gap's prefill, sent with the detach: the resume does the work if it fails."""
    try:
        await client.prefill(dest, gen_id, start, tokens)
    except DestinationFailed as exc:
        _log.debug("last prefill not used", id=gen_id, instance=dest.id, error=str(exc))


async def migrate_generation(client: InstanceClient, tracked: Tracked, dest: RoutedInstance) -> MigrationResult:
    """Move one generation from its instance to `dest` (rounds, follow, detach; the relay splices)."""
    cfg = client.cfg
    t0 = time.perf_counter()
    src = tracked.instance
    rounds, cached, tokens = 0, 0, 0  # cached: tokens sent to the destination
    gaps: list[int] = []
    lags: list[int] = []
    computed = 0  # tokens the destination reported computed (follow phase)

    def result(outcome: MigrationOutcome) -> MigrationResult:
        return MigrationResult(tracked.id, outcome, tokens, rounds, time.perf_counter() - t0,
                               dest.id if outcome.moved else None, tuple(gaps), tuple(lags))

    tracked.begin(dest)
    last: asyncio.Future[None] | None = None
    phase = MigrationPhase.PREFILL
    try:
        while True:
            # An export is answered at the source's next step boundary: one loop per source step
            # at most, with the token that step made.
            state = await client.export(src, tracked.id)
            tracked.checkpoint(state)
            tokens = state.position
            gap = tokens - cached
            if phase is not MigrationPhase.FOLLOW and rounds:
                gaps.append(gap)
                phase = next_action(rounds, gap, cfg)
            if phase is MigrationPhase.DETACH:
                break
            if phase is MigrationPhase.FOLLOW:
                if gap:
                    computed = await client.prefill(dest, tracked.id, cached, state.tokens[cached:tokens], wait=False)
                    cached = tokens
                lags.append(max(0, cached - 1 - computed))
                if follow_done(lags, cfg):
                    break
                continue
            computed = await client.prefill(dest, tracked.id, cached, state.tokens[cached:tokens])
            cached, rounds = tokens, rounds + 1
        # The last gap goes to the destination together with the detach, not before it: it is
        # prefilled while the source finishes its step and the relay resumes, so the resume finds
        # only the token of that step left to compute (a late prefill is refused harmlessly).
        last = asyncio.ensure_future(_last_prefill(client, dest, tracked.id, cached, state.tokens[cached:tokens])) \
            if tokens > cached else None
        try:
            final = await client.detach(src, tracked.id)
        except BaseException:
            if last is not None:
                await last  # in order before a drop_prefill below
            raise
        tracked.checkpoint(final)
        tokens = final.position
        tracked.handoff.set_result(Handoff(final))
    except SourceFinished:
        tracked.destination = None
        await client.drop_prefill(dest, tracked.id)
        return result(MigrationOutcome.FINISHED_ON_SOURCE)
    except DestinationFailed as exc:
        _log.warning("destination failed before the detach: the generation stays on the source", id=tracked.id,
                     instance=dest.id, error=str(exc))
        tracked.destination = None
        await client.drop_prefill(dest, tracked.id)
        return result(MigrationOutcome.STAYED_ON_SOURCE)
    except SourceFailed as exc:
        _log.warning("source failed during the migration", id=tracked.id, instance=src.id, error=str(exc),
                     gone=exc.gone)
        if not exc.gone and not tracked.handoff.done():  # it refused: the generation stays there
            tracked.destination = None
            await client.drop_prefill(dest, tracked.id)
            return result(MigrationOutcome.STAYED_ON_SOURCE)
        if not tracked.handoff.done():
            tracked.handoff.set_result(Handoff(None))
    try:
        outcome = await asyncio.wait_for(asyncio.shield(tracked.switched), cfg.handoff_timeout_s * 2)
    except asyncio.TimeoutError:
        outcome = MigrationOutcome.FAILED
    if last is not None:
        await last
    return result(outcome)


async def migrate_instance(client: InstanceClient, streams: Sequence[Tracked],
                           destinations: Callable[[frozenset[str]], RoutedInstance | None]) -> list[MigrationResult]:
    """Migrate all given streams in parallel; a generation whose destination fails tries the next one."""

    async def one(tracked: Tracked) -> MigrationResult:
        tried: set[str] = set()
        last: MigrationResult | None = None
        while True:
            dest = destinations(frozenset(tried))
            if dest is None:
                return last or MigrationResult(tracked.id, MigrationOutcome.STAYED_ON_SOURCE, 0, 0, 0.0, None)
            tried.add(dest.id)
            last = await migrate_generation(client, tracked, dest)
            if last.outcome is not MigrationOutcome.STAYED_ON_SOURCE:
                return last

    return list(await asyncio.gather(*(one(t) for t in streams)))
