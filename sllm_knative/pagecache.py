"""Page-cache facts about files: how much is resident (mincore), and eviction (fadvise)."""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MEMORY_FS_MAGIC = {0x01021994, 0x858458F6}  # tmpfs, ramfs


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of a file's pages in the page cache (mincore), like util-linux `fincore`."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed", str(path))
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", str(path))
            flags = bytes(vec)  # bit 0 = resident; the other bits are reserved (zero)
            return (pages - flags.count(0)) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def is_memory_fs(path: str | os.PathLike[str]) -> bool:
    """True if path lives on tmpfs/ramfs: already in memory, to be mapped rather than read."""
    buf = (ctypes.c_long * 32)()
    if _libc.statfs(os.fsencode(str(path)), buf) != 0:
        return False
    return (buf[0] & 0xFFFFFFFF) in _MEMORY_FS_MAGIC


def evict(*paths: str | os.PathLike[str]) -> None:
    """Drop files from the page cache (fsync first: dirty pages cannot be dropped)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
