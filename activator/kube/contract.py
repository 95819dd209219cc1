"""Knative's activator contract, as constants and pure functions, each from the knative/serving
(or knative/networking) source that defines it:

- Ports: `pkg/networking/constants.go` (BackendHTTPPort 8012, BackendHTTP2Port 8013); the
  activator serves both (`cmd/activator/main.go`: the "http1" and "h2c" servers).
- Probes, outermost first (`cmd/activator/main.go` builds the chain):
  1. kubelet probes (`User-Agent: kube-probe/...` or a `K-Kubelet-Probe` header) are answered by
     the health check (`pkg/activator/handler/healthz_handler.go`; networking
     `pkg/http/header/header.go: IsKubeletProbe`);
  2. `K-Network-Probe: probe` with a `K-Network-Hash` -> 200 echoing the hash, without one -> 400
     (networking `pkg/http/probe/handler.go`); any other request loses its `K-Network-Hash`;
  3. any other non-empty `K-Network-Probe`: `activator` -> 200 with the body `activator`, anything
     else -> 400 `unexpected probe header value: "<value>"`
     (`pkg/activator/handler/probe_handler.go`).
- The revision (`pkg/activator/handler/context_handler.go`): the `Knative-Serving-Revision` and
  `Knative-Serving-Namespace` headers, else a Host `<revision>.<namespace>.svc.<cluster domain>`;
  one the Revision informer does not know is a 404.
- The forwarded request (`pkg/activator/handler/handler.go: proxyRequest`): networking's
  `RewriteHostIn` (the Host into `K-Original-Host`, unless that is already set),
  `K-Proxy-Request: activator`, and the revision headers removed (`pkg/http/proxy.go:
  NewHeaderPruningReverseProxy` with `activator.RevisionHeaders`, `pkg/activator/activator.go`).
- The revision's pods: the private Service `<revision>-private` of its ServerlessService, labelled
  `networking.internal.knative.dev/serviceType: Private` and with the revision's labels
  (`pkg/reconciler/serverlessservice/resources/services.go: MakePrivateService`); the port that
  carries requests is the one named `http` (http1) or `http2` (h2c)
  (`pkg/activator/net/revision_backends.go: endpointsToDests`, networking
  `pkg/apis/networking/ports.go: ServicePortName`).
"""

from __future__ import annotations

from collections.abc import Iterable

from sllm_knative.api.keys import ServiceKey

NAME = "activator"  # pkg/activator/activator.go: Name
HTTP1_PORT = 8012  # pkg/networking/constants.go: BackendHTTPPort
H2C_PORT = 8013  # BackendHTTP2Port
CLUSTER_DOMAIN = "cluster.local"  # knative.dev/pkg/network: the default cluster domain
# cmd/activator/main.go: "ws://" + GetServiceHostname("autoscaler", system.Namespace()) + ":8080"
KNATIVE_AUTOSCALER_URL = f"ws://autoscaler.knative-serving.svc.{CLUSTER_DOMAIN}:8080"

REVISION_HEADER = b"knative-serving-revision"
NAMESPACE_HEADER = b"knative-serving-namespace"
PROBE_HEADER = b"k-network-probe"
HASH_HEADER = b"k-network-hash"
KUBELET_PROBE_HEADER = b"k-kubelet-probe"
ORIGINAL_HOST_HEADER = b"k-original-host"
PROXY_HEADER = b"k-proxy-request"
NETWORK_PROBE_VALUE = b"probe"  # networking pkg/http/header: ProbeValue
KUBE_PROBE_UA_PREFIX = b"kube-probe/"

# Labels and annotations (pkg/apis/serving/register.go, pkg/networking/constants.go,
# pkg/apis/autoscaling/register.go).
REVISION_LABEL = "serving.knative.dev/revision"
SERVICE_TYPE_LABEL = "networking.internal.knative.dev/serviceType"
PRIVATE = "Private"
CLASS_ANNOTATION = "autoscaling.knative.dev/class"
# What the activator watches: the revisions' private Services' EndpointSlices (the EndpointSlice
# controller copies a Service's labels onto its slices).
PRIVATE_SLICES_SELECTOR = f"{SERVICE_TYPE_LABEL}={PRIVATE},{REVISION_LABEL}"

Headers = list[tuple[bytes, bytes]]


def private_service(revision: str) -> str:
    """pkg/reconciler/serverlessservice/resources/names: PrivateService."""
    return f"{revision}-private"


def port_name(protocol: str) -> str:
    """The private Service's port that carries requests for this protocol type (`http1`, `h2c`)."""
    return "http2" if protocol == "h2c" else "http"


def _get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def is_kubelet_probe(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    ua = _get(headers, b"user-agent") or b""
    return ua.startswith(KUBE_PROBE_UA_PREFIX) or bool(_get(headers, KUBELET_PROBE_HEADER))


def probe_answer(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, Headers, bytes] | None:
    """The answer to a Knative network probe or a kubelet probe, or None for any other request."""
    headers = list(headers)
    if is_kubelet_probe(headers):
        return 200, [], b""
    value = _get(headers, PROBE_HEADER)
    if not value:
        return None
    if value == NETWORK_PROBE_VALUE:
        digest = _get(headers, HASH_HEADER)
        if not digest:
            return 400, [], b'a probe request must contain a non-empty "K-Network-Hash" header\n'
        return 200, [(HASH_HEADER, digest)], b""
    if value != NAME.encode():
        shown = value.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')
        return 400, [], f'unexpected probe header value: "{shown}"\n'.encode("latin-1", "replace")
    return 200, [], NAME.encode()


def revision_from(headers: Iterable[tuple[bytes, bytes]], host: str | None,
                  cluster_domain: str = CLUSTER_DOMAIN) -> ServiceKey | None:
    """The revision a request names: the two headers, else a cluster-local Host."""
    headers = list(headers)
    name = (_get(headers, REVISION_HEADER) or b"").decode("latin-1")
    namespace = (_get(headers, NAMESPACE_HEADER) or b"").decode("latin-1")
    if not (name and namespace):
        parts = (host or "").split(".", 3)
        if len(parts) == 4 and parts[2] == "svc" and parts[3].split(":", 1)[0] == cluster_domain:
            name, namespace = parts[0], parts[1]
    if not (name and namespace):
        return None
    return ServiceKey(namespace, name)


def rewrite(forward: Iterable[tuple[bytes, bytes]], host: str | None) -> Headers:
    """The headers the pod gets: the revision headers and `K-Network-Hash` removed, the Host kept
    in `K-Original-Host` (an existing one wins), `K-Proxy-Request: activator`."""
    out = [(n, v) for n, v in forward
           if n not in (REVISION_HEADER, NAMESPACE_HEADER, HASH_HEADER, PROXY_HEADER)]
    if not _get(out, ORIGINAL_HOST_HEADER):  # Go's Header.Get: absent and empty are alike
        out = [(n, v) for n, v in out if n != ORIGINAL_HOST_HEADER]
        out.append((ORIGINAL_HOST_HEADER, (host or "").encode("latin-1")))
    out.append((PROXY_HEADER, NAME.encode()))
    return out
