"""Where a training run computes: the CPU (default) or a CUDA GPU when one is lent.

The recipe, seed and data order are the same on either; only the device changes. On CUDA, cuDNN
is pinned to deterministic kernels (no autotuning), so a rerun on the same GPU repeats itself;
CPU and GPU runs agree to rounding, not bit for bit. Model cards name the device a run trained on.
"""

from __future__ import annotations

import torch

from edgecloud.cim.cpu import cpu_info


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``, checked against this machine; a clear error otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: not a device name (use cpu, cuda or cuda:N)") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: training runs on cpu or cuda only")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device here (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False); train on --device cpu")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """What a model card says the run trained on: ``cpu (AMD EPYC ...)`` or ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_info().model})"


def gpu_bf16(requested: str, device: torch.device) -> bool:
    """bfloat16 autocast on a GPU: wherever the recipe asks for it and the GPU computes it."""
    return device.type == "cuda" and requested == "bf16" and torch.cuda.is_bf16_supported()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for one with neither)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


__all__ = ["describe", "gpu_bf16", "module_device", "resolve_device"]
