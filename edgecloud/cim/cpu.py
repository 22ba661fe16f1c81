"""What CPU this is: model name and SIMD features, for kernel dispatch and for benchmark reports.

Read from ``/proc/cpuinfo`` on Linux (x86 ``flags``, aarch64 ``Features``); elsewhere only the
machine type is known and no SIMD feature is assumed. ``EDGECLOUD_CPU_FLAGS_OFF`` (a comma list,
e.g. ``avx512f,avx512_vnni``) hides features, to see what dispatch does on a lesser CPU.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# features worth naming in a report, in this order
NOTABLE = ("sse4_2", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
           "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str
    flags: frozenset[str]
    cores: int

    def simd(self) -> list[str]:
        """The notable SIMD features this CPU has."""
        return [f for f in NOTABLE if f in self.flags]

    def as_dict(self) -> dict:
        import torch

        return {"model": self.model, "machine": self.machine, "cores": self.cores, "simd": self.simd(),
                "torch_capability": torch.backends.cpu.get_cpu_capability()}


@functools.cache
def cpu_info() -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    hidden = {f.strip() for f in os.environ.get("EDGECLOUD_CPU_FLAGS_OFF", "").split(",") if f.strip()}
    flags -= hidden
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model or platform.machine(), platform.machine(), frozenset(flags), cores)
