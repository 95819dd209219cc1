"""The continuous-batching engine: one thread, one packed forward step after another.

Between two steps the engine thread runs queued control calls (export, detach, prefill,
resume), admits submitted sequences into free KV slots and drops cancelled ones, so a new
request joins the very next step and a disconnected client frees its slot at once. Each step
feeds every decoding sequence one row and gives the rest of the row budget to prefills
(`scheduler.plan_step`), runs `ModelRunner.step`, then samples, detokenizes and checks the
stop conditions of each sequence whose next-token row was computed.

Thread-safety: `submit`, `cancel`, `call` and the read-only properties may be used from any
thread; everything else runs on the engine thread.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from functions.llm import scheduler
from functions.llm.errors import ApiError, Conflict, NotFound, TooManyRequests, Unavailable
from functions.llm.params import Output, TokenLogprob
from functions.llm.runner import Feed, ModelRunner
from functions.llm.sampling import choose, token_logprob
from functions.llm.sequence import Sequence, Status, stop_reason
from functions.llm.state import GenerationState
from sllm_knative.log import Logger

T = TypeVar("T")


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Any, *, eos_ids: set[int], step_tokens: int,
                 parked_slots: int, log: Logger, metrics: Any = None, parked_ttl_s: float = 120.0) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.step_tokens = step_tokens
        self.parked_limit = parked_slots
        self.parked_ttl_s = parked_ttl_s  # a parked prefill untouched this long is dropped
        self.numerics = runner.fingerprint()
        self._log = log
        self._metrics = metrics
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._stopping: str | None = None
        self._thread: threading.Thread | None = None
        # engine-thread state
        self._free = list(range(runner.slots - 1, -1, -1))
        self._active: list[Sequence] = []  # RUNNING and PARKED, in arrival order
        self._waiting: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self.failed: BaseException | None = None
        self.batch_size = 0  # running (non-parked) sequences after the last boundary
        self.parked = 0

    # -- any thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sllm-engine", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "the server is shutting down", timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = reason
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._stopping:
                raise Unavailable(self._stopping, code="shutting_down")
            self._inbox.append(seq)
            self._cv.notify_all()

    def cancel(self, seq: Sequence) -> None:
        with self._cv:
            seq.cancelled = True
            self._cv.notify_all()

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run fn on the engine thread at the next step boundary."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                fut.set_exception(Unavailable(self._stopping, code="shutting_down"))
                return fut
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    # -- control calls (run through `call`, on the engine thread) -------------------------
    def export(self, gen_id: str) -> GenerationState:
        return self._find(gen_id, parked_ok=False).state(self.numerics)

    def detach(self, gen_id: str, position: int | None) -> concurrent.futures.Future[GenerationState]:
        """Stop a generation when it reaches `position` (now if None); the future gets its final state."""
        seq = self._find(gen_id, parked_ok=False)
        fut: concurrent.futures.Future[GenerationState] = concurrent.futures.Future()
        at = len(seq.tokens) if position is None else position
        if at < len(seq.tokens):
            raise Conflict(f"generation {gen_id} is already at position {len(seq.tokens)}, past {at}",
                           param="position", code="position_passed")
        seq.detach_waiters.append(fut)
        seq.detach_at = at if seq.detach_at is None else min(seq.detach_at, at)
        if at == len(seq.tokens):
            self._end_detached(seq)
        return fut

    def prefill(self, gen_id: str, start: int, tokens: list[int]) -> concurrent.futures.Future[int]:
        """Build (start == 0) or extend the parked KV cache of gen_id; the future gets the cached length."""
        seq = self._by_id.get(gen_id)
        if seq is None:
            if start != 0:
                raise Conflict(f"no prefill for {gen_id} here: the first prefill must start at 0, not {start}",
                               param="start", code="prefill_out_of_order")
            if self.parked >= self.parked_limit:
                raise TooManyRequests(f"all {self.parked_limit} parked slots are in use", code="no_parked_slot")
            if not self._free:
                raise TooManyRequests("every KV slot is taken (resumed migrations run beyond the concurrency "
                                      "limit in the parked slots)", code="no_parked_slot")
            seq = Sequence.parked(gen_id, tokens, self.tokenizer)
            self._place(seq)
            self._log.info("prefill for a migration", id=gen_id, tokens=len(tokens))
        else:
            if seq.status is not Status.PARKED:
                raise Conflict(f"generation {gen_id} is running here; it cannot be prefilled",
                               code="generation_running")
            if start != len(seq.tokens):
                raise Conflict(f"prefill for {gen_id} has {len(seq.tokens)} tokens; the next prefill must start "
                               f"there, not at {start}", param="start", code="prefill_out_of_order")
            seq.tokens.extend(tokens)
        seq.touched = time.monotonic()
        if len(seq.tokens) > self.runner.max_len:
            self._release(seq, Status.CANCELLED)
            raise Conflict(f"prefill of {len(seq.tokens)} tokens exceeds the context of {self.runner.max_len}",
                           param="tokens", code="context_length_exceeded")
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        seq.prefill_waiters.append((len(seq.tokens) - 1, fut))
        self._resolve_prefills(seq)
        return fut

    def cached(self, gen_id: str) -> int:
        """Tokens of a parked prefill whose KV cache is computed (0 if there is none), read from any
        thread: a plain read of an int the engine thread updates, stale by at most one step."""
        seq = self._by_id.get(gen_id)
        return seq.cache_len if seq is not None and seq.status is Status.PARKED else 0

    def holds_parked(self, gen_id: str) -> bool:
        """Whether a parked prefill of gen_id is here (any thread: a plain read, as `cached`)."""
        seq = self._by_id.get(gen_id)
        return seq is not None and seq.status is Status.PARKED

    def drop_parked(self, gen_id: str) -> None:
        seq = self._by_id.get(gen_id)
        if seq is None or seq.status is not Status.PARKED:
            raise NotFound(f"no parked prefill for generation {gen_id}", code="generation_not_found")
        self._release(seq, Status.CANCELLED)

    def resume(self, state: GenerationState, sink: Callable[[Output], None]) -> Sequence:
        """Continue an exported generation here, reusing a parked prefill of it when there is one."""
        if state.finish_reason is not None:
            raise Conflict(f"generation {state.id} already finished ({state.finish_reason})",
                           code="generation_finished")
        if len(state.tokens) > self.runner.max_len:
            raise Conflict(f"generation {state.id} has {len(state.tokens)} tokens, over this instance's context "
                           f"of {self.runner.max_len}", code="context_length_exceeded")
        seq = self._by_id.get(state.id)
        if seq is not None and seq.status is not Status.PARKED:
            raise Conflict(f"generation {state.id} is already running here", code="generation_running")
        if seq is not None and tuple(seq.tokens) != state.tokens[:len(seq.tokens)]:
            self._log.warning("parked prefill does not match the resumed state; prefilling again", id=state.id)
            self._release(seq, Status.CANCELLED)
            seq = None
        if state.numerics != self.numerics:
            self._log.warning("resuming a generation exported with other numerics; tokens may differ",
                              id=state.id, source=state.numerics, here=self.numerics)
        if seq is None:
            seq = Sequence.from_state(state, self.tokenizer, sink)
            self._waiting.append(seq)
            self._by_id[seq.id] = seq
        else:
            seq.adopt(state, self.tokenizer, sink)
            self.parked -= 1
            # Prefills still computing become part of the generation: their callers are done.
            for _, fut in seq.prefill_waiters:
                if not fut.done():
                    fut.set_result(seq.cache_len)
            seq.prefill_waiters.clear()
        return seq

    def generations(self) -> list[dict[str, Any]]:
        return [{"id": s.id, "status": s.status.value, "position": len(s.tokens), "cached": s.cache_len}
                for s in self._waiting + self._active]

    # -- engine thread ----------------------------------------------------------------------
    def _find(self, gen_id: str, parked_ok: bool) -> Sequence:
        seq = self._by_id.get(gen_id)
        if seq is None or (seq.status is Status.PARKED and not parked_ok):
            raise NotFound(f"no generation {gen_id} on this instance", code="generation_not_found")
        return seq

    def _place(self, seq: Sequence) -> None:
        seq.slot = self._free.pop()
        self._active.append(seq)
        self._by_id[seq.id] = seq
        if seq.status is Status.PARKED:
            self.parked += 1
        else:
            seq.status = Status.RUNNING

    def _release(self, seq: Sequence, status: Status) -> None:
        if seq in self._active:
            self._active.remove(seq)
            if seq.status is Status.PARKED:
                self.parked -= 1
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq.slot is not None:
            self._free.append(seq.slot)
            seq.slot = None
        if self._by_id.get(seq.id) is seq:
            del self._by_id[seq.id]
        seq.status = status
        for _, fut in seq.prefill_waiters:
            if not fut.done():
                fut.set_exception(Conflict(f"prefill of {seq.id} was dropped", code="prefill_dropped"))
        seq.prefill_waiters.clear()

    def _emit(self, seq: Sequence, out: Output) -> None:
        out.prompt_tokens = seq.prompt_len
        out.completion_tokens = seq.generated
        if seq.echo_text is not None:
            out.echo, seq.echo_text = seq.echo_text, None
        if seq.sink is not None:
            try:
                seq.sink(out)
            except Exception:  # a consumer's bug must not stop the engine
                self._log.error("output sink failed", exc_info=True, id=seq.id)

    def _fail(self, seq: Sequence, error: ApiError) -> None:
        self._emit(seq, Output(error=error))
        for fut in seq.detach_waiters:
            if not fut.done():
                fut.set_exception(error)
        self._release(seq, Status.FINISHED)

    def _end_detached(self, seq: Sequence) -> None:
        state = seq.state(self.numerics)
        self._emit(seq, Output(detached=state))
        for fut in seq.detach_waiters:
            if not fut.done():
                fut.set_result(state)
        self._release(seq, Status.DETACHED)
        self._log.info("generation detached", id=seq.id, position=len(seq.tokens))

    def _finish(self, seq: Sequence, reason: str, out: Output) -> None:
        seq.finish_reason = reason
        out.text += seq.text.flush()
        out.finish_reason = reason
        self._emit(seq, out)
        if seq.detach_waiters:
            state = seq.state(self.numerics)
            for fut in seq.detach_waiters:
                if not fut.done():
                    fut.set_result(state)
        self._release(seq, Status.FINISHED)
        if self._metrics is not None:
            self._metrics.finished(seq)

    def _resolve_prefills(self, seq: Sequence) -> None:
        keep = []
        for target, fut in seq.prefill_waiters:
            if seq.cache_len >= target:
                if not fut.done():
                    fut.set_result(seq.cache_len)
            else:
                keep.append((target, fut))
        seq.prefill_waiters = keep

    def _expire_parked(self) -> float | None:
        """Drop parked prefills untouched for parked_ttl_s; seconds until the next expiry, if any."""
        now = time.monotonic()
        next_in = None
        for seq in [s for s in self._active if s.status is Status.PARKED]:
            left = seq.touched + self.parked_ttl_s - now
            if left <= 0:
                self._log.warning("parked prefill expired", id=seq.id, tokens=len(seq.tokens))
                self._release(seq, Status.CANCELLED)
            else:
                next_in = left if next_in is None else min(next_in, left)
        return next_in

    def _boundary(self) -> bool:
        """Take calls and submissions; False when the engine must stop."""
        expiry = self._expire_parked()
        with self._cv:
            while (not self._inbox and not self._calls and not self._stopping
                   and not any(s.cancelled for s in self._active + self._waiting)
                   and not (self._waiting and self._free)
                   and not any(s.pending() for s in self._active)):
                if not self._cv.wait(expiry):
                    break  # a parked prefill is due to expire
            inbox, self._inbox = self._inbox, []
            calls, self._calls = self._calls, []
            stopping = self._stopping
        for seq in inbox:
            if seq.cancelled:
                seq.status = Status.CANCELLED
                continue
            if seq.id in self._by_id:  # a caller-chosen id (x-sllm-generation-id) already in use here
                self._emit(seq, Output(error=Conflict(f"generation id {seq.id} is already in use on this instance",
                                                      code="generation_id_in_use")))
                seq.status = Status.FINISHED
                continue
            self._waiting.append(seq)
            self._by_id[seq.id] = seq
        for fn, fut in calls:
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:  # errors go back to the caller's future
                    fut.set_exception(exc)
                else:
                    if isinstance(result, concurrent.futures.Future):
                        result.add_done_callback(functools.partial(_chain, dst=fut))
                    else:
                        fut.set_result(result)
        for seq in [s for s in self._active + self._waiting if s.cancelled]:
            for fut in seq.detach_waiters:
                if not fut.done():
                    fut.set_exception(Conflict(f"generation {seq.id} was cancelled by its client",
                                               code="generation_cancelled"))
            self._release(seq, Status.CANCELLED)
            self._log.info("generation cancelled", id=seq.id, position=len(seq.tokens))
        while self._waiting and self._free:
            self._place(self._waiting.pop(0))
        self._publish()
        if stopping:
            for seq in list(self._active + self._waiting):
                if seq.status is Status.PARKED:
                    self._release(seq, Status.CANCELLED)
                else:
                    self._fail(seq, Unavailable(stopping, code="shutting_down"))
            self._publish()
            return False
        return True

    def _run(self) -> None:
        self.runner.bind_thread()
        try:
            while self._boundary():
                self._step()
        except BaseException as exc:  # the engine is dead: fail everything, report unhealthy
            self.failed = exc
            self._log.error("engine stopped on an error", exc_info=True)
            with self._cv:
                self._stopping = self._stopping or "the inference engine failed"
            for seq in list(self._active + self._waiting):
                self._fail(seq, Unavailable("the inference engine failed", code="engine_failed"))

    def _step(self) -> None:
        active = list(self._active)  # finishing sequences leave self._active during the loop
        wants = [scheduler.Want(i, s.pending()) for i, s in enumerate(active) if s.pending() > 0]
        if not wants:
            return
        plan = scheduler.plan_step(wants, self.step_tokens)
        feeds = []
        for key, rows in plan:
            seq = active[key]
            start = seq.cache_len
            end = start + rows
            samples = seq.status is Status.RUNNING and end == len(seq.tokens)
            logits_from: int | None = rows - 1 if samples else None
            if seq.want_prompt_logprobs and start < seq.prompt_len:
                logits_from = 0
            feeds.append(Feed(seq.slot, start, seq.tokens[start:end], logits_from))  # type: ignore[arg-type]
        t0 = time.perf_counter()
        results = self.runner.step(feeds)
        if self._metrics is not None:
            self._metrics.step(time.perf_counter() - t0, sum(len(f.tokens) for f in feeds))
        for (key, rows), feed, logits in zip(plan, feeds, results, strict=True):
            seq = active[key]
            seq.cache_len += rows
            if seq.status is Status.PARKED:
                self._resolve_prefills(seq)
                continue
            if seq.want_prompt_logprobs and logits is not None and feed.start < seq.prompt_len:
                self._prompt_logprobs(seq, feed, logits)
            if seq.cache_len == len(seq.tokens) and logits is not None:
                self._advance(seq, logits[-1])
        self._publish()

    def _publish(self) -> None:
        self.batch_size = sum(1 for s in self._active if s.status is Status.RUNNING)
        if self._metrics is not None:
            self._metrics.boundary(self)

    def _prompt_logprobs(self, seq: Sequence, feed: Feed, logits: Any) -> None:
        top = seq.params.logprobs or 0
        for i in range(len(feed.tokens)):
            p = feed.start + i + 1  # row i predicts the token at position p
            if p < seq.prompt_len:
                seq.prompt_logprobs.append(token_logprob(logits[i], seq.tokens[p], top))

    def _advance(self, seq: Sequence, logits: Any) -> None:
        """Sample the next token of seq from its logits row, then emit and check the stop conditions."""
        token = choose(logits, seq.params, seq.generator)
        seq.tokens.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        out = Output()
        if seq.params.logprobs is not None:
            entry: TokenLogprob = token_logprob(logits, token, seq.params.logprobs)
            out.logprobs.append(entry)
            if seq.logprob_log is not None:
                seq.logprob_log.append(entry)
        if seq.want_prompt_logprobs:
            out.prompt_logprobs, seq.want_prompt_logprobs = seq.prompt_logprobs, False
        is_eos = token in self.eos_ids and not seq.params.ignore_eos
        if not is_eos:
            out.text = seq.text.add(token)
        reason = stop_reason(is_eos=is_eos, text_stopped=seq.text.stopped, generated=seq.generated,
                             max_tokens=seq.params.max_tokens, length=len(seq.tokens), max_len=self.runner.max_len)
        if reason is not None:
            self._finish(seq, reason, out)
        else:
            self._emit(seq, out)
            if seq.detach_at is not None and len(seq.tokens) >= seq.detach_at:
                self._end_detached(seq)


def _chain(src: concurrent.futures.Future[Any], dst: concurrent.futures.Future[Any]) -> None:
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())
