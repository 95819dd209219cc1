"""Live migration of in-flight generations: the handoff coordinator and the stream splice.

The activator holds the client connections, so it coordinates (docs/migration.md):

    round 1   GET  source/internal/v1/generations/{id}     export: tokens so far, sampling state
              POST dest/internal/v1/prefill {start: 0}     while the source keeps streaming
    round k   export again; POST dest prefill {start: cached, tokens: only the new ones}
    follow    once the gap is under settle_gap (or after max_rounds): export at every source step
              and queue its new tokens on the destination without waiting (`"wait": false`), until
              the destination has computed all but gap_threshold of them (or falls behind, or
              max_follow steps)
    detach    then, or at once when a round leaves a gap <= gap_threshold:
              POST source/.../{id}/detach {"position": null} -> the final state at an exact position;
              the source's stream ends with `event: sllm.detached` carrying that state (no [DONE])
    resume    POST dest/internal/v1/resume {state}: as soon as the relay reads the detach frame;
              the relay splices the destination's frames after the source's

Pure decisions (`next_action`, `follow_done`, `split_frames`, `frame_text`, `trim_frame`, `pick_destination`)
are plain functions; `Tracked` is one client stream the relay may switch; `splice` is the relay
once a stream is migrating (frame by frame); `migrate_generation` / `migrate_instance` do the I/O.

Hot path: a stream that is never migrated costs a dict entry, an attribute test and a list
append per chunk (the raw chunks are kept, not parsed, so the characters delivered can be
counted if the stream is ever migrated; kept bytes are folded into a count above FOLD_BYTES).

Abort rules: the source finishes first -> nothing to do (the parked prefill is dropped); the
destination fails before the detach -> the generation stays on the source; the gap does not
shrink -> follow after max_rounds, detach after max_follow steps; the source dies mid-migration ->
the relay resumes the last exported state on the destination and skips the characters the client
already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx

from activator.balancer import Breaker, Instance
from activator.routing import ServiceKey
from sllm_knative.log import get_logger

_log = get_logger("activator.migration")

FOLD_BYTES = 256 << 10  # raw chunks kept per stream before they are folded into a character count
API = "/internal/v1"
DETACHED_HEADER = "x-sllm-detached"  # an instance's answer to a non-streaming request it detached


# -- configuration --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MigrationConfig:
    # Detach once the destination lacks at most this many tokens (not sent after a round; not yet
    # computed in the follow phase). The resume computes them before its first token, so each is
    # handoff time the client sees (on the CPU in exact numerics, two tokens cost about one step).
    gap_threshold: int = 2
    max_rounds: int = 8  # waited prefill rounds at most; then the follow phase
    # A gap at most this large ends the waited rounds: the follow phase takes over (a waited round
    # cannot get below its fixed point, the tokens the source makes while the round's export and
    # prefill run; following does not wait for either). 0: waited rounds until max_rounds.
    settle_gap: int = 16
    # Source steps at most in the follow phase before detaching regardless (a destination that
    # does not keep pace). 0: no follow phase; detach where it would begin.
    max_follow: int = 64
    request_timeout_s: float = 60.0  # one internal call (a prefill of a long context included)
    # The instances' SLLM_INTERNAL_TOKEN, sent as `Authorization: Bearer` on every internal call.
    internal_token: str | None = dataclasses.field(default=None, repr=False)
    handoff_timeout_s: float = 60.0  # from the detach until the destination's stream is spliced in

    def __post_init__(self) -> None:
        if self.gap_threshold < 0:
            raise ValueError(f"gap_threshold = {self.gap_threshold}, must be >= 0")
        if self.settle_gap < 0:
            raise ValueError(f"settle_gap = {self.settle_gap}, must be >= 0")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds = {self.max_rounds}, must be >= 1")
        if self.max_follow < 0:
            raise ValueError(f"max_follow = {self.max_follow}, must be >= 0")
        for name in ("request_timeout_s", "handoff_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}, must be > 0")


    @property
    def headers(self) -> dict[str, str]:
        """Headers of every call to an instance's internal API."""
        return {"authorization": f"Bearer {self.internal_token}"} if self.internal_token else {}


# -- pure decisions -------------------------------------------------------------------------

