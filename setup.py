"""What pyproject.toml cannot express alone.

- The top-level ``models/`` folder (trained bundles) ships inside the installed package as
  ``edgecloud.models``.
- The array-pass kernels of the simulated CiM backends (``edgecloud/cim/csrc``) are compiled at
  build time, once per instruction set, each into a shared library of its own that
  :mod:`edgecloud.cim.kernel` loads with ctypes and picks at run time from the CPU's features:
  AVX-512 VNNI and AVX2 (x86-64 only) and a portable build with no instruction-set flags. A build
  that fails (no compiler, no OpenMP) is skipped, not fatal: the package then runs the torch path
  and says so once.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from setuptools import Extension, find_packages, setup

CSRC = Path("edgecloud/cim/csrc")
COMMON = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-std=gnu11"]
# instruction set -> compiler flags (the sources check nothing at run time: kernel.py dispatches)
ISA_FLAGS = {
    "vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma",
             "-mprefer-vector-width=512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "portable": [],
}


def source_hash(isa: str) -> str:
    """Digest of one library's sources, compiled into it so a stale build is noticed (kernel.py)."""
    digest = hashlib.sha256()
    for path in (CSRC / "cim_common.h", CSRC / f"cim_{isa}.c"):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def kernel_extensions() -> list[Extension]:
    x86 = platform.machine().lower() in {"x86_64", "amd64"}
    return [
        Extension(
            f"edgecloud.cim._kernel_{isa}",
            sources=[str(CSRC / f"cim_{isa}.c")],
            depends=[str(CSRC / "cim_common.h")],
            define_macros=[("EC_SOURCE_HASH", f'"{source_hash(isa)}"')],
            extra_compile_args=COMMON + flags,
            extra_link_args=["-fopenmp"],
            libraries=["m"],
            optional=True,
        )
        for isa, flags in ISA_FLAGS.items()
        if x86 or isa == "portable"
    ]


setup(
    packages=find_packages(include=["edgecloud", "edgecloud.*"]) + ["edgecloud.models"],
    package_dir={"edgecloud.models": "models"},
    ext_modules=kernel_extensions(),
)
