"""Checkpoint loading: sllm_knative side by side with the other loaders, cold, warm and DRAM.

    .venv/bin/python -m bench.loading --model-gb 2.5 --out DIR
    python -m bench.loading --device cuda --shape llama-8b --runs 1 --out DIR   (on a GPU machine)

writes DIR/loading.json and DIR/loading.png. Every loader reads the same tensors (a
Llama-like random model of about --model-gb), prepared before timing. "Loaded" means every
byte is in the target memory: every loader's result has one byte per page read back
(lazy loaders fault their pages in; for eager ones it is a cheap pass). Cold runs evict
the files first and check with mincore that nothing is resident. The disk limit comes
from fio (sequential direct reads on the same file, 16 MiB blocks, io_uring and libaio,
queue depth 8 and 16, one job per core on disjoint parts; best of those), or, without
fio, from our own direct reader at high queue depth (then `tool` says so).

`--device cuda`: every loader puts the tensors in GPU memory (safetensors `load_file(device=)`,
`torch.load(mmap=True)` then `.to()`, transformers `from_pretrained(device_map=)`, InstantTensor's
`safe_open(device=N)`, ours through the pinned ring), "loaded" ends with a device synchronize, and the limits add the pinned host-to-device
copy bandwidth (torch's copy from pinned memory, 1 GiB, best of 5): the ceiling of the DRAM -> GPU
path. Targets there (issue 18): DRAM -> GPU at >= 0.9 of that copy, cold disk -> GPU at >= 0.85 of
the disk, >= 6.5x faster than safetensors to cuda, no slower than InstantTensor cold.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import (
    ensure_model,
    evict,
    exit_on_sigterm,
    machine,
    median_runs,
    resident_fraction,
    save_figure,
    write_json,
)

LOADERS = ["sllm_knative", "safetensors", "torch_load_mmap", "transformers_from_pretrained",
           "runai_model_streamer", "tensorizer", "fastsafetensors", "instanttensor"]


# -- preparation -------------------------------------------------------------------------------


def model_spec(model_gb: float, shape: str = "auto") -> Any:
    from sllm_knative.models import SHAPES, spec_for_size

    return spec_for_size(int(model_gb * 2**30)) if shape == "auto" else SHAPES[shape]


def prepare(work: Path, model_gb: float, shape: str = "auto", loaders: list[str] | None = None,
            init_device: str = "cpu") -> dict[str, Path]:
    """Build the model once (cached by size or shape), then every requested loader's file from
    the same tensors (the pickle for torch_load_mmap, the tensorizer file for tensorizer)."""
    import torch

    from sllm_knative.convert import convert

    wanted = set(loaders or LOADERS)
    spec = model_spec(model_gb, shape)
    root = work / (f"model-{model_gb:g}gb" if shape == "auto" else f"model-{shape}")
    hf = root / "hf"
    if ensure_model(hf, spec, init_device):  # the files derived from it below are made again
        shutil.rmtree(root / "sllm", ignore_errors=True)
        for name in ("pytorch_model.bin", "model.tensors"):
            (root / name).unlink(missing_ok=True)
    paths = {"hf": hf, "sllm": root / "sllm"}
    if not (paths["sllm"] / "sllm-index.json").exists():
        convert(hf, paths["sllm"], overwrite=True, progress=True)
    paths["bin"] = root / "pytorch_model.bin"
    paths["tensorizer"] = root / "model.tensors"
    need_bin = "torch_load_mmap" in wanted and not paths["bin"].exists()
    need_tz = "tensorizer" in wanted and not paths["tensorizer"].exists()
    if need_bin or need_tz:
        sd = _safetensors_state_dict(hf, "cpu")
        if need_bin:
            torch.save(sd, paths["bin"].with_suffix(".part"))
            os.replace(paths["bin"].with_suffix(".part"), paths["bin"])
        if need_tz:
            from tensorizer import TensorSerializer

            ser = TensorSerializer(str(paths["tensorizer"].with_suffix(".part")))
            ser.write_state_dict(sd)
            ser.close()
            os.replace(paths["tensorizer"].with_suffix(".part"), paths["tensorizer"])
        del sd
        gc.collect()
    return paths


def _safetensors_files(hf: Path) -> list[Path]:
    """The model's safetensors files: one, or save_pretrained's shards of a large model."""
    return sorted(hf.glob("*.safetensors"))


def _safetensors_state_dict(hf: Path, device: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in _safetensors_files(hf):
        out.update(load_file(str(f), device=device))
    return out


def files_of(loader: str, paths: dict[str, Path]) -> list[Path]:
    if loader == "sllm_knative":
        return sorted(paths["sllm"].glob("partition-*.bin"))
    if loader == "torch_load_mmap":
        return [paths["bin"]]
    if loader == "tensorizer":
        return [paths["tensorizer"]]
    return _safetensors_files(paths["hf"])


# -- loaders: each returns {name: tensor} on the CPU with every byte in memory ------------------


def _touch(tensors: dict[str, Any]) -> int:
    """Read one byte per 4 KiB page of every tensor (faults lazy loaders' pages in)."""
    import torch

    total = 0
    for t in tensors.values():
        if t.numel() == 0:
            continue
        flat = t.detach().reshape(-1).view(torch.uint8) if t.is_contiguous() else t.contiguous().view(-1)
        total += int(flat[::4096].sum())
    return total


def load_with(loader: str, paths: dict[str, Path], source_dir: Path | None = None,
              device: str = "cpu") -> dict[str, Any]:
    """{name: tensor} on `device`, by `loader`'s own API for that device where it has one."""
    import torch

    if loader == "sllm_knative":
        from sllm_knative.loading import load_state_dict

        return load_state_dict(source_dir or paths["sllm"], device)
    if loader == "safetensors":
        return _safetensors_state_dict(source_dir or paths["hf"], device)
    if loader == "torch_load_mmap":
        sd = torch.load(str(paths["bin"]), mmap=True, weights_only=True)
        return sd if device == "cpu" else {k: v.to(device) for k, v in sd.items()}
    if loader == "transformers_from_pretrained":
        from transformers import AutoModelForCausalLM

        kw = {} if device == "cpu" else {"device_map": device}
        return dict(AutoModelForCausalLM.from_pretrained(str(paths["hf"]), **kw).state_dict())
    if loader == "runai_model_streamer":
        from runai_model_streamer import SafetensorsStreamer

        out = {}
        with SafetensorsStreamer() as s:
            for f in _safetensors_files(paths["hf"]):
                s.stream_file(str(f))
                # The streamer reuses its buffer: clone on the CPU, copy on a GPU.
                out.update({k: v.clone() if device == "cpu" else v.to(device) for k, v in s.get_tensors()})
        return out
    if loader == "tensorizer":
        from tensorizer import TensorDeserializer

        return dict(TensorDeserializer(str(paths["tensorizer"]), device=device, lazy_load=False))
    if loader == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        ld = SafeTensorsFileLoader(SingleGroup(), device, nogds=True)
        ld.add_filenames({0: [str(f) for f in _safetensors_files(paths["hf"])]})
        fb = ld.copy_files_to_device()
        out = {k: fb.get_tensor(k).clone() for k in fb.key_to_rank_lidx}
        fb.close()
        ld.close()
        return out
    if loader == "instanttensor":  # GPU only (CUDA or ROCm): its safe_open takes a device index
        from instanttensor import safe_open

        if device == "cpu":
            raise RuntimeError("instanttensor loads onto a GPU only")
        out = {}
        for f in _safetensors_files(paths["hf"]):
            with safe_open(str(f), framework="pt", device=torch.device(device).index or 0) as st:
                out.update(dict(st.tensors()))
        return out
    raise ValueError(f"unknown loader {loader!r}")


def timed_load(loader: str, paths: dict[str, Path], scenario: str, source_dir: Path | None = None,
               device: str = "cpu") -> float:
    import torch

    files = files_of(loader, paths) if source_dir is None else sorted(source_dir.glob("*"))
    if scenario == "cold":
        evict(*files)
        resident = max(resident_fraction(f) for f in files)
        if resident > 0.01:
            raise RuntimeError(f"{loader}: {resident:.0%} of a file is still cached after eviction")
    gc.collect()
    t0 = time.perf_counter()
    out = load_with(loader, paths, source_dir, device)
    _touch(out)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del out
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()  # the next loader starts with the GPU's memory free
    return seconds


# -- machine limits ----------------------------------------------------------------------------


def fio_limit(path: Path) -> tuple[float, str] | None:
    if shutil.which("fio") is None:
        return None
    size = path.stat().st_size
    jobs = max(1, os.cpu_count() or 1)
    part = size // jobs // (16 << 20) * (16 << 20)
    best, best_cfg = 0.0, ""
    for engine in ("io_uring", "libaio"):
        for depth in (8, 16):
            evict(path)
            cmd = ["fio", "--name=seqread", f"--filename={path}", "--rw=read", "--direct=1", f"--ioengine={engine}",
                   "--bs=16m", f"--iodepth={depth}", f"--numjobs={jobs}", f"--size={part}",
                   f"--offset_increment={part}", "--group_reporting", "--output-format=json"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                continue
            doc = json.loads(r.stdout[r.stdout.index("{"):])
            gbps = doc["jobs"][0]["read"]["bw_bytes"] / 1e9
            if gbps > best:
                best, best_cfg = gbps, f"fio {engine} iodepth={depth} numjobs={jobs} bs=16m direct=1"
    return (best, best_cfg) if best else None


def own_direct_limit(path: Path) -> tuple[float, str]:
    from cuda_ext import _C
    from sllm_knative.loading import aligned_empty

    size = min(path.stat().st_size, 4 << 30) // 4096 * 4096  # 4 GiB is long enough to time
    buf = aligned_empty(size)
    best = 0.0
    for _ in range(3):
        evict(path)
        s = _C.read_to_host(str(path), 0, buf.data_ptr(), size, 16 << 20, 16, True)
        best = max(best, size / s["seconds"] / 1e9)
    return best, "sllm_knative direct reader, 16 threads x 16 MiB (fio not installed)"


def _dram_dirs(default_shm: str, nbytes: int = 0) -> list[tuple[str, Path, bool]]:
    """(label, directory, mounted_by_us): a huge-page tmpfs when we may mount one, and /dev/shm.
    The tmpfs holds two copies of the model (ours and safetensors') with room to spare."""
    out = []
    mnt = Path(tempfile.mkdtemp(prefix="sllm-hugetmpfs-"))
    size_gb = max(16, math.ceil(2.2 * nbytes / 2**30))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"huge=always,size={size_gb}g", "none", str(mnt)],
                       capture_output=True)
    if r.returncode == 0:
        out.append(("tmpfs huge=always", mnt, True))
    else:
        mnt.rmdir()  # not mounted (not root): leave no empty directory behind
    out.append((f"{default_shm} (as configured)", Path(default_shm), False))
    return out


