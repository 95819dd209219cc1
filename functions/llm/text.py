"""Generated token ids to text: incremental detokenization and stop strings.

`TextTracker.add(token)` returns the text that can be released to the client now. A token
that ends in the middle of a multi-byte character releases nothing until the character is
complete; text that could be the start of a stop string is held back until it is known not
to be. When a stop string appears, the text before it is released and the tracker reports a
stop; the stop string itself is never released (OpenAI semantics).

The text is a pure function of the token ids, so a resumed generation could rebuild the same
tracker by replaying its generated tokens (`replay`: two decodes a token, about 5 us each, on
the destination's engine thread). A migrated state carries the tracker itself instead
(`snapshot` / `restore`: the decoded text and the two decode offsets), so a resume costs the
same at any length; `replay` remains for states that do not carry it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Detok:
    """A tracker's decoding position: `text` decoded so far (held-back text included) and the
    offsets into the generated ids where the next incremental decode starts (`prefix`) and
    where the text of `text` ends (`read`)."""

    text: str
    prefix: int
    read: int

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "prefix": self.prefix, "read": self.read}


class TextTracker:
    def __init__(self, tokenizer: Any, stop: Iterable[str] = ()) -> None:
        self._tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0  # offsets into _ids for incremental decoding
        self._read = 0
        self.text = ""  # all decoded text (before stop truncation)
        self.sent = 0  # characters of `text` released to the client
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _step(self, token: int) -> None:
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix = self._read
            self._read = len(self._ids)

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def add(self, token: int) -> str:
        """Feed one generated token; returns the newly released text ('' if none)."""
        if self.stopped:
            raise RuntimeError("token after a stop string")
        self._step(token)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                return self._release(end)
            return self._release(len(self.text) - self._held_back())
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def flush(self) -> str:
        """At the end of a generation (length or end-of-sequence): release held-back text."""
        if self.stopped:
            return ""
        return self._release(len(self.text))

    def replay(self, tokens: Iterable[int], sent: int) -> None:
        """Rebuild the state after `tokens`, of which the client already has `sent` characters."""
        for t in tokens:
            self.add(t)
        if sent > len(self.text):
            raise ValueError(f"text_offset {sent} is past the {len(self.text)} characters the tokens decode to")
        self.sent = sent

    def snapshot(self) -> Detok:
        """What `restore` needs to continue exactly where this tracker is (not after a stop)."""
        if self.stopped:
            raise RuntimeError("a stopped tracker has nothing to continue")
        return Detok(self.text, self._prefix, self._read)

    def restore(self, tokens: Sequence[int], detok: Detok, sent: int) -> None:
        """The state `replay(tokens, sent)` would build, from a `snapshot` taken after `tokens`."""
        if not 0 <= detok.prefix <= detok.read <= len(tokens):
            raise ValueError(f"decode offsets {detok.prefix}, {detok.read} are not within the {len(tokens)} tokens")
        if sent > len(detok.text):
            raise ValueError(f"text_offset {sent} is past the {len(detok.text)} characters decoded")
        self._ids = list(tokens)
        self._prefix, self._read = detok.prefix, detok.read
        self.text, self.sent, self.stopped = detok.text, sent, False

    def token_text(self, token: int) -> str:
        """Text of one token on its own (for logprobs)."""
        return self._decode([token])
