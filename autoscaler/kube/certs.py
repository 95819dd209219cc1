"""The placement webhook's TLS: a CA and a serving certificate, made, stored, published and rotated here.

The API server calls the webhook over HTTPS and trusts only the `caBundle` of its
MutatingWebhookConfiguration, so this project is its own CA:

- The leader (a `coordination.k8s.io` Lease of its own, `sllm-knative-webhook-certs`) makes a CA
  and a serving certificate for `<service>.<namespace>.svc` (plus any extra DNS names or IP
  addresses it is given), and stores them in the Secret `sllm-knative-webhook-certs` of the
  install namespace (`tls.crt`, `tls.key`, and `ca.crt`, the CA bundle). It keeps the `caBundle`
  of every webhook in the MutatingWebhookConfiguration `sllm-knative-placement` equal to `ca.crt`
  (an install re-applied with an empty caBundle is repaired as soon as the watch sees it).
- It rotates both before expiry: at `rotate_fraction` (0.8) of the validity (one year), or at once
  when the Secret is missing, unreadable, inconsistent or names other hosts. A rotation keeps the
  previous CA in the bundle while it is valid, publishes the new bundle to the caBundle first,
  waits `propagation_s` for the API server to pick it up, and only then writes the Secret, so a
  replica still serving the old certificate and one already serving the new one are both trusted.
- Every replica, leading or not, watches the Secret and hands its certificate to the server
  (`on_certificate`), which serves new connections with it from then on.

The decisions (is a rotation due and why, when is the next one, which caBundles differ) are pure
functions with table tests; `CertController` is the loop around them.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import secrets as pysecrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sllm_knative.kube.client import Kube, error_message, is_status
from sllm_knative.kube.events import NORMAL, EventRecorder
from sllm_knative.kube.informer import DELETED, Informer
from sllm_knative.kube.leader import LeaderElector
from sllm_knative.kube.workqueue import backoff_s
from sllm_knative.log import get_logger

_log = get_logger("autoscaler.kube.certs")

SECRET = "sllm-knative-webhook-certs"
LEASE = "sllm-knative-webhook-certs"
WEBHOOK_CONFIG = "sllm-knative-placement"
SERVICE = "sllm-knative-webhook"
CA_KEY, CERT_KEY, KEY_KEY = "ca.crt", "tls.crt", "tls.key"
DEFAULT_VALIDITY_S = 365 * 24 * 3600.0
DEFAULT_ROTATE_FRACTION = 0.8
REQUEST_TIMEOUT_S = 10.0

CertificateSink = Callable[[bytes, bytes], None]  # (tls.crt, tls.key) -> the server serves them


def service_host(service: str, namespace: str) -> str:
    """The name the API server checks the certificate against for a service clientConfig."""
    return f"{service}.{namespace}.svc"


def check_settings(validity_s: float, rotate_fraction: float) -> None:
    if not validity_s > 0:
        raise ValueError(f"certificate validity = {validity_s} s, must be positive")
    if not 0 < rotate_fraction < 1:
        raise ValueError(f"rotate fraction = {rotate_fraction}, must be between 0 and 1 (exclusive)")


# --- certificates (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    ca_bundle: bytes  # PEM: the new CA, then the previous one while it is valid
    cert: bytes  # PEM
    key: bytes  # PEM (PKCS#8)

    def data(self) -> dict[str, bytes]:
        return {CA_KEY: self.ca_bundle, CERT_KEY: self.cert, KEY_KEY: self.key}


def _pem_certs(pem: bytes) -> list[Any]:
    from cryptography import x509

    return list(x509.load_pem_x509_certificates(pem))


def _san(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def cert_hosts(cert: Any) -> set[str]:
    """The DNS names and IP addresses a certificate is valid for (its subjectAltName)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}


def normal_hosts(hosts: Sequence[str]) -> set[str]:
    out = set()
    for h in hosts:
        try:
            out.add(str(ipaddress.ip_address(h)))
        except ValueError:
            out.add(h.lower())
    return out


