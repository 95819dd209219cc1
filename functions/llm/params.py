"""Plain values shared by the HTTP layer and the engine (no torch: importable before the model loads).

    SamplingParams   the sampling parameters of one request
    TokenLogprob     a generated token's logprob and its most likely alternatives
    Output           what one engine step produced for one sequence, or how it ended
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from functions.llm.errors import ApiError
    from functions.llm.state import GenerationState

MAX_SEED = (1 << 63) - 1
MAX_TEMPERATURE = 2.0
MAX_LOGPROBS = 20  # alternatives per token (chat's top_logprobs bound; completions allow 5)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 in requests): no top-k
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token; None: no logprobs at all
    ignore_eos: bool = False

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SamplingParams:
        """From `to_json`'s form (an exported state); ValueError for a value no request could have."""
        params = cls(temperature=float(d["temperature"]), top_p=float(d["top_p"]), top_k=int(d["top_k"]),
                     seed=None if d["seed"] is None else int(d["seed"]), max_tokens=int(d["max_tokens"]),
                     stop=tuple(str(s) for s in d["stop"]),
                     logprobs=None if d["logprobs"] is None else int(d["logprobs"]),
                     ignore_eos=bool(d["ignore_eos"]))
        params.check()
        return params

    def check(self) -> None:
        """The bounds the public API enforces (functions.llm.protocol), for values from elsewhere."""
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature = {self.temperature}, must be in [0, {MAX_TEMPERATURE:g}]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p = {self.top_p}, must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}, must be 0 (disabled) or positive")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed = {self.seed}, must be in [0, {MAX_SEED}]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens = {self.max_tokens}, must be at least 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs = {self.logprobs}, must be between 0 and {MAX_LOGPROBS}")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob and the `n` most likely alternatives (token id, logprob)."""

    token: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: tuple[tuple[int, float], ...]

    def to_json(self) -> list[Any]:
        return [self.token, self.logprob, [list(t) for t in self.top]]

    @classmethod
    def from_json(cls, raw: Any) -> TokenLogprob:
        token, logprob, top = raw
        return cls(int(token), None if logprob is None else float(logprob),
                   tuple((int(t), float(lp)) for t, lp in top))


@dataclasses.dataclass
class Output:
    """What one step produced for one sequence (or how it ended)."""

    text: str = ""
    echo: str | None = None  # the prompt text, in the first output of a request with echo
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    detached: GenerationState | None = None
    error: ApiError | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.detached is not None or self.error is not None
