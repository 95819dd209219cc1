"""`hf://org/name@revision` store: the Hugging Face Hub's resolve URLs.

`{HF_ENDPOINT}/{org}/{name}/resolve/{revision}/{file}` (the revision %-escaped, refs%2Fpr%2F1),
with `Authorization: Bearer $HF_TOKEN` when a token is set. Both of HttpStore's clients drop it
on the redirect to the CDN (another origin), which is what the Hub wants: httpx by itself, the
blocking reader by `http.redirect`.
Any server with that layout works, which is how the tests run it against nginx.
"""

from __future__ import annotations

from urllib.parse import quote

from loader_sidecar.refs import DEFAULT_REVISION, ModelRef, StoreRoot
from loader_sidecar.stores.http import HttpStore


class HfStore(HttpStore):
    def __init__(self, root: StoreRoot, *, endpoint: str, token: str | None, timeout_s: float,
                 connections: int) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        super().__init__(root, timeout_s=timeout_s, connections=connections, headers=headers)
        self._endpoint = endpoint.rstrip("/")

    def url(self, ref: ModelRef, file: str) -> str:
        # A revision may hold "/" (refs/pr/1): the Hub wants it as one escaped path segment.
        return f"{self._endpoint}/{ref.path}/resolve/{quote(ref.revision or DEFAULT_REVISION, safe='')}/{file}"
