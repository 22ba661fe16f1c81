"""CPU settings that are first-order effects for eager torch on a 2-core machine.

glibc malloc returns large activation buffers to the OS after every step and page-faults them
back in on the next one; raising the mmap/trim thresholds keeps them in the heap
(see /work/shared/notes/cpu-performance.md: 1.4-1.7x faster eager torch). ``mallopt`` applies
the same settings as the ``MALLOC_*_`` environment variables, but from inside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30, top_pad: int = 256 << 20) -> bool:
    """Apply the malloc settings; returns False where glibc's ``mallopt`` is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1  # glibc caps this at 32 MiB on 64-bit
    ok &= mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    ok &= mallopt(_M_TOP_PAD, top_pad) == 1
    return bool(ok)
