"""The real Kubernetes control plane on loopback, for tests and by hand.

`KubeCluster.up(workdir)` starts etcd, kube-apiserver, kube-controller-manager and
kube-scheduler (built from their Go modules by `make kube-bins` into `.kube-bins/`) with a
throwaway data directory, the way envtest does, plus the controller manager and scheduler that
envtest leaves out:

- etcd on loopback; the API server on the host's address of the cluster's own pod network
  (testkit/kube/network.py: a bridge and a namespace per node, all on this machine), because
  pods run in those namespaces and must reach it;
- a CA, the API server's serving certificate (127.0.0.1, localhost) and an admin client
  certificate (group system:masters), made here with `cryptography`;
- a service-account key pair, so the token controller and the TokenRequest API issue real
  tokens;
- RBAC authorization, and an admission chain that includes MutatingAdmissionWebhook and
  ValidatingAdmissionWebhook; with no kube-proxy here (cluster IPs lead nowhere), a webhook's
  `service` is called at a ready endpoint from its EndpointSlices (`--enable-aggregator-routing`);
- the Knative Serving CRDs (../shared/data/knative/crds, vendored in sllm_knative/schemas) and
  this project's CRDs (manifests/crds), installed and Established before `up` returns.

Every process runs in its own process group with PR_SET_PDEATHSIG, so none outlives the test
run; `down()` stops them and removes the data directory.

By hand:

    python -m testkit.kube.cluster up [--dir DIR]   # prints the kubeconfig path, stays up
    python -m testkit.kube.cluster down [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sllm_knative.local.procs import spawn, stop
from sllm_knative.ports import free_port
from testkit.kube.network import NETWORK_FILE, ClusterNetwork

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("SLLM_KUBE_BINS", ROOT / ".kube-bins"))
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
KNATIVE_CRDS = ROOT / "sllm_knative/schemas/knative/crds"
PROJECT_CRDS = ROOT / "manifests/crds"
DEFAULT_DIR = ROOT / ".kube-cluster"

# The node lifecycle controller's timings: short, so a test that kills a node sees it
# NotReady in seconds instead of the default 40 s.
NODE_MONITOR_PERIOD = "1s"
NODE_MONITOR_GRACE_PERIOD = "8s"


def missing_binaries(bin_dir: Path = BIN_DIR) -> list[str]:
    return [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]


# --- certificates ---------------------------------------------------------------------------


@dataclass
class KeyPair:
    cert_pem: bytes
    key_pem: bytes

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """Write <stem>.crt and <stem>.key (mode 0600) into folder; return their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        for path, data in ((crt, self.cert_pem), (key, self.key_pem)):
            path.write_bytes(data)
            path.chmod(0o600)
        return crt, key


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A throwaway certificate authority: the cluster's CA, and the issuer of webhook certs."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.cert_pem = cert_pem
        self._cert = x509.load_pem_x509_certificate(cert_pem)
        self._key = serialization.load_pem_private_key(key_pem, password=None)
        self.key_pem = key_pem

    @classmethod
    def create(cls) -> TestCA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        subject = _name("sllm-knative-test-ca")
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + dt.timedelta(days=7))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue(self, cn: str, *, org: str | None = None, server: bool = True,
              hosts: tuple[str, ...] = ()) -> KeyPair:
        """A leaf certificate for a server (hosts are DNS names or IP addresses) or a client."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (x509.CertificateBuilder().subject_name(_name(cn, org)).issuer_name(self._cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + dt.timedelta(days=7))
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if hosts:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self._key, hashes.SHA256())  # type: ignore[arg-type]
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _name(cn: str, org: str | None = None) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _make_pki(out: Path, api_ip: str) -> TestCA:
    """CA, the API server's serving cert, the admin client cert, the service-account key pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    ca = TestCA.create()
    KeyPair(ca.cert_pem, ca.key_pem).write(out, "ca")
    ca.issue("kube-apiserver", hosts=("localhost", "kubernetes", "kubernetes.default",
                                      "kubernetes.default.svc", "127.0.0.1", api_ip)).write(out, "apiserver")
    ca.issue("admin", org="system:masters", server=False).write(out, "admin")
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = sa.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    for fname, data in (("sa.key", _key_pem(sa)), ("sa.pub", pub)):
        (out / fname).write_bytes(data)
        (out / fname).chmod(0o600)
    return ca


