"""The exported state of a generation: what migration moves between instances.

A JSON object (version 1), specified in docs/function.md:

    {
      "version": 1,
      "id": "cmpl-…",                 generation id (= the response id the client sees)
      "kind": "completion" | "chat",
      "model": "tiny",  "created": 1732480000,
      "tokens": [int, …],             prompt + generated token ids so far
      "prompt_len": int,              how many of `tokens` are the prompt
      "position": int,                == len(tokens): index of the next token to generate
      "sampling": {temperature, top_p, top_k, seed, max_tokens, stop, logprobs, ignore_eos},
      "generator": "base64",          CPU torch.Generator state before drawing token `position`
      "stream": bool, "include_usage": bool, "echo": bool,
      "text_offset": int,             characters of generated text the client has received
      "logprobs": [[token, logprob, [[token, logprob], …]], …] | null
                                      entries not yet delivered (non-streaming requests)
      "finish_reason": null | "stop" | "length",
      "numerics": {mode, tile_rows, linear, forward, device, dtype, torch}   of the exporting instance
      "detok": {"text": str, "prefix": int, "read": int} | null (optional)
                                      the exporter's detokenizer: generated text decoded so far and
                                      its incremental-decode offsets into the generated ids; without
                                      it the importer replays the generated ids (slower)
    }

`parse_state` validates an incoming state in a fixed order and names the offending field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from functions.llm.errors import BadRequest
from functions.llm.params import SamplingParams, TokenLogprob
from functions.llm.sampling import decode_generator
from functions.llm.text import Detok

VERSION = 1
KINDS = ("completion", "chat")


@dataclasses.dataclass(frozen=True)
class GenerationState:
    id: str
    kind: str
    model: str
    created: int
    tokens: tuple[int, ...]
    prompt_len: int
    sampling: SamplingParams
    generator: str
    stream: bool
    include_usage: bool
    echo: bool
    text_offset: int
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    numerics: dict[str, Any]
    detok: Detok | None = None

    @property
    def position(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION, "id": self.id, "kind": self.kind, "model": self.model, "created": self.created,
            "tokens": list(self.tokens), "prompt_len": self.prompt_len, "position": self.position,
            "sampling": self.sampling.to_json(), "generator": self.generator, "stream": self.stream,
            "include_usage": self.include_usage, "echo": self.echo, "text_offset": self.text_offset,
            "logprobs": None if self.logprobs is None else [e.to_json() for e in self.logprobs],
            "finish_reason": self.finish_reason, "numerics": dict(self.numerics),
            "detok": None if self.detok is None else self.detok.to_json(),
        }


def _field(d: dict[str, Any], name: str, kinds: type | tuple[type, ...], where: str = "state") -> Any:
    if name not in d:
        raise BadRequest(f"{where}.{name} is missing", param=f"{where}.{name}")
    value = d[name]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"{where}.{name} must not be a boolean", param=f"{where}.{name}")
    if not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise BadRequest(f"{where}.{name} must be {names}, got {type(value).__name__}", param=f"{where}.{name}")
    return value


def _token_ids(value: Any, where: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list of token ids", param=where)
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise BadRequest(f"{where}[{i}] = {t!r}, must be a token id in [0, {vocab_size})", param=where)
    return tuple(value)


def parse_state(raw: Any, vocab_size: int) -> GenerationState:
    if not isinstance(raw, dict):
        raise BadRequest("state must be a JSON object", param="state")
    version = _field(raw, "version", int)
    if version != VERSION:
        raise BadRequest(f"state.version = {version}, this instance reads version {VERSION}", param="state.version")
    gen_id = _field(raw, "id", str)
    if not gen_id:
        raise BadRequest("state.id must not be empty", param="state.id")
    kind = _field(raw, "kind", str)
    if kind not in KINDS:
        raise BadRequest(f"state.kind = {kind!r}, must be one of {', '.join(KINDS)}", param="state.kind")
    tokens = _token_ids(_field(raw, "tokens", list), "state.tokens", vocab_size)
    prompt_len = _field(raw, "prompt_len", int)
    if not 1 <= prompt_len <= len(tokens):
        raise BadRequest(f"state.prompt_len = {prompt_len}, must be in [1, {len(tokens)}]", param="state.prompt_len")
    position = _field(raw, "position", int)
    if position != len(tokens):
        raise BadRequest(f"state.position = {position}, must equal len(state.tokens) = {len(tokens)}",
                         param="state.position")
    s = _field(raw, "sampling", dict)
    try:
        sampling = SamplingParams.from_json(s)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(inf) overflows
        raise BadRequest(f"state.sampling is invalid: {exc!r}", param="state.sampling") from None
    logprobs_raw = raw.get("logprobs")
    logprobs = None
    if logprobs_raw is not None:
        if not isinstance(logprobs_raw, list):
            raise BadRequest("state.logprobs must be a list or null", param="state.logprobs")
        try:
            logprobs = tuple(TokenLogprob.from_json(e) for e in logprobs_raw)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"state.logprobs is invalid: {exc!r}", param="state.logprobs") from None
        for i, e in enumerate(logprobs):
            if any(not 0 <= t < vocab_size for t in (e.token, *(t for t, _ in e.top))):
                raise BadRequest(f"state.logprobs[{i}] names a token outside [0, {vocab_size})",
                                 param="state.logprobs")
    finish = raw.get("finish_reason")
    if finish not in (None, "stop", "length"):
        raise BadRequest(f"state.finish_reason = {finish!r}, must be null, 'stop' or 'length'",
                         param="state.finish_reason")
    text_offset = _field(raw, "text_offset", int)
    if text_offset < 0:
        raise BadRequest(f"state.text_offset = {text_offset}, must be at least 0", param="state.text_offset")
    numerics = raw.get("numerics") or {}
    if not isinstance(numerics, dict):
        raise BadRequest("state.numerics must be an object", param="state.numerics")
    detok = _detok(raw.get("detok"), len(tokens) - prompt_len, text_offset)
    generator = _field(raw, "generator", str)
    try:
        decode_generator(generator)
    except ValueError as exc:
        raise BadRequest(f"state.generator is invalid: {exc}", param="state.generator") from None
    return GenerationState(
        id=gen_id, kind=kind, model=_field(raw, "model", str), created=_field(raw, "created", int),
        tokens=tokens, prompt_len=prompt_len, sampling=sampling, generator=generator,
        stream=_field(raw, "stream", bool), include_usage=_field(raw, "include_usage", bool),
        echo=_field(raw, "echo", bool), text_offset=text_offset, logprobs=logprobs, finish_reason=finish,
        numerics=numerics, detok=detok)


def _detok(value: Any, generated: int, text_offset: int) -> Detok | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("state.detok must be an object or null", param="state.detok")
    text = _field(value, "text", str, "state.detok")
    prefix = _field(value, "prefix", int, "state.detok")
    read = _field(value, "read", int, "state.detok")
    if not 0 <= prefix <= read <= generated:
        raise BadRequest(f"state.detok offsets prefix = {prefix}, read = {read} must satisfy "
                         f"0 <= prefix <= read <= {generated} (the generated tokens)", param="state.detok")
    if text_offset > len(text):
        raise BadRequest(f"state.text_offset = {text_offset} is past the {len(text)} characters of state.detok.text",
                         param="state.text_offset")
    return Detok(text, prefix, read)
