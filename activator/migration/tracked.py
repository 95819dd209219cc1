"""One client stream (or waiting non-streaming request) that a migration may switch, and the
table of them by generation id.

Hot path: a stream that is never migrated costs a dict entry, an attribute test and a list
append per chunk (the raw chunks are kept, not parsed, so the characters delivered can be
counted if the stream is ever migrated; kept bytes are folded into a count above FOLD_BYTES).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from activator.balancer import Breaker, RoutedInstance
from activator.migration.frames import frame_counts, split_frames
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
        self.last_state: GenerationState | None = None  # the newest export of the source
        loop = asyncio.get_running_loop()
        self.handoff: asyncio.Future[Handoff] = loop.create_future()
        self.switched: asyncio.Future[MigrationOutcome] = loop.create_future()  # outcome for the coordinator
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

    def begin(self, destination: RoutedInstance) -> None:
        """A migration to `destination` starts: fresh handoff and outcome, frames parsed from now on."""
        loop = asyncio.get_running_loop()
        self.handoff, self.switched = loop.create_future(), loop.create_future()
        self.destination = destination
        self.migrating = True

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

    def __len__(self) -> int:
        return len(self._by_id)
