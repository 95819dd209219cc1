"""The HTTP store's blocking reader (the fetcher's bulk path) against real servers: nginx over
plain HTTP and TLS, redirects, a proxy that cuts or stalls responses; plus the pure rules it
shares with the httpx path (status, range, redirect, error translation), table-tested."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loader_sidecar.refs import parse_store, resolve
from loader_sidecar.stores.base import Cancel
from loader_sidecar.stores.hf import HfStore
from loader_sidecar.stores.http import (
    MAX_REDIRECTS,
    HttpStore,
    body_offset,
    origin,
    proxied,
    redirect,
    transport_error,
)
from sllm_knative import format as fmt
from sllm_knative.loader import errors
from sllm_knative.ports import free_port
from testkit.servers import CutProxy, nginx_conf, nginx_path, wait_port

WORDS = 3 * (1 << 20) + 5  # bytes of models/words/partition-0.bin: little-endian uint64 offsets, cut short
TOKEN = "Bearer s3cret"


# -- pure rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status, content_range, start, expected", [
    pytest.param(206, "bytes 100-199/1000", 100, 0, id="206-asked-range"),
    pytest.param(206, "bytes 0-999/*", 0, 0, id="206-unknown-length"),
    pytest.param(200, None, 0, 0, id="200-from-zero"),
    pytest.param(200, None, 4096, 4096, id="200-ignores-range-skip"),
])
def test_body_offset(status, content_range, start, expected):
    assert body_offset(status, content_range, start, "u bytes 1-2") == expected


@pytest.mark.parametrize("status, content_range, start, cls, message", [
    pytest.param(206, "bytes 0-99/1000", 100, errors.CorruptData, "answered another range", id="206-other-range"),
    pytest.param(206, "bytes */1000", 100, errors.CorruptData, "malformed Content-Range", id="206-malformed"),
    pytest.param(206, None, 100, errors.CorruptData, "malformed Content-Range", id="206-no-header"),
    pytest.param(404, None, 0, errors.NotFound, "HTTP 404", id="404"),
    pytest.param(403, None, 0, errors.AccessDenied, "HTTP 403", id="403"),
    pytest.param(416, None, 0, errors.CorruptData, "shorter than its recorded size", id="416"),
    pytest.param(503, None, 0, errors.StoreUnavailable, "HTTP 503", id="503"),
    pytest.param(204, None, 0, errors.StoreUnavailable, "unexpected HTTP 204", id="204"),
])
def test_body_offset_refuses(status, content_range, start, cls, message):
    with pytest.raises(cls, match=message) as info:
        body_offset(status, content_range, start, "http://h/m/f bytes 100-199")
    assert type(info.value) is cls and "http://h/m/f bytes 100-199" in str(info.value)


@pytest.mark.parametrize("url, expected", [
    pytest.param("http://Host.example/a", ("http", "host.example", 80), id="http-default"),
    pytest.param("https://h/a?x=1", ("https", "h", 443), id="https-default"),
    pytest.param("http://127.0.0.1:8080/a", ("http", "127.0.0.1", 8080), id="port"),
    pytest.param("https://[::1]:8443/a", ("https", "::1", 8443), id="ipv6"),
])
def test_origin(url, expected):
    assert origin(url) == expected


AUTH = {"Authorization": "Bearer t", "Range": "bytes=0-9"}
NO_AUTH = {"Range": "bytes=0-9"}


@pytest.mark.parametrize("url, location, target, headers", [
    pytest.param("https://hub/m/resolve/main/f", "/m/resolve/abc123/f", "https://hub/m/resolve/abc123/f", AUTH,
                 id="relative-same-origin-keeps-token"),
    pytest.param("https://hub/m/f", "https://hub:443/other", "https://hub:443/other", AUTH,
                 id="explicit-default-port-same-origin"),
    pytest.param("https://hub/m/f", "https://cdn.example/blob?sig=1", "https://cdn.example/blob?sig=1", NO_AUTH,
                 id="other-host-drops-token"),
    pytest.param("https://hub/m/f", "http://hub/m/f", "http://hub/m/f", NO_AUTH, id="https-to-http-drops-token"),
    pytest.param("http://hub/m/f", "https://hub/m/f", "https://hub/m/f", AUTH, id="http-to-https-upgrade-keeps"),
    pytest.param("http://hub:8080/m/f", "https://hub/m/f", "https://hub/m/f", NO_AUTH,
                 id="upgrade-from-other-port-drops"),
    pytest.param("https://hub/a/b/f", "../c/g", "https://hub/a/c/g", AUTH, id="dot-dot-relative"),
])
def test_redirect(url, location, target, headers):
    assert redirect(url, location, AUTH, "w") == (target, headers)


def test_redirect_header_names_are_case_insensitive():
    assert redirect("https://a/f", "https://b/f", {"authorization": "x", "Range": "r"}, "w") == \
        ("https://b/f", {"Range": "r"})


@pytest.mark.parametrize("location, message", [
    pytest.param(None, "without a Location", id="missing"),
    pytest.param("", "without a Location", id="empty"),
    pytest.param("ftp://h/f", "to a ftp URL, not http", id="ftp"),
    pytest.param("file:///etc/passwd", "to a file URL, not http", id="file"),
])
def test_redirect_refuses(location, message):
    with pytest.raises(errors.StoreUnavailable, match=message):
        redirect("https://hub/m/f", location, AUTH, "https://hub/m/f bytes 0-9")


@pytest.mark.parametrize("exc, cls, message", [
    pytest.param(TimeoutError("timed out"), errors.Stalled, "no bytes within 2.5 s", id="timeout"),
    pytest.param(OSError(110, "timed out"), errors.Stalled, "no bytes within 2.5 s", id="etimedout-oserror"),
    pytest.param(ConnectionResetError(104, "reset"), errors.StoreUnavailable, "ConnectionResetError", id="reset"),
    pytest.param(ConnectionRefusedError(111, "refused"), errors.StoreUnavailable, "refused", id="refused"),
    pytest.param(http.client.RemoteDisconnected("closed"), errors.StoreUnavailable, "RemoteDisconnected",
                 id="remote-disconnected"),
    pytest.param(http.client.IncompleteRead(b"", 10), errors.StoreUnavailable, "IncompleteRead", id="incomplete"),
    pytest.param(ssl.SSLCertVerificationError("certificate verify failed"), errors.StoreUnavailable,
                 "SSLCertVerificationError", id="tls-verify"),
])
def test_transport_error(exc, cls, message):
    err = transport_error(exc, "http://h/f bytes 0-9", 2.5)
    assert type(err) is cls and message in str(err) and "http://h/f bytes 0-9" in str(err)


@pytest.mark.parametrize("proxies, expected", [
    pytest.param({}, False, id="none"),
    pytest.param({"no": "127.0.0.1"}, False, id="only-no-proxy"),
    pytest.param({"https": "http://proxy:3128"}, True, id="https"),
    pytest.param({"http": "http://proxy:3128"}, True, id="http"),
    pytest.param({"all": "socks5://proxy:1080"}, True, id="all"),
    pytest.param({"http": ""}, False, id="empty-value"),
])
def test_proxied(proxies, expected):
    assert proxied(proxies) is expected


def test_cancel_runs_the_hook_installed_now_or_at_once():
    calls: list[str] = []
    cancel = Cancel()
    with cancel.hooked(lambda: calls.append("first")):
        assert not cancel.cancelled
        cancel.cancel()
    cancel.cancel()  # no hook installed any more
    with cancel.hooked(lambda: calls.append("late")):  # already cancelled: runs at once
        pass
    assert cancel.cancelled and calls == ["first", "late"]


# -- servers ---------------------------------------------------------------------------------------


_SERVERS = """\
  log_format auth '$server_port $request_uri $status auth=$http_authorization';
  access_log {work}/access.log auth;
  default_type application/octet-stream;
  sendfile on;
  server {{
    listen 127.0.0.1:{tls} ssl;
    ssl_certificate {work}/cert.pem;
    ssl_certificate_key {work}/key.pem;
    root {root};
    absolute_redirect off;
    location /same/ {{ rewrite ^/same/(.*)$ /models/$1 redirect; }}
    location /elsewhere/ {{ rewrite ^/elsewhere/(.*)$ http://127.0.0.1:{plain}/models/$1 redirect; }}
    location /loop/ {{ return 302 /loop/again; }}
  }}
  server {{
    listen 127.0.0.1:{plain};
    root {root};
    location /norange/ {{ alias {root}/models/; max_ranges 0; }}
  }}
"""


class Servers:
    """nginx serving `root` over TLS (self-signed, trusted through SSL_CERT_FILE) and plain HTTP."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        self.tls, self.plain = free_port(), free_port()
        self.cert = work / "cert.pem"
        self.https = f"https://127.0.0.1:{self.tls}"
        self.http = f"http://127.0.0.1:{self.plain}"

    def log(self) -> list[str]:
        return (self.work / "access.log").read_text().splitlines()


@pytest.fixture(scope="module")
def servers(store_root, tmp_path_factory) -> Iterator[Servers]:
    binary, openssl = nginx_path(), shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("nginx and openssl are needed (apt-get install nginx-light openssl)")
    root, work = tmp_path_factory.mktemp("http-root"), tmp_path_factory.mktemp("http-nginx")
    shutil.copytree(store_root / "models" / "small", root / "models" / "small")
    (root / "models" / "words").mkdir()
    words = np.arange(-(-WORDS // 8), dtype="<u8").tobytes()[:WORDS]  # each 8 bytes: their own offset
    (root / "models" / "words" / "partition-0.bin").write_bytes(words)
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(work / "key.pem"), "-out", str(work / "cert.pem"), "-days", "2",
                    "-subj", "/CN=sllm-test", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    s = Servers(root, work)
    conf = work / "nginx.conf"
    conf.write_text(nginx_conf(work, _SERVERS.format(work=work, root=root, tls=s.tls, plain=s.plain), connections=256))
    proc = subprocess.Popen([binary, "-e", str(work / "error.log"), "-p", str(work), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(s.tls)
        wait_port(s.plain)
        yield s
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def trusted(servers, monkeypatch) -> Servers:
    """The servers' certificate trusted (httpx.create_ssl_context reads SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(servers.cert))
    return servers


def _file(root: Path, model: str, name: str, start: int, end: int) -> bytes:
    return (root / "models" / model / name).read_bytes()[start:end]


def read(store: HttpStore, model: str, name: str, start: int, end: int, cancel: Cancel | None = None) -> bytes:
    """One read_into call, its pieces joined (each piece is copied: the buffer is reused)."""
    ref = resolve(model, [store.root])
    pieces: list[bytes] = []
    store.read_into(ref, name, start, end, lambda view: pieces.append(bytes(view)), cancel or Cancel())
    return b"".join(pieces)


def read_resuming(store: HttpStore, model: str, name: str, start: int, end: int,
                  attempts: int = 20) -> tuple[bytes, int, list[errors.LoaderError]]:
    """What the fetcher does: after a failure, ask again from the first byte not yet delivered.
    Returns the bytes placed at their offsets, how many the sink was handed, and the failures."""
    ref = resolve(model, [store.root])
    out = bytearray(end - start)
    pos, handed, failures = start, 0, []

    def sink(view: memoryview) -> None:
        nonlocal pos, handed
        out[pos - start: pos - start + len(view)] = view
        pos += len(view)
        handed += len(view)

    for _ in range(attempts):
        try:
            store.read_into(ref, name, pos, end, sink, Cancel())
        except errors.StoreUnavailable as exc:
            failures.append(exc)
            continue
        if pos == end:
            break
    return bytes(out), handed, failures


# -- the blocking reader against real servers -----------------------------------------------------


def test_reads_over_tls_with_the_shared_trust(trusted):
    store = HttpStore(parse_store(f"{trusted.https}/models"), timeout_s=5, connections=2)
    assert store.blocking_reader() is not None
    ref = resolve("small", [store.root])
    assert read(store, "small", "partition-0.bin", 1000, 700_000) == \
        _file(trusted.root, "small", "partition-0.bin", 1000, 700_000)
    size = (trusted.root / "models" / "small" / "partition-1.bin").stat().st_size
    assert read(store, "small", "partition-1.bin", 0, size) == _file(trusted.root, "small", "partition-1.bin", 0, size)
    assert asyncio.run(store.size(ref, "partition-1.bin")) == size  # httpx, same ssl context
    with pytest.raises(errors.NotFound, match=r"/models/small/absent.bin bytes 0-9: HTTP 404"):
        read(store, "small", "absent.bin", 0, 10)


def test_untrusted_certificate_is_refused(servers, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    store = HttpStore(parse_store(f"{servers.https}/models"), timeout_s=5, connections=2)
    with pytest.raises(errors.StoreUnavailable, match="SSLCertVerificationError.*certificate verify failed"):
        read(store, "small", "partition-0.bin", 0, 100)


def test_redirects_keep_the_token_on_the_origin_only(trusted):
    headers = {"Authorization": TOKEN}
    expected = _file(trusted.root, "small", "partition-0.bin", 5000, 90_000)
    same = HttpStore(parse_store(f"{trusted.https}/same"), timeout_s=5, connections=2, headers=headers)
    assert read(same, "small", "partition-0.bin", 5000, 90_000) == expected
    other = HttpStore(parse_store(f"{trusted.https}/elsewhere"), timeout_s=5, connections=2, headers=headers)
    assert read(other, "small", "partition-0.bin", 5000, 90_000) == expected
    log = trusted.log()
    assert f"{trusted.tls} /same/small/partition-0.bin 302 auth={TOKEN}" in log
    assert f"{trusted.tls} /models/small/partition-0.bin 206 auth={TOKEN}" in log  # relative Location
    assert f"{trusted.tls} /elsewhere/small/partition-0.bin 302 auth={TOKEN}" in log
    assert f"{trusted.plain} /models/small/partition-0.bin 206 auth=-" in log  # another origin: no token
    looping = HttpStore(parse_store(f"{trusted.https}/loop"), timeout_s=5, connections=2)
    with pytest.raises(errors.StoreUnavailable, match=f"more than {MAX_REDIRECTS} redirects"):
        read(looping, "small", "partition-0.bin", 0, 10)


def test_connections_are_kept_alive_between_ranges(servers):
    with CutProxy(servers.plain, after=1 << 40, faulty=0) as counting:  # passes everything, counts connections
        store = HttpStore(parse_store(f"{counting.url}/models"), timeout_s=5, connections=2)
        for start in range(0, 600_000, 100_000):
            assert read(store, "words", "partition-0.bin", start, start + 100_000) == \
                _file(servers.root, "words", "partition-0.bin", start, start + 100_000)
        assert counting.connections == 1


def test_hf_token_is_sent_by_the_blocking_reader(nginx, store_root, hf_token):
    root = parse_store("hf://")

    def store(token: str) -> HfStore:
        return HfStore(root, endpoint=f"{nginx.url}/hf", token=token, timeout_s=5, connections=2)

    ref = resolve("hf://org/small", [root])
    pieces: list[bytes] = []
    store(hf_token).read_into(ref, "partition-1.bin", 4096, 80_000, lambda v: pieces.append(bytes(v)), Cancel())
    assert b"".join(pieces) == _file(store_root, "small", "partition-1.bin", 4096, 80_000)
    with pytest.raises(errors.AccessDenied, match="HTTP 401"):
        store("wrong").read_into(ref, "partition-1.bin", 0, 10, lambda v: None, Cancel())


def test_server_errors_map_like_the_httpx_path(nginx):
    broken = parse_store(f"{nginx.url}/err500")
    store = HttpStore(broken, timeout_s=5, connections=2)
    with pytest.raises(errors.StoreUnavailable, match=r"err500/small/x.bin bytes 0-9: HTTP 500"):
        store.read_into(resolve("small", [broken]), "x.bin", 0, 10, lambda v: None, Cancel())
    closed = parse_store(f"http://127.0.0.1:{free_port()}/models")
    with pytest.raises(errors.StoreUnavailable, match="ConnectionRefusedError"):
        HttpStore(closed, timeout_s=5, connections=2).read_into(resolve("small", [closed]), "x.bin", 0, 10,
                                                                lambda v: None, Cancel())


def test_a_server_that_ignores_range_is_skipped_to_the_first_byte(servers):
    """200 and the whole file (nginx with max_ranges 0): the bytes before `start` are read and dropped,
    by both clients."""
    store = HttpStore(parse_store(f"{servers.http}/norange"), timeout_s=5, connections=2)
    expected = _file(servers.root, "words", "partition-0.bin", 1_500_001, 2_600_000)
    assert read(store, "words", "partition-0.bin", 1_500_001, 2_600_000) == expected
    assert f"{servers.plain} /norange/words/partition-0.bin 200 auth=-" in servers.log()

    async def through_httpx() -> bytes:
        try:
            ref = resolve("words", [store.root])
            return b"".join([c async for c in store.read(ref, "partition-0.bin", 1_500_001, 2_600_000)])
        finally:
            await store.aclose()

    assert asyncio.run(through_httpx()) == expected


def test_cut_connection_loses_and_repeats_nothing(servers):
    """Three responses cut at offsets that are not multiples of anything: every byte arrives once,
    at its own offset (each 8-byte word of the file holds its offset), and a cut (the server
    closing) keeps everything received before it."""
    with CutProxy(servers.plain, after=150_001, faulty=3) as proxy:
        store = HttpStore(parse_store(f"{proxy.url}/models"), timeout_s=5, connections=2)
        data, handed, failures = read_resuming(store, "words", "partition-0.bin", 12_345, WORDS)
    assert proxy.broken == 3 and len(failures) == 3
    assert data == _file(servers.root, "words", "partition-0.bin", 12_345, WORDS)
    assert handed == WORDS - 12_345  # nothing handed twice
    assert all("the connection closed with" in str(f) and "bytes 12345-" in str(f) for f in failures[:1])
    # The first cut came after 150_001 bytes of response: all but its head reached the sink.
    with CutProxy(servers.plain, after=150_001, faulty=1) as proxy:
        store = HttpStore(parse_store(f"{proxy.url}/models"), timeout_s=5, connections=2)
        pieces: list[bytes] = []
        try:
            store.read_into(resolve("words", [store.root]), "partition-0.bin", 0, WORDS,
                            lambda v: pieces.append(bytes(v)), Cancel())
        except errors.StoreUnavailable:
            pass
        got = b"".join(pieces)
    assert 150_001 - 1000 < len(got) < 150_001
    assert got == _file(servers.root, "words", "partition-0.bin", 0, len(got))


def test_stalled_response_is_reported_with_the_range_then_resumed(servers):
    with CutProxy(servers.plain, after=400_000, faulty=2, mode="stall") as proxy:
        store = HttpStore(parse_store(f"{proxy.url}/models"), timeout_s=0.3, connections=2)
        t0 = time.monotonic()
        data, handed, failures = read_resuming(store, "words", "partition-0.bin", 1000, WORDS)
        seconds = time.monotonic() - t0
    assert data == _file(servers.root, "words", "partition-0.bin", 1000, WORDS)
    assert handed == WORDS - 1000
    assert [type(f) for f in failures] == [errors.Stalled, errors.Stalled]
    assert f"{proxy.url}/models/words/partition-0.bin bytes 1000-{WORDS - 1}: no bytes within 0.3 s" in \
        str(failures[0])
    assert seconds < 5


def test_cancel_interrupts_a_stalled_read_at_once(servers):
    with CutProxy(servers.plain, after=100_000, faulty=1, mode="stall") as proxy:
        store = HttpStore(parse_store(f"{proxy.url}/models"), timeout_s=60, connections=2)
        cancel = Cancel()
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                read(store, "words", "partition-0.bin", 0, WORDS, cancel)
                outcome.append(None)
            except errors.LoaderError as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 10
        while proxy.broken == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.broken == 1
        time.sleep(0.1)  # the reader is now blocked in recv on the stalled connection
        t0 = time.monotonic()
        cancel.cancel()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - t0 < 2  # not the 60 s timeout
        assert len(outcome) == 1


def test_a_proxy_in_the_environment_turns_the_blocking_reader_off(nginx, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    root = parse_store(f"{nginx.url}/models")
    assert HttpStore(root, timeout_s=5, connections=2).blocking_reader() is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert HttpStore(root, timeout_s=5, connections=2).blocking_reader() is not None


# -- through the sidecar ---------------------------------------------------------------------------


def _transfer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fetch_")]


@pytest.mark.parametrize("mode, after, flags", [
    pytest.param("cut", 40_001, (), id="cut"),
    pytest.param("stall", 40_001, ("--timeout", "0.5"), id="stall"),
])
def test_unverified_download_keeps_every_byte_through_faults(nginx, sidecar, store_root, mode, after, flags):
    """A plain Hugging Face checkpoint has no checksums until it is converted on the node: a byte
    lost or repeated on resume would go unnoticed by the download and change the converted weights."""
    with CutProxy(nginx.port, after=after, faulty=3, mode=mode,
                  match=b"GET /models/tiny-hf/model.safetensors ") as proxy:
        thread, client = sidecar([f"{proxy.url}/models"], *flags)
        with client.acquire("tiny-hf") as lease:
            lease.wait_complete(timeout=60)
            got = [Path(p.path).read_bytes() for p in lease.partitions]
            assert _transfer_threads()  # the range requests ran in the fetcher's transfer threads
        assert proxy.broken == 3
    index = fmt.read_index(store_root / "models" / "tiny")
    assert got == [(store_root / "models" / "tiny" / p.file).read_bytes() for p in index.partitions]


def test_stop_cancels_stalled_transfers_promptly(nginx, sidecar):
    with CutProxy(nginx.port, after=100_000, faulty=1000, mode="stall") as proxy:
        thread, client = sidecar([f"{proxy.url}/models"], "--timeout", "60", "--connections", "2")
        client.acquire("small")  # granted at once; the fill goes on in the background
        deadline = time.monotonic() + 10
        while proxy.broken < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.broken == 2 and _transfer_threads()
        t0 = time.monotonic()
        client.close()
        thread.stop()
        assert time.monotonic() - t0 < 5  # the blocked reads were interrupted, not waited out
    deadline = time.monotonic() + 5
    while _transfer_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _transfer_threads() == []


def test_with_a_proxy_configured_the_fetch_goes_through_httpx(nginx, sidecar, store_root, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there ...
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # ... and httpx bypasses it for the store
    thread, client = sidecar([f"{nginx.url}/models"])
    with client.acquire("small") as lease:
        lease.wait_complete(timeout=60)
        got = [Path(p.path).read_bytes() for p in lease.partitions]
    index = fmt.read_index(store_root / "models" / "small")
    assert got == [(store_root / "models" / "small" / p.file).read_bytes() for p in index.partitions]
