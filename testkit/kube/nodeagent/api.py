"""The API server, through the official `kubernetes` client, raw JSON in and out."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testkit.kube.nodeagent.env import Lookup
from testkit.kube.nodeagent.spec import Json


class Api:
    """The official `kubernetes` client, raw JSON in and out (no model round trips)."""

    MERGE = "application/merge-patch+json"

    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg, persist_config=False)
        cfg.connection_pool_maxsize = 64
        self.cfg = cfg
        self.client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.client)
        self.coord = client.CoordinationV1Api(self.client)
        self.version = client.VersionApi(self.client)

    @staticmethod
    def status_of(e: BaseException) -> int | None:
        from kubernetes.client.rest import ApiException

        return e.status if isinstance(e, ApiException) else None

    @staticmethod
    def data(resp: Any) -> Json:
        return json.loads(resp.data)

    def server_host_port(self) -> tuple[str, str]:
        from urllib.parse import urlsplit

        u = urlsplit(self.cfg.host)
        return u.hostname or "127.0.0.1", str(u.port or 443)

    def lookup(self, namespace: str) -> Lookup:
        """(kind, name) -> the ConfigMap's or Secret's data as text, None when it does not exist."""
        def get(kind: str, name: str) -> Mapping[str, str] | None:
            data = self.lookup_bytes(namespace, kind, name)
            return None if data is None else {k: v.decode("utf-8", "surrogateescape") for k, v in data.items()}
        return get

    def lookup_bytes(self, namespace: str, kind: str, name: str) -> dict[str, bytes] | None:
        read = self.core.read_namespaced_config_map if kind == "configmap" else self.core.read_namespaced_secret
        try:
            obj = self.data(read(name, namespace, _preload_content=False, _request_timeout=10))
        except Exception as e:
            if self.status_of(e) == 404:
                return None
            raise
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out