class Action(enum.Enum):
    PREFILL = "prefill"  # send the new tokens to the destination, wait for their prefill, look again
    FOLLOW = "follow"  # queue each source step's tokens on the destination until it keeps pace
    DETACH = "detach"  # stop the source now and resume on the destination


def next_action(rounds: int, gap: int, cfg: MigrationConfig) -> Action:
    """After `rounds` waited prefill rounds the destination lacks `gap` tokens: another round,
    the follow phase, or detach? Detach once the gap is at most gap_threshold; follow once it is
    at most settle_gap or the rounds are spent (a larger gap, even one that did not shrink after
    a noisy round or a long first prefill, gets another waited round first)."""
    if gap <= cfg.gap_threshold:
        return Action.DETACH
    if rounds >= cfg.max_rounds or gap <= cfg.settle_gap:
        return Action.FOLLOW if cfg.max_follow > 0 else Action.DETACH
    return Action.PREFILL


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


def pick_destination(instances: Sequence[Instance], source_id: str,
                     exclude: frozenset[str] = frozenset()) -> Instance | None:
    """The ready instance (not the source) with the fewest outstanding requests and an internal API."""
    best: Instance | None = None
    for inst in instances:
        if inst.id == source_id or inst.id in exclude or not inst.internal_url:
            continue
        if best is None or inst.outstanding < best.outstanding:
            best = inst
    return best


def split_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE frames (each with its blank-line terminator) and the incomplete rest."""
    frames: list[bytes] = []
    start = 0
    while True:
        end = buf.find(b"\n\n", start)
        if end < 0:
            return frames, buf[start:]
        frames.append(buf[start:end + 2])
        start = end + 2


class Frame(enum.Enum):
    DATA = "data"
    DONE = "done"
    DETACHED = "detached"
    OTHER = "other"


def classify(frame: bytes) -> tuple[Frame, Any]:
    """What an SSE frame of the function's stream is, with its parsed data (None if not JSON)."""
    event, data = None, []
    for line in frame.split(b"\n"):
        if line.startswith(b"event:"):
            event = line[6:].strip()
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    payload = b"\n".join(data)
    if event == b"sllm.detached":
        return Frame.DETACHED, _json(payload)
    if payload == b"[DONE]":
        return Frame.DONE, None
    if not data:
        return Frame.OTHER, None
    return Frame.DATA, _json(payload)


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def chunk_text(chunk: Any) -> str:
    """The generated text an OpenAI stream chunk carries (completion `text` or chat `delta.content`)."""
    if not isinstance(chunk, dict):
        return ""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if isinstance(choice.get("text"), str):
        return str(choice["text"])
    delta = choice.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("content"), str):
        return str(delta["content"])
    return ""


def chunk_tokens(chunk: Any) -> int:
    """Generated tokens whose logprob entries a chunk carries (0 without logprobs)."""
    try:
        lp = chunk["choices"][0]["logprobs"]
        return len(lp["tokens"] if "tokens" in lp else lp["content"])
    except (KeyError, IndexError, TypeError):
        return 0


def frame_text(frame: bytes) -> int:
    """Characters of generated text in one frame."""
    kind, data = classify(frame)
    return len(chunk_text(data)) if kind is Frame.DATA else 0


def frame_counts(frame: bytes) -> tuple[int, int]:
    """(characters of generated text, tokens with logprob entries) in one frame."""
    kind, data = classify(frame)
    return (len(chunk_text(data)), chunk_tokens(data)) if kind is Frame.DATA else (0, 0)


def trim_frame(frame: bytes, skip: int) -> tuple[bytes | None, int]:
    """Drop the first `skip` characters of a frame's text: (frame to send or None, characters dropped).

    Frames without text (finish, usage, [DONE]) pass unchanged; a frame whose whole text was
    already delivered is dropped; a frame that overlaps is re-encoded with the rest of its text.
    """
    kind, data = classify(frame)
    text = chunk_text(data) if kind is Frame.DATA else ""
    if skip <= 0 or not text:
        return frame, 0
    if len(text) <= skip:
        return None, len(text)
    choice = data["choices"][0]
    if isinstance(choice.get("text"), str):
        choice["text"] = text[skip:]
    else:
        choice["delta"]["content"] = text[skip:]
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return b"data: " + body + b"\n\n", skip


# -- one client stream ----------------------------------------------------------------------

@dataclasses.dataclass
class Handoff:
    """What the coordinator gives the relay when the source has detached (state None: use last_state)."""

    state: dict[str, Any] | None


