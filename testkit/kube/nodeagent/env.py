"""A container's command line and environment: Kubernetes' `$(VAR)` expansion, Docker's
ENTRYPOINT/CMD rules, and env/envFrom with the downward API, ConfigMaps and Secrets (pure)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_CEILING

from testkit.kube.nodeagent.spec import ImageConfig, ImageError, Json, map_python


def expand(text: str, *mappings: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (third_party/forked/golang/expansion).

    `$(NAME)` becomes the first mapping's value for NAME, or stays as written when no mapping
    has it; `$$` is a literal `$` (so `$$(NAME)` is the text `$(NAME)`); an unclosed `$(` stays.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "$" or i + 1 == n:
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:
                out.append("$(")
                i += 2
                continue
            name = text[i + 2:close]
            for m in mappings:
                if name in m:
                    out.append(m[name])
                    break
            else:
                out.append(f"$({name})")
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def container_argv(image: ImageConfig, command: Sequence[str] | None, args: Sequence[str] | None,
                   env: Mapping[str, str], python: str = sys.executable) -> list[str]:
    """The process argv for a container: Docker's rules for command/args, `$(VAR)` expanded."""
    cmd = [expand(s, env) for s in command or ()]
    arg = [expand(s, env) for s in args or ()]
    if cmd:
        argv = cmd + arg
    elif arg:
        argv = list(image.entrypoint) + arg
    else:
        argv = list(image.entrypoint) + list(image.cmd)
    if not argv:
        raise ImageError("no command: the image has no entrypoint and the container gives none")
    argv[0] = map_python(argv[0], python)
    return argv


class ConfigError(Exception):
    """The container's config refers to something missing (kubelet's CreateContainerConfigError)."""


def _label_path(path: str, prefix: str) -> str | None:
    m = re.fullmatch(re.escape(prefix) + r"\['(.*)'\]", path)
    return m.group(1) if m else None


def field_ref(pod: Json, path: str, pod_ip: str, host_ip: str) -> str:
    """The value of a downward-API fieldRef on this pod."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip, "status.podIPs": pod_ip, "status.hostIP": host_ip, "status.hostIPs": host_ip,
    }
    if path in simple:
        return simple[path]
    for kind in ("labels", "annotations"):
        key = _label_path(path, f"metadata.{kind}")
        if key is not None:
            return (meta.get(kind) or {}).get(key, "")
        if path == f"metadata.{kind}":
            return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get(kind) or {}).items()))
    raise ConfigError(f"unsupported fieldRef fieldPath {path!r}")


def resource_ref(container: Json, ref: Json, node_allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef (limits.cpu, requests.memory, ...): kubelet rounds up by the divisor."""
    from kubernetes.utils import parse_quantity

    res = ref.get("resource", "")
    kind, _, name = res.partition(".")
    if kind not in ("limits", "requests") or not name:
        raise ConfigError(f"unsupported resourceFieldRef resource {res!r}")
    value = (container.get("resources") or {}).get(kind, {}).get(name)
    if value is None:  # an unset limit is the node's allocatable; an unset request is 0
        value = node_allocatable.get(name, "0") if kind == "limits" else "0"
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    q = parse_quantity(str(value)) / divisor
    return str(int(q.to_integral_value(rounding=ROUND_CEILING)))


Lookup = Callable[[str, str], "Mapping[str, str] | None"]  # (kind, name) -> data or None when missing


def build_env(container: Json, pod: Json, *, pod_ip: str, host_ip: str, base: Mapping[str, str],
              lookup: Lookup, node_allocatable: Mapping[str, str] = {}) -> dict[str, str]:
    """The container's environment: base, then envFrom, then env (each value `$(VAR)`-expanded)."""
    own: dict[str, str] = {}
    for src in container.get("envFrom") or ():
        prefix = src.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key in src:
                ref = src[key]
                data = lookup(kind, ref["name"])
                if data is None:
                    if not ref.get("optional"):
                        raise ConfigError(f'{kind} "{ref["name"]}" not found')
                    continue
                own.update({prefix + k: v for k, v in data.items()})
    for e in container.get("env") or ():
        name = e["name"]
        if "valueFrom" not in e:
            own[name] = expand(e.get("value", ""), own, base)
            continue
        vf = e["valueFrom"]
        if "fieldRef" in vf:
            own[name] = field_ref(pod, vf["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "resourceFieldRef" in vf:
            own[name] = resource_ref(container, vf["resourceFieldRef"], node_allocatable)
        else:
            ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef") or {}
            kind = "configmap" if "configMapKeyRef" in vf else "secret" if "secretKeyRef" in vf else ""
            if not kind:
                raise ConfigError(f"env {name}: unsupported valueFrom {sorted(vf)}")
            data = lookup(kind, ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                what = f'{kind} "{ref["name"]}"' if data is None else f'key "{ref["key"]}" in {kind} "{ref["name"]}"'
                raise ConfigError(f"env {name}: {what} not found")
            own[name] = data[ref["key"]]
    return {**base, **own}
