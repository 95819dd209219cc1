"""The placement webhook's HTTPS server, in the autoscaler's process.

- `POST /mutate-pods`: an AdmissionReview v1 in, one out (`autoscaler.kube.admission`). A body
  that is not JSON, or not an AdmissionReview v1 (`BadReview`), gets a 400 whose text names the
  field. A pod whose Revision cannot be read is refused (503 in the review's status), never
  admitted ungated; with `failurePolicy: Fail` its ReplicaSet retries.
- `GET /healthz`: 200 once a certificate is loaded (before that the server does not listen).

uvicorn and starlette serve it (the project's HTTP stack; the Revision lookups, which block, run
in starlette's thread pool) on an event loop of its own in a thread. TLS: uvicorn's
`ssl_context_factory` gets a context whose SNI callback hands every new connection the context
of the certificate loaded last (`load_certificate`), so a rotated certificate is served from the
next handshake on, without a restart, and open connections keep theirs. The callback runs on
every handshake (the API server sends no server name for an IP address; the callback still runs).

`PlacementWebhook` bundles the certificate controller (`autoscaler.kube.certs`) and the server:
what the autoscaler starts in Kubernetes mode, and what the tests start as replicas.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from autoscaler.kube.admission import BadReview, ClassUnknown, Decision, Lookup, Request, admit
from autoscaler.kube.certs import (
    DEFAULT_ROTATE_FRACTION,
    DEFAULT_VALIDITY_S,
    SERVICE,
    WEBHOOK_CONFIG,
    CertController,
)
from autoscaler.kube.podautoscaler import CLASS_ANNOTATION
from sllm_knative.kube.client import REVISIONS, Kube, error_message, is_status
from sllm_knative.log import get_logger

_log = get_logger("autoscaler.kube.webhook")

PATH = "/mutate-pods"
PORT = 8443
LOOKUP_TIMEOUT_S = 2.0  # well inside the webhook's timeoutSeconds (5)


class RevisionClasses:
    """`Lookup` for admission: the autoscaler class of a Revision, read with a GET (one
    `get revisions`, no cluster-wide watch) and remembered for `ttl_s` (a Revision's class does
    not change: a new template makes a new Revision). A Revision that does not exist has no class
    (not remembered); one that cannot be read raises ClassUnknown."""

    def __init__(self, kube: Kube, ttl_s: float = 60.0, timeout_s: float = LOOKUP_TIMEOUT_S,
                 max_entries: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube, self.ttl_s, self.timeout_s, self.max_entries, self.clock = kube, ttl_s, timeout_s, max_entries, clock
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.reads = 0

    def __call__(self, namespace: str, name: str) -> str | None:
        now = self.clock()
        with self._lock:
            hit = self._cache.get((namespace, name))
        if hit is not None and now - hit[1] < self.ttl_s:
            return hit[0] or None
        self.reads += 1
        try:
            rev = self.kube.get(REVISIONS, name, namespace, _request_timeout=self.timeout_s)
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise ClassUnknown(f"could not read Revision {namespace}/{name} to learn its autoscaler class: "
                               f"{type(exc).__name__}: {error_message(exc)}"[:400]) from exc
        cls = str(((rev.get("metadata") or {}).get("annotations") or {}).get(CLASS_ANNOTATION) or "")
        with self._lock:
            if len(self._cache) >= self.max_entries:
                for k in sorted(self._cache, key=lambda k: self._cache[k][1])[: self.max_entries // 2]:
                    del self._cache[k]
            self._cache[(namespace, name)] = (cls, now)
        return cls or None


def _context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context for this certificate (ssl loads key pairs from files only: a private
    temporary folder, removed at once)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    with tempfile.TemporaryDirectory(prefix="sllm-webhook-") as d:
        crt, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        for path, data in ((crt, cert_pem), (key, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(crt, key)  # ssl.SSLError if the key is not the certificate's
    return ctx


class WebhookServer:
    def __init__(self, lookup: Lookup, host: str = "0.0.0.0", port: int = PORT, token_secret: str | None = None) -> None:
        self.lookup, self.host, self.port, self.token_secret = lookup, host, port, token_secret
        self._current: ssl.SSLContext | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self.reviews = 0
        self._log = _log.bind(listen=f"{host}:{port}")

    # -- TLS --------------------------------------------------------------------------------

    def load_certificate(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Serve this certificate from the next handshake on (raises if it cannot be loaded)."""
        self._current = _context(cert_pem, key_pem)

    def _pick(self, sslobj: Any, server_name: str | None, outer: ssl.SSLContext) -> None:
        ctx = self._current
        if ctx is not None and ctx is not outer:
            sslobj.context = ctx

    def _ssl_factory(self, config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        outer = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        outer.minimum_version = ssl.TLSVersion.TLSv1_2
        outer.set_alpn_protocols(["http/1.1"])
        outer.sni_callback = self._pick
        return outer

    # -- HTTP -------------------------------------------------------------------------------

    def review(self, body: Any) -> tuple[int, Any]:
        """(status, response body) for one POST body; logs the decision."""
        self.reviews += 1
        try:
            answer, req, decision = admit(body, self.lookup, self.token_secret)
        except BadReview as exc:
            self._log.warning("malformed AdmissionReview", field=exc.field, problem=exc.problem)
            return 400, f"malformed AdmissionReview: {exc}"
        self._log_decision(req, decision, answer)
        return 200, answer

    def _log_decision(self, req: Request, decision: Decision | None, answer: dict[str, Any]) -> None:
        meta = req.pod.get("metadata") or {}
        instance = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else None)
        if decision is None:
            self._log.warning("pod refused: its class is unknown", namespace=req.namespace, instance=instance,
                              error=answer["response"]["status"]["message"])
        elif decision.outcome in ("mutated", "no-model"):
            self._log.info("pod admitted", service=decision.service, instance=instance, outcome=decision.outcome,
                           ops=len(decision.patch), warnings="; ".join(decision.warnings) or None)

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request as HttpRequest
        from starlette.responses import JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route

        async def mutate(request: HttpRequest) -> Response:
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                return PlainTextResponse(f"malformed AdmissionReview: body: not JSON ({exc})", status_code=400)
            status, out = await run_in_threadpool(self.review, body)
            if status != 200:
                return PlainTextResponse(str(out), status_code=status)
            return JSONResponse(out)

        async def healthz(request: HttpRequest) -> Response:
            return PlainTextResponse("ok" if self._current is not None else "no certificate",
                                     status_code=200 if self._current is not None else 503)

        return Starlette(routes=[Route(PATH, mutate, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])])

    # -- running ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(getattr(self._server, "started", False))

    def start(self, timeout_s: float = 10.0) -> WebhookServer:
        import uvicorn

        if self._current is None:
            raise RuntimeError(f"webhook server {self.host}:{self.port}: no certificate loaded yet")
        config = uvicorn.Config(self.app(), host=self.host, port=self.port, loop="asyncio", lifespan="off",
                                log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                ssl_context_factory=self._ssl_factory)
        self._server = uvicorn.Server(config)
        self._failed = None

        def run() -> None:
            try:
                self._server.run()
            except BaseException as exc:  # uvicorn exits (SystemExit) when it cannot bind
                self._failed = exc

        self._thread = threading.Thread(target=run, name=f"webhook-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"webhook server could not listen on {self.host}:{self.port}"
                                   + (f" ({self._failed!r})" if self._failed else " (see the uvicorn log above)"))
            time.sleep(0.02)
        self._log.info("webhook server listening", path=PATH)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class PlacementWebhook:
    """One replica of the webhook: the certificate controller (every replica serves the Secret's
    certificate; the leader makes and rotates it and publishes the CA) and the server, which
    starts listening once the first certificate is loaded."""

    def __init__(self, kube: Kube, *, namespace: str, identity: str, host: str = "0.0.0.0", port: int = PORT,
                 service: str = SERVICE, extra_hosts: Sequence[str] = (), webhook_config: str = WEBHOOK_CONFIG,
                 validity_s: float = DEFAULT_VALIDITY_S, rotate_fraction: float = DEFAULT_ROTATE_FRACTION,
                 token_secret: str | None = None, **cert_options: Any) -> None:
        self.server = WebhookServer(RevisionClasses(kube), host, port, token_secret)
        self.certs = CertController(kube, namespace=namespace, identity=identity,
                                    on_certificate=self.server.load_certificate, service=service,
                                    extra_hosts=extra_hosts, webhook_config=webhook_config, validity_s=validity_s,
                                    rotate_fraction=rotate_fraction, **cert_options)

    def start(self, timeout_s: float = 30.0) -> PlacementWebhook:
        self.certs.start()
        if not self.certs.wait_serving(timeout_s):
            self.certs.stop()
            raise TimeoutError(f"webhook: no certificate in Secret {self.certs.namespace}/{self.certs.secret} after "
                               f"{timeout_s} s (is a replica leading? is the Role for the Secret applied?)")
        self.server.start()
        return self

    def stop(self, release: bool = True) -> None:
        self.server.stop()
        self.certs.stop(release=release)