class Tracked:
    """One streaming response the relay is passing through, which a migration may switch."""

    def __init__(self, gen_id: str, key: ServiceKey, instance: Instance, breaker: Breaker) -> None:
        self.id = gen_id
        self.key = key
        self.instance = instance  # where the generation runs now
        self.breaker = breaker
        self.upstream = contextlib.AsyncExitStack()  # the current upstream's response and breaker slot
        self.migrating = False  # the relay parses frames from here on
        self.destination: Instance | None = None
        self.last_state: dict[str, Any] | None = None  # the newest export of the source
        self.handoff: asyncio.Future[Handoff] = asyncio.get_running_loop().create_future()
        self.switched: asyncio.Future[str] = asyncio.get_running_loop().create_future()  # outcome for the coordinator
        self.log: list[bytes] = []  # raw chunks passed through (until migration)
        self.log_bytes = 0
        self.delivered = 0  # characters of generated text in complete frames sent, not counting `log`
        self.delivered_tokens = 0  # logprob entries in those frames (streams that asked for logprobs)
        self.partial = b""  # the start of a frame already sent (folded from the log)
        self.ended = False

    def keep(self, chunk: bytes) -> None:
        """Hot path: remember a passed-through chunk (folded into a count once large)."""
        self.log.append(chunk)
        self.log_bytes += len(chunk)
        if self.log_bytes > FOLD_BYTES:
            self.fold()

    def fold(self) -> None:
        frames, self.partial = split_frames(self.partial + b"".join(self.log))
        for f in frames:
            self.count(f)
        self.log, self.log_bytes = [], 0

    def count(self, frame: bytes) -> None:
        chars, tokens = frame_counts(frame)
        self.delivered += chars
        self.delivered_tokens += tokens

    def begin(self, destination: Instance) -> None:
        """A migration to `destination` starts: fresh handoff and outcome, frames parsed from now on."""
        loop = asyncio.get_running_loop()
        self.handoff, self.switched = loop.create_future(), loop.create_future()
        self.destination = destination
        self.migrating = True

    def settle(self, outcome: str) -> None:
        if not self.switched.done():
            self.switched.set_result(outcome)

    async def close(self) -> None:
        self.ended = True
        self.settle("ended")
        await self.upstream.aclose()


class StreamTable:
    """The streams the activator relays, by generation id."""

    def __init__(self) -> None:
        self._by_id: dict[str, Tracked] = {}

    def add(self, tracked: Tracked) -> None:
        self._by_id[tracked.id] = tracked

    def remove(self, tracked: Tracked) -> None:
        if self._by_id.get(tracked.id) is tracked:
            del self._by_id[tracked.id]

    def on_instance(self, key: ServiceKey, instance_id: str) -> list[Tracked]:
        return [t for t in self._by_id.values() if t.key == key and t.instance.id == instance_id and not t.ended]

    def __len__(self) -> int:
        return len(self._by_id)


# -- the relay once a stream is migrating ---------------------------------------------------

Candidates = Callable[[Tracked, frozenset[str]], Sequence[Instance]]


async def _open_resume(client: httpx.AsyncClient, tracked: Tracked, state: dict[str, Any],
                       candidates: Candidates, cfg: MigrationConfig) -> AsyncIterator[bytes] | None:
    """Resume `state` on the first candidate that accepts it; the new upstream replaces the old."""
    tried: set[str] = set()
    while True:
        options = candidates(tracked, frozenset(tried))
        if not options:
            return None
        inst = options[0]
        tried.add(inst.id)
        stack = contextlib.AsyncExitStack()
        resp = None
        try:
            await stack.enter_async_context(tracked.breaker.slot(inst))
            req = client.build_request("POST", f"{inst.internal_url}{API}/resume", json={"state": state},
                                       headers=cfg.headers)
            resp = await client.send(req, stream=True)
            stack.push_async_callback(resp.aclose)
            if resp.status_code != 200:
                body = (await resp.aread())[:300].decode(errors="replace")
                raise httpx.HTTPStatusError(f"resume answered {resp.status_code}: {body}", request=req, response=resp)
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


