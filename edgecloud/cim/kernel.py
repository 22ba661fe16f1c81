"""The compiled array-pass kernels, one library per instruction set, and which one runs.

The C sources (``edgecloud/cim/csrc``: ``cim_common.h`` and one file per instruction set) are
compiled when the package is built (``setup.py``), into ``_kernel_vnni``, ``_kernel_avx2`` and
``_kernel_portable`` shared libraries next to this module, loaded here with ctypes. Paths, in
the order ``auto`` prefers them:

- ``vnni``: AVX-512 VNNI (``vpdpbusd``: 64 exact int8 products per instruction);
- ``avx2``: AVX2 + FMA + F16C (``vpmaddubsw`` with int16 accumulation while sums stay below
  2^15, widened by ``vpmaddwd``);
- ``portable``: plain C, auto-vectorised by the compiler; builds anywhere (aarch64 included);
- ``torch``: no C at all, the reference the kernels are tested against (exact fp32 GEMMs where
  ``torch._int_mm`` would be a slow reference loop, i.e. without VNNI).

``EDGECLOUD_CIM_KERNEL=auto|vnni|avx2|portable|torch`` (or a backend's ``kernel`` option) forces
a path; a path this machine cannot run is an error that says why. Every path does the same
arithmetic with the same noise samples; results differ by float rounding only, and are equal
at ideal settings.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from edgecloud.cim.cpu import CpuInfo, cpu_info

log = logging.getLogger(__name__)

ENV = "EDGECLOUD_CIM_KERNEL"
COMPILED = ("vnni", "avx2", "portable")
PATHS = (*COMPILED, "torch")
CHOICES = ("auto", *PATHS)
# CPU features each compiled path needs (names as in /proc/cpuinfo)
REQUIRES: dict[str, frozenset[str]] = {
    "vnni": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "portable": frozenset(),
}
CSRC = Path(__file__).with_name("csrc")
HOW_TO_BUILD = ("build them with a C compiler and OpenMP present: `pip install -e .` in a checkout "
                "(or `python setup.py build_ext --inplace`), or reinstall the package")


class KernelUnavailable(ValueError):
    """A kernel path was asked for that this machine or this installation cannot run."""


def library_file(path: str) -> Path | None:
    """Where the compiled library of a path is, or None if it was not built."""
    spec = importlib.util.find_spec(f"edgecloud.cim._kernel_{path}")
    return Path(spec.origin) if spec is not None and spec.origin else None


def unavailable_reason(path: str, info: CpuInfo | None = None, built: bool | None = None) -> str | None:
    """Why ``path`` cannot run here (None when it can)."""
    if path not in PATHS:
        return f"unknown CiM kernel {path!r}; choose one of {', '.join(CHOICES)}"
    if path == "torch":
        return None
    info = info or cpu_info()
    missing = sorted(REQUIRES[path] - info.flags)
    if missing:
        return f"the {path} kernel needs CPU features {', '.join(missing)}, which this CPU ({info.model}) lacks"
    if not (library_file(path) is not None if built is None else built):
        return f"the {path} kernel was not compiled into this installation ({HOW_TO_BUILD})"
    return None


def choose(requested: str = "auto", info: CpuInfo | None = None, built: set[str] | None = None,
           source: str = ENV) -> str:
    """The path a request resolves to on a CPU; raises :class:`KernelUnavailable` for a forced one
    that cannot run. ``built`` (the compiled paths) defaults to what is installed; ``source``
    names where the request came from, for the error."""
    requested = (requested or "auto").strip().lower()
    if requested not in CHOICES:
        raise KernelUnavailable(f"{source}={requested}: unknown CiM kernel; choose one of {', '.join(CHOICES)}")
    has = None if built is None else (lambda p: p in built)
    if requested != "auto":
        reason = unavailable_reason(requested, info, None if has is None else has(requested))
        if reason:
            raise KernelUnavailable(f"{source}={requested}: {reason}")
        return requested
    for path in COMPILED:
        if unavailable_reason(path, info, None if has is None else has(path)) is None:
            return path
    return "torch"


def int8_gemm_is_fast(info: CpuInfo | None = None) -> bool:
    """Whether ``torch._int_mm`` is a real int8 GEMM here; without VNNI it is a slow reference loop."""
    flags = (info or cpu_info()).flags
    return "avx512_vnni" in flags or "amx_int8" in flags


def source_hash(path: str) -> str | None:
    """Digest of one path's C sources beside this module (as setup.py computes it), if they are here."""
    files = [CSRC / "cim_common.h", CSRC / f"cim_{path}.c"]
    if not all(f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


@dataclass
class Kernel:
    """One loaded kernel library."""

    path: str
    lib: ctypes.CDLL

    @classmethod
    def load(cls, path: str) -> "Kernel":
        file = library_file(path)
        assert file is not None
        lib = ctypes.CDLL(str(file))
        lib.adc_accumulate.argtypes = [_p, _i32, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p, _i32, _f32, _p, _f32,
                                       _p, _i32, _f32, _p, _f32, _p, _p, _i64, _p, _i32]
        lib.adc_accumulate.restype = None
        lib.or_reduce.argtypes = [_p, _i64, _i64, _i64, _i32]
        lib.or_reduce.restype = ctypes.c_int32
        lib.fused_block.argtypes = [_p, _i64, _i64, _i64, _p, _i64, _p, _p, _p, _i64, _i64, _i64, _p, ctypes.c_int32,
                                    _i64, _p, _p, _p, _p, _p, _i32, _f32, _p, _p, _i64, _f32, _p, _i64, _f32, _f32,
                                    _p, _i32, _f32, _p, _f32, _p, _p, _i64, _p, _i32]
        lib.fused_block.restype = None
        for name in ("kernel_isa", "kernel_source_hash"):
            getattr(lib, name).restype = ctypes.c_char_p
        lib.weight_layout.argtypes = [ctypes.c_int32]
        lib.weight_layout.restype = _i32
        isa = lib.kernel_isa().decode()
        if isa != path:
            raise KernelUnavailable(f"{file} holds the {isa} kernel, not {path}")
        built, here = lib.kernel_source_hash().decode(), source_hash(path)
        if here is not None and built != here:
            log.warning("the compiled %s CiM kernel was built from older sources than %s; rebuild: "
                        "`python setup.py build_ext --inplace` (or `pip install -e .`)", path, CSRC)
        return cls(path, lib)

    def or_reduce(self, x: torch.Tensor) -> int:
        """Bitwise OR of every byte of a uint8 (m, K) matrix with unit column stride."""
        assert x.dtype == torch.uint8 and x.dim() == 2 and x.stride(1) == 1
        return int(self.lib.or_reduce(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), _threads()))

    def layout(self, bits_per_cycle: int) -> int:
        """How :meth:`pack_weights` lays out the weights for planes of this many bits (cim_common.h)."""
        return int(self.lib.weight_layout((1 << bits_per_cycle) - 1))

    @staticmethod
    def pack_weights(weights: list[torch.Tensor], layout: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(packed bytes, byte offset of each array, Jv): int8 (R, J) array weights in a kernel layout.

        0: int8 [ceil(R/4)][Jv][16][4] (vpdpbusd / vpmaddubsw); 1: int16 [R][16 Jv] (row-major);
        2: int16 [ceil(R/4)][16][16 Jv], the 16 subset sums of each group of 4 rows (one-bit planes).
        """
        j = weights[0].shape[1]
        jv = -(-j // 16)
        parts, offsets, at = [], [], 0
        for w in weights:
            r = w.shape[0]
            rows = -(-r // 4) * 4 if layout in (0, 2) else r
            pad = torch.zeros(rows, jv * 16, dtype=torch.int8)
            pad[:r, :j] = w
            if layout == 0:
                flat = pad.view(rows // 4, 4, jv, 16).permute(0, 2, 3, 1).reshape(-1)
            elif layout == 1:
                flat = pad.to(torch.int16).reshape(-1)
            else:
                pattern = torch.arange(16).view(16, 1)
                bits = ((pattern >> (3 - torch.arange(4).view(1, 4))) & 1).to(torch.int32)  # (16, 4), MSB = row 0
                sums = torch.einsum("pb,gbj->gpj", bits, pad.view(rows // 4, 4, jv * 16).to(torch.int32))
                flat = sums.to(torch.int16).reshape(-1)
            parts.append(flat.contiguous().view(torch.int8))
            offsets.append(at)
            at += parts[-1].numel()
        return torch.cat(parts).contiguous(), torch.tensor(offsets, dtype=torch.int64), jv

    def adc_accumulate(
        self,
        partial: torch.Tensor,  # (n_tiles, T m, J) int32 / float32, contiguous
        n_cycles: int,
        scale: torch.Tensor, shift: torch.Tensor, step: torch.Tensor, inv: torch.Tensor,  # (n_tiles, J) f32
        cycle_w: torch.Tensor,  # (T,) f32
        top: float | None,
        noise: torch.Tensor | None,  # (m n_tiles T J,) f32, row-major (see cim_common.h)
        sigma1: float,
        sigma: torch.Tensor | None,  # (n_tiles, T m, J) f32 per-conversion sigma (read noise), or sigma1
        saturation: str | None, unit: float, offset: torch.Tensor, v_sat: float,
        const: torch.Tensor, coef: torch.Tensor,  # (J,), (n_sub,) f32
        out: torch.Tensor,  # (m, O) f32, contiguous rows: written
    ) -> None:
        """out[i, o] = sum_s coef[s] (const + sum over arrays of step * sum over cycles of weight * code)[i, s O + o]."""
        n_tiles, rows, j = partial.shape
        m = rows // n_cycles
        for t in (partial, scale, shift, step, inv, cycle_w, offset, noise, sigma, const, coef, out):
            assert t is None or t.is_contiguous()
        assert noise is None or (noise.dtype == torch.float32 and noise.numel() == partial.numel())
        assert sigma is None or sigma.shape == partial.shape
        assert out.shape == (m, j // coef.numel()) and out.dtype == torch.float32
        self.lib.adc_accumulate(
            partial.data_ptr(), int(partial.dtype == torch.float32), n_tiles, n_cycles, m, j,
            scale.data_ptr(), shift.data_ptr(), step.data_ptr(), inv.data_ptr(), cycle_w.data_ptr(),
            int(top is not None), float(top or 0.0), _ptr(noise), float(sigma1), _ptr(sigma),
            _SATURATION[saturation], float(unit), offset.data_ptr(), float(v_sat),
            const.data_ptr(), coef.data_ptr(), coef.numel(), out.data_ptr(), _threads(),
        )

    def fused_block(
        self,
        x: torch.Tensor,  # (M, K) uint8 rows with unit column stride, or the padded NHWC input (conv)
        m: int,
        conv: torch.Tensor | None,  # int64 (OH, OW, KH, KW, C, SH, SW, DH, DW, Hp, Wp) or None
        bounds: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, int], lim16: int,
        shifts: torch.Tensor, mask: int, j: int,
        scale: torch.Tensor, shift: torch.Tensor, step: torch.Tensor, inv: torch.Tensor,  # (n_tiles, J) f32
        cycle_w: torch.Tensor, top: float | None,
        noise: tuple[torch.Tensor, torch.Tensor, int] | None,  # (float16 samples, int64 block offsets, block rows)
        sigma1: float,
        read_noise: tuple[torch.Tensor | None, float, float, torch.Tensor] | None,  # (table, rn2, s1sq, inv^2)
        saturation: str | None, unit: float, offset: torch.Tensor, v_sat: float,
        const: torch.Tensor, coef: torch.Tensor, out: torch.Tensor,
        row0: int = 0,
    ) -> None:
        """out (m, O) = the array pass of patch rows row0..row0+m: planes, int8 GEMM, ADC, shift-and-add.

        Noise samples of row i (counted from row0) start at ``samples[offs[i // block] + (i % block) n_tiles T J]``.
        """
        weights, offsets, jv = packed
        assert x.dtype == torch.uint8 and x.stride(-1) == 1 and weights.dtype == torch.int8
        assert bounds.dtype == torch.int64 and shifts.dtype == torch.int32 and offsets.dtype == torch.int64
        n_tiles, t = bounds.numel() - 1, shifts.numel()
        table, rn2, s1sq, iv2 = read_noise if read_noise is not None else (None, 0.0, 0.0, None)
        samples, noff, block = noise if noise is not None else (None, None, 1)
        for ten in (weights, scale, shift, step, inv, cycle_w, offset, samples, noff, const, coef, out, conv,
                    table, iv2):
            assert ten is None or ten.is_contiguous()
        if samples is not None:
            assert noff is not None and samples.dtype == torch.float16 and noff.dtype == torch.int64
            per_row = n_tiles * t * j
            n_blocks = -(-m // block)
            assert noff.numel() >= n_blocks
            rows = (m - block * torch.arange(n_blocks)).clamp(max=block)
            first = noff[:n_blocks]  # every block's samples lie inside the sample tensor
            assert bool(((first >= 0) & (first + rows * per_row <= samples.numel())).all())
        assert read_noise is None or noise is not None
        assert table is None or (table.dim() == 3 and table.shape[0] == n_tiles and table.shape[2] == j)
        assert out.shape == (m, j // coef.numel()) and out.dtype == torch.float32
        if conv is None:
            assert x.dim() == 2 and x.shape[0] >= row0 + m
        else:
            assert conv.dtype == torch.int64 and conv.numel() == 11 and x.is_contiguous()
            assert row0 + m <= x.shape[0] * int(conv[0]) * int(conv[1])
        self.lib.fused_block(
            x.data_ptr(), m, row0, x.stride(0) if conv is None else 0, _ptr(conv), n_tiles, bounds.data_ptr(),
            weights.data_ptr(), offsets.data_ptr(), jv, int(lim16), t, shifts.data_ptr(), mask, j,
            scale.data_ptr(), shift.data_ptr(), step.data_ptr(), inv.data_ptr(), cycle_w.data_ptr(),
            int(top is not None), float(top or 0.0), _ptr(samples), _ptr(noff), int(block), float(sigma1),
            _ptr(table), 0 if table is None else table.shape[1], float(rn2), float(s1sq), _ptr(iv2),
            _SATURATION[saturation], float(unit), offset.data_ptr(), float(v_sat),
            const.data_ptr(), coef.data_ptr(), coef.numel(), out.data_ptr(), _threads(),
        )


_SATURATION = {None: 0, "exp": 1, "tanh": 2}
_lock = threading.Lock()
_loaded: dict[str, Kernel] = {}
_warned = False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def requested() -> str:
    """The path asked for by the environment (``auto`` when unset)."""
    return os.environ.get(ENV, "").strip().lower() or "auto"


def resolve(request: str | None = None) -> Kernel | None:
    """The kernel for a request (None: the environment's; ``torch`` gives None), loaded once.

    Raises :class:`KernelUnavailable` for a forced path that cannot run here. ``auto`` on a machine
    with no compiled kernel says so once and falls back to torch.
    """
    global _warned
    path = choose(request or requested(), source=ENV if request is None else "kernel")
    if path == "torch":
        if (request or requested()) == "auto" and not _warned:
            _warned = True
            log.warning("no compiled CiM kernel is installed for this machine (%s): the simulated backends "
                        "run on the much slower torch path; %s", cpu_info().model, HOW_TO_BUILD)
        return None
    with _lock:
        if path not in _loaded:
            try:
                _loaded[path] = Kernel.load(path)
            except OSError as exc:
                raise KernelUnavailable(f"the {path} kernel at {library_file(path)} failed to load: {exc}") from exc
        return _loaded[path]


def available_paths() -> list[str]:
    """Every path that can run on this machine, in ``auto``'s order of preference (torch last)."""
    return [p for p in PATHS if unavailable_reason(p) is None]


def describe() -> dict:
    """Which path runs here and why: for benchmark reports and ``edgecloud`` diagnostics."""
    reasons = {p: unavailable_reason(p) for p in PATHS}
    return {
        "requested": requested(),
        "auto": choose("auto"),
        "available": [p for p in PATHS if reasons[p] is None],
        "unavailable": {p: why for p, why in reasons.items() if why},
        "cpu": cpu_info().as_dict(),
    }
