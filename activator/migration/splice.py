"""The relay once a stream is migrating, and the resume of a detached generation.

`splice` replaces the plain relay when a migration starts, or when a stream's instance dies:
it passes the source's frames whole, swallows the `sllm.detached` frame that ends them, resumes
the final state it carries on the destination at once (or the last export, when the source
died) and passes the destination's frames after the source's, dropping what the client already
has. `resume_whole` does the same for a non-streaming request: its answer is the destination's
whole completion.

A resume from the last export regenerates the text between that export and what the client
already has. It is checked against the text the client got (Tracked.sent_after): with exact
numerics it is the same, bit for bit; if it is not (fast numerics are deterministic only for a
fixed batch), the stream ends with a `stream_cut` error event rather than a spliced answer.
When no instance of the service can take the resume, it waits for one (a cold start) for as long
as a held request would (`Wait`, handoff.Migrations.wait_for_destination).

The client-visible gap of each handoff (from the last frame of the source to the first of the
destination) goes to the `activator_migration_gap_seconds` metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import httpx

from activator import errors, metrics
from activator.balancer import RoutedInstance
from activator.migration.client import InstanceClient, detached_answer
from activator.migration.frames import (
    Frame,
    classify,
    detached_state,
    frame_content,
    split_frames,
    trim_frame,
)
from activator.migration.tracked import Tracked
from sllm_knative.api.instance import GenerationState
from sllm_knative.api.migration import MigrationOutcome
from sllm_knative.log import get_logger

_log = get_logger("activator.migration")

Candidates = Callable[[Tracked, frozenset[str]], Sequence[RoutedInstance]]
# An instance with room for the resume, after waiting (a cold start) if the service has none; None
# past the hold.
Wait = Callable[[Tracked, frozenset[str]], Awaitable[RoutedInstance | None]]


async def _open_resume(client: InstanceClient, tracked: Tracked, state: GenerationState,
                       candidates: Candidates, wait: Wait | None) -> AsyncIterator[bytes] | None:
    """Resume `state` on the first candidate that accepts it (waiting for one with `wait` when there
    is none); the new upstream replaces the old."""
    tried: set[str] = set()
    while True:
        options = candidates(tracked, frozenset(tried))
        if options:
            inst = options[0]
        else:
            found = await wait(tracked, frozenset(tried)) if wait is not None else None
            if found is None:
                return None
            inst = found
        tried.add(inst.id)
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(tracked.breaker.slot(inst))
            resp = await client.open_resume(inst, state)
            stack.push_async_callback(resp.aclose)
        except httpx.HTTPError as exc:
            await stack.aclose()
            _log.warning("resume failed; trying another instance", id=tracked.id, instance=inst.id,
                         error=f"{type(exc).__name__}: {exc}")
            continue
        old = tracked.upstream
        tracked.upstream = stack
        await old.aclose()
        tracked.instance = inst
        return resp.aiter_raw()


async def splice(client: InstanceClient, tracked: Tracked, rest: AsyncIterator[bytes], candidates: Candidates,
                 broken: bool = False, wait: Wait | None = None) -> AsyncIterator[bytes]:
    """The relay for a migrating stream: whole frames only, the source's detach spliced to a resume.

    `rest` is the source's remaining body; `broken` says it already failed.
    """
    cfg = client.cfg
    tracked.fold()
    buf = tracked.partial  # already sent: the start of the frame being received
    sent_prefix = len(buf)
    # The sent start of a frame of a dead source: the resumed stream's same frame must begin with it.
    must_match: bytes | None = None
    skip = 0  # characters of a resumed stream the client already has
    skip_frames_tokens = 0  # with logprobs: tokens (whole frames) of a resumed stream the client already has
    check = _Regenerated(None)  # what the skipped text of a resumed stream must be
    source: AsyncIterator[bytes] | None = rest
    last_sent = time.perf_counter()  # when the client last got a frame (the handoff gap starts there)
    resumed = False  # the destination's frames are being relayed; the first one ends the gap
    while True:
        detached = False
        frame_state: GenerationState | None = None
        if source is not None and not broken:
            try:
                async for chunk in source:
                    frames, buf = split_frames(buf + chunk)
                    for f in frames:
                        kind, data = classify(f)
                        if kind is Frame.DETACHED:
                            detached = True
                            frame_state = detached_state(data)
                            break
                        if skip_frames_tokens > 0 and kind is Frame.DATA:
                            text, tokens = frame_content(f)
                            skip_frames_tokens -= tokens
                            if not check.add(text):
                                yield _diverged(tracked, check)
                                return
                            continue
                        out, dropped = trim_frame(f, skip)
                        skip -= len(dropped)
                        if not check.add(dropped):
                            yield _diverged(tracked, check)
                            return
                        if out is None:
                            continue
                        tracked.count(out)
                        if sent_prefix:
                            if must_match is not None and not out.startswith(must_match):
                                yield _diverged(tracked, check, frame=True)
                                return
                            out, sent_prefix, must_match = out[sent_prefix:], 0, None
                        if resumed:
                            metrics.observe_handoff_gap(time.perf_counter() - last_sent)
                            resumed = False
                        yield out
                        last_sent = time.perf_counter()
                    if detached:
                        break
                if not detached:
                    tracked.settle(MigrationOutcome.FINISHED_ON_SOURCE)
                    return
            except httpx.HTTPError as exc:
                _log.warning("upstream broke during a migration", id=tracked.id, instance=tracked.instance.id,
                             error=f"{type(exc).__name__}: {exc}")
                broken = True
        state: GenerationState | None = None
        if frame_state is not None:
            state = frame_state  # the final state rides on the detach frame: resume without waiting
        elif detached:
            try:
                handoff = await asyncio.wait_for(asyncio.shield(tracked.handoff), cfg.handoff_timeout_s)
                state = handoff.state
            except asyncio.TimeoutError:
                state = None
        if state is None:  # the source died (or its detach answer was lost): the last export
            state = tracked.last_state
            outcome = MigrationOutcome.RECOVERED
        else:
            outcome = MigrationOutcome.MIGRATED
        if state is None:
            _log.error("the stream's instance went away and left no state to resume from", id=tracked.id,
                       instance=tracked.instance.id)
            tracked.settle(MigrationOutcome.FAILED)
            yield errors.error_frame(errors.StreamCut("the stream's instance went away during a migration "
                                                      "and left no state to resume from"))
            return
        skip = max(0, tracked.delivered - state.text_offset)
        check = _Regenerated(tracked.sent_after(state.text_offset) if skip or state.sampling.logprobs is not None
                             else "")
        resume_state = state.model_copy(update={"text_offset": min(state.text_offset, tracked.delivered)})
        if state.sampling.logprobs is not None:
            # Every token's frame carries its logprob entry, and a resumed generation emits the same
            # frames: skip whole frames by token count (text-less frames of held-back tokens included).
            skip_frames_tokens, skip = max(0, tracked.delivered_tokens - state.generated), 0
        # The client may hold the start of a frame the dead source never finished: the resumed
        # stream's frame for that token (byte for byte the same, where numerics are exact) completes it.
        partial = buf[:sent_prefix] if outcome is MigrationOutcome.RECOVERED else b""
        buf, sent_prefix, must_match, broken = b"", len(partial), partial or None, False
        source = await _open_resume(client, tracked, resume_state, candidates, wait)
        if source is None:
            _log.error("no instance accepted the resumed generation", id=tracked.id)
            tracked.settle(MigrationOutcome.FAILED)
            if outcome is MigrationOutcome.RECOVERED:
                metrics.observe_recovery("no_instance")
            yield errors.error_frame(errors.StreamCut("the stream was migrated but no instance accepted it"))
            return
        if outcome is MigrationOutcome.RECOVERED:
            metrics.observe_recovery("resumed")
        _log.info("stream spliced", id=tracked.id, instance=tracked.instance.id, position=state.position,
                  outcome=str(outcome), skip_chars=skip, skip_tokens=skip_frames_tokens)
        tracked.destination = tracked.instance
        tracked.settle(outcome)
        resumed = True


class _Regenerated:
    """The text a resumed stream regenerates before it reaches what the client has (`add`, piece by
    piece), checked against that text (`expected`; None: not kept, nothing to check)."""

    def __init__(self, expected: str | None) -> None:
        self.expected = expected
        self.got = ""

    def add(self, text: str) -> bool:
        """False once the regenerated text differs from what the client got."""
        if not text or self.expected is None:
            return True
        self.got += text
        n = min(len(self.got), len(self.expected))
        return self.got[:n] == self.expected[:n]


def _diverged(tracked: Tracked, check: _Regenerated, frame: bool = False) -> bytes:
    """The error frame that ends a stream whose resumed generation differs from what was sent
    (its text; `frame`: the frame the client had the start of)."""
    if frame:
        where = "in the frame the client had the start of"
    else:
        assert check.expected is not None
        at = next((i for i, (a, b) in enumerate(zip(check.got, check.expected, strict=False)) if a != b),
                  min(len(check.got), len(check.expected)))
        where = f"at character {at} of the regenerated text"
    _log.error("the resumed generation differs from what was already sent: the stream is cut", id=tracked.id,
               instance=tracked.instance.id, where=where)
    tracked.settle(MigrationOutcome.FAILED)
    metrics.observe_recovery("diverged")
    return errors.error_frame(errors.StreamCut(
        f"the stream's instance went away and its generation, resumed from the last export, differs from "
        f"what was already sent {where} (numerics that are not batch-invariant?)"))


async def resume_whole(client: InstanceClient, tracked: Tracked, state: GenerationState | None,
                       candidates: Candidates) -> httpx.Response | None:
    """A non-streaming generation's answer after its source let go of it: `state` (None: the last
    export, when the source died) resumed on the first candidate that takes it, whose response
    is the whole completion (the resumed text starts at the beginning, text_offset 0). A
    destination that is itself migrated away meanwhile answers with the newer state: resumed
    again. None when no instance could finish it."""
    outcome = MigrationOutcome.MIGRATED
    if state is None:
        state, outcome = tracked.last_state, MigrationOutcome.RECOVERED
    if state is None:
        _log.error("migration lost the request: no state to resume from", id=tracked.id)
        tracked.settle(MigrationOutcome.FAILED)
        return None
    tracked.settle(outcome)  # off the source: what the coordinator waits for
    tried: set[str] = set()
    while True:
        options = candidates(tracked, frozenset(tried))
        if not options:
            _log.error("no instance accepted the resumed generation", id=tracked.id)
            return None
        inst = options[0]
        tried.add(inst.id)
        tracked.instance, tracked.migrating, tracked.destination = inst, False, None
        try:
            async with tracked.breaker.slot(inst):
                resp = await client.resume(inst, state)
        except httpx.HTTPError as exc:
            _log.warning("resume failed; trying another instance", id=tracked.id, instance=inst.id,
                         error=f"{type(exc).__name__}: {exc}")
            continue
        newer = detached_answer(resp)
        if newer is not None:  # moved on again
            state, tried = newer, {inst.id}
            tracked.settle(MigrationOutcome.MIGRATED)
            _log.info("resumed generation migrated again", id=tracked.id, instance=inst.id)
            continue
        if resp.status_code == 200:
            _log.info("request resumed", id=tracked.id, instance=inst.id, position=state.position,
                      outcome=str(outcome))
            return resp
        _log.warning("resume refused; trying another instance", id=tracked.id, instance=inst.id,
                     status=resp.status_code, error=resp.text[:300])
