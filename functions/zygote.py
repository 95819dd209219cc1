"""A pre-imported instance runtime: `python -m functions.zygote SOCKET` (local mode, one per node).

It imports torch, transformers, the loader client and the inference function once, then listens
on a Unix socket. Each request (the wire format is sllm_knative/local/zygote.py: argv, env, log
file) forks a child that runs `functions.llm.__main__.main(argv)` with everything already
imported, so an instance's cold start pays neither Python's nor torch's import time.

The zygote only pre-imports and forks. The instance does the rest itself, as it would in a
Kubernetes pod: given `--checkpoint URI --loader ADDRESS` it takes its lease on the checkpoint
from the node's loader sidecar, loads it following the fill's watermark and serves
(functions/llm/weights.py); its lease timing goes to `--lease-timing`. The zygote never runs a
torch operation and never opens a gRPC channel (threads created before fork would not survive
it); children die with it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from sllm_knative.local.procs import die_with_parent
from sllm_knative.local.zygote import SpawnRequest, reply


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
    import functions.llm.weights  # noqa: F401
    import sllm_knative.loading  # noqa: F401
    from sllm_knative.loader import client  # noqa: F401  (grpc: the instance's lease)
    return time.perf_counter() - t0


def _reap(signum: int, frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(req: SpawnRequest, conn: socket.socket, server: socket.socket) -> None:
    from functions.llm.__main__ import main

    server.close()
    conn.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    code = 1
    try:
        fd = os.open(req.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.update(req.env)
        code = main(list(req.argv))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    die_with_parent()
    seconds = _preimport()
    signal.signal(signal.SIGCHLD, _reap)
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)  # it forks instances on request: its owner's only
    server.listen(64)
    print(f"zygote ready on {path} (imports {seconds:.2f}s)", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except InterruptedError:
            continue
        with conn:
            try:
                req = SpawnRequest.decode(conn.makefile("r").readline())
            except ValueError as exc:  # json.JSONDecodeError is one
                conn.sendall(reply(error=str(exc)))
                continue
            pid = os.fork()
            if pid == 0:
                _child(req, conn, server)
            conn.sendall(reply(pid))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m functions.zygote SOCKET", file=sys.stderr)
        return 2
    serve(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