def _kubeconfig(server: str, pki: Path) -> dict:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "sllm-test",
        "clusters": [{"name": "sllm-test", "cluster": {"server": server,
                                                        "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(pki / "admin.crt"),
                                             "client-key": str(pki / "admin.key")}}],
        "contexts": [{"name": "sllm-test", "context": {"cluster": "sllm-test", "user": "admin"}}],
    }


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class KubeCluster:
    workdir: Path
    server: str = ""
    kubeconfig: Path = Path()
    pids: dict[str, int] = field(default_factory=dict)
    startup_s: dict[str, float] = field(default_factory=dict)
    crds: list[str] = field(default_factory=list)
    network: ClusterNetwork | None = field(default=None, repr=False)
    ca: TestCA | None = field(default=None, repr=False)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def audit_log(self) -> Path:
        """JSON lines, one per request by a service account (audit level Metadata)."""
        return self.workdir / "audit.log"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @classmethod
    def up(cls, workdir: Path, bin_dir: Path = BIN_DIR, timeout_s: float = 90.0) -> KubeCluster:
        missing = missing_binaries(bin_dir)
        if missing:
            raise FileNotFoundError(f"{bin_dir}: missing {', '.join(missing)}; run `make kube-bins`")
        c = cls(workdir=workdir)
        try:
            c._start(bin_dir, timeout_s)
        except BaseException:
            c.down()
            raise
        return c

    def _run(self, name: str, argv: list[str]) -> None:
        # SIGKILL if we die: a throwaway control plane need not drain (kube-apiserver's graceful
        # shutdown outlived its owner by minutes in a test).
        p = spawn(argv, self.logs / f"{name}.log", death_signal=signal.SIGKILL)
        self._procs[name] = p
        self.pids[name] = p.pid

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {p.returncode} during start-up; its log ends:\n{tail}")

    def _start(self, bin_dir: Path, timeout_s: float) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.network = ClusterNetwork.create()
        self.network.save(self.workdir / NETWORK_FILE)  # next to the kubeconfig: how the CLI node agent joins
        api_ip = self.network.host_ip
        self.ca = _make_pki(self.pki, api_ip)
        self.startup_s["certs"] = time.monotonic() - t0

        etcd_client, etcd_peer = free_port(), free_port()
        self._run("etcd", [
            str(bin_dir / "etcd"), "--name", "default", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level", "warn", "--listen-metrics-urls", ""])

        port = free_port()
        self.server = f"https://{api_ip}:{port}"
        pki = self.pki
        # Audit what service accounts do (metadata only): the RBAC test derives each component's
        # verbs from it and compares them with the component's Role.
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                          "omitStages": ["RequestReceived"], "rules": [
                                              {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                                              {"level": "None"}]}))
        self._run("kube-apiserver", [
            str(bin_dir / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{etcd_client}",
            "--bind-address", api_ip, "--advertise-address", api_ip, "--secure-port", str(port),
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--api-audiences", "https://kubernetes.default.svc.cluster.local",
            "--authorization-mode", "RBAC",
            "--enable-admission-plugins",
            "NamespaceLifecycle,ServiceAccount,DefaultStorageClass,MutatingAdmissionWebhook,"
            "ValidatingAdmissionWebhook,ResourceQuota",
            "--service-cluster-ip-range", "10.96.0.0/16", "--allow-privileged=true",
            # There is no kube-proxy here (no ClusterIP routing): the API server calls a webhook's
            # `service` (and an aggregated API's) at a ready endpoint of that Service, from its
            # EndpointSlices, as clusters without kube-proxy on the control plane configure it.
            "--enable-aggregator-routing=true",
            "--audit-policy-file", str(policy), "--audit-log-path", str(self.audit_log),
            "--audit-log-format", "json", "--audit-log-mode", "blocking",
            "--cert-dir", str(self.workdir / "apiserver-certs"), "--v", "1"])
        self._wait_ready(timeout_s, t0)
        self.startup_s["apiserver_ready"] = time.monotonic() - t0

        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(_kubeconfig(self.server, pki)))
        self.kubeconfig.chmod(0o600)
        kc = str(self.kubeconfig)
        self._run("kube-controller-manager", [
            str(bin_dir / "kube-controller-manager"), "--kubeconfig", kc,
            "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
            "--leader-elect=false", "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(pki / "sa.key"), "--root-ca-file", str(pki / "ca.crt"),
            "--cluster-signing-cert-file", str(pki / "ca.crt"), "--cluster-signing-key-file", str(pki / "ca.key"),
            "--node-monitor-period", NODE_MONITOR_PERIOD, "--node-monitor-grace-period", NODE_MONITOR_GRACE_PERIOD,
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
            "--cert-dir", str(self.workdir / "kcm-certs"), "--v", "1"])
        self._run("kube-scheduler", [
            str(bin_dir / "kube-scheduler"), "--kubeconfig", kc,
            "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
            "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
            "--cert-dir", str(self.workdir / "scheduler-certs"), "--v", "1"])

        self._install_crds(timeout_s, t0)
        self.startup_s["crds_established"] = time.monotonic() - t0
        self._wait_default_service_account(timeout_s, t0)
        self.startup_s["total"] = time.monotonic() - t0

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _wait_ready(self, timeout_s: float, t0: float) -> None:
        ctx = self._ssl()
        last = ""
        while time.monotonic() - t0 < timeout_s:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready after {timeout_s} s ({last}); logs in {self.logs}")

    def api_client(self) -> Any:
        """An official `kubernetes` client for this cluster, as the admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def service_account_token(self, namespace: str, service_account: str, expiration_s: int = 3600) -> str:
        """A token for the ServiceAccount, requested by the admin (TokenRequest, as the kubelet does for a pod)."""
        from kubernetes import client

        return str(client.CoreV1Api(self.api_client()).create_namespaced_service_account_token(
            service_account, namespace, {"spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"],
                                                  "expirationSeconds": expiration_s}}).status.token)

    def api_client_as(self, namespace: str, service_account: str, expiration_s: int = 3600) -> Any:
        """An official `kubernetes` client that acts as a ServiceAccount."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.pki / "ca.crt")
        cfg.api_key = {"authorization": f"Bearer {self.service_account_token(namespace, service_account, expiration_s)}"}
        return client.ApiClient(cfg)

    def kubeconfig_as(self, namespace: str, service_account: str, path: Path) -> Path:
        """A kubeconfig file (mode 0600) that authenticates as the ServiceAccount, for a process."""
        token = self.service_account_token(namespace, service_account)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "test", "cluster": {"server": self.server,
                                                      "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "test", "user": service_account}}]}))
        path.chmod(0o600)
        return path

    def _install_crds(self, timeout_s: float, t0: float) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        ext = client.ApiextensionsV1Api(self.api_client())
        names = []
        for f in sorted([*KNATIVE_CRDS.glob("*.yaml"), *PROJECT_CRDS.glob("*.yaml")]):
            for doc in yaml.safe_load_all(f.read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                try:
                    ext.create_custom_resource_definition(doc)
                except ApiException as e:
                    if e.status != 409:
                        raise RuntimeError(f"{f}: the API server refused CRD {doc['metadata']['name']}: "
                                           f"{e.body}") from e
                names.append(doc["metadata"]["name"])
        pending = set(names)
        while pending and time.monotonic() - t0 < timeout_s:
            for n in list(pending):
                conds = ext.read_custom_resource_definition(n).status.conditions or []
                if any(c.type == "Established" and c.status == "True" for c in conds):
                    pending.discard(n)
            time.sleep(0.1)
        if pending:
            raise TimeoutError(f"CRDs not Established after {timeout_s} s: {sorted(pending)}")
        self.crds = names

    def _wait_default_service_account(self, timeout_s: float, t0: float) -> None:
        """The controller manager is serving once it has made the default ServiceAccount."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self.api_client())
        while time.monotonic() - t0 < timeout_s:
            self._check_alive()
            with contextlib.suppress(ApiException):
                core.read_namespaced_service_account("default", "default")
                return
            time.sleep(0.2)
        raise TimeoutError(f"kube-controller-manager made no default ServiceAccount in {timeout_s} s")

    def down(self) -> None:
        # Reverse order: the clients of the API server first, etcd last.
        for name in reversed(list(self._procs)):
            stop(self._procs[name].pid, grace_s=5.0)
            with contextlib.suppress(Exception):
                self._procs[name].wait(timeout=1)
        self._procs.clear()
        if self.network is not None:
            self.network.destroy()
            self.network = None
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- by hand --------------------------------------------------------------------------------


def _serve(workdir: Path) -> int:
    """Hold a cluster until SIGTERM or SIGINT; write its kubeconfig path to workdir/READY."""
    cluster = KubeCluster.up(workdir / "cluster")
    (workdir / "READY").write_text(str(cluster.kubeconfig))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    try:
        while not stopping:
            time.sleep(0.2)
    finally:
        cluster.down()
        for f in ("READY", "supervisor.pid"):
            (workdir / f).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testkit.kube.cluster", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["up", "down", "serve"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state folder (default {DEFAULT_DIR})")
    args = ap.parse_args(argv)
    d: Path = args.dir.resolve()
    pidfile = d / "supervisor.pid"
    if args.action == "serve":
        return _serve(d)
    if args.action == "down":
        if not pidfile.exists():
            print(f"no cluster is up in {d}")
            return 0
        pid = int(pidfile.read_text())
        stop(pid, grace_s=30.0, group=False)
        shutil.rmtree(d, ignore_errors=True)
        print(f"stopped the cluster in {d}")
        return 0
    if pidfile.exists():
        print(f"a cluster is already up in {d}: kubeconfig {(d / 'READY').read_text()}", file=sys.stderr)
        return 1
    d.mkdir(parents=True, exist_ok=True)
    log = d / "supervisor.log"
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "testkit.kube.cluster", "serve", "--dir", str(d)],
                             cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    pidfile.write_text(str(p.pid))
    t0 = time.monotonic()
    while not (d / "READY").exists():
        if p.poll() is not None:
            pidfile.unlink(missing_ok=True)
            print(log.read_text()[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"up in {time.monotonic() - t0:.1f} s; kubeconfig: {(d / 'READY').read_text()}")
    print(f"  KUBECONFIG={(d / 'READY').read_text()} .kube-bins/kubectl get nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
