"""A pre-imported instance runtime: `python -m sllm_knative.local.zygote SOCKET`.

It imports torch, transformers, the loader and the inference function once, then listens on
a Unix socket. Each request (one JSON line: argv, env, log file, and optionally a lease)
forks a child that runs `functions.llm.main(argv)` with everything already imported, so an
instance's cold start pays neither Python's nor torch's import time. The zygote never runs a
torch operation (threads created before fork would not survive it); children die with it.

With `lease: {loader, model}`, the child first takes a lease on the checkpoint from the
node's loader sidecar (held until the instance exits: the gRPC stream closes with the
process), waits until the DRAM-tier copy is complete and verified, and serves the leased
directory (`--model DIR`); on the CPU the instance then maps those tmpfs files without a
copy. The lease's timing goes to `timing` (JSON) for the autoscaler's cold-start breakdown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sllm_knative import atomic


def _preimport() -> float:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import functions.llm.__main__  # noqa: F401
    import functions.llm.app  # noqa: F401
    import functions.llm.server  # noqa: F401
    import functions.llm.service  # noqa: F401
    import sllm_knative.loading  # noqa: F401
    from loader_sidecar import client  # noqa: F401
    return time.perf_counter() - t0


def _reap(signum: int, frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(req: dict, conn: socket.socket, server: socket.socket) -> None:
    from functions.llm.__main__ import main
    from sllm_knative.local.procs import die_with_parent

    server.close()
    conn.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(req.get("env", {}))
    code = 1
    try:
        argv = list(req["argv"])
        lease, follow = None, None
        if req.get("lease"):
            # A GPU instance copies to its device right behind the fill; on the CPU the DRAM-tier
            # files are mapped, which needs them whole.
            behind = str(req["lease"].get("device", "cpu")).startswith("cuda")
            lease = _take_lease(req["lease"], req.get("timing"), wait=not behind)
            argv += ["--model", lease.directory]
            follow = lease.wait if behind else None
        code = main(argv, follow)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _take_lease(spec: dict, timing_path: str | None, wait: bool = True) -> Any:
    """The lease on the checkpoint; with wait, once its DRAM-tier copy is complete. Without, the
    timing is written when the fill completes, from a thread, while the instance loads."""
    from loader_sidecar.client import LoaderClient

    t0 = time.time()
    client = LoaderClient(spec["loader"])
    lease = client.acquire(spec["model"], device=spec.get("device", "cpu"), instance=spec.get("instance", ""))
    granted = time.time()

    def record() -> None:
        lease.wait_complete()
        done = time.time()
        if timing_path:
            atomic.write_json(Path(timing_path), {
                "lease_requested": t0, "lease_granted": granted, "lease_complete": done,
                "source": lease.source, "bytes": lease.total_bytes, "followed": not wait}, durable=False)
        print(f"lease {lease.id}: {lease.model} from {lease.source}, {lease.total_bytes} bytes, "
              f"{done - t0:.3f}s", flush=True)

    if wait:
        record()
    else:
        threading.Thread(target=record, name="lease-timing", daemon=True).start()
    return lease


def serve(path: str) -> None:
    from sllm_knative.local.procs import die_with_parent

    die_with_parent()
    seconds = _preimport()
    signal.signal(signal.SIGCHLD, _reap)
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print(f"zygote ready on {path} (imports {seconds:.2f}s)", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except InterruptedError:
            continue
        with conn:
            try:
                req = json.loads(conn.makefile("r").readline())
                if not isinstance(req.get("argv"), list) or not isinstance(req.get("log"), str):
                    raise ValueError("request needs argv (list) and log (path)")
            except ValueError as exc:
                conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
                continue
            pid = os.fork()
            if pid == 0:
                _child(req, conn, server)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def spawn_via(path: str, argv: list[str], log: str, env: dict[str, str] | None = None,
              lease: dict[str, str] | None = None, timing: str | None = None, timeout: float = 10.0) -> int:
    """Ask the zygote at `path` for a new instance; returns its pid."""
    req = {"argv": argv, "log": log, "env": env or {}, "lease": lease, "timing": timing}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        reply = json.loads(s.makefile("r").readline())
    if "error" in reply:
        raise RuntimeError(f"zygote {path}: {reply['error']}")
    return int(reply["pid"])


if __name__ == "__main__":
    serve(sys.argv[1])
