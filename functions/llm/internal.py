"""The internal app: resumable generation for migration, on its own port (never the public one).

Listens on `--internal-host:--internal-port` (default: all interfaces, public port + 1).
When `SLLM_INTERNAL_TOKEN` is set every route but /health/* requires
`Authorization: Bearer <token>`. Routes (bodies and states are JSON, see docs/function.md):

    GET    /internal/v1/generations                   [{id, status, position, cached}]
    GET    /internal/v1/generations/{id}              export: the state, generation keeps running
    POST   /internal/v1/generations/{id}/detach       {"position": int | null} -> final state
    POST   /internal/v1/prefill                       {"id", "start", "tokens", "wait"?} -> {"id", "cached", "tokens"}
    DELETE /internal/v1/prefill/{id}                  drop a parked prefill
    POST   /internal/v1/resume                        {"state": {...}} -> continues: SSE or JSON
    GET    /health/live, /health/ready, /metrics
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from functions.llm.app import COMMON_ROUTES, EXCEPTION_HANDLERS, CountRequests
from functions.llm.errors import BadRequest, Unauthorized
from functions.llm.generation import OutputQueue, respond
from functions.llm.responses import Formatter
from functions.llm.service import Service
from functions.llm.state import parse_state
from functions.llm.transport import dumps, json_response, read_json


def _service(request: Request) -> Service:
    return request.app.state.service


async def _on_engine(request: Request, fn: Any) -> Any:
    """Run fn on the engine thread at the next step boundary; await its (possibly future) result."""
    engine = _service(request).require_engine()
    return await asyncio.wrap_future(engine.call(lambda: fn(engine)))


async def generations(request: Request) -> Response:
    return json_response({"data": await _on_engine(request, lambda e: e.generations())})


async def export(request: Request) -> Response:
    gen_id = request.path_params["id"]
    state = await _on_engine(request, lambda e: e.export(gen_id))
    return json_response(state.to_json())


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise BadRequest(f"'{name}' must be a non-negative integer or null, got {value!r}", param=name)
    return value


async def detach(request: Request) -> Response:
    gen_id = request.path_params["id"]
    body = await read_json(request, _service(request).cfg.max_body_bytes, empty={})
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    position = _optional_int(body, "position")
    state = await _on_engine(request, lambda e: e.detach(gen_id, position))
    return json_response(state.to_json())


async def prefill(request: Request) -> Response:
    service = _service(request)
    body = await read_json(request, service.cfg.max_body_bytes)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    gen_id = body.get("id")
    if not isinstance(gen_id, str) or not gen_id:
        raise BadRequest("'id' must be a non-empty string", param="id")
    start = _optional_int(body, "start") or 0
    tokens = body.get("tokens")
    wait = body.get("wait", True)
    if not isinstance(wait, bool):
        raise BadRequest(f"'wait' must be a boolean, got {wait!r}", param="wait")
    engine = service.require_engine()
    if (not isinstance(tokens, list) or not tokens or
            any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < service.vocab_size for t in tokens)):
        raise BadRequest(f"'tokens' must be a non-empty list of token ids in [0, {service.vocab_size})",
                         param="tokens")
    if not wait:
        # Queued in order behind the calls already sent (the caller awaits each answer before the
        # next); answered at once with what is computed so far. A refusal is only logged: the
        # resume prefills whatever a parked prefill lacks.
        def refused(f: Any) -> None:
            if f.exception() is not None:
                service.log.warning("queued prefill refused", id=gen_id, start=start, error=str(f.exception()))

        queued = engine.call(lambda: engine.prefill(gen_id, start, list(tokens)))
        if queued.done() and queued.exception() is not None:  # refused at once (shutting down)
            raise queued.exception()  # type: ignore[misc]
        queued.add_done_callback(refused)
        return json_response({"id": gen_id, "cached": engine.cached(gen_id), "tokens": start + len(tokens)})
    cached = await _on_engine(request, lambda e: e.prefill(gen_id, start, list(tokens)))
    return json_response({"id": gen_id, "cached": cached, "tokens": start + len(tokens)})


async def drop_prefill(request: Request) -> Response:
    gen_id = request.path_params["id"]
    await _on_engine(request, lambda e: e.drop_parked(gen_id))
    return json_response({"id": gen_id, "dropped": True})


async def resume(request: Request) -> Any:
    service = _service(request)
    body = await read_json(request, service.cfg.max_body_bytes)
    if not isinstance(body, dict) or "state" not in body:
        raise BadRequest("the body must be {\"state\": {...}}", param="state")
    engine = service.require_engine()
    state = parse_state(body["state"], service.vocab_size)
    if state.model != service.cfg.model_name:
        raise BadRequest(f"state.model = {state.model!r}, this instance serves {service.cfg.model_name!r}",
                         param="state.model", code="model_mismatch")
    permit = service.limiter.acquire()
    try:
        queue = OutputQueue()
        seq = await asyncio.wrap_future(engine.call(lambda: engine.resume(state, queue.sink)))
    except BaseException:
        permit.release()
        raise
    fmt = Formatter(kind=state.kind, id=state.id, created=state.created, model=state.model,
                    include_usage=state.include_usage, token_text=service.token_text, text_offset=state.text_offset)
    return await respond(request, engine=engine, seq=seq, queue=queue, fmt=fmt, permit=permit, stream=state.stream,
                     want_logprobs=state.sampling.logprobs is not None, prior_logprobs=state.logprobs)


class RequireToken:
    """Rejects requests without `Authorization: Bearer <token>` (health probes excepted)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/health/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = Unauthorized("A valid internal token is required (Authorization: Bearer ...).")
                body = dumps(err.body())
                await send({"type": "http.response.start", "status": err.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build(service: Service) -> Starlette:
    p = "/internal/v1"
    routes = [
        Route(f"{p}/generations", generations, methods=["GET"]),
        Route(f"{p}/generations/{{id}}", export, methods=["GET"]),
        Route(f"{p}/generations/{{id}}/detach", detach, methods=["POST"]),
        Route(f"{p}/prefill", prefill, methods=["POST"]),
        Route(f"{p}/prefill/{{id}}", drop_prefill, methods=["DELETE"]),
        Route(f"{p}/resume", resume, methods=["POST"]),
        *COMMON_ROUTES,
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    app.state.service = service
    app.add_middleware(CountRequests, service=service)
    if service.cfg.internal_token:
        app.add_middleware(RequireToken, token=service.cfg.internal_token)
    return app