def pinned_h2d_limit(device: str) -> float:
    """GB/s of one 1 GiB host-to-device copy from pinned memory (cudaMemcpyAsync under torch's
    copy_), best of 5 after a warm-up: what the DRAM -> GPU path can reach at most."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t0) / 1e9)
    del src, dst
    torch.cuda.empty_cache()
    return best


def memcpy_limit() -> float:
    import torch

    n = 1 << 30
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty(n, dtype=torch.uint8)
    dst.copy_(src)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, n / (time.perf_counter() - t0) / 1e9)
    return best


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    device = args.device
    on_gpu = device != "cpu"
    if on_gpu:
        from sllm_knative.loading import resolve_device

        device = str(resolve_device(device))  # fails here, before minutes of preparation, without a GPU
    work = Path(args.work)
    paths = prepare(work, args.model_gb, args.shape, args.loaders, "cuda" if on_gpu else "cpu")
    part0 = files_of("sllm_knative", paths)[0]
    nbytes = sum(f.stat().st_size for f in files_of("sllm_knative", paths))
    limit = fio_limit(part0) or own_direct_limit(part0)
    limits: dict[str, Any] = {"disk_direct_gbps": round(limit[0], 3), "tool": limit[1],
                              "memcpy_gbps": round(memcpy_limit(), 3)}
    if on_gpu:
        limits["pinned_h2d_gbps"] = round(pinned_h2d_limit(device), 3)
        limits["gpu"] = torch.cuda.get_device_name(device)
    print(f"limits: {limits}", flush=True)
    rows: list[dict[str, Any]] = []

    def add(loader: str, scenario: str, fn: Callable[[], float], extra: dict[str, Any] | None = None) -> None:
        try:
            r = median_runs(fn, args.runs)
        except Exception as exc:  # a peer that cannot run here gets a row that says why
            rows.append({"loader": loader, "scenario": scenario, "device": device,
                         "skipped": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{loader:30s} {scenario:5s} skipped: {exc}", flush=True)
            return
        gbps = nbytes / r["seconds"] / 1e9
        rows.append({"loader": loader, "scenario": scenario, "device": device, "seconds": round(r["seconds"], 4),
                     "gbps": round(gbps, 3), "first_s": round(r["first_s"], 4),
                     "runs_s": [round(x, 4) for x in r["runs_s"]], **(extra or {})})
        print(f"{loader:30s} {scenario:5s} {r['seconds']:7.3f} s {gbps:6.2f} GB/s (first {r['first_s']:.3f} s)"
              f" {extra or ''}", flush=True)
        # What is measured so far, for a run stopped at a time limit (bench/gpu/check.py reads it).
        write_json(Path(args.out), "loading", {"benchmark": "loading", "partial": True, "device": device,
                                               "model_bytes": nbytes, "limits": limits, "rows": rows})

    for loader in args.loaders:
        for scenario in ("cold", "warm"):
            if scenario == "warm":
                for f in files_of(loader, paths):
                    with open(f, "rb") as fh:
                        while fh.read(64 << 20):
                            pass
            add(loader, scenario, functools.partial(timed_load, loader, paths, scenario, device=device))
    # DRAM tier: the checkpoint on tmpfs (mapped on the CPU, through the pinned ring onto a GPU);
    # safetensors from the same tmpfs for reference. Two tmpfs set-ups: one mounted with
    # huge=always (the recommended DRAM tier, see docs/sidecar.md; needs root to mount) and the
    # machine's /dev/shm as it is.
    dram_dirs = _dram_dirs(args.shm, nbytes)
    for label, shm_root, mounted in dram_dirs[:1] if args.one_dram_fs else dram_dirs:
        shm = shm_root / f"sllm-bench-{os.getpid()}"
        try:
            shutil.copytree(paths["sllm"], shm / "sllm")
            add("sllm_knative", "dram",
                functools.partial(timed_load, "sllm_knative", paths, "dram", shm / "sllm", device),
                extra={"dram_fs": label})
            if "safetensors" in args.loaders:
                (shm / "st").mkdir()
                for f in _safetensors_files(paths["hf"]):
                    shutil.copy(f, shm / "st" / f.name)
                add("safetensors", "dram", functools.partial(timed_load, "safetensors", paths, "dram", shm / "st",
                                                             device), extra={"dram_fs": label})
        finally:
            shutil.rmtree(shm, ignore_errors=True)
            if mounted:
                subprocess.run(["umount", "-l", str(shm_root)], check=False)
                with contextlib.suppress(OSError):  # detached lazily; left where still in use
                    shm_root.rmdir()
    if not on_gpu:
        rows.append({"loader": "sllm_knative", "scenario": "dram", "device": "cuda",
                     "skipped": "this run is on the CPU (--device cuda on a GPU machine: bench/gpu/run.sh)"})
    sweep = []
    if args.sweep:
        from sllm_knative.loading import LoadOptions, load_state_dict

        for threads in (2, 4, 8, 16):
            for chunk_mb in (4, 16):
                def one(t: int = threads, c: int = chunk_mb) -> float:
                    evict(part0)
                    t0 = time.perf_counter()
                    load_state_dict(paths["sllm"], device, options=LoadOptions(threads=t, chunk_bytes=c << 20))
                    if on_gpu:
                        torch.cuda.synchronize()
                    return time.perf_counter() - t0
                r = median_runs(one, 2)
                sweep.append({"threads": threads, "chunk_mb": chunk_mb, "gbps": round(nbytes / r["seconds"] / 1e9, 3)})
                print(f"sweep threads={threads:2d} chunk={chunk_mb:2d} MiB {sweep[-1]['gbps']:.2f} GB/s", flush=True)
    ratios = ratios_of(rows, limits, device)
    return {"benchmark": "loading", "device": device, "model_bytes": nbytes,
            "model": args.shape if args.shape != "auto" else f"spec_for_size({args.model_gb:g} GiB)",
            "machine": machine(), "limits": limits, "rows": rows, "ratios": ratios,
            "targets": targets_of(ratios, device), "sweep": sweep,
            "command": " ".join(["python -m bench.loading", *sys.argv[1:]])}


# Issue 18's targets on a GPU: name -> (ratio key, least value).
GPU_TARGETS = {"dram_to_gpu_vs_pinned_copy": ("dram_fraction_of_pinned_h2d", 0.9),
               "cold_disk_to_gpu_vs_disk": ("cold_fraction_of_disk", 0.85),
               "cold_vs_safetensors_to_cuda": ("cold_speedup_vs_safetensors", 6.5),
               "cold_no_slower_than_instanttensor": ("cold_speedup_vs_instanttensor", 1.0)}


def ratios_of(rows: list[dict[str, Any]], limits: dict[str, Any], device: str = "cpu") -> dict[str, float]:
    """The headline ratios of the rows measured on `device` (the first dram row is the huge-page
    tmpfs one when it could be mounted)."""
    def row(loader: str, scenario: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["loader"] == loader and r["scenario"] == scenario
                     and r.get("device") == device and "seconds" in r), None)

    out: dict[str, float] = {}
    ours_cold, st_cold = row("sllm_knative", "cold"), row("safetensors", "cold")
    ours_dram, st_warm = row("sllm_knative", "dram"), row("safetensors", "warm")
    if ours_cold and limits.get("disk_direct_gbps"):
        out["cold_fraction_of_disk"] = round(ours_cold["gbps"] / limits["disk_direct_gbps"], 3)
    if ours_cold and st_cold:
        out["cold_speedup_vs_safetensors"] = round(st_cold["seconds"] / ours_cold["seconds"], 2)
    it_cold = row("instanttensor", "cold")
    if ours_cold and it_cold:
        out["cold_speedup_vs_instanttensor"] = round(it_cold["seconds"] / ours_cold["seconds"], 2)
    if ours_dram and st_warm:
        out["dram_time_over_safetensors_warm"] = round(ours_dram["seconds"] / st_warm["seconds"], 3)
    if ours_dram and limits.get("pinned_h2d_gbps"):
        out["dram_fraction_of_pinned_h2d"] = round(ours_dram["gbps"] / limits["pinned_h2d_gbps"], 3)
    return out


def targets_of(ratios: dict[str, float], device: str) -> list[dict[str, Any]]:
    """Each GPU target with its measured ratio and whether it is met (None: not measured)."""
    if device == "cpu":
        return []
    out = []
    for name, (key, least) in GPU_TARGETS.items():
        got = ratios.get(key)
        out.append({"target": name, "ratio": key, "at_least": least, "measured": got,
                    "met": None if got is None else got >= least})
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "gbps" in r]
    scenarios = ["cold", "warm", "dram"]
    loaders = [lo for lo in LOADERS if any(r["loader"] == lo for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.27
    for i, sc in enumerate(scenarios):
        vals = [next((r["gbps"] for r in rows if r["loader"] == lo and r["scenario"] == sc), 0) for lo in loaders]
        ax.bar([x + (i - 1) * width for x in range(len(loaders))], vals, width, label=sc)
    ax.axhline(doc["limits"]["disk_direct_gbps"], color="k", ls="--", lw=1,
               label=f"disk direct read limit ({doc['limits']['disk_direct_gbps']:.2f} GB/s)")
    ax.set_xticks(range(len(loaders)))
    ax.set_xticklabels([lo.replace("_", "\n", 1) for lo in loaders], fontsize=8)
    ax.set_ylabel("GB/s (higher is better)")
    if doc.get("device", "cpu") == "cpu":
        where = "host memory"
    else:
        where = f"{doc['limits'].get('gpu', 'GPU')} memory"
        ax.axhline(doc["limits"]["pinned_h2d_gbps"], color="tab:red", ls=":", lw=1,
                   label=f"pinned host-to-device copy ({doc['limits']['pinned_h2d_gbps']:.1f} GB/s)")
    ax.set_title(f"Loading a {doc['model_bytes'] / 2**30:.2f} GiB checkpoint into {where} "
                 f"({doc['machine']['cpus']} cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    from sllm_knative.models import SHAPES

    p = argparse.ArgumentParser(prog="python -m bench.loading", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-gb", type=float, default=2.5, help="size of the random model (--shape auto)")
    p.add_argument("--shape", default="auto", choices=["auto", *SHAPES],
                   help="auto: spec_for_size(--model-gb); or a named Llama-3-like shape (llama-8b: about 16 GB)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where every loader puts the tensors")
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=5,
                   help="timed runs after the first (median reported; 0: the first run is the result)")
    p.add_argument("--work", default=".bench/loading", help="where models are built and cached")
    p.add_argument("--shm", default="/dev/shm", help="tmpfs directory for the DRAM scenario")
    p.add_argument("--loaders", nargs="+", default=LOADERS, choices=LOADERS)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the threads x chunk sweep")
    p.add_argument("--one-dram-fs", action="store_true",
                   help="the DRAM scenario on the huge-page tmpfs only (or /dev/shm where it cannot be mounted)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    exit_on_sigterm()
    doc = run(args)
    out = Path(args.out)
    write_json(out, "loading", doc)
    plot(doc, out / "loading.png")
    print(json.dumps({"limits": doc["limits"], "ratios": doc["ratios"], "targets": doc["targets"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