def issue(hosts: Sequence[str], *, validity_s: float, now: dt.datetime, keep_ca: bytes | None = None) -> Issued:
    """A new CA and a serving certificate it signs for `hosts`, both valid from a little before
    `now` (clock skew) for `validity_s`; `keep_ca` (the previous CA, PEM) follows the new one in
    the bundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("a serving certificate needs at least one host")
    skew = dt.timedelta(seconds=min(300.0, validity_s * 0.05))
    start, end = now - skew, now + dt.timedelta(seconds=validity_s)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"sllm-knative-webhook-ca-{pysecrets.token_hex(4)}")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Issued(ca.public_bytes(pem) + (keep_ca or b""), leaf.public_bytes(pem), key_pem)


def rotate_at(cert: Any, fraction: float) -> dt.datetime:
    """When a certificate is due for rotation: at `fraction` of its validity."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


def rotation_due(data: Mapping[str, bytes] | None, hosts: Sequence[str], now: dt.datetime,
                 fraction: float) -> str | None:
    """Why the stored certificate must be replaced now, or None when it may stay."""
    from cryptography.hazmat.primitives import serialization

    if data is None:
        return "the Secret does not exist"
    for k in (CA_KEY, CERT_KEY, KEY_KEY):
        if not data.get(k):
            return f"the Secret has no {k}"
    try:
        leaf = _pem_certs(data[CERT_KEY])[0]
    except (ValueError, IndexError) as exc:
        return f"{CERT_KEY} is not a PEM certificate ({exc})"
    try:
        cas = _pem_certs(data[CA_KEY])
        if not cas:
            raise ValueError("no certificate")
    except ValueError as exc:
        return f"{CA_KEY} is not a PEM certificate bundle ({exc})"
    try:
        key = serialization.load_pem_private_key(data[KEY_KEY], password=None)
    except (ValueError, TypeError) as exc:
        return f"{KEY_KEY} is not an unencrypted PEM private key ({exc})"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        return f"{KEY_KEY} is not the key of {CERT_KEY}"
    try:
        leaf.verify_directly_issued_by(cas[0])
    except Exception:  # InvalidSignature, ValueError, TypeError: all mean "not this CA's"
        return f"{CERT_KEY} is not signed by the first CA in {CA_KEY}"
    have, want = cert_hosts(leaf), normal_hosts(hosts)
    if have != want:
        return f"the certificate is for {sorted(have)}, the webhook is reached as {sorted(want)}"
    if now >= leaf.not_valid_after_utc or now >= cas[0].not_valid_after_utc:
        return f"the certificate expired at {min(leaf.not_valid_after_utc, cas[0].not_valid_after_utc):%Y-%m-%dT%H:%M:%SZ}"
    if now >= rotate_at(leaf, fraction):
        return (f"{fraction:.0%} of its validity has passed (rotate at {rotate_at(leaf, fraction):%Y-%m-%dT%H:%M:%SZ}, "
                f"expires {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    return None


def next_check_s(data: Mapping[str, bytes], fraction: float, now: dt.datetime) -> float:
    """Seconds until the stored certificate is due (0 if it is, or cannot be read)."""
    try:
        return max(0.0, (rotate_at(_pem_certs(data[CERT_KEY])[0], fraction) - now).total_seconds())
    except (KeyError, ValueError, IndexError):
        return 0.0


def kept_ca(data: Mapping[str, bytes] | None, now: dt.datetime) -> bytes | None:
    """The CA a rotation keeps in the new bundle: the current one (first in ca.crt) while valid."""
    from cryptography.hazmat.primitives import serialization

    try:
        ca = _pem_certs((data or {}).get(CA_KEY) or b"")[0]
    except (ValueError, IndexError):
        return None
    if now >= ca.not_valid_after_utc:
        return None
    return bytes(ca.public_bytes(serialization.Encoding.PEM))


def bundle_patch(config: Mapping[str, Any], bundle: bytes) -> list[dict[str, Any]]:
    """The JSON patch that makes every webhook's caBundle `bundle` ([] when all are): each change
    is guarded by a `test` of the webhook's name, so a reordered list fails instead of
    patching the wrong webhook."""
    want = base64.b64encode(bundle).decode()
    ops: list[dict[str, Any]] = []
    for i, wh in enumerate(config.get("webhooks") or []):
        if (wh.get("clientConfig") or {}).get("caBundle") != want:
            ops += [{"op": "test", "path": f"/webhooks/{i}/name", "value": wh.get("name")},
                    {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": want}]
    return ops


def secret_data(secret: Mapping[str, Any] | None) -> dict[str, bytes] | None:
    """A Secret's data (API JSON, base64) decoded; None for no Secret."""
    if secret is None:
        return None
    out = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[k] = base64.b64decode(v)
        except ValueError:
            out[k] = b""
    return out


def fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 of a PEM certificate's DER form, hex (for logs and comparisons)."""
    from cryptography.hazmat.primitives import hashes

    return str(_pem_certs(cert_pem)[0].fingerprint(hashes.SHA256()).hex())


# --- the controller ---------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class CertController:
    """Every replica runs one: all watch the Secret and serve its certificate; the leader makes,
    rotates and publishes it (see the module docstring)."""

    def __init__(self, kube: Kube, *, namespace: str, identity: str, on_certificate: CertificateSink,
                 service: str = SERVICE, extra_hosts: Sequence[str] = (), webhook_config: str = WEBHOOK_CONFIG,
                 secret: str = SECRET, lease: str = LEASE, validity_s: float = DEFAULT_VALIDITY_S,
                 rotate_fraction: float = DEFAULT_ROTATE_FRACTION, propagation_s: float = 2.0,
                 resync_s: float = 60.0, lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0,
                 retry_period_s: float = 2.0, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        check_settings(validity_s, rotate_fraction)
        self.kube, self.namespace, self.identity = kube, namespace, identity
        self.secret, self.webhook_config = secret, webhook_config
        self.hosts = [service_host(service, namespace), *extra_hosts]
        self.validity_s, self.rotate_fraction, self.propagation_s = validity_s, rotate_fraction, propagation_s
        self.resync_s, self.clock = resync_s, clock
        self.on_certificate = on_certificate
        self.events = EventRecorder(kube, "sllm-knative-webhook", identity)
        self.secrets = Informer("webhook-secret", kube.core.list_namespaced_secret, namespace, resync_s=resync_s,
                                field_selector=f"metadata.name={secret}")
        self.configs = Informer("webhook-config", kube.admission.list_mutating_webhook_configuration,
                                resync_s=resync_s, field_selector=f"metadata.name={webhook_config}")
        self.secrets.add_handler(self._on_secret)
        self.configs.add_handler(lambda kind, obj, old: self._wake.set())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.elector = LeaderElector(kube, namespace, lease, identity, lease_duration_s=lease_duration_s,
                                     renew_deadline_s=renew_deadline_s, retry_period_s=retry_period_s,
                                     on_started_leading=self._wake.set)
        self._thread: threading.Thread | None = None
        self._served = b""  # the tls.crt last handed to on_certificate
        self.serving = threading.Event()  # set once a certificate was handed over
        self.rotations = 0  # certificates this replica made
        self._missing_config_logged = False
        self._log = _log.bind(secret=f"{namespace}/{secret}", identity=identity)

    # -- every replica: serve what the Secret holds -------------------------------------------

    def _on_secret(self, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self._wake.set()
        if kind == DELETED:
            self._log.warning("the webhook's Secret was deleted; serving the last certificate until it is remade")
            return
        data = secret_data(obj) or {}
        cert, key = data.get(CERT_KEY) or b"", data.get(KEY_KEY) or b""
        if not cert or not key or cert == self._served:
            return
        try:
            self.on_certificate(cert, key)
        except Exception as exc:
            self._log.error("could not load the certificate from the Secret; keeping the last one",
                            error=f"{type(exc).__name__}: {exc}"[:300])
            return
        self._served = cert
        self.serving.set()
        self._log.info("serving the Secret's certificate", sha256=fingerprint(cert)[:16])

    def wait_serving(self, timeout_s: float) -> bool:
        return self.serving.wait(timeout_s)

    # -- running ------------------------------------------------------------------------------

    def start(self) -> CertController:
        self.secrets.start()
        self.configs.start()
        self.elector.start()
        self._thread = threading.Thread(target=self._run, name="webhook-certs", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S * 3 + self.propagation_s)
        self.elector.stop(release=release)
        self.secrets.stop()
        self.configs.stop()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            delay = self.resync_s
            if self.elector.is_leader:
                try:
                    delay = min(delay, max(0.05, self.reconcile()))
                    failures = 0
                except Exception as exc:
                    failures += 1
                    delay = backoff_s(failures, 0.5, 30.0)
                    self._log.warning("webhook certificate round failed; retrying", retry_in_s=round(delay, 2),
                                      error=f"{type(exc).__name__}: {error_message(exc)}"[:300])
            self._wake.wait(delay)

    # -- the leader ---------------------------------------------------------------------------

    def _read(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise
        return dict(json.loads(resp.data))

    def reconcile(self) -> float:
        """One round as the leader: rotate when due, keep every caBundle equal to ca.crt. Returns
        the seconds until the certificate is next due."""
        now = self.clock()
        secret = self._read(self.kube.core.read_namespaced_secret, self.secret, self.namespace)
        data = secret_data(secret)
        config = self._read(self.kube.admission.read_mutating_webhook_configuration, self.webhook_config)
        reason = rotation_due(data, self.hosts, now, self.rotate_fraction)
        if reason is not None:
            issued = issue(self.hosts, validity_s=self.validity_s, now=now, keep_ca=kept_ca(data, now))
            if config is not None and bundle_patch(config, issued.ca_bundle):
                # the new CA is trusted before any replica serves a certificate it signed
                self._patch_bundle(config, issued.ca_bundle, "rotation")
                if self._stop.wait(self.propagation_s):
                    return 0.0
            written = self._write_secret(secret, issued.data())
            self.rotations += 1
            data = issued.data()
            self._log.info("made a new webhook certificate", reason=reason, hosts=",".join(self.hosts),
                           sha256=fingerprint(issued.cert)[:16], validity_s=self.validity_s)
            self.events.record(written, NORMAL, "CertificateRotated" if secret else "CertificateCreated",
                               f"new serving certificate for {', '.join(self.hosts)}: {reason}")
            config = self._read(self.kube.admission.read_mutating_webhook_configuration, self.webhook_config)
        assert data is not None
        if config is None:
            if not self._missing_config_logged:
                self._log.warning("no MutatingWebhookConfiguration to publish the CA to; its caBundle is set "
                                  "when it appears", webhook_config=self.webhook_config)
                self._missing_config_logged = True
        else:
            self._missing_config_logged = False
            if bundle_patch(config, data[CA_KEY]):
                self._patch_bundle(config, data[CA_KEY], "repair")
                self.events.record(config, NORMAL, "CABundleUpdated",
                                   f"caBundle set to the CA in Secret {self.namespace}/{self.secret}")
        return next_check_s(data, self.rotate_fraction, self.clock())

    def _patch_bundle(self, config: dict[str, Any], bundle: bytes, why: str) -> None:
        ops = bundle_patch(config, bundle)
        self.kube.admission.patch_mutating_webhook_configuration(self.webhook_config, ops,
                                                                 _request_timeout=REQUEST_TIMEOUT_S)
        self._log.info("caBundle published", webhook_config=self.webhook_config, why=why,
                       webhooks=len(ops) // 2)

    def _write_secret(self, current: dict[str, Any] | None, data: Mapping[str, bytes]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Secret", "type": (current or {}).get("type") or "kubernetes.io/tls",
            "metadata": {"name": self.secret, "namespace": self.namespace,
                         "labels": {"app.kubernetes.io/part-of": "sllm-knative",
                                    "app.kubernetes.io/component": "webhook"}},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        if current is None:
            resp = self.kube.core.create_namespaced_secret(self.namespace, body, _preload_content=False,
                                                           _request_timeout=REQUEST_TIMEOUT_S)
        else:  # optimistic: a concurrent writer makes this a 409, and the round is retried
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            body["metadata"]["labels"] = {**(current["metadata"].get("labels") or {}), **body["metadata"]["labels"]}
            resp = self.kube.core.replace_namespaced_secret(self.secret, self.namespace, body, _preload_content=False,
                                                            _request_timeout=REQUEST_TIMEOUT_S)
        return dict(json.loads(resp.data))
