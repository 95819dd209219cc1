"""A pod's volumes, and each container's mounts as symlinks under its SLLM_MOUNT_ROOT.

Volume kinds: emptyDir (`medium: Memory` under /dev/shm), hostPath (a per-node folder),
configMap, secret, downwardAPI and projected (serviceAccountToken through the TokenRequest API,
bound to the pod; configMap; secret; downwardAPI). `PodVolumes.setup` runs again every
`volume_resync_s`: contents are rewritten when they changed, tokens at 80 % of their lifetime.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from testkit.kube.nodeagent.api import Api
from testkit.kube.nodeagent.env import ConfigError, expand, field_ref, resource_ref
from testkit.kube.nodeagent.spec import Json

Files = dict[str, tuple[bytes, int]]  # relative path -> (content, mode)


class VolumeError(Exception):
    """A volume cannot be set up yet (kubelet's FailedMount): containers stay ContainerCreating."""


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _key_files(data: Mapping[str, bytes], items: Sequence[Json] | None, default_mode: int, what: str) -> Files:
    if not items:
        return {k: (v, default_mode) for k, v in data.items()}
    out = {}
    for it in items:
        if it["key"] not in data:
            raise VolumeError(f'{what}: key "{it["key"]}" not found')
        out[it["path"]] = (data[it["key"]], int(it.get("mode", default_mode)))
    return out


def _write_files(vdir: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    vdir.mkdir(parents=True, exist_ok=True)
    for rel, (data, mode) in files.items():
        _write_atomic(vdir / rel, data, mode)


class PodVolumes:
    """The volumes of one pod: folders under `<pod dir>/volumes` (emptyDir Memory: under `shm`),
    hostPath under the node's `hostpath_root`, and each container's `<pod dir>/rootfs/<name>`."""

    def __init__(self, api: Api, pod_dir: Path, shm: Path, hostpath_root: Path, node_ip: str,
                 allocatable: Mapping[str, str]) -> None:
        self.api, self.dir, self.shm = api, pod_dir, shm
        self.hostpath_root, self.node_ip, self.allocatable = hostpath_root, node_ip, allocatable
        self.volumes: dict[str, Path] = {}
        self._tokens: dict[str, tuple[float, float]] = {}  # file -> (fetched_at, lifetime)

    def setup(self, pod: Json, pod_ip: str, containers: Sequence[Json]) -> None:
        """Create or refresh every volume of the pod; VolumeError when one cannot be made yet."""
        ns = pod["metadata"]["namespace"]
        for vol in pod["spec"].get("volumes") or ():
            name = vol["name"]
            vdir = self.dir / "volumes" / name
            if "emptyDir" in vol:
                if (vol["emptyDir"] or {}).get("medium") == "Memory":
                    vdir = self.shm / name
                vdir.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                vdir = self._host_path(vol["hostPath"])
            elif "configMap" in vol or "secret" in vol:
                kind = "configmap" if "configMap" in vol else "secret"
                src = vol["configMap"] if kind == "configmap" else vol["secret"]
                ref = src.get("name") or src.get("secretName")
                data = self.api.lookup_bytes(ns, kind, ref)
                files: Files = {}
                if data is None:
                    if not src.get("optional"):
                        raise VolumeError(f'{kind} "{ref}" not found')
                else:
                    files = _key_files(data, src.get("items"), int(src.get("defaultMode", 0o644)), f'{kind} "{ref}"')
                _write_files(vdir, files)
            elif "downwardAPI" in vol:
                _write_files(vdir, self._downward_files(pod, pod_ip, containers, vol["downwardAPI"].get("items") or (),
                                                        int(vol["downwardAPI"].get("defaultMode", 0o644))))
            elif "projected" in vol:
                _write_files(vdir, self._projected_files(pod, pod_ip, containers, vdir, vol["projected"]))
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise VolumeError(f"volume {name}: kind {kinds} is not supported by the node agent")
            self.volumes[name] = vdir

    def _host_path(self, hp: Json) -> Path:
        vdir = self.hostpath_root / hp["path"].lstrip("/")
        kind = hp.get("type") or ""
        if kind in ("", "DirectoryOrCreate"):
            vdir.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate":
            vdir.parent.mkdir(parents=True, exist_ok=True)
            vdir.touch(exist_ok=True)
        elif not vdir.exists():
            raise VolumeError(f'hostPath type check failed: {hp["path"]} is not a {kind}')
        return vdir

    def _downward_files(self, pod: Json, pod_ip: str, containers: Sequence[Json], items: Sequence[Json],
                        default_mode: int) -> Files:
        out = {}
        for it in items:
            if "fieldRef" in it:
                v = field_ref(pod, it["fieldRef"]["fieldPath"], pod_ip, self.node_ip)
            else:
                c = next((c for c in containers if c["name"] == it["resourceFieldRef"].get("containerName")), {})
                v = resource_ref(c, it["resourceFieldRef"], self.allocatable)
            out[it["path"]] = (v.encode(), int(it.get("mode", default_mode)))
        return out

    def _projected_files(self, pod: Json, pod_ip: str, containers: Sequence[Json], vdir: Path, proj: Json) -> Files:
        mode = int(proj.get("defaultMode", 0o644))
        ns = pod["metadata"]["namespace"]
        out: Files = {}
        for src in proj.get("sources") or ():
            if "serviceAccountToken" in src:
                sat = src["serviceAccountToken"]
                path = sat["path"]
                fetched, life = self._tokens.get(str(vdir / path), (0.0, 0.0))
                if time.monotonic() - fetched < 0.8 * life and (vdir / path).exists():
                    out[path] = ((vdir / path).read_bytes(), 0o600 if mode == 0o644 else mode)
                    continue
                token, life = self._request_token(pod, sat)
                self._tokens[str(vdir / path)] = (time.monotonic(), life)
                out[path] = (token.encode(), 0o600 if mode == 0o644 else mode)
            elif "configMap" in src or "secret" in src:
                kind = "configmap" if "configMap" in src else "secret"
                s = src["configMap"] if kind == "configmap" else src["secret"]
                data = self.api.lookup_bytes(ns, kind, s["name"])
                if data is None:
                    if s.get("optional"):
                        continue
                    raise VolumeError(f'{kind} "{s["name"]}" not found')
                out.update(_key_files(data, s.get("items"), mode, f'{kind} "{s["name"]}"'))
            elif "downwardAPI" in src:
                out.update(self._downward_files(pod, pod_ip, containers, src["downwardAPI"].get("items") or (), mode))
            else:
                raise VolumeError(f"projected source {sorted(src)} is not supported by the node agent")
        return out

    def _request_token(self, pod: Json, sat: Json) -> tuple[str, float]:
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [sat["audience"]] if sat.get("audience") else [],
                         "expirationSeconds": int(sat.get("expirationSeconds", 3607)),
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                            "uid": meta["uid"]}}}
        try:
            resp = self.api.core.create_namespaced_service_account_token(
                sa, meta["namespace"], body, _preload_content=False, _request_timeout=10)
        except Exception as e:
            raise VolumeError(f'token for service account "{sa}": {str(e)[:300]}') from e
        st = Api.data(resp)["status"]
        return st["token"], float(sat.get("expirationSeconds", 3607))

    def mount_root(self, container: Json, env: Mapping[str, str]) -> Path:
        """The container's SLLM_MOUNT_ROOT: a symlink at each mountPath to its volume."""
        root = self.dir / "rootfs" / container["name"]
        root.mkdir(parents=True, exist_ok=True)
        for m in sorted(container.get("volumeMounts") or (), key=lambda m: len(m["mountPath"])):
            if m["name"] not in self.volumes:
                raise ConfigError(f'volumeMount "{m["name"]}": no volume of that name')
            target = self.volumes[m["name"]]
            sub = m.get("subPath") or (expand(m["subPathExpr"], env) if m.get("subPathExpr") else "")
            if sub:
                target = target / sub
                if not target.exists():
                    target.mkdir(parents=True, exist_ok=True)
            link = root / m["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if link.is_symlink() and os.readlink(link) == str(target):
                    continue
                if link.is_dir() and not link.is_symlink():
                    shutil.rmtree(link)
                else:
                    link.unlink()
            link.symlink_to(target)
        return root

    def cleanup(self) -> None:
        """Remove the volumes and mounts (the pod's logs stay)."""
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        shutil.rmtree(self.dir / "rootfs", ignore_errors=True)
