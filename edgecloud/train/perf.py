"""CPU settings that are first-order effects for eager torch on a 2-core machine.

bfloat16 autocast pays only where the CPU computes in bf16 natively (AVX512-BF16, AMX-BF16, Arm
BF16): there FP convs train ~1.8x faster. Elsewhere (AVX2-only CPUs) oneDNN emulates it and a
training step is many times SLOWER than in float32 (benchmarks/train_precision.py; the README's
"Training a bundle" gives the numbers and the command), so a recipe's ``precision: bf16`` means
"bf16 where it is native, float32 elsewhere"; ``EDGECLOUD_BF16=force`` keeps bf16 anyway,
``EDGECLOUD_BF16=off`` never uses it. The precision used goes to the bundle's card.

glibc malloc returns large activation buffers to the OS after every step and page-faults them
back in on the next one; raising the mmap/trim thresholds keeps them in the heap
(see /work/shared/notes/cpu-performance.md: 1.4-1.7x faster eager torch). ``mallopt`` applies
the same settings as the ``MALLOC_*_`` environment variables, but from inside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

from edgecloud.cim.cpu import cpu_info

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


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 flags; "bf16" is Arm's Features name


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (see the module docstring)."""
    return any(f in cpu_info().flags for f in NATIVE_BF16_FLAGS)


def training_precision(requested: str) -> str:
    """The precision a recipe's ``precision`` trains in on this machine: "bf16" or "fp32"."""
    mode = os.environ.get("EDGECLOUD_BF16", "").strip().lower()
    if mode not in ("", "force", "off"):
        raise ValueError(f"EDGECLOUD_BF16 must be 'force', 'off' or unset, got {mode!r}")
    if requested != "bf16" or mode == "off":
        return "fp32"
    if mode == "force" or native_bf16():
        return "bf16"
    _warn_emulated_bf16()
    return "fp32"


@functools.cache
def _warn_emulated_bf16() -> None:
    print(f"note: the recipe asks for bf16, but this CPU ({cpu_info().model}) has no native bfloat16 "
          f"({' / '.join(NATIVE_BF16_FLAGS[:2])}): emulated bf16 trains several times slower, so it trains in float32 "
          "(EDGECLOUD_BF16=force keeps bf16)", file=sys.stderr)


def autocast_bf16(requested: str) -> bool:
    """Whether to wrap forward passes in bfloat16 autocast for a recipe's ``precision``."""
    return training_precision(requested) == "bf16"
