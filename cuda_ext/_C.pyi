"""Typed surface of the compiled loader extension (checked by mypy in `make lint`)."""

from typing import Any

class CancelToken:
    def __init__(self) -> None: ...
    def cancel(self) -> None: ...
    @property
    def cancelled(self) -> bool: ...

def set_error_types(checksum_error: type[BaseException], cancelled_error: type[BaseException]) -> None: ...
def crc32c(data: Any, crc: int = 0) -> int: ...
def crc32c_ptr(ptr: int, nbytes: int, crc: int = 0) -> int: ...
def crc32c_hardware() -> bool: ...
def bf16_linear_supported() -> bool: ...
def amx_linear_supported() -> bool: ...
def bf16_linear(
    x: int,
    w: int,
    bias: int,
    y: int,
    m: int,
    n: int,
    k: int,
    batch: int = 1,
    *,
    threads: int = 1,
    amx: bool = False,
    w_stride: int = 0,
) -> None: ...
def rms_norm_bf16(x: int, w: int, y: int, rows: int, n: int, eps: float) -> None: ...
def rotary_bf16(x: int, cos: int, sin: int, y: int, rows: int, heads: int, d: int) -> None: ...
def cuda_available() -> bool: ...
def cuda_compiled() -> bool: ...
def cuda_error() -> str: ...
def release_pinned() -> None: ...
def read_to_host(
    path: str,
    file_offset: int,
    dst: int,
    length: int,
    chunk_bytes: int,
    threads: int,
    direct: bool = True,
    block_bytes: int = 0,
    block_crcs: list[int] = ...,
    cancel: CancelToken | None = None,
    prefault: bool = False,
) -> dict[str, Any]: ...
def read_to_device(
    path: str,
    file_offset: int,
    device: int,
    dptr: int,
    length: int,
    chunk_bytes: int,
    threads: int,
    direct: bool = True,
    pinned_bytes: int = 268435456,
    streams: int = 4,
    block_bytes: int = 0,
    block_crcs: list[int] = ...,
    cancel: CancelToken | None = None,
) -> dict[str, Any]: ...
