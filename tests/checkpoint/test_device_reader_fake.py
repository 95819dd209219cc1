"""The device reader (cuda_ext/src/device_reader.cu) against a fake CUDA runtime, under sanitizers.

No GPU needed: device_reader.cu is compiled as C++ against tests/checkpoint/fake_cuda/cuda_runtime.h,
whose streams are threads that run their copies in order after random delays, and whose calls can be
made to fail one at a time. The driver (fake_cuda/driver.cpp) calls the real sllm::read_to_device and
checks the data, checksum errors, cancellation, injected failures (no leaks), zero-length reads and
the caller's current device. It is built twice, with ASan/UBSan and with TSan.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "cuda_ext" / "src"
FAKE = Path(__file__).resolve().parent / "fake_cuda"

SANITIZERS = {
    "asan-ubsan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}


@pytest.mark.parametrize("sanitizer", sorted(SANITIZERS))
def test_device_reader_under_fake_cuda(sanitizer: str, tmp_path: Path) -> None:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: cannot build the fake-CUDA driver")
    exe = tmp_path / f"driver-{sanitizer}"
    cmd = [gxx, "-std=c++17", "-g", "-O1", "-Wall", "-Wextra", "-Werror", *SANITIZERS[sanitizer],
           "-DSLLM_WITH_CUDA", f"-I{FAKE}", f"-I{SRC}",
           "-x", "c++", str(SRC / "device_reader.cu"), "-x", "none",
           str(SRC / "reader.cpp"), str(SRC / "crc32c.cpp"), str(FAKE / "fake_cuda.cpp"), str(FAKE / "driver.cpp"),
           "-o", str(exe), "-pthread"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{build.stderr[-6000:]}"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1")
    run = subprocess.run([str(exe), str(scratch)], capture_output=True, text=True, timeout=120, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"driver failed under {sanitizer} (rc {run.returncode}):\n{out[-8000:]}"
    assert "all fake-CUDA checks passed" in run.stdout
    assert "WARNING: ThreadSanitizer" not in out and "runtime error:" not in out, out[-8000:]
