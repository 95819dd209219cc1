"""The function's SSE stream, frame by frame: what a migrating relay parses (only then; a stream
that never migrates is passed through unparsed).

A frame is one `data:` event and its blank-line terminator. `classify` says what it is (an
OpenAI chunk, `[DONE]`, the `sllm.detached` event that ends a detached stream); `frame_content`
gives the generated text and the count of logprob entries a chunk carries (what the client has
received); `trim_frame` drops text the client already has from a resumed stream's frame.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from sllm_knative.api.instance import DETACHED_EVENT, DetachedEvent, GenerationState
from sllm_knative.api.wire import InvalidBody, parse_obj

_DETACHED_EVENT = DETACHED_EVENT.encode()


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
    if event == _DETACHED_EVENT:
        return Frame.DETACHED, _json(payload)
    if payload == b"[DONE]":
        return Frame.DONE, None
    if not data:
        return Frame.OTHER, None
    return Frame.DATA, _json(payload)


def detached_state(data: Any) -> GenerationState | None:
    """The final state a `sllm.detached` frame carries (None if it carries no valid one)."""
    try:
        return parse_obj(DetachedEvent, data).state
    except InvalidBody:
        return None


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


def frame_content(frame: bytes) -> tuple[str, int]:
    """(the generated text, the tokens with logprob entries) of one frame."""
    kind, data = classify(frame)
    return (chunk_text(data), chunk_tokens(data)) if kind is Frame.DATA else ("", 0)


def trim_frame(frame: bytes, skip: int) -> tuple[bytes | None, str]:
    """Drop the first `skip` characters of a frame's text: (frame to send or None, the text dropped).

    Frames without text (finish, usage, [DONE]) pass unchanged; a frame whose whole text was
    already delivered is dropped; a frame that overlaps is re-encoded with the rest of its text.
    """
    kind, data = classify(frame)
    text = chunk_text(data) if kind is Frame.DATA else ""
    if skip <= 0 or not text:
        return frame, ""
    if len(text) <= skip:
        return None, text
    choice = data["choices"][0]
    if isinstance(choice.get("text"), str):
        choice["text"] = text[skip:]
    else:
        choice["delta"]["content"] = text[skip:]
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return b"data: " + body + b"\n\n", text[:skip]
