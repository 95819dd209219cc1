"""The placement webhook's certificates (autoscaler/kube/certs.py), table-tested: when a stored
certificate is due for rotation and why, what a rotation keeps in the CA bundle, which caBundles
a patch touches; and the server (autoscaler/kube/webhook.py) serving the certificate loaded last
from the next TLS handshake on, on loopback."""

from __future__ import annotations

import base64
import datetime as dt
import socket
import ssl
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from autoscaler.kube.certs import (
    CA_KEY,
    CERT_KEY,
    KEY_KEY,
    Issued,
    bundle_patch,
    cert_hosts,
    check_settings,
    issue,
    kept_ca,
    next_check_s,
    rotation_due,
    secret_data,
    service_host,
)
from autoscaler.kube.webhook import WebhookServer
from sllm_knative.ports import free_port
from tests.core.test_admission import GOOD, apply_patch, classes

T0 = dt.datetime(2026, 9, 1, 12, 0, tzinfo=dt.timezone.utc)
YEAR = 365 * 24 * 3600.0
HOSTS = [service_host("sllm-knative-webhook", "sllm-knative"), "10.200.0.1"]


@pytest.fixture(scope="module")
def made() -> Issued:
    return issue(HOSTS, validity_s=YEAR, now=T0)


def test_a_fresh_certificate_is_for_the_service_and_its_ca(made: Issued) -> None:
    leaf = x509.load_pem_x509_certificate(made.cert)
    (ca,) = x509.load_pem_x509_certificates(made.ca_bundle)
    assert service_host("sllm-knative-webhook", "sllm-knative") == "sllm-knative-webhook.sllm-knative.svc"
    assert cert_hosts(leaf) == {"sllm-knative-webhook.sllm-knative.svc", "10.200.0.1"}
    leaf.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_after_utc == T0 + dt.timedelta(seconds=YEAR)
    assert leaf.not_valid_before_utc == T0 - dt.timedelta(minutes=5)  # clock skew, capped at 5 min
    assert rotation_due(made.data(), HOSTS, T0, 0.8) is None


def _other_key() -> bytes:
    return issue(["x"], validity_s=60, now=T0).key


