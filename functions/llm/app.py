"""The public app: the OpenAI API, health and metrics (the port Knative routes to).

    POST /v1/completions          POST /v1/chat/completions
    GET  /v1/models               GET  /v1/models/{model}
    GET  /health/live             200 while the process and its engine are healthy
    GET  /health/ready            200 once the weights are loaded and warmed up, else 503
    GET  /metrics                 Prometheus text format
    GET  /openapi.json            the OpenAPI document of this API (functions.llm.openapi)

Errors, wherever raised, become OpenAI-shaped bodies in `_on_error` (the only handler).
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from functions.llm import openapi, protocol
from functions.llm.errors import ApiError, error_response, model_not_found
from functions.llm.generation import OutputQueue, respond
from functions.llm.metrics import CONTENT_TYPE
from functions.llm.responses import Formatter
from functions.llm.service import ModelHost
from functions.llm.transport import json_response, read_json


def _service(request: Request) -> ModelHost:
    return request.app.state.service


async def _on_error(request: Request, exc: Exception) -> Response:
    status, body = error_response(exc)
    if status >= 500:
        _service(request).log.error("request failed", exc_info=exc.__traceback__ is not None,
                                    path=request.url.path, error=repr(exc))
    return json_response(body, status)


async def _generate(request: Request, kind: str) -> Any:
    service = _service(request)
    body = await read_json(request, service.cfg.max_body_bytes)
    parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion
    req = parse(body, service.cfg.model_name)
    gen_id = protocol.generation_id(request.headers.get(protocol.GENERATION_ID_HEADER))
    engine = service.require_engine()
    permit = service.limiter.acquire()  # one per request, as Knative counts them, whatever its n
    seqs: list[Any] = []
    try:
        prompt = service.prompt_ids(req)
        max_tokens = protocol.resolve_max_tokens(req, len(prompt), service.max_len)
        queue = OutputQueue(req.n)
        name = gen_id or protocol.new_id(kind)
        for index in range(req.n):
            seqs.append(service.new_sequence(req, prompt, max_tokens, queue.sink_for(index),
                                             protocol.choice_id(name, index, req.n), index=index))
        service.metrics.prompt_tokens.inc(len(prompt))
        for seq in seqs:
            engine.submit(seq)
    except BaseException:
        for seq in seqs:
            engine.cancel(seq)  # a choice submitted before another failed to
        permit.release()
        raise
    fmts = [Formatter(kind=kind, id=name, created=seqs[0].created, model=req.model, include_usage=req.include_usage,
                      token_text=service.token_text, index=index) for index in range(req.n)]
    return await respond(request, engine=engine, seqs=seqs, queue=queue, fmts=fmts, permit=permit, stream=req.stream,
                         want_logprobs=req.sampling.logprobs is not None, role_chunk=kind == "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


def _model_card(service: ModelHost) -> dict[str, Any]:
    created = int(service.stopwatch.process_start)
    return {"id": service.cfg.model_name, "object": "model", "created": created, "owned_by": "sllm-knative",
            "max_model_len": service.max_len or None}


async def list_models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_card(_service(request))]})


async def get_model(request: Request) -> Response:
    service = _service(request)
    name = request.path_params["model"]
    if name != service.cfg.model_name:
        raise model_not_found(name)
    return json_response(_model_card(service))


async def openapi_document(request: Request) -> Response:
    service = _service(request)
    return json_response(openapi.document(service.cfg.model_name, service.max_len or None,
                                          service.vocab_size or None))


async def live(request: Request) -> Response:
    service = _service(request)
    return json_response({"status": service.status}, 200 if service.live else 500)


async def ready(request: Request) -> Response:
    service = _service(request)
    report = service.startup_report()
    return json_response(report, 200 if service.status == "ready" and service.live else 503)


async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE)


class CountRequests:
    """Counts finished API requests in sllm_function_requests_total, by endpoint function and status."""

    def __init__(self, app: ASGIApp, service: ModelHost) -> None:
        self.app = app
        self.counter = service.metrics.requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/internal/")):
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            endpoint = scope.get("endpoint")  # set by the router; a label per route, not per path
            self.counter.labels(getattr(endpoint, "__name__", "unmatched"), str(status)).inc()


# ApiError and HTTPException are answered by Starlette's ExceptionMiddleware; anything else by
# its ServerErrorMiddleware, which also re-raises it so the server logs the traceback.
EXCEPTION_HANDLERS: dict[Any, Any] = {ApiError: _on_error, HTTPException: _on_error, Exception: _on_error}

COMMON_ROUTES = [
    Route("/health/live", live, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


def build(service: ModelHost) -> Starlette:
    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/openapi.json", openapi_document, methods=["GET"]),
        *COMMON_ROUTES,
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    app.state.service = service
    app.add_middleware(CountRequests, service=service)
    return app
