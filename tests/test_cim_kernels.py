"""Kernel dispatch: which compiled path runs on which CPU, how to force one, and how it fails."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgecloud.cim import kernel
from edgecloud.cim.backend import create_backend
from edgecloud.cim.cpu import CpuInfo, cpu_info
from edgecloud.nn.quant import QuantConv2d

ROOT = Path(__file__).resolve().parents[1]
ALL_BUILT = {"vnni", "avx2", "portable"}
AVX512_VNNI = CpuInfo("EPYC with AVX-512", "x86_64", frozenset(
    {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}), 2)
AVX2_ONLY = CpuInfo("EPYC with AVX2", "x86_64", frozenset({"avx2", "fma", "f16c", "sse4_2"}), 2)
ARM = CpuInfo("Neoverse", "aarch64", frozenset({"asimd", "fp"}), 4)


@pytest.mark.parametrize("info,built,expected", [
    (AVX512_VNNI, ALL_BUILT, "vnni"),
    (AVX2_ONLY, ALL_BUILT, "avx2"),  # an AVX2-only CPU gets the AVX2 kernel
    (AVX512_VNNI, {"avx2", "portable"}, "avx2"),  # a build without the VNNI library
    (ARM, {"portable"}, "portable"),
    (AVX2_ONLY, set(), "torch"),  # nothing compiled: the torch reference
])
def test_auto_picks_the_best_path_the_cpu_and_the_build_allow(info: CpuInfo, built: set, expected: str) -> None:
    assert kernel.choose("auto", info, built) == expected


def test_forcing_a_path_the_cpu_lacks_fails_naming_the_missing_features() -> None:
    with pytest.raises(kernel.KernelUnavailable, match=r"EDGECLOUD_CIM_KERNEL=vnni: .*avx512_vnni.*EPYC with AVX2"):
        kernel.choose("vnni", AVX2_ONLY, ALL_BUILT)
    with pytest.raises(kernel.KernelUnavailable, match=r"avx2.*f16c"):
        kernel.choose("avx2", ARM, ALL_BUILT)


def test_forcing_a_path_that_was_not_compiled_says_how_to_build_it() -> None:
    with pytest.raises(kernel.KernelUnavailable, match=r"not compiled.*pip install -e \."):
        kernel.choose("portable", ARM, set())


def test_unknown_paths_are_rejected_with_the_choices() -> None:
    with pytest.raises(kernel.KernelUnavailable, match="auto, vnni, avx2, portable, torch"):
        kernel.choose("sse9")
    assert kernel.choose("torch", ARM, set()) == "torch"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    if kernel.ENV not in env:  # the caller's environment must not force a path
        full.pop(kernel.ENV, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, check=False)


PICKED = ("import json; from edgecloud.cim.backend import create_backend; "
          "be = create_backend('crossbar', {}); print(json.dumps(be.kernel and be.kernel.path))")


@pytest.mark.parametrize("path", [p for p in kernel.available_paths()])
def test_the_environment_variable_forces_a_path(path: str) -> None:
    proc = _run(PICKED, EDGECLOUD_CIM_KERNEL=path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == (None if path == "torch" else path)


def test_a_bad_environment_value_fails_when_the_backend_is_made() -> None:
    proc = _run(PICKED, EDGECLOUD_CIM_KERNEL="fastest")
    assert proc.returncode != 0
    assert "EDGECLOUD_CIM_KERNEL=fastest: unknown CiM kernel" in proc.stderr


@pytest.mark.skipif("avx2" not in kernel.available_paths(), reason="needs an AVX2 CPU and the AVX2 kernel")
def test_hiding_avx512_makes_auto_dispatch_choose_avx2() -> None:
    """What an AVX2-only CPU sees: dispatch runs on the real /proc/cpuinfo with AVX-512 hidden."""
    hidden = "avx512f,avx512bw,avx512vl,avx512dq,avx512_vnni"
    proc = _run(PICKED, EDGECLOUD_CPU_FLAGS_OFF=hidden)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == "avx2"
    forced = _run("from edgecloud.cim.backend import create_backend; create_backend('sram', {'kernel': 'vnni'})",
                  EDGECLOUD_CPU_FLAGS_OFF=hidden)
    assert forced.returncode != 0 and "kernel=vnni: the vnni kernel needs CPU features" in forced.stderr


def test_a_backend_option_that_cannot_run_fails_at_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "cpu_info", lambda: AVX2_ONLY)
    with pytest.raises(ValueError, match="kernel=vnni: the vnni kernel needs CPU features"):
        create_backend("crossbar", {"kernel": "vnni"})


def test_a_missing_build_is_said_once_and_the_torch_path_runs(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernel, "library_file", lambda path: None)
    monkeypatch.setattr(kernel, "_warned", False)
    monkeypatch.delenv(kernel.ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="edgecloud.cim.kernel"):
        first, second = create_backend("crossbar", {}), create_backend("sram", {})
    assert first.kernel is None and second.kernel is None
    warnings = [r.getMessage() for r in caplog.records if "no compiled CiM kernel" in r.getMessage()]
    assert len(warnings) == 1 and "pip install -e ." in warnings[0]
    conv = QuantConv2d(4, 3, 3, padding=1, weight_bits=4, act_bits=4).eval()
    with torch.no_grad():
        xi, (wi, _) = conv.quantize_input(torch.rand(1, 4, 5, 5)), conv.quantize_weight()
        assert torch.equal(first.mvm(conv, xi, wi), conv.integer_mvm(xi, wi))


def test_describe_names_the_cpu_and_the_choice() -> None:
    info = kernel.describe()
    assert info["auto"] == kernel.choose("auto") and info["available"][-1] == "torch"
    assert info["cpu"]["model"] == cpu_info().model and info["cpu"]["cores"] >= 1
    assert set(info["cpu"]["simd"]) <= cpu_info().flags


@pytest.mark.parametrize("path", [p for p in kernel.available_paths() if p != "torch"])
def test_every_compiled_library_is_current_and_is_what_it_says(path: str) -> None:
    lib = kernel.resolve(path)
    assert lib is not None and lib.path == path
    assert lib.lib.kernel_isa().decode() == path
    assert lib.lib.kernel_source_hash().decode() == kernel.source_hash(path), "rebuild: pip install -e ."


def test_subset_sum_layout_holds_every_subset_of_four_rows() -> None:
    w = torch.randint(-127, 128, (6, 5), dtype=torch.int8)
    packed, offsets, jv = kernel.Kernel.pack_weights([w], 2)
    table = packed.view(torch.int16).view(2, 16, 16 * jv)  # 6 rows -> 2 groups (last padded)
    rows = torch.zeros(8, 16 * jv, dtype=torch.int32)
    rows[:6, :5] = w.int()
    for g in range(2):
        for pattern in range(16):
            chosen = [b for b in range(4) if (pattern >> (3 - b)) & 1]
            expected = rows[[4 * g + b for b in chosen]].sum(0) if chosen else torch.zeros(16 * jv, dtype=torch.int32)
            assert torch.equal(table[g, pattern].int(), expected)


def test_the_kernels_command_reports_the_path_and_fails_clearly(capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecloud.cli import main

    monkeypatch.delenv(kernel.ENV, raising=False)
    assert main(["kernels", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["chosen"] == kernel.choose("auto") and info["cpu"]["model"] == cpu_info().model
    monkeypatch.setenv(kernel.ENV, "avx9")
    assert main(["kernels"]) == 2
    assert "EDGECLOUD_CIM_KERNEL=avx9: unknown CiM kernel" in capsys.readouterr().err