@pytest.mark.parametrize(("case", "change", "at", "reason"), [
    ("no Secret", None, T0, "the Secret does not exist"),
    ("no ca.crt", {CA_KEY: b""}, T0, "the Secret has no ca.crt"),
    ("no tls.key", {KEY_KEY: None}, T0, "the Secret has no tls.key"),
    ("garbage tls.crt", {CERT_KEY: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, T0,
     "tls.crt is not a PEM certificate"),
    ("garbage ca.crt", {CA_KEY: b"hello"}, T0, "ca.crt is not a PEM certificate bundle"),
    ("garbage tls.key", {KEY_KEY: b"hello"}, T0, "tls.key is not an unencrypted PEM private key"),
    ("a key of another certificate", {KEY_KEY: "other"}, T0, "tls.key is not the key of tls.crt"),
    ("another CA", {CA_KEY: "other-ca"}, T0, "tls.crt is not signed by the first CA in ca.crt"),
    ("79 % through: keep", {}, T0 + dt.timedelta(seconds=0.79 * YEAR), None),
    ("81 % through: rotate", {}, T0 + dt.timedelta(seconds=0.81 * YEAR), "80% of its validity has passed"),
    ("expired", {}, T0 + dt.timedelta(seconds=YEAR + 1), "the certificate expired at"),
])
def test_rotation_due(made: Issued, case: str, change: dict[str, Any] | None, at: dt.datetime,
                      reason: str | None) -> None:
    data: dict[str, bytes] | None = None
    if change is not None:
        data = made.data()
        for k, v in change.items():
            if v is None:
                del data[k]
            elif v == "other":
                data[k] = _other_key()
            elif v == "other-ca":
                data[k] = issue(HOSTS, validity_s=YEAR, now=T0).ca_bundle
            else:
                data[k] = v
    got = rotation_due(data, HOSTS, at, 0.8)
    if reason is None:
        assert got is None, case
    else:
        assert got is not None and got.startswith(reason), f"{case}: {got}"


def test_other_hosts_make_it_due_naming_both(made: Issued) -> None:
    got = rotation_due(made.data(), [HOSTS[0]], T0, 0.8)
    assert got is not None and "10.200.0.1" in got and HOSTS[0] in got
    assert rotation_due(made.data(), [HOSTS[0].upper(), "10.200.0.1"], T0, 0.8) is None  # DNS names ignore case


def test_the_next_check_is_at_the_rotation_point(made: Issued) -> None:
    start = T0 - dt.timedelta(minutes=5)
    lifetime = YEAR + 300
    assert next_check_s(made.data(), 0.8, T0) == pytest.approx(0.8 * lifetime - 300, abs=1)
    assert next_check_s(made.data(), 0.8, start + dt.timedelta(seconds=lifetime)) == 0.0
    assert next_check_s({}, 0.8, T0) == 0.0


def test_a_rotation_keeps_the_previous_ca_while_it_is_valid(made: Issued) -> None:
    later = T0 + dt.timedelta(seconds=0.85 * YEAR)
    keep = kept_ca(made.data(), later)
    assert keep is not None and keep == made.ca_bundle
    rotated = issue(HOSTS, validity_s=YEAR, now=later, keep_ca=keep)
    new_ca, old_ca = x509.load_pem_x509_certificates(rotated.ca_bundle)
    x509.load_pem_x509_certificate(rotated.cert).verify_directly_issued_by(new_ca)
    assert old_ca.public_bytes(serialization.Encoding.PEM) == made.ca_bundle
    assert new_ca.subject != old_ca.subject
    assert rotation_due(rotated.data(), HOSTS, later, 0.8) is None
    # the next rotation drops the oldest: only the CA it replaces is kept
    again = issue(HOSTS, validity_s=YEAR, now=later, keep_ca=kept_ca(rotated.data(), later))
    assert len(x509.load_pem_x509_certificates(again.ca_bundle)) == 2
    assert kept_ca(made.data(), T0 + dt.timedelta(seconds=YEAR + 1)) is None  # an expired CA is dropped
    assert kept_ca(None, T0) is None


@pytest.mark.parametrize(("validity", "fraction"), [(0, 0.8), (-1, 0.8), (60, 0), (60, 1), (60, 1.5)])
def test_settings_are_checked(validity: float, fraction: float) -> None:
    with pytest.raises(ValueError):
        check_settings(validity, fraction)


def test_bundle_patch_touches_only_the_webhooks_that_differ() -> None:
    bundle = b"-----BEGIN CERTIFICATE-----\nnew\n-----END CERTIFICATE-----\n"
    want = base64.b64encode(bundle).decode()
    config = {"webhooks": [{"name": "a.example.com", "clientConfig": {"caBundle": want}},
                           {"name": "b.example.com", "clientConfig": {"caBundle": "b2xk"}},
                           {"name": "c.example.com", "clientConfig": {"url": "https://x"}}]}
    ops = bundle_patch(config, bundle)
    assert ops == [{"op": "test", "path": "/webhooks/1/name", "value": "b.example.com"},
                   {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": want},
                   {"op": "test", "path": "/webhooks/2/name", "value": "c.example.com"},
                   {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": want}]
    after = apply_patch(config, ops)
    assert bundle_patch(after, bundle) == []
    assert after["webhooks"][2]["clientConfig"]["url"] == "https://x"
    with pytest.raises(ValueError):  # the list was reordered: the guard stops the patch
        apply_patch({"webhooks": list(reversed(config["webhooks"]))}, ops)


def test_secret_data_decodes() -> None:
    assert secret_data(None) is None
    assert secret_data({"data": {"tls.crt": base64.b64encode(b"x").decode()}}) == {"tls.crt": b"x"}
    assert secret_data({}) == {}


# --- serving: the certificate loaded last, from the next handshake ------------------------------


def _served(port: int, bundle: bytes) -> bytes:
    ctx = ssl.create_default_context(cadata=bundle.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_the_server_serves_the_certificate_loaded_last() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    first = issue(["127.0.0.1"], validity_s=3600, now=now)
    server = WebhookServer(classes({}), "127.0.0.1", free_port())
    with pytest.raises(RuntimeError, match="no certificate"):
        server.start()
    server.load_certificate(first.cert, first.key)
    with pytest.raises(ssl.SSLError):
        server.load_certificate(first.cert, _other_key())  # a mismatched pair is refused ...
    server.start()
    try:
        assert _served(server.port, first.ca_bundle) == _der(first.cert)  # ... and the last good one kept
        second = issue(["127.0.0.1"], validity_s=3600, now=now, keep_ca=kept_ca(first.data(), now))
        server.load_certificate(second.cert, second.key)
        assert _served(server.port, second.ca_bundle) == _der(second.cert)
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that knows only the old CA
            _served(server.port, first.ca_bundle)
        assert server.review(GOOD)[0] == 200
    finally:
        server.stop()
    assert not server.running
