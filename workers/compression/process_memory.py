"""The process's host memory as the kernel sees it, and glibc's hold on what was freed.

Torch-free (stdlib only), so preflight, the worker and the engine share one reader of `/proc`.

glibc keeps freed heap memory for reuse instead of handing it back, and by default it raises its
mmap threshold each time a large block is freed, so the next large tensors come from that heap
too: a blockwise run's per-block activations then stay resident, fragmented, long after they were
freed (measured on SmolLM2 GPTQ 64 x 512, streamed: a block's peak RSS 1,148 MB with the default,
879 MB with `return_large_frees`). Elsewhere than Linux/glibc every call here is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import os
from contextlib import suppress

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
_M_MMAP_THRESHOLD = -3
# Allocations from this size up get their own mapping, unmapped (returned) when freed: a tensor of
# 1 MiB or more never lingers in the heap. Smaller ones (GPTQ's column vectors) stay on the heap.
LARGE_ALLOCATION_BYTES = 1 << 20


def _libc() -> ctypes.CDLL | None:
    with suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def return_large_frees() -> bool:
    """From now on, large allocations are handed back to the OS when freed (a fixed mmap
    threshold, which also stops glibc from raising it). Call once per process, before the work;
    True when it took effect."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", LARGE_ALLOCATION_BYTES, done)
    return done


def trim() -> None:
    """Hand the heap's free memory back to the OS now (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        with suppress(AttributeError):
            libc.malloc_trim(0)


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process: write 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def proc_bytes(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a /proc file (`/proc/self/status`, `/proc/meminfo`), in bytes."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def status_bytes(field: str) -> int | None:
    """This process's `VmRSS`, `VmHWM`, `RssAnon`, … in bytes (None where /proc has none)."""
    return proc_bytes("/proc/self/status", field)


_MADV_DONTNEED = 4


def _file_mapping(address: int) -> tuple[int, int] | None:
    """(start, end) of the private mapping of a file that holds `address`, or None (anonymous
    memory, a shared mapping, or no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(part, 16) for part in fields[0].split("-"))
                if start <= address < end:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    private = fields[1].endswith("p")
                    return (start, end) if private and path.startswith("/") else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def drop_file_pages(address: int, length: int) -> bool:
    """Take the pages wholly inside [address, address + length) of a private file mapping out of
    this process's resident set (`madvise(MADV_DONTNEED)`): they stay in the page cache, and a
    later read maps them again. For what is read through a memory map and never written (a
    checkpoint's embeddings and head, read a slice at a time): resident memory is then what is
    in use, not all that was ever read. Refuses (False) anything but a private file mapping
    covering the whole range; the caller must know the range was never written in place (this
    would discard such writes)."""
    libc = _libc()
    if libc is None or length <= 0 or not hasattr(libc, "madvise"):
        return False
    mapping = _file_mapping(address)
    if mapping is None or address + length > mapping[1]:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    first = -(-address // page) * page
    last = (address + length) // page * page
    if last <= first:
        return False
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0
