"""One client stream (or waiting non-streaming request) that a migration may switch, and the
table of them by generation id.

Hot path: a stream that is never migrated costs a dict entry, an attribute test and a list
append per chunk (the raw chunks are kept, not parsed, so the characters delivered can be
counted if the stream is ever migrated; kept bytes are folded into a count above FOLD_BYTES,
and at every export).

Exports (`checkpoint`): the newest state of the generation, exported from its instance every
`--export-interval` seconds (handoff.Migrations.export_loop) and at every round of a migration.
If the instance dies, the stream resumes from it elsewhere (splice.py) and regenerates the text
between the export and what the client already has. From the first export on (`mark`), that
text is kept (`tail`, trimmed at each export) so the regenerated text can be checked against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from activator.balancer import Breaker, RoutedInstance
from activator.migration.frames import frame_content, split_frames
from sllm_knative.api.instance import GenerationState
from sllm_knative.api.keys import ServiceKey
from sllm_knative.api.migration import MigrationOutcome

FOLD_BYTES = 256 << 10  # raw chunks kept per stream before they are folded into a character count


@dataclasses.dataclass
class Handoff:
    """What the coordinator gives the relay when the source has detached (state None: use last_state)."""

    state: GenerationState | None


class Tracked:
    """One streaming response the relay is passing through, which a migration may switch."""

    def __init__(self, gen_id: str, key: ServiceKey, instance: RoutedInstance, breaker: Breaker) -> None:
        self.id = gen_id
        self.key = key
        self.instance = instance  # where the generation runs now
        self.breaker = breaker
        self.upstream = contextlib.AsyncExitStack()  # the current upstream's response and breaker slot
        self.migrating = False  # the relay parses frames from here on
        self.destination: RoutedInstance | None = None
        self.last_state: GenerationState | None = None  # the newest export (`checkpoint`)
        self.streaming = False  # an SSE stream (handoff.Migrations.track_stream): exported periodically
        self.exporting = False  # a periodic export of it is in flight
        loop = asyncio.get_running_loop()
        self.handoff: asyncio.Future[Handoff] = loop.create_future()
        self.switched: asyncio.Future[MigrationOutcome] = loop.create_future()  # outcome for the coordinator
        self.log: list[bytes] = []  # raw chunks passed through (until migration)
        self.log_bytes = 0
        self.delivered = 0  # characters of generated text in complete frames sent, not counting `log`
        self.delivered_tokens = 0  # logprob entries in those frames (streams that asked for logprobs)
        self.partial = b""  # the start of a frame already sent (folded from the log)
        self.ended = False
        # The text delivered from character `tail_from` on (None until the first `mark`): what a
        # resume from `last_state` regenerates must equal its part after the state's text_offset.
        self.tail: list[str] | None = None
        self.tail_from = 0

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
        text, tokens = frame_content(frame)
        self.delivered += len(text)
        self.delivered_tokens += tokens
        if self.tail is not None and text:
            self.tail.append(text)

    def mark(self) -> None:
        """An export is about to be asked for: keep the text delivered from now on. (The export's
        text_offset counts at least what was delivered before it was asked for.)"""
        self.fold()
        if self.tail is None:
            self.tail, self.tail_from = [], self.delivered

    def checkpoint(self, state: GenerationState) -> None:
        """The newest export of the generation (an older position than the one held is ignored);
        the kept text before its text_offset is no longer needed."""
        if self.last_state is not None and state.position < self.last_state.position:
            return
        self.last_state = state
        if self.tail is not None:
            self.fold()
            text = "".join(self.tail)
            cut = min(max(0, state.text_offset - self.tail_from), len(text))
            self.tail, self.tail_from = [text[cut:]], self.tail_from + cut

    def sent_after(self, offset: int) -> str | None:
        """The text delivered after character `offset` (None when it was not kept)."""
        if self.tail is None or offset < self.tail_from:
            return None
        return "".join(self.tail)[offset - self.tail_from:]

    @property
    def moving(self) -> bool:
        """A migration is moving it now (begun, not yet switched or called off)."""
        return self.migrating and not self.switched.done()

    def begin(self, destination: RoutedInstance) -> None:
        """A migration to `destination` starts: fresh handoff and outcome, frames parsed from now on."""
        loop = asyncio.get_running_loop()
        self.handoff, self.switched = loop.create_future(), loop.create_future()
        self.destination = destination
        self.migrating = True
        self.mark()

    def settle(self, outcome: MigrationOutcome) -> None:
        if not self.switched.done():
            self.switched.set_result(outcome)

    async def close(self) -> None:
        """The client's response is over. A migration still waiting for the switch reports the
        generation lost (`failed`): its client is gone, nothing will resume it."""
        self.ended = True
        self.settle(MigrationOutcome.FAILED)
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

    def exportable(self) -> list[Tracked]:
        """Streams due a periodic export: relayed, on an instance with an internal API, not being
        migrated, no export of theirs in flight."""
        return [t for t in self._by_id.values()
                if t.streaming and not t.ended and not t.moving and not t.exporting and t.instance.internal_url]

    def __len__(self) -> int:
        return len(self._by_id)
