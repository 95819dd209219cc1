"""The internal app: resumable generation for migration, on its own port (never the public one).

Listens on `--internal-host:--internal-port` (default: all interfaces, public port + 1).
With the internal token set (sllm_knative/api/auth.py) every route but /health/* requires
`Authorization: Bearer <token>`. Routes, paths and bodies are sllm_knative/api/instance.py
(the activator's migration client uses the same types; docs/function.md):

    GET    /internal/v1/generations                   -> GenerationList
    GET    /internal/v1/generations/{id}              export: the state, generation keeps running
    POST   /internal/v1/generations/{id}/detach       DetachRequest -> final state
    POST   /internal/v1/prefill                       PrefillRequest -> PrefillResponse
    DELETE /internal/v1/prefill/{id}                  drop a parked prefill -> DropPrefillResponse
    POST   /internal/v1/resume                        ResumeRequest -> continues: SSE or JSON
    GET    /health/live, /health/ready, /metrics

A body that does not match its type is a 400 whose `param` names the field; the state of a
resume is then checked whole by `state.parse_state` (vocabulary, bounds, generator).
"""

from __future__ import annotations

import asyncio
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
from functions.llm.service import ModelHost
from functions.llm.state import parse_state
from functions.llm.transport import dumps, json_response, read_json
from sllm_knative.api import auth
from sllm_knative.api import instance as api
from sllm_knative.api.wire import InvalidBody, M, Message, parse_obj


def _service(request: Request) -> ModelHost:
    return request.app.state.service


async def _on_engine(request: Request, fn: Any) -> Any:
    """Run fn on the engine thread at the next step boundary; await its (possibly future) result."""
    engine = _service(request).require_engine()
    return await asyncio.wrap_future(engine.call(lambda: fn(engine)))


async def _body(request: Request, model: type[M], empty: Any = None) -> M:
    """The request body as `model` (413 over the size limit, 400 naming the field if malformed)."""
    raw = await read_json(request, _service(request).cfg.max_body_bytes, empty=empty)
    try:
        return parse_obj(model, raw)
    except InvalidBody as exc:
        raise BadRequest(exc.message, param=exc.field) from None


def _answer(msg: Message) -> Response:
    return json_response(msg.model_dump())


async def generations(request: Request) -> Response:
    rows = await _on_engine(request, lambda e: e.generations())
    return _answer(api.GenerationList(data=rows))


async def export(request: Request) -> Response:
    gen_id = request.path_params["id"]
    state = await _on_engine(request, lambda e: e.export(gen_id))
    return json_response(state.to_json())


async def detach(request: Request) -> Response:
    gen_id = request.path_params["id"]
    body = await _body(request, api.DetachRequest, empty={})
    state = await _on_engine(request, lambda e: e.detach(gen_id, body.position))
    return json_response(state.to_json())


async def prefill(request: Request) -> Response:
    service = _service(request)
    body = await _body(request, api.PrefillRequest)
    gen_id, start, tokens = body.id, body.start or 0, body.tokens
    engine = service.require_engine()
    for i, t in enumerate(tokens):
        if t >= service.vocab_size:
            raise BadRequest(f"tokens[{i}] = {t}: must be a token id in [0, {service.vocab_size})", param="tokens")
    if not body.wait:
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
        return _answer(api.PrefillResponse(id=gen_id, cached=engine.cached(gen_id), tokens=start + len(tokens)))
    cached = await _on_engine(request, lambda e: e.prefill(gen_id, start, list(tokens)))
    return _answer(api.PrefillResponse(id=gen_id, cached=cached, tokens=start + len(tokens)))


async def drop_prefill(request: Request) -> Response:
    gen_id = request.path_params["id"]
    await _on_engine(request, lambda e: e.drop_parked(gen_id))
    return _answer(api.DropPrefillResponse(id=gen_id, dropped=True))


async def resume(request: Request) -> Any:
    service = _service(request)
    body = await _body(request, api.ResumeRequest)
    engine = service.require_engine()
    state = parse_state(body.state.model_dump(), service.vocab_size)
    if state.model != service.cfg.model_name:
        raise BadRequest(f"state.model = {state.model!r}, this instance serves {service.cfg.model_name!r}",
                         param="state.model", code="model_mismatch")
    permit = service.limiter.acquire(reserved=engine.holds_parked(state.id))
    try:
        queue = OutputQueue()
        seq = await asyncio.wrap_future(engine.call(lambda: engine.resume(state, queue.sink)))
    except BaseException:
        permit.release()
        raise
    fmt = Formatter(kind=state.kind, id=state.id, created=state.created, model=state.model,
                    include_usage=state.include_usage, token_text=service.token_text, text_offset=state.text_offset)
    return await respond(request, engine=engine, seqs=[seq], queue=queue, fmts=[fmt], permit=permit,
                         stream=state.stream, want_logprobs=state.sampling.logprobs is not None,
                         prior_logprobs=state.logprobs)


class RequireToken:
    """Rejects requests without the internal token (health probes excepted)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/health/"):
            given = dict(scope["headers"]).get(auth.HEADER.encode(), b"")
            if not auth.token_ok(given, self.token):
                err = Unauthorized(f"A valid internal token is required ({auth.HEADER}: {auth.SCHEME} ...).")
                body = dumps(err.body())
                await send({"type": "http.response.start", "status": err.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build(service: ModelHost) -> Starlette:
    routes = [
        Route(api.GENERATIONS, generations, methods=["GET"]),
        Route(api.GENERATION_ROUTE, export, methods=["GET"]),
        Route(api.DETACH_ROUTE, detach, methods=["POST"]),
        Route(api.PREFILL, prefill, methods=["POST"]),
        Route(api.PREFILL_ROUTE, drop_prefill, methods=["DELETE"]),
        Route(api.RESUME, resume, methods=["POST"]),
        *COMMON_ROUTES,
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    app.state.service = service
    app.add_middleware(CountRequests, service=service)
    if service.cfg.internal_token:
        app.add_middleware(RequireToken, token=service.cfg.internal_token)
    return app
