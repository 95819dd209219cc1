"""The GPU check: everything issue 18 asks of a lent H100/H200, in one command, in fail-fast order.

    bash bench/gpu/run.sh            # on the lent machine (installs the wheels, builds, runs this)
    python -m bench.gpu.check --out DIR [--dry] [--phases a,b,...] [--deadline-s S]

Phases, in order. The first five are gates (GPU-PATH-REVIEW.md's fail-fast order): the first that
fails stops the check, and its `fix` says what to do. The rest are measurements: a failed one is
reported and the next one runs.

  environment   torch sees the GPU; the extension was built with CUDA and sees it (its CUDA error
                text otherwise, F9); every module the benchmarks import imports
  raw_read      read_to_device, buffered, of 64 MiB of random bytes, compared on the GPU
  direct_read   the same after the page cache is evicted, O_DIRECT into the pinned ring, with
                16 MiB and with 4 KiB slots; reports a fallback to buffered reads (F3)
  edges         an unaligned offset into an unaligned destination; block checksums passing and
                failing; a cancelled read
  ring          the first read (pins the ring) against the next (reuses it, F1), and a 1 GiB
                tmpfs -> GPU read against the pinned host-to-device copy limit
  tests         pytest -m gpu: tests/checkpoint/test_gpu.py, tests/loader_sidecar/test_h2d_probe.py
  loading       bench.loading --device cuda --shape llama-8b: ours from DRAM and cold disk against
                safetensors, torch.load(mmap), from_pretrained, fastsafetensors, Run:ai streamer,
                InstantTensor
  coldstart_8b  bench.coldstart --device cuda --shape llama-8b --tiers ssd dram (with knative_default)
  migration     bench.migration --device cuda --numerics fast at 256, 1024 and 2048 tokens
  coldstart_1b  bench.coldstart --device cuda --shape llama-1b --tiers ssd dram

Everything lands in DIR: gpu-check.json (each phase's status, seconds, details and error; the
benchmarks' own JSON under `results`), gpu-check.png, the benchmarks' PNGs; run.sh adds log.txt.
The JSON is rewritten after every phase, so a run stopped at its time limit keeps what it measured.
`--deadline-s` (default 420) skips a phase that cannot start in time, and caps each benchmark's
subprocess at the time left; `--phases` reruns a subset.

`--dry` (make gpu-check DRY=1, in make test): no GPU. The gates run the same code through the host
reader, the tests phase collects and skips the GPU tests, the loading phase runs bench.loading on
the CPU at a tiny size, and the other benchmarks' command lines are parsed by their own parsers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
# What the benchmarks and the local cluster import: a missing wheel shows up here, not minutes in.
MODULES = ("sllm_knative.cli", "sllm_knative.loading", "sllm_knative.convert", "sllm_knative.local.cluster",
           "activator.app", "autoscaler.server", "loader_sidecar.server", "functions.llm.server",
           "functions.zygote", "bench.loading", "bench.coldstart", "bench.migration", "grpc", "pydantic",
           "starlette", "uvicorn", "httpx", "prometheus_client", "jsonschema", "kubernetes", "cryptography", "gguf",
           "matplotlib", "pytest")
OPTIONAL_MODULES = ("fastsafetensors", "runai_model_streamer", "instanttensor")
GPU_TESTS = ("tests/checkpoint/test_gpu.py", "tests/loader_sidecar/test_h2d_probe.py")


class GateFailed(RuntimeError):
    """A gate's check failed: `fix` says what to do before the next run."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@dataclasses.dataclass
class PhaseResult:
    name: str
    gate: bool
    status: str  # passed | failed | skipped
    seconds: float = 0.0
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    fix: str | None = None


@dataclasses.dataclass
class Report:
    dry: bool
    started: str
    device: dict[str, Any]
    phases: list[PhaseResult]
    stopped_at: str | None = None
    left: list[str] = dataclasses.field(default_factory=list)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    command: str = ""


STATUSES = {"passed", "failed", "skipped"}


