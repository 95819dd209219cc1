"""The instance's internal API: resumable generation for migration (docs/function.md,
"Resumable generation"). Served by functions/llm/internal.py on the instance's internal port;
called by the activator's migration client (activator/migration/client.py) and the autoscaler.

    GET    /internal/v1/generations              -> GenerationList
    GET    /internal/v1/generations/{id}         -> GenerationState (export; it keeps running)
    POST   /internal/v1/generations/{id}/detach  DetachRequest -> GenerationState (final)
    POST   /internal/v1/prefill                  PrefillRequest -> PrefillResponse
    DELETE /internal/v1/prefill/{id}             -> DropPrefillResponse
    POST   /internal/v1/resume                   ResumeRequest -> the public API's stream or body

Errors are the public API's OpenAI shape, `{"error": {"message", "type", "param", "code"}}`;
a malformed body is a 400 whose `param` names the field. With the internal token set
(sllm_knative/api/auth.py) every route but /health/* needs it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field, Strict

from sllm_knative.api.wire import Int, Message, NonEmptyStr, NonNegInt

ROOT = "/internal"  # never forwarded from the activator's public port
PREFIX = f"{ROOT}/v1"
GENERATIONS = f"{PREFIX}/generations"
PREFILL = f"{PREFIX}/prefill"
RESUME = f"{PREFIX}/resume"
# Route templates (the server's) ...
GENERATION_ROUTE = GENERATIONS + "/{id}"
DETACH_ROUTE = GENERATION_ROUTE + "/detach"
PREFILL_ROUTE = PREFILL + "/{id}"

# Headers of the activator <-> instance contract on the instance's public port.
# The activator names each generation it forwards with it; the instance answers a stream with it
# only where that stream is one generation a migration can move (one choice): the choices of a
# request with n > 1 are generations of other names, which the activator must not export.
GENERATION_ID_HEADER = "x-sllm-generation-id"
DETACHED_HEADER = "x-sllm-detached"  # the 409 answer to a non-streaming request detached for migration
DETACHED_EVENT = "sllm.detached"  # the SSE event that ends a detached stream (data: DetachedEvent)


# ... and the paths the clients call.
def generation_path(gen_id: str) -> str:
    return f"{GENERATIONS}/{gen_id}"


def detach_path(gen_id: str) -> str:
    return f"{GENERATIONS}/{gen_id}/detach"


def prefill_path(gen_id: str) -> str:
    return f"{PREFILL}/{gen_id}"


class GenerationInfo(Message):
    id: str
    status: str  # waiting, running, parked
    position: int
    cached: int


class GenerationList(Message):
    data: list[GenerationInfo]


class Sampling(Message):
    """A state's sampling parameters: `logprobs` typed (the activator reads it), the rest carried."""

    model_config = ConfigDict(extra="allow")

    logprobs: int | None = None


STATE_VERSION = 1


def _readable_version(version: int) -> int:
    if version != STATE_VERSION:
        raise ValueError(f"state version {version}; this reads version {STATE_VERSION}")
    return version


class GenerationState(Message):
    """An exported generation (version 1, docs/function.md "The state"). Its identity and the fields
    the activator reads are typed, in the order the instance's full check takes them
    (functions/llm/state.parse_state: vocabulary, bounds, generator, run on resume), so both name
    the same first bad field; the other fields ride along unchanged (extra fields are kept)."""

    model_config = ConfigDict(extra="allow")

    version: Annotated[int, Strict(), AfterValidator(_readable_version)]
    id: NonEmptyStr
    kind: str
    tokens: list[Int]
    prompt_len: Int
    position: Int
    sampling: Sampling
    finish_reason: str | None = None
    text_offset: Int

    @property
    def generated(self) -> int:
        return self.position - self.prompt_len


class DetachRequest(Message):
    position: NonNegInt | None = None  # stop there (None: at the next step boundary)


class PrefillRequest(Message):
    id: NonEmptyStr
    start: NonNegInt | None = 0  # tokens the parked prefill holds already (null: 0)
    tokens: list[NonNegInt] = Field(min_length=1)
    wait: bool = Field(default=True, strict=True)  # false: queue and answer at once


class PrefillResponse(Message):
    id: str
    cached: Int  # tokens computed (all but the last once built)
    tokens: Int  # tokens received so far


class DropPrefillResponse(Message):
    id: str
    dropped: bool


class ResumeRequest(Message):
    state: GenerationState


class DetachedAnswer(Message):
    """The body of a non-streaming request's 409 `generation_detached` (header DETACHED_HEADER)."""

    state: GenerationState


class DetachedEvent(Message):
    """The data of the `sllm.detached` frame that ends a detached stream."""

    id: str
    position: int
    state: GenerationState
