"""Build of the loader extension (cuda_ext._C).

The C++ part always builds. The CUDA part (device_reader.cu) is compiled with nvcc whenever
nvcc is found (set SLLM_NO_CUDA=1 to skip it) and linked against the static CUDA runtime, so
the module loads on machines without CUDA libraries and picks the GPU path only when a
device is present at run time. PyTorch is neither included nor linked: the module takes raw
pointers and byte counts.

Where nvcc comes from, in order: $CUDA_HOME/bin, the PyPI wheels in this interpreter's
site-packages (nvidia-cuda-nvcc, -runtime, -crt and nvidia-nvvm, installed by `make install`,
laid out as nvidia/cu13/{bin,include,lib}), PATH, /usr/local/cuda. With CI=true a build that
finds no nvcc fails instead of quietly building the CPU path only (SLLM_NO_CUDA=1 opts out).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

SRC = Path("cuda_ext/src")
CUDA_ARCHS = os.environ.get("SLLM_CUDA_ARCHS", "80;90")


def pypi_cuda_home() -> Path | None:
    """nvidia/cu13 of the CUDA 13 wheels in this interpreter's site-packages, if nvcc is there."""
    for site in map(Path, sysconfig.get_paths().values()):
        home = site / "nvidia" / "cu13"
        if (home / "bin" / "nvcc").exists():
            return home
    return None


def find_nvcc() -> str | None:
    if os.environ.get("SLLM_NO_CUDA") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin/nvcc").exists():
        return str(Path(home) / "bin/nvcc")
    wheels = pypi_cuda_home()
    if wheels:
        return str(wheels / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def find_cuda_home(nvcc: str) -> Path:
    """The toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include/cuda_runtime.h").exists():
            return Path(c)
    raise RuntimeError(f"nvcc found at {nvcc} but no CUDA toolkit headers; set CUDA_HOME or SLLM_NO_CUDA=1")


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc into objects linked with the C++ sources."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        if nvcc:
            cuda_home = find_cuda_home(nvcc)
            build_tmp = Path(self.build_temp)
            build_tmp.mkdir(parents=True, exist_ok=True)
            obj = build_tmp / "device_reader.o"
            gencode = []
            for arch in CUDA_ARCHS.split(";"):
                gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            last = CUDA_ARCHS.split(";")[-1]
            gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
            cmd = [nvcc, "-c", str(SRC / "device_reader.cu"), "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC,-Wall,-Wextra", "-DSLLM_WITH_CUDA", f"-I{SRC}", *gencode]
            print("compiling CUDA path:", " ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            ext.extra_objects.append(str(obj))
            ext.define_macros.append(("SLLM_WITH_CUDA", "1"))
            ext.include_dirs.append(str(cuda_home / "include"))
            # The toolkit has lib64; the PyPI wheels have lib.
            ext.library_dirs += [str(d) for d in (cuda_home / "lib64", cuda_home / "lib") if d.is_dir()]
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        elif os.environ.get("CI") == "true" and os.environ.get("SLLM_NO_CUDA") != "1":
            raise RuntimeError("CI=true: nvcc not found, so the CUDA path of cuda_ext would not be built; "
                               "install the pinned nvidia-cuda-nvcc wheels (make install) or set SLLM_NO_CUDA=1")
        else:
            print("nvcc not found: building the CPU path of cuda_ext only", flush=True)
        super().build_extension(ext)


ext = Pybind11Extension(
    "cuda_ext._C",
    sources=[str(SRC / "module.cpp"), str(SRC / "reader.cpp"), str(SRC / "crc32c.cpp"), str(SRC / "cpu_linear.cpp"),
             str(SRC / "cpu_norm.cpp")],
    include_dirs=[str(SRC)],
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra"],  # builds with no warnings; keep it so
    libraries=["pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