def validate(doc: dict[str, Any]) -> Report:
    """The report of a gpu-check.json, its shape checked (ValueError saying where)."""
    def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if key not in obj:
            raise ValueError(f"{where}: no {key!r}")
        if not isinstance(obj[key], kind):
            raise ValueError(f"{where}.{key}: {type(obj[key]).__name__}, expected {kind}")
        return obj[key]

    phases = []
    for i, p in enumerate(need(doc, "phases", list, "report")):
        where = f"phases[{i}]"
        status = need(p, "status", str, where)
        if status not in STATUSES:
            raise ValueError(f"{where}.status: {status!r}, expected one of {sorted(STATUSES)}")
        phases.append(PhaseResult(name=need(p, "name", str, where), gate=need(p, "gate", bool, where), status=status,
                                  seconds=float(need(p, "seconds", (int, float), where)),
                                  detail=need(p, "detail", dict, where), error=p.get("error"), fix=p.get("fix")))
    return Report(dry=need(doc, "dry", bool, "report"), started=need(doc, "started", str, "report"),
                  device=need(doc, "device", dict, "report"), phases=phases, stopped_at=doc.get("stopped_at"),
                  left=need(doc, "left", list, "report"), results=need(doc, "results", dict, "report"),
                  command=need(doc, "command", str, "report"))


# -- the context every phase gets -------------------------------------------------------------------


@dataclasses.dataclass
class Ctx:
    out: Path
    work: Path
    dry: bool
    deadline: float  # time.monotonic() by which the check ends
    results: dict[str, Any]

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda:0"


def _random_file(path: Path, nbytes: int) -> bytes:
    data = os.urandom(nbytes)
    path.write_bytes(data)
    return data


def read_into(ctx: Ctx, path: Path, offset: int, length: int, *, chunk: int = 16 * MiB, threads: int = 8,
              direct: bool = False, block: int = 0, crcs: list[int] | None = None, cancel: Any = None,
              pad: int = 0) -> tuple[Any, dict[str, Any]]:
    """(a uint8 tensor of the range, the reader's stats): the device reader into GPU memory, or in a
    dry run the host reader into aligned host memory; `pad` bytes before the range in the buffer
    (an unaligned destination)."""
    import torch

    from cuda_ext import _C
    from sllm_knative.loading import aligned_empty

    if ctx.dry:
        buf = aligned_empty(length + pad + 4096)
        stats = _C.read_to_host(str(path), offset, buf.data_ptr() + pad, length, chunk, threads, direct, block,
                                crcs or [], cancel)
        return buf[pad: pad + length], stats
    gpu = torch.empty(length + pad, dtype=torch.uint8, device=ctx.device)
    torch.cuda.current_stream().synchronize()
    stats = _C.read_to_device(str(path), offset, 0, gpu.data_ptr() + pad, length, chunk, threads, direct, 256 * MiB,
                              4, block, crcs or [], cancel)
    return gpu[pad:], stats


def same(ctx: Ctx, got: Any, want: bytes) -> bool:
    import torch

    ref = torch.frombuffer(bytearray(want), dtype=torch.uint8)
    return bool(torch.equal(got, ref.to(got.device)))


# -- the gates ---------------------------------------------------------------------------------------