async def splice(client: httpx.AsyncClient, tracked: Tracked, rest: AsyncIterator[bytes], candidates: Candidates,
                 cfg: MigrationConfig, broken: bool = False) -> AsyncIterator[bytes]:
    """The relay for a migrating stream: whole frames only, the source's detach spliced to a resume.

    `rest` is the source's remaining body; `broken` says it already failed.
    """
    tracked.fold()
    buf = tracked.partial  # already sent: the start of the frame being received
    sent_prefix = len(buf)
    skip = 0  # characters of a resumed stream the client already has
    skip_frames_tokens = 0  # with logprobs: tokens (whole frames) of a resumed stream the client already has
    source: AsyncIterator[bytes] | None = rest
    while True:
        detached = False
        frame_state: Any = None
        if source is not None and not broken:
            try:
                async for chunk in source:
                    frames, buf = split_frames(buf + chunk)
                    for f in frames:
                        kind, data = classify(f)
                        if kind is Frame.DETACHED:
                            detached = True
                            frame_state = data.get("state") if isinstance(data, dict) else None
                            break
                        if skip_frames_tokens > 0 and kind is Frame.DATA:
                            skip_frames_tokens -= frame_counts(f)[1]
                            continue
                        out, dropped = trim_frame(f, skip)
                        skip -= dropped
                        if out is None:
                            continue
                        tracked.count(out)
                        if sent_prefix:
                            out, sent_prefix = out[sent_prefix:], 0
                        yield out
                    if detached:
                        break
                if not detached:
                    tracked.settle("finished_on_source")
                    return
            except httpx.HTTPError as exc:
                _log.warning("upstream broke during a migration", id=tracked.id, instance=tracked.instance.id,
                             error=f"{type(exc).__name__}: {exc}")
                broken = True
        state: dict[str, Any] | None = None
        if detached and isinstance(frame_state, dict):
            state = frame_state  # the final state rides on the detach frame: resume without waiting
        elif detached:
            try:
                handoff = await asyncio.wait_for(asyncio.shield(tracked.handoff), cfg.handoff_timeout_s)
                state = handoff.state
            except asyncio.TimeoutError:
                state = None
        if state is None:  # the source died (or its detach answer was lost): the last export
            state = tracked.last_state
            outcome = "recovered"
        else:
            outcome = "migrated"
        if state is None:
            _log.error("migration lost the stream: no state to resume from", id=tracked.id)
            tracked.settle("failed")
            return
        resume_state = dict(state)
        offset = int(state.get("text_offset", 0))
        resume_state["text_offset"] = min(offset, tracked.delivered)
        skip = max(0, tracked.delivered - offset)
        if (state.get("sampling") or {}).get("logprobs") is not None:
            # Every token's frame carries its logprob entry, and a resumed generation emits the same
            # frames: skip whole frames by token count (text-less frames of held-back tokens included).
            generated = int(state["position"]) - int(state["prompt_len"])
            skip_frames_tokens, skip = max(0, tracked.delivered_tokens - generated), 0
        buf, sent_prefix, broken = b"", 0, False
        source = await _open_resume(client, tracked, resume_state, candidates, cfg)
        if source is None:
            _log.error("no instance accepted the resumed generation", id=tracked.id)
            tracked.settle("failed")
            return
        _log.info("stream spliced", id=tracked.id, instance=tracked.instance.id, position=state.get("position"),
                  outcome=outcome, skip=skip)
        tracked.destination = tracked.instance
        tracked.settle(outcome)


async def resume_whole(client: httpx.AsyncClient, tracked: Tracked, state: dict[str, Any] | None,
                       candidates: Candidates, cfg: MigrationConfig) -> httpx.Response | None:
    """A non-streaming generation's answer after its source let go of it: `state` (None: the last
    export, when the source died) resumed on the first candidate that takes it, whose response
    is the whole completion (the resumed text starts at the beginning, text_offset 0). A
    destination that is itself migrated away meanwhile answers with the newer state: resumed
    again. None when no instance could finish it."""
    outcome = "migrated"
    if state is None:
        state, outcome = tracked.last_state, "recovered"
    if state is None:
        _log.error("migration lost the request: no state to resume from", id=tracked.id)
        tracked.settle("failed")
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
                resp = await client.post(f"{inst.internal_url}{API}/resume", json={"state": state},
                                         headers=cfg.headers, timeout=httpx.Timeout(cfg.request_timeout_s, read=None))
        except httpx.HTTPError as exc:
            _log.warning("resume failed; trying another instance", id=tracked.id, instance=inst.id,
                         error=f"{type(exc).__name__}: {exc}")
            continue
        if resp.headers.get(DETACHED_HEADER) is not None:  # moved on again
            with contextlib.suppress(ValueError):
                newer = resp.json().get("state")
                if isinstance(newer, dict):
                    state, tried = newer, {inst.id}
                    tracked.settle("migrated")
                    _log.info("resumed generation migrated again", id=tracked.id, instance=inst.id)
                    continue
        if resp.status_code == 200:
            _log.info("request resumed", id=tracked.id, instance=inst.id, position=state.get("position"),
                      outcome=outcome)
            return resp
        _log.warning("resume refused; trying another instance", id=tracked.id, instance=inst.id,
                     status=resp.status_code, error=resp.text[:300])


