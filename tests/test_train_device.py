"""``edgecloud train --device``: the CPU path is the default and unchanged; a missing GPU is one
clear error; on a CUDA machine (skipped elsewhere) a run trains there, its checkpoint loads and
resumes on the CPU, and the result names the device."""

from __future__ import annotations

import pytest
import torch

from test_train_airbench import _recipe, _same_state, _splits, _strip_wall

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here (torch.cuda.is_available() is False)")


def test_resolve_device_names_the_problem() -> None:
    from edgecloud.train.device import describe, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert describe(torch.device("cpu")).startswith("cpu (")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="cpu or cuda only"):
        resolve_device("meta")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="no CUDA device here"):
            resolve_device("cuda")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a machine without CUDA gives")
def test_cli_train_on_a_missing_gpu_is_one_error_line(capsys) -> None:
    from edgecloud.cli import main

    assert main(["train", "cifar10-resnet20", "--device", "cuda", "--limit", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device 'cuda'" in err[0] and "no CUDA device" in err[0]


def test_explicit_cpu_device_is_the_default_run(tmp_path) -> None:
    from edgecloud.train.loop import run_training

    splits = _splits()
    recipe = _recipe(optim={"ema": {"decay": 0.7, "every": 2}})
    default = run_training(recipe, tmp_path / "a", splits=splits, progress=False)
    explicit = run_training(recipe, tmp_path / "b", splits=splits, progress=False, device="cpu")
    assert _same_state(default.model.state_dict(), explicit.model.state_dict())
    assert _strip_wall(default.history) == _strip_wall(explicit.history)
    assert explicit.device.startswith("cpu (") and explicit.precision_used == "fp32"


@needs_cuda
def test_cuda_run_trains_resumes_on_cpu_and_names_the_device(tmp_path) -> None:
    from edgecloud.train.loop import load_checkpoint, run_training

    splits = _splits()
    recipe = _recipe(optim={"ema": {"decay": 0.7, "every": 2}, "lookahead": {"k": 3, "alpha": 0.5}, "epochs": 3})
    part = run_training(recipe, tmp_path / "g", splits=splits, progress=False, stop_after=2, device="cuda")
    assert part.device.startswith("cuda:0 (") and next(part.model.parameters()).device.type == "cpu"
    again = run_training(recipe, tmp_path / "g2", splits=splits, progress=False, stop_after=2, device="cuda")
    assert _same_state(part.model.state_dict(), again.model.state_dict())  # deterministic on the GPU
    full = run_training(recipe, tmp_path / "g", splits=splits, progress=False, resume=True, device="cpu")
    assert len(full.history) == 3 and full.history[-1]["val_accuracy"]
    _, loaded, _ = load_checkpoint(tmp_path / "g")
    assert next(loaded.parameters()).device.type == "cpu"
