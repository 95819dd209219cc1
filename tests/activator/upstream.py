"""A minimal OpenAI-shaped upstream for activator tests, run as a real uvicorn process.

It streams `n` SSE chunks `delay` seconds apart, reports which instance answered, and can be
told to die before answering (`"die": "<its name>"`) to exercise the activator's retry.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

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
    if not body.get("stream"):
        await asyncio.sleep(delay)
        return JSONResponse({"instance": NAME, "model": body.get("model"), "host": request.headers.get("host")})

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