def environment(ctx: Ctx) -> dict[str, Any]:
    import platform

    import torch

    from cuda_ext import _C

    d: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda, "torch_sees_gpu": torch.cuda.is_available(),
                         "extension_cuda_compiled": _C.cuda_compiled(), "extension_sees_gpu": _C.cuda_available(),
                         "extension_cuda_error": _C.cuda_error(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        d.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                 gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
                       ("nvcc", ["--version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
            d[tool] = (r.stdout.strip().splitlines() or [""])[-1]
    d["disk_free_gb"] = round(shutil.disk_usage(ctx.work).free / 2**30, 1)
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import failure is what this gate reports
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    d["optional_modules"] = {m: importlib.util.find_spec(m) is not None for m in OPTIONAL_MODULES}
    if missing:
        raise GateFailed("cannot import " + "; ".join(missing),
                         "carry the missing packages as wheels: add them to bench/gpu/image-packages.txt's "
                         "complement (make gpu-wheels), carry .gpu-wheels")
    if ctx.dry:
        return d
    if not torch.cuda.is_available():
        raise GateFailed(f"torch {torch.__version__} sees no CUDA device",
                         "run on the lent machine's own python3 (the image's CUDA torch), not a CPU build")
    if not _C.cuda_compiled():
        raise GateFailed("the loader extension was built without CUDA",
                         "run.sh builds it with this machine's nvcc (setup.py build_ext --inplace): see the "
                         "log for 'compiling CUDA path'; set CUDA_HOME if nvcc is elsewhere")
    if not _C.cuda_available():
        raise GateFailed(f"the extension's CUDA runtime sees no device: {_C.cuda_error()}",
                         "the driver must support the CUDA runtime the extension links (13.0: driver 580 or newer)")
    return d


def raw_read(ctx: Ctx) -> dict[str, Any]:
    path = ctx.work / "raw.bin"
    data = _random_file(path, 64 * MiB)
    got, stats = read_into(ctx, path, 0, len(data), direct=False)
    if not same(ctx, got, data):
        raise GateFailed("a buffered read_to_device of 64 MiB differs from the file",
                         "the device reader copies wrong bytes: run tests/checkpoint/test_device_reader_fake.py "
                         "and read device_reader.cu's slot reuse")
    return {"bytes": len(data), "seconds": round(stats["seconds"], 4),
            "gbps": round(len(data) / stats["seconds"] / 1e9, 2), "direct": stats["direct"]}


def direct_read(ctx: Ctx) -> dict[str, Any]:
    from sllm_knative.pagecache import evict, is_memory_fs, resident_fraction

    path = ctx.work / "direct.bin"
    data = _random_file(path, 64 * MiB)
    out: dict[str, Any] = {"memory_fs": is_memory_fs(path)}
    for label, chunk, threads, length in (("16MiB_slots", 16 * MiB, 8, len(data)), ("4KiB_slots", 4096, 4, 8 * MiB)):
        evict(path)
        resident = resident_fraction(path)
        got, stats = read_into(ctx, path, 0, length, chunk=chunk, threads=threads, direct=True)
        if not same(ctx, got, data[:length]):
            raise GateFailed(f"a direct read with {label} differs from the file",
                             "O_DIRECT into pinned memory delivered wrong bytes: read with direct=False "
                             "(LoadOptions(direct=False)) until this is understood")
        out[label] = {"bytes": length, "resident_before": round(resident, 3), "direct": stats["direct"],
                      "fallback": stats.get("direct_fallback", ""),
                      "gbps": round(length / stats["seconds"] / 1e9, 2)}
    return out


def edges(ctx: Ctx) -> dict[str, Any]:
    from cuda_ext import _C
    from sllm_knative import format as fmt
    from sllm_knative.loading import CancelToken, LoadCancelled

    path = ctx.work / "edges.bin"
    data = _random_file(path, 8 * MiB)
    off, length = 12345, 5 * MiB + 777
    got, _ = read_into(ctx, path, off, length, chunk=1 * MiB, threads=3, pad=3)
    if not same(ctx, got, data[off: off + length]):
        raise GateFailed("a read at an unaligned offset into an unaligned destination differs",
                         "the bounce-buffer path (reader.cpp bounce_read) or the device offsets are wrong")
    block = 1 * MiB
    crcs = [_C.crc32c(data[i: i + block]) for i in range(0, len(data), block)]
    got, _ = read_into(ctx, path, 0, len(data), chunk=block, threads=4, block=block, crcs=crcs)
    if not same(ctx, got, data):
        raise GateFailed("a verified read differs", "checksummed device reads copy wrong bytes")
    crcs[5] ^= 1
    try:
        read_into(ctx, path, 0, len(data), chunk=block, threads=4, block=block, crcs=crcs)
        raise GateFailed("a wrong block checksum was not detected", "device_reader.cu must compare each block's crc")
    except fmt.ChecksumError as exc:
        if exc.block != 5:
            raise GateFailed(f"the checksum error names block {exc.block}, not 5", "ChecksumMismatch's block index") from exc
    token = CancelToken()
    token.cancel()
    try:
        read_into(ctx, path, 0, len(data), chunk=block, cancel=token)
        raise GateFailed("a cancelled read completed", "the reader must poll the CancelToken per chunk")
    except LoadCancelled:
        pass
    return {"unaligned": "ok", "checksum_fail_block": 5, "cancel": "ok"}


def ring(ctx: Ctx) -> dict[str, Any]:
    import torch

    from cuda_ext import _C

    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else ctx.work
    path = shm / f"sllm-gpu-check-{os.getpid()}.bin"
    nbytes = 64 * MiB if ctx.dry else 1 << 30
    try:
        with path.open("wb") as f:
            block = os.urandom(16 * MiB)
            for _ in range(nbytes // len(block)):
                f.write(block)
        _C.release_pinned()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            got, _stats = read_into(ctx, path, 0, nbytes)
            if not ctx.dry:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            del got
        d: dict[str, Any] = {"bytes": nbytes, "first_s": round(times[0], 4), "next_s": round(min(times[1:]), 4),
                             "ring_setup_s": round(times[0] - min(times[1:]), 4),
                             "gbps": round(nbytes / min(times[1:]) / 1e9, 2)}
        if not ctx.dry:
            from bench.loading import pinned_h2d_limit

            limit = pinned_h2d_limit(ctx.device)
            d.update(pinned_h2d_gbps=round(limit, 2), fraction_of_pinned_h2d=round(d["gbps"] / limit, 3))
        return d
    finally:
        path.unlink(missing_ok=True)


# -- the measurements -------------------------------------------------------------------------------


def _subprocess(ctx: Ctx, argv: list[str], budget_s: float) -> dict[str, Any]:
    """Run `python -m ...` with its output in ours (run.sh tees it into log.txt), at most budget_s."""
    timeout = max(10.0, min(budget_s, ctx.left_s()))
    print(f"$ {' '.join(argv)}   (at most {timeout:.0f} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO)
    try:
        return {"rc": proc.wait(timeout=timeout), "seconds": round(time.monotonic() - t0, 1)}
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmarks stop their clusters and instances on it (exit_on_sigterm),
        # which hold GPU memory the next phase needs; SIGKILL only if that takes over a minute.
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return {"rc": None, "timed_out_after_s": round(timeout, 1)}


def tests(ctx: Ctx) -> dict[str, Any]:
    junit = ctx.work / "gpu-tests.xml"
    run = _subprocess(ctx, ["-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                            f"--junitxml={junit}", *GPU_TESTS], 240)
    if not junit.is_file():
        raise RuntimeError(f"pytest wrote no report ({run})")
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or bad.text or "")[:600]})
    d = {**run, **counts, "failed": failed}
    if counts["tests"] == 0:
        raise RuntimeError(f"no GPU test was collected: {d}")
    if ctx.dry and counts["skipped"] != counts["tests"]:
        raise RuntimeError(f"without a GPU every GPU test must skip: {d}")
    if failed or counts["errors"] or run.get("rc") != 0:
        raise RuntimeError(f"{len(failed)} GPU test(s) failed: " + "; ".join(f["test"] for f in failed[:5]))
    return d


def _bench(ctx: Ctx, key: str, module: str, argv: list[str], budget_s: float, png: str) -> dict[str, Any]:
    """Run a benchmark with its output in work/key; keep its JSON under results[key], its PNG in out."""
    dest = ctx.work / key
    run = _subprocess(ctx, ["-m", module, *argv, "--out", str(dest)], budget_s)
    doc_path = next(iter(sorted(dest.glob("*.json"))), None)
    if doc_path is not None:
        ctx.results[key] = json.loads(doc_path.read_text())
    pngs = sorted(dest.glob("*.png"))
    if pngs:
        shutil.copy(pngs[0], ctx.out / png)
    d = {**run, "json": doc_path.name if doc_path else None, "png": png if pngs else None}
    if run.get("rc") != 0:
        raise RuntimeError(f"{module} did not finish: {run}")
    return d


def _dry_parse(module: str, argv: list[str]) -> dict[str, Any]:
    """In a dry run, a benchmark's command line is parsed by its own parser: a renamed flag fails here."""
    mod = importlib.import_module(module)
    args = mod.parser().parse_args([*argv, "--out", "/nonexistent"])
    return {"parsed": module, "argv": argv, "args": {k: v for k, v in vars(args).items() if k != "out"}}


LOADING_ARGS = ["--device", "cuda", "--shape", "llama-8b", "--runs", "0", "--no-sweep", "--one-dram-fs",
                "--loaders", "sllm_knative", "safetensors", "torch_load_mmap", "transformers_from_pretrained",
                "fastsafetensors", "runai_model_streamer", "instanttensor"]
COLDSTART_8B = ["--device", "cuda", "--shape", "llama-8b", "--tiers", "ssd", "dram", "--runs", "1", "--nodes", "1",
                "--numerics", "fast"]
COLDSTART_1B = ["--device", "cuda", "--shape", "llama-1b", "--tiers", "ssd", "dram", "--runs", "2", "--nodes", "1",
                "--numerics", "fast"]
MIGRATION = ["--device", "cuda", "--numerics", "fast", "--runs", "2", "--contexts", "256,1024,2048"]


def loading(ctx: Ctx) -> dict[str, Any]:
    work = ctx.work / "loading-models"
    try:
        if ctx.dry:
            argv = ["--device", "cpu", "--model-gb", "0.02", "--runs", "0", "--no-sweep", "--one-dram-fs",
                    "--loaders", "sllm_knative", "safetensors", "--work", str(work)]
            return _bench(ctx, "loading", "bench.loading", argv, 240, "loading.png")
        return _bench(ctx, "loading", "bench.loading", [*LOADING_ARGS, "--work", str(work)], 260, "loading.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 48 GB: the cold-start phases need the disk


def _coldstart(ctx: Ctx, key: str, argv: list[str], budget_s: float) -> dict[str, Any]:
    if ctx.dry:
        return _dry_parse("bench.coldstart", argv)
    work = ctx.work / f"{key}-models"
    try:
        return _bench(ctx, key, "bench.coldstart", [*argv, "--work", str(work)], budget_s, f"{key}.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def coldstart_8b(ctx: Ctx) -> dict[str, Any]:
    return _coldstart(ctx, "coldstart_8b", COLDSTART_8B, 200)


def coldstart_1b(ctx: Ctx) -> dict[str, Any]:
    return _coldstart(ctx, "coldstart_1b", COLDSTART_1B, 120)


def migration(ctx: Ctx) -> dict[str, Any]:
    if ctx.dry:
        return _dry_parse("bench.migration", MIGRATION)
    return _bench(ctx, "migration", "bench.migration", [*MIGRATION, "--work", str(ctx.work / "migration-work")], 150,
                  "migration.png")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    fn: Callable[[Ctx], dict[str, Any]]
    gate: bool
    least_s: float  # not started with less time left than this


PHASES = (Phase("environment", environment, True, 5), Phase("raw_read", raw_read, True, 5),
          Phase("direct_read", direct_read, True, 5), Phase("edges", edges, True, 5), Phase("ring", ring, True, 10),
          Phase("tests", tests, False, 30), Phase("loading", loading, False, 90),
          Phase("coldstart_8b", coldstart_8b, False, 90), Phase("migration", migration, False, 45),
          Phase("coldstart_1b", coldstart_1b, False, 45))


# -- the run ----------------------------------------------------------------------------------------


def run_phases(ctx: Ctx, report: Report, names: list[str], save: Callable[[], None],
               phases: tuple[Phase, ...] = PHASES) -> None:
    """Run the named phases in order into report.phases: stop at the first failed gate, skip what
    cannot start before the deadline (report.left names what did not run)."""
    chosen = [p for p in phases if p.name in names]
    for i, phase in enumerate(chosen):
        if ctx.left_s() < phase.least_s:
            report.left = [p.name for p in chosen[i:]]
            for p in chosen[i:]:
                report.phases.append(PhaseResult(p.name, p.gate, "skipped",
                                                 error=f"no time left ({ctx.left_s():.0f} s < {p.least_s:.0f} s)"))
            break
        print(f"== {phase.name}", flush=True)
        t0 = time.monotonic()
        result = PhaseResult(phase.name, phase.gate, "passed")
        try:
            result.detail = phase.fn(ctx)
        except GateFailed as exc:
            result.status, result.error, result.fix = "failed", str(exc), exc.fix
        except Exception as exc:  # a measurement that broke is reported; the next one runs
            result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        result.seconds = round(time.monotonic() - t0, 2)
        report.phases.append(result)
        print(f"== {phase.name}: {result.status} in {result.seconds} s"
              + (f": {result.error}" if result.error else "") + (f"\n   fix: {result.fix}" if result.fix else ""),
              flush=True)
        save()
        if result.status == "failed" and phase.gate:
            report.stopped_at = phase.name
            report.left = [p.name for p in chosen[i + 1:]]
            break


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench._common import save_figure

    colors = {"passed": "tab:green", "failed": "tab:red", "skipped": "tab:gray"}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [p.name for p in report.phases]
    ax.barh(range(len(names)), [p.seconds for p in report.phases], color=[colors[p.status] for p in report.phases])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    for y, p in enumerate(report.phases):
        ax.text(p.seconds, y, f" {p.status}", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    gpu = report.device.get("gpu", "no GPU (dry run)" if report.dry else "?")
    ratios = (report.results.get("loading") or {}).get("ratios") or {}
    ax.set_title(f"GPU check on {gpu}, {report.started}" + (f"\nloading ratios: {ratios}" if ratios else ""),
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="scratch space on the disk (default: a temporary dir)")
    p.add_argument("--dry", action="store_true", help="no GPU: the dry run (see above)")
    p.add_argument("--phases", default=",".join(ph.name for ph in PHASES),
                   help="comma-separated subset, run in the order above")
    p.add_argument("--deadline-s", type=float, default=420.0)
    args = p.parse_args(argv)
    names = [n for n in args.phases.split(",") if n]
    unknown = sorted(set(names) - {ph.name for ph in PHASES})
    if unknown:
        p.error(f"--phases: unknown {', '.join(unknown)}; known: {', '.join(ph.name for ph in PHASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="sllm-gpu-check-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out=args.out, work=work, dry=args.dry, deadline=time.monotonic() + args.deadline_s, results={})
    report = Report(dry=args.dry, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), device={}, phases=[],
                    results=ctx.results, command=" ".join(["python -m bench.gpu.check", *(argv or sys.argv[1:])]))
    lock = threading.Lock()

    def save() -> None:
        from sllm_knative import atomic

        env = next((ph.detail for ph in report.phases if ph.name == "environment"), {})
        report.device = {k: env[k] for k in ("gpu", "capability", "gpu_memory_gb", "nvidia-smi", "torch", "cpus")
                         if k in env}
        with lock:
            atomic.write_json(args.out / "gpu-check.json", dataclasses.asdict(report), durable=False, indent=1)

    try:
        run_phases(ctx, report, names, save)
    finally:
        save()
        plot(report, args.out / "gpu-check.png")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    validate(json.loads((args.out / "gpu-check.json").read_text()))
    failed = [ph.name for ph in report.phases if ph.status == "failed"]
    print(f"gpu check: {len(report.phases) - len(failed)} of {len(report.phases)} phases without failure"
          + (f"; failed: {', '.join(failed)}" if failed else "") + (f"; left: {', '.join(report.left)}"
                                                                        if report.left else ""), flush=True)
    return 1 if failed or report.left else 0


if __name__ == "__main__":
    sys.exit(main())
