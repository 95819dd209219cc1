"""`sllm-knative up`: a local cluster of the real components as processes.

    up process (this module)
     ├── loader sidecar per node     python -m loader_sidecar      (SSD + DRAM tiers, gRPC on a Unix socket)
     ├── zygote per node             python -m functions.zygote    (pre-imported runtime; forks instances)
     ├── activator                   python -m activator           (public port; admin on loopback)
     └── autoscaler                  python -m autoscaler          (control loop, API for the CLI)

Everything lives under a state directory (cluster.json, logs, each node's SSD cache); the DRAM
tiers live on tmpfs. Every child dies with the up process (PR_SET_PDEATHSIG and process
groups), `down` or Ctrl-C stops them all, and a new `up` first cleans what a killed one left.

The supervisor is library code: it starts every component by its entry point (`python -m ...`)
and talks to them only through the library's API (the loader's gRPC client, HTTP); it never
imports a process package (tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sllm_knative import atomic
from sllm_knative.api.auth import TOKEN_ENV, token_from_env
from sllm_knative.local import procs
from sllm_knative.log import get_logger
from sllm_knative.ports import free_port as _free_port

_log = get_logger("sllm_knative.local")
PY = sys.executable
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]{1,3})?)$")


def parse_device(text: str) -> str:
    """`up --device`: 'cpu', 'cuda' or 'cuda:N', as given; ValueError otherwise. The same value
    goes to every instance (`functions.llm --device`) and its lease; every local node runs on
    this machine, so each may use any of its GPUs (the loader sidecars count the machine's)."""
    if not _DEVICE.match(text):
        raise ValueError(f"--device = {text!r}, must be cpu, cuda or cuda:N")
    return text


def check_device_usable(device: str) -> None:
    """RuntimeError, saying why, unless `device` can compute here: a CUDA device needs torch to
    see it and the loader extension to have been built with CUDA and to see a GPU (instances
    load their leased checkpoint straight into GPU memory through it)."""
    if device == "cpu":
        return
    from sllm_knative.loading import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as exc:
        raise RuntimeError(f"--device {device}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class UpOptions:
    state_dir: Path
    nodes: int = 2
    slots: int = 2
    dram_bytes: int = 2 << 30
    ssd_bytes: int = 8 << 30
    stores: tuple[str, ...] = ()
    port: int = 8080
    dram_root: Path = Path("/dev/shm")
    device: str = "cpu"
    placement: str = "load-time"  # or "random": the no-locality ablation (placement.place_random)

    def __post_init__(self) -> None:
        from sllm_knative.placement import PLACERS

        parse_device(self.device)
        if self.placement not in PLACERS:
            raise ValueError(f"--placement = {self.placement!r}, must be one of {', '.join(PLACERS)}")
        if not 1 <= self.nodes <= 64:
            raise ValueError(f"--nodes = {self.nodes}, must be between 1 and 64")
        if self.slots < 1:
            raise ValueError(f"--slots = {self.slots}, must be at least 1")
        if self.dram_bytes <= 0 or self.ssd_bytes <= 0:
            raise ValueError("--dram-gb and --ssd-gb must be > 0")


def cluster_file(state_dir: Path) -> Path:
    return state_dir / "cluster.json"


def read_cluster(state_dir: Path) -> dict[str, Any]:
    p = cluster_file(state_dir)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(2, "no local cluster here: run `sllm-knative up` first", str(p)) from None
    if not doc.get("ready") or not procs.alive(int(doc.get("pid", 0))):
        raise FileNotFoundError(2, "the local cluster is not running: run `sllm-knative up`", str(p))
    return doc


def _tag(state_dir: Path) -> str:
    return hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:10]


def _dram_dir(opts: UpOptions) -> Path:
    return runtime_dirs(opts.state_dir, opts.dram_root)[1]


def _socket_dir(state_dir: Path) -> Path:
    """Unix socket paths are limited to 107 bytes: keep them short, outside the state dir."""
    return runtime_dirs(state_dir)[0]


def runtime_dirs(state_dir: Path, dram_root: Path = Path("/dev/shm")) -> tuple[Path, Path]:
    """(the sockets' directory, the DRAM tiers' directory) of the cluster kept in `state_dir`:
    outside it, named by a hash of its path."""
    tag = _tag(state_dir)
    return Path("/tmp") / f"sllm-knative-{tag}", dram_root / f"sllm-knative-{tag}"


def clean_stale(state_dir: Path, dram: Path) -> None:
    """Stop what a killed `up` left behind (its recorded process groups), drop sockets and DRAM files."""
    p = cluster_file(state_dir)
    if p.exists():
        with contextlib.suppress(ValueError, OSError):
            doc = json.loads(p.read_text())
            if procs.alive(int(doc.get("pid", 0))):
                raise RuntimeError(f"a local cluster is already running (pid {doc['pid']}); "
                                   "run `sllm-knative down` first")
            for pgid in doc.get("groups", []):
                procs.stop(int(pgid), grace_s=2.0)
        p.unlink(missing_ok=True)
    shutil.rmtree(_socket_dir(state_dir), ignore_errors=True)
    shutil.rmtree(dram, ignore_errors=True)


def _wait(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            lines = [line.strip() for line in tail.splitlines() if line.strip()]
            reason = lines[-1].removeprefix("error: ") if lines else "it wrote nothing"
            raise RuntimeError(f"{what} exited with code {proc.returncode}: {reason} (log {log})\n"
                               f"last log lines:\n{tail}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s (see {log})")


def restartable(component: str) -> bool:
    """Whether `up` restarts a component that exits, as a kubelet restarts a crashed container.
    Every component is: the activator learns the services again from the autoscaler (which
    pushes every service's endpoints to an activator it has not heard from), the autoscaler
    replays its journal of what was applied and adopts the instances still running
    (autoscaler/journal.py, LocalBackend.adopt_running), a loader rebuilds its tiers' index from
    disk, and a zygote imports again and listens on the same socket. The instances a zygote
    forked go with it (they die with their parent), as a node's pods go with a crashed node: the
    autoscaler sees them exit, their streams end with an error event, and the next demand starts
    new ones."""
    return component in ("activator", "autoscaler") or component.startswith(("loader ", "zygote "))


def restart_delay(restarts: int) -> float:
    """Seconds before the n-th restart of a component: 0.5 s doubling, at most 30 s (a component
    that keeps crashing does not spin)."""
    return min(30.0, 0.5 * 2 ** max(0, restarts - 1))


def _http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=1.0).status_code < 500


def up(opts: UpOptions, on_ready: Any = None) -> int:
    """Start the cluster, block until SIGTERM/SIGINT, then stop everything."""
    check_device_usable(opts.device)
    state = opts.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    dram = _dram_dir(opts)
    clean_stale(state, dram)
    # A new cluster starts empty: what an earlier one applied, and the records of its instances,
    # are for its own autoscaler's restarts only.
    (state / "applied.json").unlink(missing_ok=True)
    shutil.rmtree(state / "instances", ignore_errors=True)
    # The nodes' private files (the loaders' and zygotes' sockets, the SSD and DRAM tiers) live
    # under folders only this user may enter: nobody else on the machine reads a checkpoint or
    # talks to a loader.
    for root in (state / "nodes", _socket_dir(state), dram):
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    doc: dict[str, Any] = {"pid": os.getpid(), "ready": False, "groups": [], "state_dir": str(state),
                           "device": opts.device, "placement": opts.placement, "nodes": []}

    def save() -> None:
        atomic.write_json(cluster_file(state), doc, durable=False, indent=1)

    # One internal-API token for this cluster: every instance (through its node's zygote) requires
    # it on its internal port, the activator sends it on every migration call.
    internal = {TOKEN_ENV: token_from_env() or secrets.token_urlsafe(24)}

    how: dict[str, tuple[list[str], Path]] = {}  # each child's command line and log, to restart it

    def start(name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        proc = procs.spawn(argv, log, env=internal)
        children.append((name, proc))
        how[name] = (argv, log)
        doc["groups"].append(proc.pid)
        doc.setdefault("components", {})[name] = proc.pid
        save()
        return proc

    restarts: dict[str, int] = {}  # restarts of each component so far
    due: dict[str, float] = {}  # a crashed component's restart time (monotonic)

    def restart(index: int) -> None:
        name, old = children[index]
        argv, log = how[name]
        proc = procs.spawn(argv, log, env=internal)
        children[index] = (name, proc)
        doc["groups"] = [g for g in doc["groups"] if g != old.pid] + [proc.pid]
        doc["components"][name] = proc.pid
        doc.setdefault("restarts", {})[name] = restarts[name]
        save()
        _log.warning("component restarted", component=name, restarts=restarts[name], pid=proc.pid)

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        from sllm_knative.loader.client import LoaderClient

        logs = state / "logs"
        node_procs: list[tuple[dict[str, Any], subprocess.Popen[bytes], subprocess.Popen[bytes]]] = []
        for i in range(1, opts.nodes + 1):
            node = f"node-{i}"
            ndir = state / "nodes" / node
            ndir.mkdir(parents=True, exist_ok=True)
            sdir = _socket_dir(state) / node
            sdir.mkdir(parents=True, exist_ok=True)
            loader = f"unix://{sdir / 'loader.sock'}"
            metrics = f"127.0.0.1:{_free_port()}"  # Prometheus: tiers, fills, hits, joins, bandwidth
            argv = [PY, "-m", "loader_sidecar", "--node", node, "--listen", loader, "--metrics", metrics,
                    "--ssd-dir", str(ndir / "ssd"), "--ssd-bytes", str(opts.ssd_bytes),
                    "--dram-dir", str(dram / node), "--dram-bytes", str(opts.dram_bytes)]
            for s in opts.stores:
                argv += ["--store", s]
            lp = start(f"loader {node}", argv, logs / f"loader-{node}.log")
            zp = start(f"zygote {node}", [PY, "-m", "functions.zygote", str(sdir / "zygote.sock")],
                       logs / f"zygote-{node}.log")
            doc["nodes"].append({"name": node, "loader": loader, "zygote": str(sdir / "zygote.sock"),
                                 "metrics": f"http://{metrics}/metrics",
                                 "slots": opts.slots, "logs": str(logs / "instances")})
            node_procs.append((doc["nodes"][-1], lp, zp))
        port, admin, scaler = opts.port, _free_port(), _free_port()
        doc.update(activator=f"http://127.0.0.1:{port}", activator_admin=f"http://127.0.0.1:{admin}",
                   autoscaler=f"http://127.0.0.1:{scaler}")
        act = start("activator", [PY, "-m", "activator", "--port", str(port), "--admin-port", str(admin),
                                  "--autoscaler-url", doc["autoscaler"]], logs / "activator.log")
        save()
        sc = start("autoscaler", [PY, "-m", "autoscaler", "--cluster", str(cluster_file(state)),
                                  "--port", str(scaler)], logs / "autoscaler.log")
        for n, lp, zp in node_procs:
            def check(target: str = n["loader"]) -> bool:
                with LoaderClient(target, timeout=1.0) as c:
                    c.inventory()
                return True
            _wait(f"loader {n['name']}", check, 120, lp, logs / f"loader-{n['name']}.log")
            _wait(f"zygote {n['name']}", lambda p=n["zygote"]: Path(p).exists(), 120, zp,
                  logs / f"zygote-{n['name']}.log")
        _wait("activator", lambda: _http_ok(f"{doc['activator_admin']}/metrics"), 30, act, logs / "activator.log")
        _wait("autoscaler", lambda: _http_ok(f"{doc['autoscaler']}/v1/services"), 30, sc, logs / "autoscaler.log")
        doc["ready"] = True
        save()
        _log.info("local cluster up", nodes=opts.nodes, activator=doc["activator"], state=str(state))
        if on_ready:
            on_ready(doc)
        while not stopping:
            now = time.monotonic()
            for index, (name, proc) in enumerate(children):
                if proc.poll() is None:
                    continue
                if not restartable(name):
                    _log.error("component exited; stopping the cluster", component=name, code=proc.returncode)
                    stopping = True
                elif name not in due:
                    restarts[name] = restarts.get(name, 0) + 1
                    due[name] = now + restart_delay(restarts[name])
                    _log.error("component exited; restarting it", component=name, code=proc.returncode,
                               restarts=restarts[name], in_s=round(due[name] - now, 2))
                elif now >= due[name]:
                    del due[name]
                    restart(index)
            time.sleep(0.2)
        return 0
    finally:
        for _name, proc in reversed(children):
            procs.stop(proc.pid, grace_s=5.0)
        shutil.rmtree(dram, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            cluster_file(state).unlink()
        shutil.rmtree(_socket_dir(state), ignore_errors=True)


def up_detached(argv: list[str], state_dir: Path, timeout: float = 300.0) -> dict[str, Any]:
    """Run `sllm-knative up ARGV` in its own session and return once the cluster is ready."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "up.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([PY, "-m", "sllm_knative.cli", "up", *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`up` exited with code {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            doc = json.loads(cluster_file(state_dir).read_text())
            if doc.get("ready") and doc.get("pid") == proc.pid:
                return doc
        time.sleep(0.1)
    procs.stop(proc.pid)
    raise TimeoutError(f"the local cluster did not come up within {timeout:.0f}s (see {log})")


def down(state_dir: Path, timeout: float = 30.0) -> bool:
    p = cluster_file(state_dir)
    try:
        pid = int(json.loads(p.read_text())["pid"])
    except (FileNotFoundError, ValueError, KeyError):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while procs.alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if procs.alive(pid):
        procs.stop(pid, grace_s=0.0, group=False)
    return True
