"""Keep freed host memory inside the process, so CPU training steps stop page-faulting their tensors in again.

Why this exists: torch's CPU allocator calls malloc and free directly — there is no caching allocator as on CUDA.
With glibc's defaults, blocks above the mmap threshold (which adapts, up to 32 MiB) are fresh mappings that free()
unmaps, and the top of the heap goes back to the OS once more than M_TRIM_THRESHOLD of it is free. A training step
frees its activations, logits and gradients, so the next step asks the kernel for the same memory again and
touches it page by page, each page zero-filled. On the project's 2-core CPU that is up to ~15 % of a step
(docs/PERFORMANCE.md; `make demo` trains at 259 instead of 247 tokens/s with it, with identical losses).

Raising both thresholds keeps freed blocks in the heap for the next step: the effect PyTorch's CPU tuning guide
gets from preloading jemalloc or tcmalloc, without a native dependency. The price is that the process holds on to
its peak resident size until it exits, as torch's CUDA caching allocator does with device memory. It only changes
where memory comes from, never a value a tensor holds. (A malloc that finds the main heap locked by another thread
is served from a thread heap of at most 64 MiB; blocks bigger than that are still mapped afresh each time.)

`drlora train` applies it by default (`train.keep_host_memory`); library users call `keep_freed_host_memory()`
once at the start of their own training script.
"""

from __future__ import annotations

import ctypes
import platform
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest free heap top it leaves alone
# blocks up to this size come from the heap and stay there once freed; some glibc versions refuse more than 32 MiB
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)

_applied: str | None = None


def keep_freed_host_memory() -> str:
    """Make glibc keep freed blocks of this process for reuse instead of returning them to the OS.

    Returns what was done, in one sentence for a log line. Off Linux or with a C library other than glibc it
    changes nothing and says so (macOS and musl manage their heaps differently; preload jemalloc there instead).
    Calling it again is harmless.
    """
    global _applied
    if _applied is not None:
        return _applied
    library, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or library != "glibc":
        return (f"host memory: left to the system allocator ({library or 'unknown C library'} on {sys.platform}; "
                "keeping freed memory needs glibc)")
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM):
        return f"host memory: left to the system allocator (glibc {version} refused M_TRIM_THRESHOLD)"
    threshold = next((t for t in _MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, t)), None)
    mapped = f"blocks up to {threshold >> 20} MiB come from the heap" if threshold else "large blocks stay mmapped"
    _applied = f"host memory: freed blocks stay in the process for reuse (glibc {version}; {mapped})"
    return _applied
