"""The node's bandwidth profile: measured at start, then a moving average of observed transfers.

Hops (bytes per second):
    disk_read        direct reads of a scratch file in the SSD tier (then every SSD -> DRAM fill)
    dram_copy        reads of a scratch file in the DRAM tier into process memory (a copy)
    dram_map         mapping a scratch file of the DRAM tier with its page tables populated:
                     what a CPU instance does with a DRAM-tier checkpoint (no copy)
    host_to_device   a DRAM-tier file read onto GPU 0 the way an instance loads it: the extension's
                     pinned ring, then host-to-device copies (only measured when a GPU is present;
                     in a subprocess, loader_sidecar.h2d_probe, so the sidecar holds no CUDA context)
    remote:<store>   a store's throughput, from its first transfer on

Numbers feed the load-time model, so nothing here is a constant: a hop without a measurement
is absent, never guessed. `Ewma` and `rate` are pure; the `measure_*` functions are the I/O.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cuda_ext import _C
from sllm_knative.log import get_logger

ALPHA = 0.3
_MADV_POPULATE_READ = 22  # as sllm_knative.loading maps DRAM-tier partitions
MIN_SAMPLE_BYTES = 1 << 20
H2D_PROBE_TIMEOUT_S = 120.0  # the subprocess imports torch and creates a CUDA context: seconds, not minutes
_log = get_logger("loader_sidecar.profile")


@dataclasses.dataclass
class Ewma:
    """Exponentially weighted moving average; the first sample is taken as is."""

    alpha: float = ALPHA
    value: float | None = None
    samples: int = 0

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value
        self.samples += 1
        return self.value


def rate(nbytes: int, seconds: float, min_bytes: int = MIN_SAMPLE_BYTES) -> float | None:
    """Bytes per second of a transfer, or None when it is too small or too fast to mean anything."""
    if nbytes < min_bytes or seconds <= 0:
        return None
    return nbytes / seconds


class Profile:
    def __init__(self, alpha: float = ALPHA, min_bytes: int = MIN_SAMPLE_BYTES) -> None:
        self.hops: dict[str, Ewma] = {}
        self._alpha = alpha
        self._min_bytes = min_bytes

    def observe(self, hop: str, nbytes: int, seconds: float) -> float | None:
        """Fold one observed transfer into the hop's average; returns the new value (None: ignored)."""
        r = rate(nbytes, seconds, self._min_bytes)
        if r is None:
            return None
        return self.hops.setdefault(hop, Ewma(self._alpha)).update(r)

    def get(self, hop: str) -> float | None:
        e = self.hops.get(hop)
        return e.value if e else None

    def snapshot(self) -> dict[str, tuple[float, int]]:
        return {k: (e.value, e.samples) for k, e in sorted(self.hops.items()) if e.value is not None}

    def measure_start(self, ssd_dir: Path, dram_dir: Path, nbytes: int, threads: int) -> None:
        """Run the start-up probes (each failure is logged and leaves its hop unmeasured)."""
        probes = [("disk_read", lambda: measure_file_read(ssd_dir, nbytes, threads, direct=True)),
                  ("dram_copy", lambda: measure_file_read(dram_dir, nbytes, threads, direct=False)),
                  ("dram_map", lambda: measure_file_map(dram_dir, nbytes))]
        for hop, probe in probes:
            try:
                n, secs = probe()
            except (OSError, RuntimeError) as exc:
                _log.warning("bandwidth probe failed", hop=hop, error=str(exc))
                continue
            self._keep(hop, n, secs)
        if _C.cuda_compiled() and _C.cuda_available():
            h2d = measure_host_to_device(dram_dir, nbytes)  # None: failed and logged, no estimate
            if h2d is not None:
                self._keep("host_to_device", h2d.bytes, h2d.seconds, device_name=h2d.device_name)

    def _keep(self, hop: str, n: int, secs: float, **fields: object) -> None:
        # The start-up probe may be smaller than MIN_SAMPLE_BYTES in tests: always keep it.
        self.hops.setdefault(hop, Ewma(self._alpha)).update(n / max(secs, 1e-9))
        _log.info("bandwidth measured", hop=hop, bytes=n, seconds=round(secs, 4),
                  gbps=round(n / max(secs, 1e-9) / 1e9, 3), **fields)


