"""A minimal OpenAI-shaped upstream for activator tests, run as a real uvicorn process.

It streams `n` SSE chunks `delay` seconds apart, reports which instance answered and the
target it received, and can be told to die before answering (`"die": "<its name>"`, the
activator's retry), halfway through a body with a Content-Length (`"die_mid_body"`), or after
two chunks of a stream (`"die_mid_stream"`: server-sent events, `"chunked": true` a plain chunked
body). `"request_id"` is answered as the stream's `x-sllm-generation-id` (what makes it migratable).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

NAME = os.environ.get("UPSTREAM_NAME", "u")


async def completions(request: Request):
    body = await request.json()
    if body.get("die") == NAME:
        os._exit(1)  # the process dies with the connection open: no response at all
    n, delay = int(body.get("n_chunks", 3)), float(body.get("delay", 0.0))
    if body.get("die_mid_body") == NAME:
        async def half() -> AsyncIterator[bytes]:
            yield b'{"instance": "'
            await asyncio.sleep(0.2)
            os._exit(1)  # 14 of the 100 bytes announced, then the connection drops
        return StreamingResponse(half(), headers={"content-length": "100"}, media_type="application/json")
    if body.get("die_mid_stream") == NAME:
        async def cut() -> AsyncIterator[bytes]:
            for i in range(2):
                yield f"data: {json.dumps({'i': i, 'instance': NAME})}\n\n".encode()
                await asyncio.sleep(0.1)
            yield b'data: {"i": 2, "inst'  # half a frame, then the connection drops
            await asyncio.sleep(0.1)
            os._exit(1)
        ids = {"x-sllm-generation-id": body["request_id"]} if body.get("request_id") else {}
        return StreamingResponse(cut(), headers=ids,
                                 media_type="application/octet-stream" if body.get("chunked") else "text/event-stream")
    if not body.get("stream"):
        await asyncio.sleep(delay)
        return JSONResponse({"instance": NAME, "model": body.get("model"), "host": request.headers.get("host"),
                             "raw_path": request.scope["raw_path"].decode(), "query": request.scope["query_string"].decode()})

    async def gen():
        for i in range(n):
            if i:
                await asyncio.sleep(delay)
            yield f"data: {json.dumps({'i': i, 'instance': NAME})}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(gen(), media_type="text/event-stream")


async def internal(request: Request):
    return JSONResponse({"secret": True})


app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                        Route("/v1/chat/completions", completions, methods=["POST"]),
                        Route("/internal/export", internal, methods=["GET", "POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
