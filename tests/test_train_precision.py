"""``precision: bf16`` trains in bf16 only where the CPU computes it natively: emulated bf16 on an
AVX2-only CPU is several times slower than float32 (benchmarks/train_precision.py)."""

from __future__ import annotations

import pytest
import torch

from edgecloud.cim.cpu import CpuInfo
from edgecloud.train import perf

AVX2 = CpuInfo("lesser", "x86_64", frozenset({"avx2", "fma", "f16c"}), 2)
SAPPHIRE = CpuInfo("greater", "x86_64", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), 2)
ARM = CpuInfo("arm", "aarch64", frozenset({"asimd", "bf16"}), 2)


@pytest.fixture
def cpu(monkeypatch):
    def use(info: CpuInfo) -> None:
        monkeypatch.setattr(perf, "cpu_info", lambda: info)
    monkeypatch.delenv("EDGECLOUD_BF16", raising=False)
    perf._warn_emulated_bf16.cache_clear()  # the note is printed once per process
    return use


def test_bf16_only_where_native(cpu, capsys) -> None:
    cpu(AVX2)
    assert perf.training_precision("bf16") == "fp32" and not perf.autocast_bf16("bf16")
    assert "no native bfloat16" in capsys.readouterr().err
    for native in (SAPPHIRE, ARM):
        cpu(native)
        assert perf.training_precision("bf16") == "bf16" and perf.autocast_bf16("bf16")
        assert perf.training_precision("fp32") == "fp32"


def test_environment_overrides(cpu, monkeypatch) -> None:
    cpu(AVX2)
    monkeypatch.setenv("EDGECLOUD_BF16", "force")
    assert perf.training_precision("bf16") == "bf16"
    assert perf.training_precision("fp32") == "fp32"  # force never turns an fp32 recipe into bf16
    cpu(SAPPHIRE)
    monkeypatch.setenv("EDGECLOUD_BF16", "off")
    assert perf.training_precision("bf16") == "fp32"
    monkeypatch.setenv("EDGECLOUD_BF16", "yes")
    with pytest.raises(ValueError, match="EDGECLOUD_BF16"):
        perf.training_precision("bf16")


def test_a_bf16_recipe_on_a_cpu_without_it_trains_exactly_as_fp32(cpu, monkeypatch, tmp_path) -> None:
    """Same weights bit for bit as the fp32 recipe; with bf16 forced, different ones (the switch is real)."""
    from test_train_airbench import _recipe, _splits

    from edgecloud.train.loop import run_training

    cpu(AVX2)
    splits = _splits(32)
    runs = {}
    for name, precision, env in (("fp32", "fp32", None), ("bf16", "bf16", None), ("forced", "bf16", "force")):
        if env:
            monkeypatch.setenv("EDGECLOUD_BF16", env)
        r = _recipe(arch={"weight_bits": 4, "act_bits": 4}, optim={"epochs": 1, "precision": precision})
        runs[name] = run_training(r, tmp_path / name, splits=splits, progress=False).model.state_dict()
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(runs["fp32"], runs["bf16"])
    assert not same(runs["fp32"], runs["forced"])