def aligned_buffer(nbytes: int, alignment: int = 4096) -> tuple[np.ndarray, int]:
    """A numpy byte buffer and the address of its first `alignment`-aligned byte."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    addr = raw.ctypes.data
    pad = (-addr) % alignment
    return raw, addr + pad


def _write_scratch(path: Path, nbytes: int) -> None:
    block = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        left = nbytes
        while left:
            n = min(left, len(block))
            os.write(fd, block[:n])
            left -= n
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # drop it from the page cache: measure the disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_file_read(directory: Path, nbytes: int, threads: int, *, direct: bool) -> tuple[int, float]:
    """Write a scratch file in `directory`, read it back with the extension; (bytes, seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".profile-scratch-{os.getpid()}"
    try:
        _write_scratch(path, nbytes)
        raw, addr = aligned_buffer(nbytes)
        chunk = min(nbytes, 16 << 20)
        t0 = time.perf_counter()
        _C.read_to_host(str(path), 0, addr, nbytes, chunk, threads, direct)
        seconds = time.perf_counter() - t0
        del raw
        return nbytes, seconds
    finally:
        path.unlink(missing_ok=True)


def measure_file_map(directory: Path, nbytes: int) -> tuple[int, float]:
    """Write a scratch file in `directory` (the DRAM tier) and map it the way a CPU instance maps
    a DRAM-tier partition (private, page tables populated); (bytes, seconds of the mapping)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".profile-map-{os.getpid()}"
    try:
        _write_scratch(path, nbytes)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            t0 = time.perf_counter()
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
            try:
                mm.madvise(_MADV_POPULATE_READ)
            except OSError:  # kernels before 5.14: touch a byte per page instead
                for off in range(0, nbytes, mmap.PAGESIZE):
                    mm[off]
            seconds = time.perf_counter() - t0
            mm.close()
        finally:
            os.close(fd)
        return nbytes, seconds
    finally:
        path.unlink(missing_ok=True)


class H2DProbeError(RuntimeError):
    """The host-to-device probe subprocess failed, or printed something that is not its result."""


@dataclasses.dataclass(frozen=True)
class H2DResult:
    bytes: int
    seconds: float
    device_name: str

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds


def parse_h2d_result(stdout: str) -> H2DResult:
    """The probe's result: the last non-empty line of its stdout, a JSON object with a positive
    integer `bytes`, a positive finite `seconds` and a non-empty `device_name`. ValueError otherwise."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("no output")
    try:
        doc = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {lines[-1][:200]!r} ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"not a JSON object: {lines[-1][:200]!r}")
    nbytes, seconds, name = doc.get("bytes"), doc.get("seconds"), doc.get("device_name")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise ValueError(f"bytes = {nbytes!r}: expected a positive integer")
    if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds)
            or seconds <= 0):
        raise ValueError(f"seconds = {seconds!r}: expected a positive finite number")
    if not isinstance(name, str) or not name:
        raise ValueError(f"device_name = {name!r}: expected a non-empty string")
    return H2DResult(nbytes, float(seconds), name)


def _tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def run_h2d_probe(path: Path, nbytes: int, device: str = "cuda:0",
                  timeout: float = H2D_PROBE_TIMEOUT_S) -> H2DResult:
    """Run `python -m loader_sidecar.h2d_probe` on a file; H2DProbeError naming the probe and the tail
    of its stderr when it fails, times out or prints no valid result."""
    cmd = [sys.executable, "-m", "loader_sidecar.h2d_probe", "--file", str(path), "--bytes", str(nbytes),
           "--device", device]
    what = f"host-to-device probe ({' '.join(cmd[1:3])} --device {device})"
    # The probe imports this sidecar's own copy of the packages, wherever the sidecar runs from.
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env=env)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise H2DProbeError(f"{what} ran past {timeout:g} s; stderr: {_tail(err) or '(empty)'}") from None
    if proc.returncode != 0:
        raise H2DProbeError(f"{what} exited with status {proc.returncode}; stderr: {_tail(proc.stderr) or '(empty)'}")
    try:
        return parse_h2d_result(proc.stdout)
    except ValueError as exc:
        raise H2DProbeError(f"{what} printed no valid result ({exc}); stderr: {_tail(proc.stderr) or '(empty)'}") \
            from None


def measure_host_to_device(dram_dir: Path, nbytes: int, device: str = "cuda:0",
                           timeout: float = H2D_PROBE_TIMEOUT_S) -> H2DResult | None:
    """Write a scratch file in the DRAM tier and time the extension reading it onto `device`, in a
    subprocess (see loader_sidecar.h2d_probe). None when the probe fails: logged, and the node then
    has no host_to_device estimate (never a guess)."""
    path = dram_dir / f".profile-h2d-{os.getpid()}"
    try:
        dram_dir.mkdir(parents=True, exist_ok=True)
        _write_scratch(path, nbytes)
        result = run_h2d_probe(path, nbytes, device, timeout)
    except (OSError, H2DProbeError) as exc:
        _log.warning("bandwidth probe failed", hop="host_to_device", device=device, error=str(exc))
        return None
    finally:
        path.unlink(missing_ok=True)
    if result.bytes != nbytes:
        _log.warning("bandwidth probe failed", hop="host_to_device", device=device,
                     error=f"the probe read {result.bytes} bytes, asked for {nbytes}")
        return None
    return result
