"""The request itself, before any routing: an internal API's path is refused (404; the public
port never forwards one, however its path is spelled), the body is read within the size limit
(413 past it), and each completion or chat request gets its generation name
(`x-sllm-generation-id: cmpl-<uuid>` / `chatcmpl-<uuid>`: a migration can then find it before
any response exists; a client's own value of the header was dropped with the hop-by-hop ones).
In Kubernetes mode the revision is known before this layer: the internal paths are refused only
for revisions of our class (another class's application owns all of its paths)."""

from __future__ import annotations

import uuid

from activator import errors
from activator.handlers import Exchange, Handler
from activator.request import is_internal, read_body
from activator.routing import OPENAI_PATHS


def generation_name(path: str) -> str:
    return ("chatcmpl-" if path.endswith("/chat/completions") else "cmpl-") + uuid.uuid4().hex


class RequestHandler:
    def __init__(self, next_handler: Handler, max_body_bytes: int) -> None:
        self.next = next_handler
        self.max_body_bytes = max_body_bytes

    async def __call__(self, ex: Exchange) -> None:
        path = ex.scope["path"]
        if is_internal(path) and (ex.svc is None or ex.svc.ours):
            raise errors.NotFound(f"no route for {path}")
        if ex.head.has_body:
            ex.body = await read_body(ex.receive, ex.head, self.max_body_bytes)
        if ex.scope["method"] == "POST" and path in OPENAI_PATHS:
            ex.gen_id = generation_name(path)
        await self.next(ex)
