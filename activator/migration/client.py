"""The activator's client of an instance's internal API (sllm_knative/api/instance.py): every
call a migration makes, typed both ways, with the internal token on each.

Answers are validated where they arrive: an export or detach answer that is not a state is the
source refusing (`SourceFailed`, not gone), a prefill answer without `cached` the destination
failing (`DestinationFailed`).
"""

from __future__ import annotations

from typing import Any

import httpx

from activator.balancer import RoutedInstance
from activator.migration.config import MigrationConfig
from sllm_knative.api import instance as api
from sllm_knative.api.wire import InvalidBody, parse_json, parse_obj


class SourceFinished(Exception):
    """The generation is no longer on the source (it ended there)."""


class SourceFailed(Exception):
    def __init__(self, message: str, gone: bool) -> None:
        super().__init__(message)
        self.gone = gone  # unreachable (died) rather than refusing


class DestinationFailed(Exception):
    pass


class InstanceClient:
    def __init__(self, http: httpx.AsyncClient, cfg: MigrationConfig) -> None:
        self.http = http
        self.cfg = cfg

    # -- the source ------------------------------------------------------------------------

    async def export(self, inst: RoutedInstance, gen_id: str) -> api.GenerationState:
        """The generation's state now (at the source's next step boundary); it keeps running."""
        return await self._state_call(inst, "GET", api.generation_path(gen_id))

    async def detach(self, inst: RoutedInstance, gen_id: str, position: int | None = None) -> api.GenerationState:
        """Stop the generation at `position` (None: its next step boundary); its final state."""
        body = api.DetachRequest(position=position).model_dump()
        return await self._state_call(inst, "POST", api.detach_path(gen_id), body)

    async def _state_call(self, inst: RoutedInstance, method: str, path: str,
                          body: dict[str, Any] | None = None) -> api.GenerationState:
        url = f"{inst.internal_url}{path}"
        try:
            r = await self.http.request(method, url, json=body, timeout=self.cfg.request_timeout_s,
                                        headers=self.cfg.headers)
        except httpx.HTTPError as exc:
            raise SourceFailed(f"{type(exc).__name__}: {exc}", gone=True) from exc
        if r.status_code == 404:
            raise SourceFinished()
        if r.status_code != 200:
            raise SourceFailed(f"{method} {url} answered {r.status_code}: {r.text[:300]}", gone=False)
        try:
            state = parse_obj(api.GenerationState, r.json())
        except (ValueError, InvalidBody) as exc:
            raise SourceFailed(f"{method} {url} answered no state: {exc}", gone=False) from exc
        if state.finish_reason is not None:
            raise SourceFinished()
        return state

    # -- the destination -------------------------------------------------------------------

    async def prefill(self, inst: RoutedInstance, gen_id: str, start: int, tokens: list[int], wait: bool = True) -> int:
        """Extend the destination's parked prefill; the tokens it has computed (all but the last
        when `wait`; what it had so far when not)."""
        try:
            body = api.PrefillRequest(id=gen_id, start=start, tokens=tokens, wait=wait)
            r = await self.http.post(f"{inst.internal_url}{api.PREFILL}", json=body.model_dump(),
                                     timeout=self.cfg.request_timeout_s, headers=self.cfg.headers)
        except (httpx.HTTPError, ValueError) as exc:
            raise DestinationFailed(f"{type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise DestinationFailed(f"prefill answered {r.status_code}: {r.text[:300]}")
        try:
            return parse_json(api.PrefillResponse, r.content).cached
        except InvalidBody as exc:
            raise DestinationFailed(f"prefill answer without 'cached' ({exc}): {r.text[:300]}") from exc

    async def drop_prefill(self, inst: RoutedInstance, gen_id: str) -> None:
        """Drop a parked prefill that will not be resumed (it also expires on its own)."""
        try:
            await self.http.delete(f"{inst.internal_url}{api.prefill_path(gen_id)}", timeout=5.0,
                                   headers=self.cfg.headers)
        except httpx.HTTPError:
            pass

    async def open_resume(self, inst: RoutedInstance, state: api.GenerationState) -> httpx.Response:
        """Resume a streaming generation: the response once its head is in (status 200; a refusal
        raises httpx.HTTPStatusError, its body read). The caller closes it."""
        req = self.http.build_request("POST", f"{inst.internal_url}{api.RESUME}",
                                      json=api.ResumeRequest(state=state).model_dump(), headers=self.cfg.headers)
        resp = await self.http.send(req, stream=True)
        if resp.status_code != 200:
            try:
                body = (await resp.aread())[:300].decode(errors="replace")
            finally:
                await resp.aclose()
            raise httpx.HTTPStatusError(f"resume answered {resp.status_code}: {body}", request=req, response=resp)
        return resp

    async def resume(self, inst: RoutedInstance, state: api.GenerationState) -> httpx.Response:
        """Resume a non-streaming generation: the whole answer, whatever its status."""
        return await self.http.post(f"{inst.internal_url}{api.RESUME}",
                                    json=api.ResumeRequest(state=state).model_dump(), headers=self.cfg.headers,
                                    timeout=httpx.Timeout(self.cfg.request_timeout_s, read=None))


def detached_answer(resp: httpx.Response) -> api.GenerationState | None:
    """The newer state in an instance's 409 answer to a detached non-streaming request (None if
    the answer is not one)."""
    if resp.headers.get(api.DETACHED_HEADER) is None:
        return None
    return state_of(resp.content)


def state_of(body: bytes) -> api.GenerationState | None:
    """The state in a detached non-streaming request's answer body (None if there is none)."""
    try:
        return parse_json(api.DetachedAnswer, body).state
    except InvalidBody:
        return None
