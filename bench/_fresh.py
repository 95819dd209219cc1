"""A Knative-default instance on the local machine, shared by bench/coldstart.py (one cold start
at a time) and bench/replay.py (the knative-default and kserve-localcache profiles of a trace).

What Knative does on a cold start without any ServerlessLLM part, as processes: the activator
holds the request; a pod is scheduled on some node; its container starts a fresh
`python -m functions.llm --model <plain Hugging Face dir>` (no zygote: it pays interpreter and
torch imports; no tiers: transformers `from_pretrained` reads model.safetensors from the
directory, whose page cache the caller drops first when the read must come from disk); when its
/health/ready answers, the endpoint is pushed to the activator, which forwards the held request.

Not modelled, all in the instance's favour: Kubernetes scheduling, image pull, and a network
between the store and the node (the directory is read at local disk speed).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench._common import evict, resident_fraction
from sllm_knative.api import activator as activator_api


def drop_page_cache(directory: Path) -> float:
    """posix_fadvise(DONTNEED) every file of `directory`; the largest resident fraction left."""
    files = [f for f in directory.iterdir() if f.is_file()]
    for f in files:
        evict(f)
    return max((resident_fraction(f) for f in files), default=0.0)


@dataclass
class FreshInstance:
    """One fresh function process serving `hf_dir` as `service` on loopback."""

    id: str
    node: str
    port: int
    proc: subprocess.Popen[bytes]
    started: float  # wall clock (time.time()) at spawn
    ready_at: float | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self) -> dict[str, str]:
        return {"id": self.id, "url": self.url, "node": self.node}

    def wait_ready(self, http: httpx.Client, timeout: float = 300.0, every: float = 0.02) -> dict[str, Any]:
        """Poll /health/ready until it answers 200; its JSON (the startup report) is returned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fresh instance {self.id} exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                r = http.get(f"{self.url}/health/ready", timeout=2)
                if r.status_code == 200:
                    self.report = r.json()
                    self.ready_at = time.time()
                    return self.report
            time.sleep(every)
        raise TimeoutError(f"fresh instance {self.id} not ready within {timeout:.0f}s")

    def stop(self, grace_s: float = 10.0) -> None:
        from sllm_knative.local import procs

        procs.stop(self.proc.pid, grace_s=grace_s)


def spawn(hf_dir: Path, service: str, instance_id: str, node: str, log: Path, max_concurrency: int = 1,
          env: dict[str, str] | None = None, device: str = "cpu") -> FreshInstance:
    """Start `python -m functions.llm --device DEVICE` on free loopback ports (its own process group). It gets
    PR_SET_PDEATHSIG (sllm_knative.local.procs), which Linux sends when the *thread* that
    spawned it exits: call this from a thread that outlives the instance."""
    from sllm_knative.local import procs
    from sllm_knative.ports import free_port

    port, internal = free_port(), free_port()
    argv = [sys.executable, "-m", "functions.llm", "--model", str(hf_dir), "--served-model-name", service,
            "--device", device, "--host", "127.0.0.1", "--port", str(port), "--internal-host", "127.0.0.1",
            "--internal-port", str(internal), "--max-concurrency", str(max_concurrency)]
    started = time.time()
    proc = procs.spawn(argv, log, env={"SLLM_INSTANCE": instance_id, "SLLM_NODE": node, **(env or {})})
    return FreshInstance(instance_id, node, port, proc, started)


def set_endpoints(http: httpx.Client, admin: str, namespace: str, service: str,
                  instances: list[dict[str, str]], container_concurrency: int = 1,
                  hold_timeout_s: float | None = None) -> None:
    """Register `service` on the activator's admin API with exactly these instances (none: the
    activator holds its requests, for `hold_timeout_s` at most; None: the activator's default)."""
    url = f"{admin}{activator_api.SERVICES}/{namespace}/{service}"
    body: dict[str, Any] = {"container_concurrency": container_concurrency, "instances": instances}
    if hold_timeout_s is not None:
        body["hold_timeout_s"] = hold_timeout_s
    http.put(url, json=body).raise_for_status()


def held(http: httpx.Client, admin: str) -> dict[str, tuple[int, int]]:
    """service name -> (requests the activator holds, requests in flight), for the services
    registered through `set_endpoints`."""
    stats = http.get(f"{admin}{activator_api.STATS}").json()["services"]
    return {s["name"]: (int(s["held"]), int(s["in_flight"])) for s in stats}
