"""OpenAI response bodies for completions and chat completions, streamed or whole.

A `Formatter` belongs to one choice of a request (`index`; a request with `n` choices has one
per choice): `chunks(output)` turns an engine `Output` into the stream chunks it produces,
`add(output)` accumulates it for a whole response, `choice()` is that choice of the whole
response and `response(formatters)` the whole response of all the request's choices. Pure
apart from the tokenizer lookups for logprob token strings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from functions.llm.params import Output, TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Formatter:
    def __init__(self, *, kind: str, id: str, created: int, model: str, include_usage: bool,
                 token_text: Callable[[int], str], text_offset: int = 0, index: int = 0) -> None:
        self.kind = kind
        self.index = index
        self.id = id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self._token_text = token_text
        self._offset = text_offset  # characters of output text so far (completions logprobs)
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._finish: str | None = None
        self._usage = usage(0, 0)

    # -- pieces -------------------------------------------------------------------------
    def _completion_logprobs(self, entries: list[TokenLogprob], text_start: int) -> dict[str, Any]:
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = text_start
        for e in entries:
            text = self._token_text(e.token)
            tokens.append(text)
            lps.append(e.logprob)
            tops.append(None if e.logprob is None else {self._token_text(t): lp for t, lp in e.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def one(token: int, lp: float) -> dict[str, Any]:
            text = self._token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        content = []
        for e in entries:
            if e.logprob is None:
                continue
            item = one(e.token, e.logprob)
            item["top_logprobs"] = [one(t, lp) for t, lp in e.top]
            content.append(item)
        return {"content": content, "refusal": None}

    def _entries(self, out: Output) -> list[TokenLogprob]:
        entries = list(out.prompt_logprobs or [])
        entries.extend(out.logprobs)
        return entries

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- streaming ----------------------------------------------------------------------
    def role_chunk(self) -> dict[str, Any]:
        return self._chat_chunk({"role": "assistant", "content": ""}, None, None)

    def _chat_chunk(self, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        chunk = self._base("chat.completion.chunk")
        chunk["choices"] = [{"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def chunks(self, out: Output) -> list[dict[str, Any]]:
        self._usage = usage(out.prompt_tokens, out.completion_tokens)
        text = (out.echo or "") + out.text
        entries = self._entries(out)
        chunks: list[dict[str, Any]] = []
        if self.kind == "chat":
            has_lp = bool(out.logprobs)
            if text or has_lp:
                chunks.append(self._chat_chunk({"content": text}, self._chat_logprobs(entries) if has_lp else None,
                                               None))
            if out.finish_reason is not None:
                chunks.append(self._chat_chunk({}, None, out.finish_reason))
            return chunks
        if text or entries or out.finish_reason is not None:
            start = self._offset
            lp = self._completion_logprobs(entries, start) if entries else None
            self._offset += len(text)
            chunk = self._base("text_completion")
            chunk["choices"] = [{"text": text, "index": self.index, "logprobs": lp, "finish_reason": out.finish_reason}]
            if self.include_usage:
                chunk["usage"] = None
            chunks.append(chunk)
        return chunks

    def usage_chunk(self, total: dict[str, int] | None = None) -> dict[str, Any]:
        """The stream's usage chunk: this choice's usage, or `total` (all the request's choices)."""
        chunk = self._base("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        chunk["choices"] = []
        chunk["usage"] = total or self._usage
        return chunk

    # -- whole responses ----------------------------------------------------------------
    def add(self, out: Output) -> None:
        self._usage = usage(out.prompt_tokens, out.completion_tokens)
        self._text.append((out.echo or "") + out.text)
        self._logprobs.extend(self._entries(out))
        if out.finish_reason is not None:
            self._finish = out.finish_reason

    def add_logprobs(self, entries: list[TokenLogprob]) -> None:
        """Logprobs of tokens generated before a resume (carried in the exported state)."""
        self._logprobs = list(entries) + self._logprobs

    def choice(self, want_logprobs: bool) -> dict[str, Any]:
        text = "".join(self._text)
        if self.kind == "chat":
            return {"index": self.index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": self._chat_logprobs(self._logprobs) if want_logprobs else None,
                    "finish_reason": self._finish}
        return {"text": text, "index": self.index,
                "logprobs": self._completion_logprobs(self._logprobs, 0) if want_logprobs else None,
                "finish_reason": self._finish}

    def response(self, want_logprobs: bool, choices: list[Formatter] | None = None) -> dict[str, Any]:
        """The whole response: this choice, or every choice of the request (`choices`, in order)."""
        choices = choices or [self]
        body = self._base("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = [c.choice(want_logprobs) for c in choices]
        body["usage"] = total_usage(choices)
        return body


def total_usage(choices: list[Formatter]) -> dict[str, int]:
    """The usage of a request: its prompt once, the tokens of all its choices."""
    return usage(choices[0]._usage["prompt_tokens"], sum(c._usage["completion_tokens"] for c in choices))
