"""One instance's lifecycle: load in the background, then serve through the engine.

`ModelHost.start_loading()` starts a thread that imports torch and transformers, loads the
weights from the `WeightsSource`, builds the runner and the engine and warms them up; the HTTP
servers start meanwhile (liveness answers at once, readiness and generation requests answer
503 until the model is ready). Modules that need torch are imported by that thread only, so
the server's own startup never waits for them.

A model that cannot be loaded ends the process (exit status 3) with the error logged, so the
orchestrator restarts or reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from functions.llm.config import ServeConfig
from functions.llm.dtypes import DtypeChoice
from functions.llm.errors import BadRequest, TooManyRequests, Unavailable
from functions.llm.kernels import LinearChoice
from functions.llm.metrics import FunctionMetrics, Stopwatch
from functions.llm.params import MAX_SEED, Output
from functions.llm.weights import LeasedCheckpoint, LeaseFailed, WeightsSource, source_for
from sllm_knative.log import Logger

if TYPE_CHECKING:
    from functions.llm.engine import Engine
    from functions.llm.protocol import Request


class Permit:
    """One concurrency slot; release() is idempotent."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._release()


class Limiter:
    """The instance's concurrency limit (Knative containerConcurrency). Event-loop thread only."""

    def __init__(self, limit: int, metrics: FunctionMetrics) -> None:
        self.limit = limit
        self.in_use = 0
        self._metrics = metrics

    def acquire(self, reserved: bool = False) -> Permit:
        """A slot, or TooManyRequests at the limit. `reserved`: a migrated generation whose
        prefill is parked here, its reservation (a parked KV slot, beyond the limit's slots):
        admitted even at the limit, so a resume is never refused once its source let it go."""
        if self.in_use >= self.limit and not reserved:
            raise TooManyRequests(f"This instance is serving its limit of {self.limit} concurrent requests; "
                                  "retry later or on another instance.")
        self.in_use += 1
        self._metrics.in_flight.set(self.in_use)
        return Permit(self)

    def _release(self) -> None:
        self.in_use -= 1
        self._metrics.in_flight.set(self.in_use)


