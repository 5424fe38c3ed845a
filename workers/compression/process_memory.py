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
