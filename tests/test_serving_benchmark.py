"""benchmarks/serving.py: what its JSON summary says about the machine it ran on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("serving_benchmark", REPO_ROOT / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_info_names_model_simd_cores_and_torch_capability():
    import torch

    bench = _benchmark()
    info = bench.cpu_info()
    assert set(info) == {"model", "cores", "simd", "torch_capability"}
    assert isinstance(info["model"], str) and info["model"]
    assert isinstance(info["cores"], int) and info["cores"] >= 1
    assert set(info["simd"]) <= set(bench.SIMD_FLAGS)
    assert info["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    flags = Path("/proc/cpuinfo")
    if flags.is_file() and " avx2" in flags.read_text():
        assert "avx2" in info["simd"]