# -- the coordinator ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MigrationResult:
    id: str
    outcome: str  # migrated | recovered | finished_on_source | stayed_on_source | failed
    tokens: int  # position at the detach (prompt + generated)
    rounds: int
    seconds: float
    destination: str | None
    gaps: tuple[int, ...] = ()  # tokens not yet sent after each waited round
    lags: tuple[int, ...] = ()  # tokens sent but not computed at each follow step

    @property
    def follow(self) -> int:
        return len(self.lags)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gaps"], d["lags"], d["follow"] = list(self.gaps), list(self.lags), self.follow
        return d


class _Finished(Exception):
    """The generation is no longer on the source (it ended there)."""


class _SourceFailed(Exception):
    def __init__(self, message: str, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone  # unreachable (died) rather than refusing


class _DestinationFailed(Exception):
    pass


async def _source_call(client: httpx.AsyncClient, method: str, url: str, cfg: MigrationConfig,
                       body: Any = None) -> dict[str, Any]:
    try:
        r = await client.request(method, url, json=body, timeout=cfg.request_timeout_s, headers=cfg.headers)
    except httpx.HTTPError as exc:
        raise _SourceFailed(f"{type(exc).__name__}: {exc}", gone=True) from exc
    if r.status_code == 404:
        raise _Finished()
    if r.status_code != 200:
        raise _SourceFailed(f"{method} {url} answered {r.status_code}: {r.text[:300]}", gone=False)
    state: dict[str, Any] = r.json()
    if state.get("finish_reason") is not None:
        raise _Finished()
    return state


async def _prefill(client: httpx.AsyncClient, dest: Instance, gen_id: str, start: int, tokens: list[int],
                   cfg: MigrationConfig, wait: bool = True) -> int:
    """Extend the destination's parked prefill; the tokens it has computed (all but the last
    when `wait`; what it had so far when not)."""
    body: dict[str, Any] = {"id": gen_id, "start": start, "tokens": tokens}
    if not wait:
        body["wait"] = False
    try:
        r = await client.post(f"{dest.internal_url}{API}/prefill", json=body, timeout=cfg.request_timeout_s,
                              headers=cfg.headers)
    except httpx.HTTPError as exc:
        raise _DestinationFailed(f"{type(exc).__name__}: {exc}") from exc
    if r.status_code != 200:
        raise _DestinationFailed(f"prefill answered {r.status_code}: {r.text[:300]}")
    try:
        return int(r.json()["cached"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _DestinationFailed(f"prefill answer without 'cached': {r.text[:300]}") from exc


async def _last_prefill(client: httpx.AsyncClient, dest: Instance, gen_id: str, start: int, tokens: list[int],
                        cfg: MigrationConfig) -> None:
    """The final gap's prefill, sent with the detach: the resume does the work if it fails."""
    try:
        await _prefill(client, dest, gen_id, start, tokens, cfg)
    except _DestinationFailed as exc:
        _log.debug("last prefill not used", id=gen_id, instance=dest.id, error=str(exc))


async def _drop_prefill(client: httpx.AsyncClient, dest: Instance, gen_id: str, cfg: MigrationConfig) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await client.delete(f"{dest.internal_url}{API}/prefill/{gen_id}", timeout=5.0, headers=cfg.headers)


async def migrate_generation(client: httpx.AsyncClient, tracked: Tracked, dest: Instance,
                             cfg: MigrationConfig) -> MigrationResult:
    """Move one streaming generation from its instance to `dest` (rounds, detach, splice)."""
    t0 = time.perf_counter()
    src = tracked.instance
    gen_url = f"{src.internal_url}{API}/generations/{tracked.id}"
    rounds, cached, tokens = 0, 0, 0  # cached: tokens sent to the destination
    gaps: list[int] = []
    lags: list[int] = []
    computed = 0  # tokens the destination reported computed (follow phase)

    def result(outcome: str) -> MigrationResult:
        return MigrationResult(tracked.id, outcome, tokens, rounds, time.perf_counter() - t0,
                               dest.id if outcome in ("migrated", "recovered") else None, tuple(gaps), tuple(lags))

    tracked.begin(dest)
    last: asyncio.Future[None] | None = None
    phase = Action.PREFILL
    try:
        while True:
            # An export is answered at the source's next step boundary: one loop per source step
            # at most, with the token that step made.
            state = await _source_call(client, "GET", gen_url, cfg)
            tracked.last_state = state
            tokens = int(state["position"])
            gap = tokens - cached
            if phase is not Action.FOLLOW and rounds:
                gaps.append(gap)
                phase = next_action(rounds, gap, cfg)
            if phase is Action.DETACH:
                break
            if phase is Action.FOLLOW:
                if gap:
                    computed = await _prefill(client, dest, tracked.id, cached, list(state["tokens"][cached:tokens]),
                                              cfg, wait=False)
                    cached = tokens
                lags.append(max(0, cached - 1 - computed))
                if follow_done(lags, cfg):
                    break
                continue
            computed = await _prefill(client, dest, tracked.id, cached, list(state["tokens"][cached:tokens]), cfg)
            cached, rounds = tokens, rounds + 1
        # The last gap goes to the destination together with the detach, not before it: it is
        # prefilled while the source finishes its step and the relay resumes, so the resume finds
        # only the token of that step left to compute (a late prefill is refused harmlessly).
        last = asyncio.ensure_future(_last_prefill(client, dest, tracked.id, cached,
                                                   list(state["tokens"][cached:tokens]), cfg)) \
            if tokens > cached else None
        try:
            final = await _source_call(client, "POST", f"{gen_url}/detach", cfg, {"position": None})
        except BaseException:
            if last is not None:
                await last  # in order before a _drop_prefill below
            raise
        tracked.last_state = final
        tokens = int(final["position"])
        tracked.handoff.set_result(Handoff(final))
    except _Finished:
        tracked.destination = None
        await _drop_prefill(client, dest, tracked.id, cfg)
        return result("finished_on_source")
    except _DestinationFailed as exc:
        _log.warning("destination failed before the detach: the generation stays on the source", id=tracked.id,
                     instance=dest.id, error=str(exc))
        tracked.destination = None
        await _drop_prefill(client, dest, tracked.id, cfg)
        return result("stayed_on_source")
    except _SourceFailed as exc:
        _log.warning("source failed during the migration", id=tracked.id, instance=src.id, error=str(exc),
                     gone=exc.gone)
        if not exc.gone and not tracked.handoff.done():  # it refused: the generation stays there
            tracked.destination = None
            await _drop_prefill(client, dest, tracked.id, cfg)
            return result("stayed_on_source")
        if not tracked.handoff.done():
            tracked.handoff.set_result(Handoff(None))
    try:
        outcome = await asyncio.wait_for(asyncio.shield(tracked.switched), cfg.handoff_timeout_s * 2)
    except asyncio.TimeoutError:
        outcome = "failed"
    if last is not None:
        await last
    return result(outcome)


async def migrate_instance(client: httpx.AsyncClient, streams: Sequence[Tracked],
                           destinations: Callable[[frozenset[str]], Instance | None],
                           cfg: MigrationConfig) -> list[MigrationResult]:
    """Migrate all given streams in parallel; a generation whose destination fails tries the next one."""

    async def one(tracked: Tracked) -> MigrationResult:
        tried: set[str] = set()
        last: MigrationResult | None = None
        while True:
            dest = destinations(frozenset(tried))
            if dest is None:
                return last or MigrationResult(tracked.id, "stayed_on_source", 0, 0, 0.0, None)
            tried.add(dest.id)
            last = await migrate_generation(client, tracked, dest, cfg)
            if last.outcome != "stayed_on_source":
                return last

    return list(await asyncio.gather(*(one(t) for t in streams)))
