"""Resolve the device and the autocast precision once, and wrap only the forward pass in autocast.

The names (`DEVICES`, `PRECISIONS`) are what the configs check options against; torch is imported by the functions
only, so that a config can be built without it.
"""

from __future__ import annotations

import contextlib

from pipeline.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto"):
    """`auto` picks CUDA, then Apple's MPS, then the CPU (a torch.device); an explicit device that is absent is a
    user error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device (use --device auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but torch sees no MPS device (use --device auto or cpu)")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16, AMX), where oneDNN runs bf16 convolutions ~2x faster."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private check: absent from some builds
        return False


def resolve_precision(name: str, device) -> str:
    """`auto`: bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere (emulated bf16 is slower)."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return "bf16" if native else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is not supported on the CPU (use fp32 or bf16)")
    return name


def autocast(device, precision: str):
    """Autocast context for the forward pass alone; a no-op for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)
