"""One generation as the engine sees it, and what the engine tells its consumer.

A `Sequence` is created by the HTTP layer (`from_request`, or `from_state` to resume an
exported generation) and then owned by the engine thread, except `cancelled`, which any
thread may set. Outputs go to `sink`, called on the engine thread.
"""

from __future__ import annotations

import concurrent.futures
import enum
import time
from collections.abc import Callable
from typing import Any

import torch

from functions.llm.params import Output, SamplingParams, TokenLogprob
from functions.llm.protocol import new_id
from functions.llm.sampling import decode_generator, encode_generator, new_generator
from functions.llm.state import GenerationState
from functions.llm.text import TextTracker


class Status(enum.Enum):
    WAITING = "waiting"  # submitted, no KV slot yet
    RUNNING = "running"  # prefilling or decoding
    PARKED = "parked"  # prefill-only (a migration target): holds a slot, emits nothing
    FINISHED = "finished"
    CANCELLED = "cancelled"
    DETACHED = "detached"


def stop_reason(*, is_eos: bool, text_stopped: bool, generated: int, max_tokens: int, length: int,
                max_len: int) -> str | None:
    """Why a generation ends after its latest token ("stop" or "length"), or None if it goes on."""
    if is_eos or text_stopped:
        return "stop"
    if generated >= max_tokens or length >= max_len:
        return "length"
    return None


class Sequence:
    def __init__(self, *, id: str, kind: str, model: str, created: int, tokens: list[int], prompt_len: int,
                 params: SamplingParams, generator: torch.Generator, tokenizer: Any, stream: bool,
                 include_usage: bool, echo_text: str | None, sink: Callable[[Output], None] | None) -> None:
        self.id = id
        self.kind = kind
        self.model = model
        self.created = created
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.params = params
        self.generator = generator
        self.stream = stream
        self.include_usage = include_usage
        self.echo = echo_text is not None  # requested
        self.echo_text = echo_text  # still owed to the client
        self.sink = sink
        self.text = TextTracker(tokenizer, params.stop)
        self.status = Status.WAITING
        self.slot: int | None = None
        self.cache_len = 0
        self.cancelled = False
        self.detach_at: int | None = None
        self.detach_waiters: list[concurrent.futures.Future[GenerationState]] = []
        self.prefill_waiters: list[tuple[int, concurrent.futures.Future[int]]] = []
        # Non-streaming requests deliver everything at the end: keep the logprobs for an export.
        self.logprob_log: list[TokenLogprob] | None = [] if (not stream and params.logprobs is not None) else None
        self.want_prompt_logprobs = self.echo and params.logprobs is not None and kind == "completion"
        self.prompt_logprobs: list[TokenLogprob] = [TokenLogprob(tokens[0], None, ())] if tokens else []
        self.finish_reason: str | None = None
        self.submitted = time.monotonic()
        self.touched = self.submitted  # last prefill activity of a parked sequence
        self.first_token_at: float | None = None

    @classmethod
    def from_request(cls, *, kind: str, model: str, prompt: list[int], params: SamplingParams, tokenizer: Any,
                     stream: bool, include_usage: bool, echo_text: str | None,
                     sink: Callable[[Output], None], gen_id: str | None = None) -> Sequence:
        return cls(id=gen_id or new_id(kind), kind=kind, model=model, created=int(time.time()), tokens=list(prompt),
                   prompt_len=len(prompt), params=params, generator=new_generator(params.seed), tokenizer=tokenizer,
                   stream=stream, include_usage=include_usage, echo_text=echo_text, sink=sink)

    @classmethod
    def parked(cls, gen_id: str, tokens: list[int], tokenizer: Any) -> Sequence:
        """A prefill-only sequence for a generation that may be resumed here later."""
        seq = cls(id=gen_id, kind="completion", model="", created=0, tokens=list(tokens), prompt_len=len(tokens),
                  params=SamplingParams(), generator=torch.Generator(), tokenizer=tokenizer, stream=True,
                  include_usage=False, echo_text=None, sink=None)
        seq.status = Status.PARKED
        return seq

    def adopt(self, state: GenerationState, tokenizer: Any, sink: Callable[[Output], None]) -> None:
        """Turn this sequence into the generation described by state (tokens already checked)."""
        self.kind, self.model, self.created = state.kind, state.model, state.created
        self.tokens = list(state.tokens)
        self.prompt_len = state.prompt_len
        self.params = state.sampling
        self.generator = decode_generator(state.generator)
        self.stream, self.include_usage, self.echo = state.stream, state.include_usage, state.echo
        self.echo_text = tokenizer.decode(state.tokens[:state.prompt_len], skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False) if state.echo else None
        self.sink = sink
        self.text = TextTracker(tokenizer, state.sampling.stop)
        if state.detok is not None:
            self.text.restore(state.tokens[state.prompt_len:], state.detok, state.text_offset)
        else:
            self.text.replay(state.tokens[state.prompt_len:], state.text_offset)
        self.logprob_log = list(state.logprobs) if state.logprobs is not None else (
            [] if (not state.stream and state.sampling.logprobs is not None) else None)
        self.want_prompt_logprobs = False
        self.prompt_logprobs = []
        self.status = Status.RUNNING if self.slot is not None else Status.WAITING

    @classmethod
    def from_state(cls, state: GenerationState, tokenizer: Any, sink: Callable[[Output], None]) -> Sequence:
        seq = cls.parked(state.id, list(state.tokens), tokenizer)
        seq.status = Status.WAITING
        seq.adopt(state, tokenizer, sink)
        return seq

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def pending(self) -> int:
        """Rows this sequence can feed now (parked ones keep their last token for the resume)."""
        target = len(self.tokens) - 1 if self.status is Status.PARKED else len(self.tokens)
        return max(0, target - self.cache_len)

    def state(self, numerics: dict[str, Any]) -> GenerationState:
        return GenerationState(
            id=self.id, kind=self.kind, model=self.model, created=self.created, tokens=tuple(self.tokens),
            prompt_len=self.prompt_len, sampling=self.params, generator=encode_generator(self.generator),
            stream=self.stream, include_usage=self.include_usage,
            echo=(self.echo_text is not None) if self.stream else self.echo,
            text_offset=self.text.sent if self.stream else 0,
            logprobs=None if self.logprob_log is None else tuple(self.logprob_log),
            finish_reason=self.finish_reason, numerics=numerics,
            detok=None if self.text.stopped else self.text.snapshot())
