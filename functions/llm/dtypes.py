"""The compute dtype: bf16 where the CPU multiplies bf16 natively, float32 otherwise.

A bf16 matrix product runs on this project's CPUs at about 900 GFLOP/s on one core with AMX,
against about 150 for float32 and float16 (which the CPU has no fast multiply for). So on the
CPU, `--dtype auto` (the default) computes in bfloat16 when `/proc/cpuinfo` lists `amx_bf16` or
`avx512_bf16`, and in float32 otherwise, whatever the checkpoint's dtype; on CUDA it keeps the
checkpoint's dtype (the GPU path is unchanged). `--dtype bfloat16|float32|float16` overrides.

Everything here is plain logic over its inputs (the flag set is read once, by `cpu_flags`), so
the choice is tested table-driven (tests/functions/test_llm_dtypes.py). The weights are cast to
the chosen dtype tensor by tensor (`weights.cast_parameters`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

AUTO = "auto"
DTYPES = ("bfloat16", "float32", "float16")
SETTINGS = (AUTO, *DTYPES)
# cpuinfo flags that mean a native bf16 multiply, the most capable first
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype (a torch dtype's name) and why it was chosen (for logs and /health/ready)."""

    dtype: str
    reason: str

    def report(self) -> dict[str, str]:
        return {"dtype": self.dtype, "dtype_reason": self.reason}


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in `path` (empty when it cannot be read,
    as on a system without /proc: the choice is then float32)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86; arm64 calls them Features
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: Iterable[str]) -> str | None:
    """The flag that shows the CPU multiplies bf16 natively, or None."""
    have = set(flags)
    return next((f for f in BF16_FLAGS if f in have), None)


def choose(setting: str, device: str, checkpoint_dtype: str, flags: Iterable[str]) -> DtypeChoice:
    """The compute dtype for `setting` (auto or a dtype name) on `device` ("cpu", "cuda[:N]"),
    given the checkpoint's dtype and the CPU's flags."""
    if setting not in SETTINGS:
        raise ValueError(f"dtype = {setting!r}, must be one of {', '.join(SETTINGS)}")
    if setting != AUTO:
        return DtypeChoice(setting, "set by --dtype / SLLM_DTYPE")
    if device.startswith("cuda"):
        return DtypeChoice(checkpoint_dtype, "cuda: the checkpoint's dtype")
    flag = native_bf16(flags)
    if flag is not None:
        return DtypeChoice("bfloat16", f"the CPU multiplies bf16 natively ({flag})")
    return DtypeChoice("float32", f"the CPU has no native bf16 multiply (none of {', '.join(BF16_FLAGS)})")