class ModelHost:
    """The instance's model: loads it (`start_loading`), then holds the engine, the tokenizer,
    the concurrency limiter and the metrics that the public and internal apps serve through."""

    def __init__(self, cfg: ServeConfig, process_start: float, log: Logger,
                 source: WeightsSource | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.metrics = FunctionMetrics()
        self.stopwatch = Stopwatch(process_start)
        self.source: WeightsSource = source or source_for(cfg, log)
        self.limiter = Limiter(cfg.max_concurrency, self.metrics)
        self.status = "loading"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.tokenizer: Any = None
        self.max_len = 0
        self.vocab_size = 0
        self.threads: int | None = None  # the engine's intra-op threads, once loaded
        self.kernel_threads: int | None = None  # our kernel's threads (None: torch's products), once loaded
        self.dtype: DtypeChoice | None = None  # the compute dtype and why, once loaded
        self.tile_rows: int | None = None  # exact numerics' tile, once loaded
        self.linear: LinearChoice | None = None  # the linear layers' kernel and why, once loaded
        self._resources = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        # Set by the server once its SIGTERM handler is installed: a load that fails before then
        # (a refused lease fails in milliseconds) must not kill the process by the default action.
        self.serving = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------
    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load_or_exit, name="sllm-load", daemon=True)
        self._thread.start()

    def _load_or_exit(self) -> None:
        try:
            self.load()
        except BaseException as exc:
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            where = {"checkpoint": self.cfg.checkpoint, "loader": self.cfg.loader} if self.cfg.checkpoint else {
                "path": str(self.cfg.model_dir)}
            # A lease the loader refused says all there is to say; anything else gets its traceback.
            self.log.error("model load failed", exc_info=not isinstance(exc, LeaseFailed), error=str(exc), **where)
            self.serving.wait(timeout=60.0)
            os.kill(os.getpid(), signal.SIGTERM)

    def load(self) -> None:
        watch = self.stopwatch
        # Asked for first: a lease lets the loader fill the DRAM tier while torch imports.
        self.source.request()
        import torch  # noqa: F401  (timed: the imports are a phase of the startup)

        from functions.llm import dtypes, kernels, weights
        from functions.llm.engine import Engine
        from functions.llm.runner import ModelRunner
        watch.lap("imports")
        path = self._resources.enter_context(self.source.acquire())
        if isinstance(self.source, LeasedCheckpoint):
            watch.lap("lease")  # granted; on the CPU also filled (on a GPU the load follows the fill)
        model, tokenizer = weights.load(path, self.cfg.device, follow=self.source.follow)
        flags = dtypes.cpu_flags()
        choice = dtypes.choose(self.cfg.dtype, self.cfg.device, weights.checkpoint_dtype(model), flags)
        linear = kernels.choose(self.cfg.linear, self.cfg.numerics, self.cfg.device, choice.dtype, flags,
                                kernels.runnable())
        weights.cast_parameters(model, getattr(torch, choice.dtype))  # nothing to do when they agree
        watch.lap("load")
        runner = ModelRunner(model, slots=self.cfg.kv_slots, max_len=self.cfg.max_model_len,
                             mode=self.cfg.numerics, tile_rows=self.cfg.tile_rows, forward=self.cfg.forward,
                             threads=self.cfg.threads, linear=linear.linear)
        engine = Engine(runner, tokenizer, eos_ids=weights.eos_ids(model, tokenizer),
                        step_tokens=self.cfg.step_tokens, parked_slots=self.cfg.parked_slots, log=self.log,
                        metrics=self.metrics)
        if self.cfg.warmup:
            _warm_up(runner, tokenizer)
        engine.start()
        watch.lap("warmup")
        self.tokenizer = tokenizer
        self.max_len = runner.max_len
        self.threads = runner.threads or torch.get_num_threads()
        self.kernel_threads = runner.kernel_threads
        self.dtype = choice
        self.linear = linear
        self.tile_rows = runner.tile_rows if runner.mode == "exact" else None
        self.vocab_size = runner.vocab_size
        self.engine = engine
        self.status = "ready"
        for phase, seconds in watch.phases.items():
            self.metrics.startup.labels(phase).set(seconds)
        self.metrics.startup.labels("total").set(watch.total())
        self.metrics.ready.set(1)
        self.log.info("ready", served_model=self.cfg.model_name, seconds=round(watch.total(), 3),
                      kv_slots=self.cfg.kv_slots, kv_cache_bytes=runner.cache.nbytes, numerics=runner.mode,
                      forward=runner.forward_kind, max_len=runner.max_len, dtype=choice.dtype,
                      dtype_reason=choice.reason, tile_rows=self.tile_rows, linear=linear.linear,
                      linear_reason=linear.reason, kernel_threads=self.kernel_threads,
                      **{f"{k}_s": round(v, 3) for k, v in watch.phases.items()})

    def shutdown(self) -> None:
        self.status = "stopping" if self.status == "ready" else self.status
        if self.engine is not None:
            self.engine.stop()
        self._resources.close()

    @property
    def live(self) -> bool:
        return self.status != "failed" and (self.engine is None or self.engine.failed is None)

    def startup_report(self) -> dict[str, Any]:
        phases = {f"{k}_s": round(v, 4) for k, v in self.stopwatch.phases.items()}
        total = round(self.stopwatch.total(), 4) if self.status == "ready" else None
        return {"status": self.status, "model": self.cfg.model_name, "startup": {"total_s": total, **phases},
                # the engine's intra-op threads (exact numerics: always 1), and the setting it got;
                # the compute dtype, why it was chosen and the setting (once loaded); exact's tile;
                # the linear kernel, and our kernel's threads (null when torch's)
                "compute": {"numerics": self.cfg.numerics, "threads": self.threads, "threads_setting": self.cfg.threads,
                            **(self.dtype.report() if self.dtype else {"dtype": None, "dtype_reason": None}),
                            "dtype_setting": self.cfg.dtype, "tile_rows": self.tile_rows,
                            **(self.linear.report() if self.linear else {"linear": None, "linear_reason": None}),
                            "linear_setting": self.cfg.linear, "kernel_threads": self.kernel_threads}}

    # -- requests (event-loop thread) ---------------------------------------------------
    def require_engine(self) -> Engine:
        if self.status == "ready" and self.engine is not None:
            if self.engine.failed is not None:
                raise Unavailable("The inference engine failed; this instance must be restarted.",
                                  code="engine_failed")
            return self.engine
        if self.status == "loading":
            raise Unavailable(f"The model `{self.cfg.model_name}` is still loading.", code="model_not_ready")
        raise Unavailable("This instance is shutting down.", code="shutting_down")

    def prompt_ids(self, req: Request) -> list[int]:
        tok = self.tokenizer
        if req.kind == "chat":
            if not getattr(tok, "chat_template", None):
                raise BadRequest(f"The model `{self.cfg.model_name}` has no chat template; use /v1/completions.",
                                 param="messages", code="no_chat_template")
            text = tok.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=False)
            return list(tok.encode(text, add_special_tokens=False))
        if req.prompt_ids is not None:
            bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                                 param="prompt", code="invalid_value")
            return list(req.prompt_ids)
        return list(tok.encode(req.prompt_text, add_special_tokens=True))

    def new_sequence(self, req: Request, prompt: list[int], max_tokens: int, sink: Callable[[Output], None],
                     gen_id: str | None = None, index: int = 0) -> Any:
        """The sequence of choice `index` of the request; choice i of a seeded request samples with seed + i."""
        from functions.llm.sequence import Sequence  # torch is loaded once the engine is ready

        echo = None
        if req.echo:
            echo = req.prompt_text if req.prompt_text is not None else self.tokenizer.decode(
                prompt, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        seed = req.sampling.seed
        params = dataclasses.replace(req.sampling, max_tokens=max_tokens,
                                     seed=None if seed is None else (seed + index) & MAX_SEED)
        return Sequence.from_request(kind=req.kind, model=req.model, prompt=prompt, params=params,
                                     tokenizer=self.tokenizer, stream=req.stream, include_usage=req.include_usage,
                                     echo_text=echo, sink=sink, gen_id=gen_id)

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False))


def _warm_up(runner: Any, tokenizer: Any) -> None:
    """One prefill, two decode steps and the sampling path, on the scratch slot."""
    from functions.llm.params import SamplingParams
    from functions.llm.runner import Feed
    from functions.llm.sampling import choose, new_generator, token_logprob

    ids = list(tokenizer.encode("warm up the model", add_special_tokens=True))[:8] or [0]
    scratch = runner.cache.scratch
    logits = runner.step([Feed(scratch, 0, ids, len(ids) - 1)])[0]
    gen = new_generator(0)
    for i in range(2):
        token = choose(logits[-1], SamplingParams(temperature=1.0, top_p=0.9, top_k=8), gen)
        token_logprob(logits[-1], token, 2)
        logits = runner.step([Feed(scratch, len(ids) + i, [token], 0)])[0]
    tokenizer.decode(ids)
